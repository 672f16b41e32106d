"""Static shape inference over the neutral graph, for the layer kinds classifiers are made of.

A registry maps a Keras class name to a small function ``(config, input_shapes) -> output_shape``.
A layer missing from it yields an unknown shape (None), never a guess; everything downstream
treats unknown shapes as "ask Keras at conversion time".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from convert.errors import ModelFileError
from convert.read.graph import Graph, Node
from convert.read.limits import MAX_TENSOR_ELEMENTS

Shape = tuple[int | None, ...]
ShapeFn = Callable[[dict[str, Any], list[Shape]], Shape | None]

SHAPE_RULES: dict[str, ShapeFn] = {}


def _registry(table: dict[str, Any]) -> Callable[..., Callable[[Any], Any]]:
    """A decorator ``@name("Conv2D", ...)`` that files a function in ``table`` by class name."""

    def by_class(*class_names: str) -> Callable[[Any], Any]:
        def register(fn: Any) -> Any:
            for name in class_names:
                table[name] = fn
            return fn

        return register

    return by_class


rule = _registry(SHAPE_RULES)


def infer_shapes(graph: Graph, recorded: dict[int, Shape] | None = None) -> None:
    """Fill ``Tensor.shape`` for every tensor whose shape follows from its inputs.

    ``recorded`` holds shapes the file itself states (Keras 3 writes the shape of every tensor a
    layer consumes); they win over inference.
    """
    recorded = recorded or {}
    for node in graph.nodes:
        if node.layer.class_name == "InputLayer":
            shape = node.layer.config.get("shape")
            graph.tensors[node.outputs[0]].shape = tuple(shape) if shape else None
            continue
        in_shapes = [graph.tensors[t].shape for t in node.inputs]
        fn = SHAPE_RULES.get(node.layer.class_name)
        out = None
        if fn is not None and in_shapes and all(s is not None for s in in_shapes):
            try:
                out = fn(node.layer.config, in_shapes)
            except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError, OverflowError):
                out = None
        if len(node.outputs) == 1:
            graph.tensors[node.outputs[0]].shape = tuple(out) if out is not None else None
        for tensor in node.outputs:
            if tensor in recorded:
                graph.tensors[tensor].shape = recorded[tensor]
            _bounded(graph, node, graph.tensors[tensor].shape)


def _bounded(graph: Graph, node: Node, shape: Shape | None) -> None:
    """A computed or recorded shape: whole numbers or None, and at most
    :data:`~convert.read.limits.MAX_TENSOR_ELEMENTS` elements."""
    if shape is None:
        return
    if any(d is not None and (not isinstance(d, int) or isinstance(d, bool)) for d in shape):
        raise ModelFileError(
            graph.source,
            f"layer '{node.layer.qualified_name}' gives a tensor of shape {_fmt(shape)}, "
            "whose dimensions are not whole numbers",
        )
    elements = math.prod(d for d in shape if d is not None and d > 0)
    if elements > MAX_TENSOR_ELEMENTS:
        raise ModelFileError(
            graph.source,
            f"layer '{node.layer.qualified_name}' gives a tensor of shape {_fmt(shape)} "
            f"({elements} elements); coreml-split reads at most {MAX_TENSOR_ELEMENTS} "
            "elements per tensor",
        )


def _fmt(shape: Any) -> str:
    """(None, 7, 7, 64) with the batch as None; anything odd as Python writes it."""
    try:
        dims = ["None" if d is None else str(d) for d in shape]
    except TypeError:
        return repr(shape)
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _conv_dim(size: int | None, kernel: int, stride: int, dilation: int, padding: str):
    if size is None:
        return None
    if padding == "same":
        return math.ceil(size / stride)
    effective = (kernel - 1) * dilation + 1
    return (size - effective) // stride + 1


@rule(
    "Activation",
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "Softmax",
    "BatchNormalization",
    "LayerNormalization",
    "Dropout",
    "SpatialDropout2D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Rescaling",
    "Normalization",
    "RandomFlip",
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomContrast",
    "RandomBrightness",
    "ThresholdedReLU",
    "UnitNormalization",
)
def _same(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    return shapes[0]


@rule("Conv2D", "DepthwiseConv2D", "SeparableConv2D")
def _conv2d(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    if config.get("data_format", "channels_last") != "channels_last":
        raise ValueError("channels_first")
    n, h, w, c = shapes[0]
    kh, kw = _pair(config["kernel_size"])
    sh, sw = _pair(config.get("strides", 1))
    dh, dw = _pair(config.get("dilation_rate", 1))
    padding = config.get("padding", "valid")
    if "filters" in config and config.get("filters"):
        channels = config["filters"]
    else:
        channels = None if c is None else c * int(config.get("depth_multiplier", 1))
    return (
        n,
        _conv_dim(h, kh, sh, dh, padding),
        _conv_dim(w, kw, sw, dw, padding),
        channels,
    )


@rule("MaxPooling2D", "AveragePooling2D")
def _pool2d(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    n, h, w, c = shapes[0]
    kh, kw = _pair(config.get("pool_size", 2))
    strides = config.get("strides") or config.get("pool_size", 2)
    sh, sw = _pair(strides)
    padding = config.get("padding", "valid")
    return n, _conv_dim(h, kh, sh, 1, padding), _conv_dim(w, kw, sw, 1, padding), c


@rule("GlobalAveragePooling2D", "GlobalMaxPooling2D")
def _global_pool2d(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    n, _, _, c = shapes[0]
    return (n, 1, 1, c) if config.get("keepdims") else (n, c)


@rule("ZeroPadding2D")
def _zero_pad(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    n, h, w, c = shapes[0]
    pad = config.get("padding", 1)
    if isinstance(pad, int):
        (top, bottom), (left, right) = (pad, pad), (pad, pad)
    elif isinstance(pad[0], int):
        (top, bottom), (left, right) = (pad[0], pad[0]), (pad[1], pad[1])
    else:
        (top, bottom), (left, right) = pad
    return n, None if h is None else h + top + bottom, None if w is None else w + left + right, c


@rule("Cropping2D")
def _crop(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    n, h, w, c = shapes[0]
    (top, bottom), (left, right) = config.get("cropping", ((0, 0), (0, 0)))
    return n, None if h is None else h - top - bottom, None if w is None else w - left - right, c


@rule("Dense")
def _dense(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    return shapes[0][:-1] + (int(config["units"]),)


@rule("Flatten")
def _flatten(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    rest = shapes[0][1:]
    if any(d is None for d in rest):
        return (shapes[0][0], None)
    return (shapes[0][0], math.prod(rest))


@rule("Reshape")
def _reshape(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    target = list(config["target_shape"])
    if -1 in target:
        rest = shapes[0][1:]
        if any(d is None for d in rest):
            raise ValueError("unknown")
        known = math.prod(d for d in target if d != -1)
        target[target.index(-1)] = math.prod(rest) // known
    return (shapes[0][0], *target)


# tf_keras TFOpLambda functions for the four arithmetic operations.
ARITHMETIC_FUNCTIONS = {
    "math.truediv",
    "math.divide",
    "math.subtract",
    "math.multiply",
    "math.add",
    "__operators__.add",
}
# TFOpLambda functions that broadcast elementwise.
ELEMENTWISE_FUNCTIONS = ARITHMETIC_FUNCTIONS | {
    "math.maximum",
    "math.minimum",
    "math.pow",
    "math.sqrt",
    "math.abs",
    "nn.relu",
    "nn.relu6",
    "math.sigmoid",
    "nn.silu",
    "math.tanh",
}


@rule("TFOpLambda")
def _tf_op(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    if config.get("function") not in ELEMENTWISE_FUNCTIONS:
        raise ValueError("not elementwise")
    return _elementwise(config, shapes)


@rule(
    "Add",
    "Subtract",
    "Multiply",
    "Average",
    "Maximum",
    "Minimum",
    "TrueDivide",
    "Divide",
    "Power",
    "Sqrt",
    "Abs",
    "Negative",
)
def _elementwise(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    out = []
    for dims in zip(*padded):
        known = [d for d in dims if d not in (None, 1)]
        out.append(known[0] if known else (None if None in dims else 1))
    return tuple(out)


@rule("Concatenate")
def _concat(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    axis = int(config.get("axis", -1))
    rank = len(shapes[0])
    axis = axis % rank
    total = sum(s[axis] for s in shapes) if all(s[axis] is not None for s in shapes) else None
    out = list(shapes[0])
    out[axis] = total
    return tuple(out)


# -- the weights a layer needs --------------------------------------------------------------------
#
# The builder writes networks from the weights without Keras, so the reader checks what Keras
# would when it loads a file: every weight the configuration implies is there, with the shape the
# configuration and the input imply. Metadata only: no value is read here.


class Need:
    """One weight a layer needs: one of ``names``, of ``shape`` (None: a dimension not known
    from the file), or, with ``size``, of any shape holding that many values."""

    def __init__(self, names: tuple[str, ...], shape: Shape, size: bool = False) -> None:
        self.names, self.shape, self.size = names, shape, size

    def fits(self, got: tuple[int, ...]) -> bool:
        if self.size:
            return self.shape[0] is None or math.prod(got) == self.shape[0]
        return len(got) == len(self.shape) and all(
            want is None or want == have for want, have in zip(self.shape, got)
        )


WeightRule = Callable[[dict[str, Any], Shape | None], list[Need]]
WEIGHT_RULES: dict[str, WeightRule] = {}


weights_rule = _registry(WEIGHT_RULES)


def check_weights(graph: Graph) -> None:
    """Raise :class:`ModelFileError` naming the first layer whose weights are missing or of the
    wrong shape for its configuration and input."""
    for node in graph.nodes:
        layer = node.layer
        fn = WEIGHT_RULES.get(layer.class_name)
        if fn is None or _quantized(layer.config):
            continue
        shape = graph.tensors[node.inputs[0]].shape if len(node.inputs) == 1 else None
        try:
            needs = fn(layer.config, shape)
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError, OverflowError):
            continue  # an odd configuration: the builder says why it cannot take it
        found: dict[str, tuple[int, ...]] = {}
        for weight in layer.weights:
            found.setdefault(weight.name, weight.shape)
        if layer.weights and not found.keys() & {n for need in needs for n in need.names}:
            # None of the names Keras gives these weights (a file not written by Keras): those
            # there are matched in Keras' order; what is missing, Keras says when it loads.
            in_order = layer.weights[: len(needs)]
            found = {w.name: w.shape for w in in_order}
            needs = [Need((w.name,), need.shape, need.size) for w, need in zip(in_order, needs)]
        for need in needs:
            name = next((n for n in need.names if n in found), None)
            if name is None:
                raise ModelFileError(
                    graph.source,
                    f"layer '{layer.qualified_name}' ({layer.class_name}): weight "
                    f"'{need.names[0]}' of shape {_need_text(need)} is missing from the file",
                )
            if not need.fits(found[name]):
                raise ModelFileError(
                    graph.source,
                    f"layer '{layer.qualified_name}' ({layer.class_name}): weight '{name}' has "
                    f"shape {_fmt(found[name])} but the layer needs {_need_text(need)}",
                )


def _need_text(need: Need) -> str:
    if need.size:
        return f"{need.shape[0] if need.shape[0] is not None else '?'} values"
    dims = ["?" if d is None else str(d) for d in need.shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _quantized(config: dict[str, Any]) -> bool:
    """Keras 3 quantized layers store packed kernels (int4: half the rows) and scales."""
    dtype = config.get("dtype")
    if isinstance(dtype, dict) and "quantiz" in str(dtype.get("class_name", "")).lower():
        return True
    return bool(config.get("quantization_config"))


def _channels(shape: Shape | None, config: dict[str, Any]) -> int | None:
    """The input's channels for a 2-D convolution (None if not known)."""
    if shape is None or len(shape) != 4:
        return None
    first = config.get("data_format", "channels_last") == "channels_first"
    c = shape[1] if first else shape[3]
    return c if isinstance(c, int) and c > 0 else None


def _positive(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) <= 0:
        raise ValueError(value)
    return int(value)


def _bias(config: dict[str, Any], size: int | None) -> list[Need]:
    return [Need(("bias",), (size,))] if config.get("use_bias", True) else []


@weights_rule("Conv2D")
def _conv2d_weights(config: dict[str, Any], shape: Shape | None) -> list[Need]:
    kh, kw = _pair(config["kernel_size"])
    filters = _positive(config["filters"])
    groups = _positive(config.get("groups", 1) or 1)
    c = _channels(shape, config)
    per_group = c // groups if c is not None and c % groups == 0 else None
    return [Need(("kernel",), (kh, kw, per_group, filters)), *_bias(config, filters)]


@weights_rule("DepthwiseConv2D")
def _depthwise_weights(config: dict[str, Any], shape: Shape | None) -> list[Need]:
    kh, kw = _pair(config["kernel_size"])
    multiplier = _positive(config.get("depth_multiplier", 1))
    c = _channels(shape, config)
    kernel = Need(("depthwise_kernel", "kernel"), (kh, kw, c, multiplier))
    return [kernel, *_bias(config, None if c is None else c * multiplier)]


@weights_rule("SeparableConv2D")
def _separable_weights(config: dict[str, Any], shape: Shape | None) -> list[Need]:
    kh, kw = _pair(config["kernel_size"])
    multiplier = _positive(config.get("depth_multiplier", 1))
    filters = _positive(config["filters"])
    c = _channels(shape, config)
    middle = None if c is None else c * multiplier
    return [
        Need(("depthwise_kernel",), (kh, kw, c, multiplier)),
        Need(("pointwise_kernel",), (1, 1, middle, filters)),
        *_bias(config, filters),
    ]


@weights_rule("Dense")
def _dense_weights(config: dict[str, Any], shape: Shape | None) -> list[Need]:
    units = _positive(config["units"])
    features = shape[-1] if shape else None
    features = features if isinstance(features, int) and features > 0 else None
    return [Need(("kernel",), (features, units)), *_bias(config, units)]


def _one_axis(config: dict[str, Any], shape: Shape | None) -> tuple[bool, int | None]:
    """(whether the layer normalises one axis, that axis' size if known)."""
    axis = config.get("axis", -1)
    if isinstance(axis, list):
        if len(axis) != 1:
            return False, None
        axis = axis[0]
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(axis)
    if shape is None or not -len(shape) <= axis < len(shape):
        return True, None
    size = shape[axis]
    return True, size if isinstance(size, int) and size > 0 else None


@weights_rule("BatchNormalization")
def _batchnorm_weights(config: dict[str, Any], shape: Shape | None) -> list[Need]:
    one, c = _one_axis(config, shape)
    if not one or config.get("virtual_batch_size"):
        raise ValueError("parameters of another shape")
    wanted = [("gamma", config.get("scale", True)), ("beta", config.get("center", True))]
    names = [n for n, on in wanted if on] + ["moving_mean", "moving_variance"]
    return [Need((n,), (c,)) for n in names]


@weights_rule("Normalization")
def _normalization_weights(config: dict[str, Any], shape: Shape | None) -> list[Need]:
    """Only the simple kind: statistics adapted over the last axis, stored as weights."""
    if config.get("mean") is not None or config.get("variance") is not None:
        return []  # given in the config (EfficientNetV2): no weights
    if config.get("invert") or shape is None:
        raise ValueError("not the simple kind")
    one, c = _one_axis(config, shape)
    axis = config.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) else axis
    if not one or axis % len(shape) != len(shape) - 1:
        raise ValueError("not the last axis")
    return [Need(("mean",), (c,), size=True), Need(("variance",), (c,), size=True)]
