"""Fast heads: a classifier head built straight from the .h5 weights, without TensorFlow.

Most heads are a few Dense layers with activations, maybe a BatchNormalization or a global
pooling. :func:`convert.build.emit.convert_head` traces such a head through TensorFlow and converts it
with ``ct.convert`` (about a second each); here the same NeuralNetworkClassifier is written layer
by layer with coremltools' ``NeuralNetworkBuilder`` from the neutral graph and the weights in the
file, in milliseconds. The result has exactly the interface ``convert_head`` gives (input
``features``, the split tensor's NHWC shape with its batch 1, FLOAT32, N-d array mapping; outputs
``classLabelProbs`` then ``classLabel``), so either can sit behind the backbone stub.

Covered: Dense, BatchNormalization (last axis), Activation / ReLU / LeakyReLU / ELU / Softmax
layers and the activations in :data:`ACTIVATIONS`, GlobalAverage/MaxPooling 1D-3D, Flatten,
Reshape, and the layers that are identities at inference (:data:`IDENTITY_LAYERS`). Anything else
makes :func:`supported` return a reason naming the layer, and the caller converts the head with
``ct.convert`` as before.

As with ``ct.convert`` and a ``ClassifierConfig``, the probabilities are whatever the head's last
layer computes: a softmax if the model ends in one, the raw values otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from convert.build.spec import CLASS_LABEL, CLASS_PROBS, FEATURES, SPEC_VERSION, set_array_shape
from convert.errors import ConversionError
from convert.plan.fingerprint import IDENTITY_AT_INFERENCE
from convert.read.graph import Graph, Layer, Node
from convert.read.h5 import load_weight
from convert.heavy import coremltools

# Layers that compute the identity at inference time (dropouts, noise, augmentation).
IDENTITY_LAYERS = IDENTITY_AT_INFERENCE

# tf.nn.selu / keras.ops.selu
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
FLOAT32_MAX = float(np.finfo(np.float32).max)
_NO_VALUES = np.zeros(0, np.float32)


class _Unsupported(Exception):
    """The head cannot be built directly; ``str()`` says which layer and why."""


def _label(layer: Layer) -> str:
    return f"layer '{layer.qualified_name}' ({layer.class_name})"


def _fail(layer: Layer, why: str) -> _Unsupported:
    return _Unsupported(f"{_label(layer)}: {why}")


# -- the emitter: tracks the current blob and its shape; writes layers when building -----------


class _Emitter:
    """The head being written. With ``builder=None`` it only checks (for :func:`supported`)."""

    def __init__(self, graph: Graph, shape: list[int], builder: Any = None) -> None:
        self.graph = graph
        self.builder = builder
        self.blob = FEATURES
        self.shape = list(shape)  # N-d shape with the leading 1, as Core ML sees the blob
        self.layers = 0
        self._taken = {FEATURES, CLASS_PROBS, CLASS_LABEL}

    @property
    def rank(self) -> int:
        return len(self.shape)

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name

    def add(self, base: str, shape: list[int], write: Callable[[str, str], None]) -> str:
        """One Core ML layer from the current blob; ``write(name, input)`` adds it to the
        builder, its output blob named like the layer. Returns the new blob's name."""
        name = self._unique(base)
        if self.builder is not None:
            write(name, self.blob)
        self.blob = name
        self.shape = list(shape)
        self.layers += 1
        return name

    def weight(self, layer: Layer, name: str) -> np.ndarray:
        found = next(w for w in layer.weights if w.name == name)
        return np.asarray(load_weight(self.graph.source, found), dtype=np.float32)


# -- activations -------------------------------------------------------------------------------


def _act(kind: str, params: Any = None) -> Callable[[_Emitter, str], None]:
    def emit(e: _Emitter, base: str) -> None:
        e.add(
            f"{base}/{kind.lower()}",
            e.shape,
            lambda name, x: e.builder.add_activation(name, kind, x, name, params=params),
        )

    return emit


def _clip(low: float, high: float) -> Callable[[_Emitter, str], None]:
    def emit(e: _Emitter, base: str) -> None:
        e.add(
            f"{base}/clip",
            e.shape,
            lambda name, x: e.builder.add_clip(name, x, name, min_value=low, max_value=high),
        )

    return emit


def _softmax(axis: int = -1) -> Callable[[_Emitter, str], None]:
    def emit(e: _Emitter, base: str) -> None:
        e.add(
            f"{base}/softmax",
            e.shape,
            lambda name, x: e.builder.add_softmax_nd(name, x, name, axis=axis),
        )

    return emit


def _gelu(e: _Emitter, base: str) -> None:
    e.add(f"{base}/gelu", e.shape, lambda name, x: e.builder.add_gelu(name, x, name, "EXACT"))


def _exp(e: _Emitter, base: str) -> None:
    e.add(f"{base}/exp", e.shape, lambda name, x: e.builder.add_unary(name, x, name, "exp"))


def _chain(*steps: Callable[[_Emitter, str], None]) -> Callable[[_Emitter, str], None]:
    def emit(e: _Emitter, base: str) -> None:
        for step in steps:
            step(e, base)

    return emit


def _gated(*gate: Callable[[_Emitter, str], None]) -> Callable[[_Emitter, str], None]:
    """``x * gate(x)`` (swish, mish, hard swish)."""

    def emit(e: _Emitter, base: str) -> None:
        x = e.blob
        for step in gate:
            step(e, base)
        g = e.blob
        e.blob = x
        e.add(
            f"{base}/multiply",
            e.shape,
            lambda name, _x: e.builder.add_multiply_broadcastable(name, [x, g], name),
        )

    return emit


_SIGMOID = _act("SIGMOID")
_SOFTPLUS = _act("SOFTPLUS")

# Keras activation name -> Core ML layers; the hard sigmoid differs between the two Kerases.
ACTIVATIONS: dict[str, Callable[[_Emitter, str], None]] = {
    "relu": _act("RELU"),
    "relu6": _clip(0.0, 6.0),
    "sigmoid": _SIGMOID,
    "tanh": _act("TANH"),
    "softmax": _softmax(-1),
    "elu": _act("ELU", 1.0),
    "selu": _chain(_act("ELU", SELU_ALPHA), _act("LINEAR", [SELU_SCALE, 0.0])),
    "softplus": _SOFTPLUS,
    "softsign": _act("SOFTSIGN"),
    "swish": _gated(_SIGMOID),
    "silu": _gated(_SIGMOID),
    "gelu": _gelu,  # the string means the exact GELU in both Kerases
    "exponential": _exp,
    "mish": _gated(_SOFTPLUS, _act("TANH")),
}
_KERAS3_ONLY: dict[str, Callable[[_Emitter, str], None]] = {
    "leaky_relu": _act("LEAKYRELU", [0.2]),
    "hard_sigmoid": _act("SIGMOID_HARD", [1.0 / 6.0, 0.5]),  # relu6(x + 3) / 6
    "hard_silu": _gated(_act("SIGMOID_HARD", [1.0 / 6.0, 0.5])),
    "hard_swish": _gated(_act("SIGMOID_HARD", [1.0 / 6.0, 0.5])),
}
_KERAS2_ONLY: dict[str, Callable[[_Emitter, str], None]] = {
    "hard_sigmoid": _act("SIGMOID_HARD", [0.2, 0.5]),  # clip(0.2 x + 0.5, 0, 1)
}


def _activation_name(layer: Layer, value: Any) -> str:
    if value is None:
        return "linear"
    if isinstance(value, dict):  # Keras 3 may serialise a built-in as a "function" object
        module = str(value.get("module") or "")
        if value.get("class_name") == "function" and module.startswith("keras"):
            value = value.get("config")
        if not isinstance(value, str):
            raise _fail(layer, "a custom activation")
    return str(value)


def _activation(e: _Emitter, layer: Layer, value: Any, base: str) -> None:
    name = _activation_name(layer, value)
    if name == "linear":
        return
    table = {**ACTIVATIONS, **(_KERAS3_ONLY if e.graph.keras_major >= 3 else _KERAS2_ONLY)}
    if name not in table:
        raise _fail(layer, f"activation '{name}' is not covered")
    table[name](e, base)


# -- layers ------------------------------------------------------------------------------------


def _weights(layer: Layer, required: set[str], optional: set[str]) -> dict[str, Any]:
    found = {w.name: w for w in layer.weights}
    extra = sorted(set(found) - required - optional)
    if extra:
        raise _fail(layer, f"unexpected weights {', '.join(extra)}")
    missing = sorted(required - set(found))
    if missing:
        raise _fail(layer, f"missing weights {', '.join(missing)}")
    return found


def _dense(e: _Emitter, layer: Layer) -> None:
    weights = _weights(layer, {"kernel"}, {"bias"})
    kernel = weights["kernel"]
    if len(kernel.shape) != 2 or kernel.shape[0] != e.shape[-1]:
        raise _fail(layer, f"kernel {list(kernel.shape)} does not fit input {e.shape}")
    n_in, n_out = kernel.shape
    bias = "bias" in weights
    if bias and tuple(weights["bias"].shape) != (n_out,):
        raise _fail(layer, f"bias {list(weights['bias'].shape)} does not fit {n_out} units")
    _activation_name(layer, layer.config.get("activation"))  # a custom one fails early
    base = layer.name
    shape = [*e.shape[:-1], n_out]
    if e.rank == 2:

        def write(name: str, x: str) -> None:
            b = e.weight(layer, "bias") if bias else None
            added = e.builder.add_inner_product(name, _NO_VALUES, b, n_in, n_out, bias, x, name)
            # Keras [in, out]; Core ML [out, in]. Filled here from a list: protobuf takes one
            # about 4x faster than the numpy array the builder would pass it.
            w = e.weight(layer, "kernel").T
            added.innerProduct.weights.floatValue.extend(w.ravel().tolist())

    elif e.rank <= 5:  # Dense acts on the last axis; innerProduct would flatten C, H, W

        def write(name: str, x: str) -> None:
            e.builder.add_batched_mat_mul(
                name,
                [x],
                name,
                weight_matrix_rows=n_in,
                weight_matrix_columns=n_out,
                W=e.weight(layer, "kernel"),
                bias=e.weight(layer, "bias") if bias else None,
            )

    else:
        raise _fail(layer, f"input rank {e.rank}")
    e.add(base, shape, write)
    _activation(e, layer, layer.config.get("activation"), base)


def _activation_layer(e: _Emitter, layer: Layer) -> None:
    _activation(e, layer, layer.config.get("activation"), layer.name)


def _relu_layer(e: _Emitter, layer: Layer) -> None:
    cfg = layer.config
    slope = float(cfg.get("negative_slope") or 0.0)
    top = cfg.get("max_value")
    if float(cfg.get("threshold") or 0.0) != 0.0:
        raise _fail(layer, "a threshold is not covered")
    base = layer.name
    if slope == 0.0:
        if top is None:
            _act("RELU")(e, base)
        else:
            _clip(0.0, float(top))(e, base)
        return
    _act("LEAKYRELU", [slope])(e, base)
    if top is not None:
        _clip(-FLOAT32_MAX, float(top))(e, base)


def _leaky_relu_layer(e: _Emitter, layer: Layer) -> None:
    cfg = layer.config
    slope = cfg.get("negative_slope", cfg.get("alpha", 0.3))
    _act("LEAKYRELU", [float(slope)])(e, layer.name)


def _elu_layer(e: _Emitter, layer: Layer) -> None:
    _act("ELU", float(layer.config.get("alpha", 1.0)))(e, layer.name)


def _softmax_layer(e: _Emitter, layer: Layer) -> None:
    axis = layer.config.get("axis", -1)
    if isinstance(axis, list) and len(axis) == 1:
        axis = axis[0]
    if not isinstance(axis, int) or not -e.rank <= axis < e.rank:
        raise _fail(layer, f"softmax axis {axis} for rank {e.rank}")
    _softmax(axis - e.rank if axis >= 0 else axis)(e, layer.name)


def _channels_last(layer: Layer) -> None:
    fmt = layer.config.get("data_format") or "channels_last"
    if fmt != "channels_last":
        raise _fail(layer, f"data_format {fmt}")


def _global_pooling(e: _Emitter, layer: Layer) -> None:
    _channels_last(layer)
    rank = {"1D": 3, "2D": 4, "3D": 5}[layer.class_name[-2:]]
    if e.rank != rank:
        raise _fail(layer, f"input rank {e.rank}, expected {rank}")
    keep = bool(layer.config.get("keepdims", False))
    axes = list(range(1, rank - 1))
    shape = [1, *([1] * len(axes)), e.shape[-1]] if keep else [1, e.shape[-1]]
    mean = layer.class_name.startswith("GlobalAverage")
    kind = "reduce_mean" if mean else "reduce_max"

    def write(name: str, x: str) -> None:
        add = e.builder.add_reduce_mean if mean else e.builder.add_reduce_max
        add(name, x, name, axes=axes, keepdims=keep, reduce_all=False)

    e.add(f"{layer.name}/{kind}", shape, write)


def _reshape_to(e: _Emitter, layer: Layer, shape: list[int]) -> None:
    if shape == e.shape:
        return
    if len(shape) > 5:
        raise _fail(layer, f"output rank {len(shape)}")
    e.add(
        f"{layer.name}/reshape",
        shape,
        lambda name, x: e.builder.add_reshape_static(name, x, name, shape),
    )


def _flatten(e: _Emitter, layer: Layer) -> None:
    if e.rank > 2:
        _channels_last(layer)
    _reshape_to(e, layer, [1, math.prod(e.shape[1:])])


def reshape_target(layer: Layer, shape: list[int]) -> list[int]:
    """A Reshape layer's target shape (without the batch) for an input of ``shape`` (without
    the batch, Keras order), its -1 resolved; raises _Unsupported if it does not fit."""
    target = layer.config.get("target_shape")
    if not isinstance(target, list) or not all(isinstance(d, int) for d in target):
        raise _fail(layer, f"target shape {target}")
    size = math.prod(shape)
    if target.count(-1) > 1 or any(d == 0 or d < -1 for d in target):
        raise _fail(layer, f"target shape {target}")
    known = math.prod(d for d in target if d != -1)
    if -1 in target:
        if size % known:
            raise _fail(layer, f"cannot reshape {shape} to {target}")
        target = [size // known if d == -1 else d for d in target]
    if math.prod(target) != size:
        raise _fail(layer, f"cannot reshape {shape} to {target}")
    return target


def _reshape(e: _Emitter, layer: Layer) -> None:
    _reshape_to(e, layer, [1, *reshape_target(layer, e.shape[1:])])


def _batchnorm(e: _Emitter, layer: Layer) -> None:
    cfg = layer.config
    axis = cfg.get("axis", -1)
    if isinstance(axis, list):
        if len(axis) != 1:
            raise _fail(layer, f"axis {axis}")
        axis = axis[0]
    if not isinstance(axis, int) or axis % e.rank != e.rank - 1:
        raise _fail(layer, f"axis {axis} is not the last axis of rank {e.rank}")
    for key in ("renorm", "virtual_batch_size", "adjustment", "synchronized"):
        if cfg.get(key):
            raise _fail(layer, f"{key} is not covered")
    optional = {name for name, on in (("gamma", "scale"), ("beta", "center")) if cfg.get(on, True)}
    weights = _weights(layer, {"moving_mean", "moving_variance"}, optional)
    c = e.shape[-1]
    for w in weights.values():
        if tuple(w.shape) != (c,):
            raise _fail(layer, f"{w.name} {list(w.shape)} does not fit {c} channels")
    eps = float(cfg.get("epsilon", 1e-3))
    if eps <= 0.0:  # Core ML reads an epsilon of 0 as its default 1e-5
        eps = float(np.finfo(np.float32).tiny)
    if e.rank not in (2, 3, 4):
        raise _fail(layer, f"input rank {e.rank}")
    base = layer.name
    shape = list(e.shape)
    # Core ML normalises axis -3 of a rank >= 3 blob: move the channels there and back.
    nhwc = e.rank == 4
    extra = [e.rank, e.rank + 1]
    if nhwc:
        e.add(
            f"{base}/to_nchw",
            [shape[0], shape[3], shape[1], shape[2]],
            lambda name, x: e.builder.add_transpose(name, [0, 3, 1, 2], x, name),
        )
    else:
        e.add(
            f"{base}/expand",
            [*shape, 1, 1],
            lambda name, x: e.builder.add_expand_dims(name, x, name, axes=extra),
        )

    def write(name: str, x: str) -> None:
        ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
        e.builder.add_batchnorm(
            name,
            c,
            e.weight(layer, "gamma") if "gamma" in weights else ones,
            e.weight(layer, "beta") if "beta" in weights else zeros,
            mean=e.weight(layer, "moving_mean"),
            variance=e.weight(layer, "moving_variance"),
            input_name=x,
            output_name=name,
            epsilon=eps,
        )

    e.add(base, e.shape, write)
    if nhwc:
        e.add(
            f"{base}/to_nhwc",
            shape,
            lambda name, x: e.builder.add_transpose(name, [0, 2, 3, 1], x, name),
        )
    else:
        e.add(
            f"{base}/squeeze",
            shape,
            lambda name, x: e.builder.add_squeeze(name, x, name, axes=extra),
        )


def _identity(e: _Emitter, layer: Layer) -> None:
    return None


HANDLERS: dict[str, Callable[[_Emitter, Layer], None]] = {
    "Dense": _dense,
    "Activation": _activation_layer,
    "ReLU": _relu_layer,
    "LeakyReLU": _leaky_relu_layer,
    "ELU": _elu_layer,
    "Softmax": _softmax_layer,
    "BatchNormalization": _batchnorm,
    "GlobalAveragePooling1D": _global_pooling,
    "GlobalAveragePooling2D": _global_pooling,
    "GlobalAveragePooling3D": _global_pooling,
    "GlobalMaxPooling1D": _global_pooling,
    "GlobalMaxPooling2D": _global_pooling,
    "GlobalMaxPooling3D": _global_pooling,
    "Flatten": _flatten,
    "Reshape": _reshape,
    **dict.fromkeys(IDENTITY_LAYERS, _identity),
}


# -- the head ----------------------------------------------------------------------------------


def _head_nodes(graph: Graph, split: int, output: int) -> list[Node]:
    needed = graph.ancestors([output])
    if split not in graph.inputs:
        needed -= graph.ancestors([split])
    return [graph.nodes[i] for i in sorted(needed)]


def _static_shape(graph: Graph, tensor: int) -> list[int] | None:
    shape = graph.tensors[tensor].shape
    if shape is None or any(d is None for d in shape[1:]):
        return None
    return [1, *[int(d) for d in shape[1:]]]


def _translate(e: _Emitter, graph: Graph, split: int, output: int) -> None:
    """Walk the head from the split tensor to ``output``; raises _Unsupported."""
    current = split
    for node in _head_nodes(graph, split, output):
        layer = node.layer
        handler = HANDLERS.get(layer.class_name)
        if handler is None:
            raise _Unsupported(f"{_label(layer)} is not covered by fast heads")
        if "trainable" not in layer.config and "dtype" not in layer.config:
            # a Keras 3 keras.ops call (e.g. keras.ops.softmax) that shares a layer's name
            raise _Unsupported(f"{_label(layer)} is a keras.ops call, not a layer")
        if node.inputs != [current] or len(node.outputs) != 1:
            raise _Unsupported(f"{_label(layer)} is not part of a single chain of layers")
        handler(e, layer)
        current = node.outputs[0]
        expected = graph.tensors[current].shape
        if expected is not None and (
            len(expected) != e.rank
            or any(d is not None and d != s for d, s in zip(expected[1:], e.shape[1:]))
        ):
            raise _Unsupported(
                f"{_label(layer)}: computed shape {e.shape[1:]} but the file says "
                f"{list(expected[1:])}"
            )
    if current != output:
        raise _Unsupported("the output does not follow from the split tensor by one chain")
    if e.rank != 2:
        raise _Unsupported(f"the head's output has shape {e.shape}, not [1, classes]")


def supported(graph: Graph, split_tensor: int, output_tensor: int) -> str | None:
    """None if the head (nodes between split tensor and output) can be built directly; else
    the reason (layer name + class) it cannot."""
    shape = _static_shape(graph, split_tensor)
    if shape is None:
        return "the split tensor's shape is not static"
    try:
        _translate(_Emitter(graph, shape), graph, split_tensor, output_tensor)
    except _Unsupported as exc:
        return str(exc)
    return None


def build_head(graph: Graph, split_tensor: int, labels: list[str], feature_shape: list[int]) -> Any:
    """NeuralNetworkClassifier spec: input FEATURES (multiArray FLOAT32, ``feature_shape`` with
    its batch 1, e.g. [1, 1280] or [1, 7, 7, 1280] NHWC), outputs CLASS_PROBS (dict string ->
    double) and CLASS_LABEL (string): the interface :func:`convert.build.emit.convert_head` gives.

    Raises :class:`ConversionError` if the head is not :func:`supported` or the labels do not
    match its width."""
    coremltools()
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    shape = [int(d) for d in feature_shape]
    builder = NeuralNetworkBuilder(
        input_features=[(FEATURES, datatypes.Array(*shape))],
        output_features=[(CLASS_PROBS, None)],
        mode="classifier",
        disable_rank5_shape_mapping=True,
        use_float_arraytype=True,
    )
    e = _Emitter(graph, shape, builder)
    try:
        _translate(e, graph, split_tensor, graph.outputs[0])
    except _Unsupported as exc:
        raise ConversionError(graph.source, f"cannot build the head directly: {exc}") from None
    if e.shape[-1] != len(labels):
        raise ConversionError(
            graph.source, f"{len(labels)} labels for a head of {e.shape[-1]} outputs"
        )
    if e.layers == 0:  # only identities: Core ML needs a layer
        e.add(
            "identity",
            e.shape,
            lambda name, x: builder.add_activation(name, "LINEAR", x, name, params=[1.0, 0.0]),
        )
    nn = builder.nn_spec
    nn.layers[-1].output[0] = CLASS_PROBS
    builder.set_class_labels(
        [str(label) for label in labels],
        predicted_feature_name=CLASS_LABEL,
        prediction_blob=CLASS_PROBS,
    )
    spec = builder.spec
    set_array_shape(spec.description.input[0], shape)
    spec.specificationVersion = max(spec.specificationVersion, SPEC_VERSION)
    return spec
