"""Direct backbones: the shared backbone built straight from the .h5 weights, without TensorFlow.

:func:`convert.build.emit.convert_backbone` loads the Keras model, traces the backbone through
TensorFlow and converts it with ``ct.convert``: about 4 s for a MobileNetV2 on a laptop-class CPU,
most of it fixed cost. The layers frozen backbones are made of (convolutions, batch norms,
activations, residual adds, concatenations, pooling, padding, rescaling) map one to one onto Core
ML NeuralNetwork layers, so here the same network is written layer by layer from the neutral
graph and the weights in the file, in a fraction of that time.

The result has exactly the interface ``convert_backbone`` gives: input ``image`` (an image of the
model's input size, with the preprocessing in Core ML's image scaler, plus a per-channel scale
layer for a ``std``), output ``features`` (FLOAT32 multi-array, the split tensor's NHWC shape with
its batch 1). Inside, rank-4 tensors are kept in Core ML's NCHW order, so a convolution needs no
transposes; the only transpose is the one back to NHWC at the end. A BatchNormalization that
follows a convolution is folded into the convolution's weights (in float64), as ``ct.convert``'s
passes do.

Anything not covered makes :func:`supported` return the reason, naming the layer, and the caller
converts the backbone with ``ct.convert`` as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from convert.build import fast_head
from convert.build.spec import CLASS_LABEL, CLASS_PROBS, FEATURES, IMAGE, SPEC_VERSION, set_array_shape
from convert.errors import ConversionError
from convert.read.families import Preprocessing
from convert.build.fast_head import (
    _activation,
    _channels_last,
    _fail,
    _label,
    _Unsupported,
    _weights,
)
from convert.read.graph import Graph, Layer, Node
from convert.heavy import coremltools

KERAS_EPSILON = 1e-7  # keras.backend.epsilon(), the floor of Normalization's std


class _Blob:
    """A Keras tensor as Core ML holds it: rank 4 as NCHW, rank 2 as it is."""

    def __init__(self, name: str, shape: list[int]) -> None:
        self.name = name
        self.shape = list(shape)  # Core ML order, batch 1 first

    @property
    def nchw(self) -> bool:
        return len(self.shape) == 4

    def keras_shape(self) -> list[int]:
        if self.nchw:
            n, c, h, w = self.shape
            return [n, h, w, c]
        return list(self.shape)


class _Emitter(fast_head._Emitter):
    """Writes layers into a builder (or, with ``builder=None``, only checks them). ``blob`` and
    ``shape`` are the current tensor, as in a fast head; the backbone is a graph, so they are set
    from :attr:`blobs` before each node and read back after it."""

    def __init__(self, graph: Graph, builder: Any = None) -> None:
        super().__init__(graph, [1], builder)
        self._taken.add(IMAGE)
        self.blobs: dict[int, _Blob] = {}
        self.folded: set[int] = set()  # BatchNormalization nodes folded into a convolution

    def use(self, blob: _Blob) -> None:
        self.blob, self.shape = blob.name, list(blob.shape)

    def current(self) -> _Blob:
        return _Blob(self.blob, self.shape)

    def merge(self, base: str, inputs: list[_Blob], shape: list[int], write: Callable) -> _Blob:
        """A layer with several inputs; ``write(name, input_names)``."""
        name = self._unique(base)
        if self.builder is not None:
            write(name, [b.name for b in inputs])
        self.layers += 1
        self.use(_Blob(name, shape))
        return self.current()

    def raw_layer(self, base: str, shape: list[int], fill: Callable[[Any], None]) -> None:
        """A layer written straight into the protobuf; ``fill(layer)`` sets its parameters.
        Used for weight-heavy layers: protobuf takes a list of floats much faster than the
        numpy array the builder would pass it."""

        def write(name: str, x: str) -> None:
            layer = self.builder.nn_spec.layers.add()
            layer.name = name
            layer.input.append(x)
            layer.output.append(name)
            fill(layer)

        self.add(base, shape, write)


def _floats(values: np.ndarray) -> list[float]:
    return np.asarray(values, dtype=np.float32).ravel().tolist()


# -- configuration helpers --------------------------------------------------------------------


def _pair(layer: Layer, key: str, default: int) -> tuple[int, int]:
    value = layer.config.get(key, default)
    if isinstance(value, int):
        return value, value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise _fail(layer, f"{key} {value}")


def _need_nchw(layer: Layer, blob: _Blob) -> None:
    if not blob.nchw:
        raise _fail(layer, f"input of rank {len(blob.shape)}, expected an image-like rank 4")


def _pads(
    layer: Layer, hw: list[int], kernel: tuple[int, int], stride, dilation=(1, 1)
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) as TensorFlow pads for ``padding``: none for valid; for same,
    the output is ceil(size / stride) and the odd pixel goes to the bottom / right."""
    padding = str(layer.config.get("padding", "valid")).lower()
    if padding == "valid":
        return 0, 0, 0, 0
    if padding != "same":
        raise _fail(layer, f"padding '{padding}'")
    out = []
    for size, k, s, d in zip(hw, kernel, stride, dilation):
        span = (k - 1) * d + 1
        total = max((-(-size // s) - 1) * s + span - size, 0)
        out.extend([total // 2, total - total // 2])
    return out[0], out[1], out[2], out[3]


def _out_hw(hw: list[int], pads, kernel, stride, dilation=(1, 1)) -> list[int]:
    sizes = []
    for i, (size, k, s, d) in enumerate(zip(hw, kernel, stride, dilation)):
        span = (k - 1) * d + 1
        padded = size + pads[2 * i] + pads[2 * i + 1]
        if padded < span:
            raise _Unsupported(f"kernel {span} wider than the padded input {padded}")
        sizes.append((padded - span) // s + 1)
    return sizes


# -- convolutions (with a following BatchNormalization folded in) -----------------------------


class _Conv:
    """One Core ML convolution: weights [out, in / groups, kh, kw] and a bias, both float64
    until written so that folding a batch norm into them loses nothing."""

    def __init__(self, weights, bias, groups, kernel, stride, dilation, pads) -> None:
        self.weights, self.bias, self.groups = weights, bias, groups
        self.kernel, self.stride, self.dilation, self.pads = kernel, stride, dilation, pads

    def fold(self, scale: np.ndarray, shift: np.ndarray) -> None:
        """y -> y * scale + shift, per output channel."""
        self.weights = self.weights * scale[:, None, None, None]
        bias = self.bias if self.bias is not None else np.zeros_like(scale)
        self.bias = bias * scale + shift

    def emit(self, e: _Emitter, base: str, blob: _Blob) -> _Blob:
        out_c, in_per_group, kh, kw = self.weights.shape
        hw = _out_hw(blob.shape[2:], self.pads, self.kernel, self.stride, self.dilation)
        shape = [1, out_c, *hw]

        def fill(layer: Any) -> None:
            conv = layer.convolution
            conv.outputChannels = out_c
            conv.kernelChannels = in_per_group
            conv.nGroups = self.groups
            conv.kernelSize.extend([kh, kw])
            conv.stride.extend(self.stride)
            conv.dilationFactor.extend(self.dilation)
            top, bottom, left, right = self.pads
            for start, end in ((top, bottom), (left, right)):
                border = conv.valid.paddingAmounts.borderAmounts.add()
                border.startEdgeSize, border.endEdgeSize = start, end
            conv.weights.floatValue.extend(_floats(self.weights))
            conv.hasBias = self.bias is not None
            if self.bias is not None:
                conv.bias.floatValue.extend(_floats(self.bias))

        e.raw_layer(base, shape, fill)
        return e.current()


def _load(e: _Emitter, layer: Layer, name: str) -> np.ndarray:
    return np.asarray(e.weight(layer, name), dtype=np.float64)


def _conv2d(e: _Emitter, layer: Layer, blob: _Blob) -> _Conv:
    _channels_last(layer)
    _need_nchw(layer, blob)
    w = _weights(layer, {"kernel"}, {"bias"})
    kh, kw, cin_g, cout = w["kernel"].shape
    groups = int(layer.config.get("groups", 1) or 1)
    if cin_g * groups != blob.shape[1] or cout % groups:
        raise _fail(
            layer, f"kernel {list(w['kernel'].shape)} does not fit {blob.shape[1]} channels"
        )
    stride, dilation = _pair(layer, "strides", 1), _pair(layer, "dilation_rate", 1)
    if dilation != (1, 1) and stride != (1, 1):
        raise _fail(layer, "strides and dilation together")
    pads = _pads(layer, blob.shape[2:], (kh, kw), stride, dilation)
    if e.builder is None:
        return _Conv(
            np.zeros((cout, cin_g, kh, kw)), None, groups, (kh, kw), stride, dilation, pads
        )
    weights = _load(e, layer, "kernel").transpose(3, 2, 0, 1)
    bias = _load(e, layer, "bias") if "bias" in w else None
    return _Conv(weights, bias, groups, (kh, kw), stride, dilation, pads)


def _depthwise(e: _Emitter, layer: Layer, blob: _Blob, name: str, bias_name: str | None) -> _Conv:
    """Depthwise kernel [kh, kw, C, m] -> Core ML [C * m, 1, kh, kw], groups C: output channel
    c * m + k reads input channel c, as in TensorFlow."""
    kh, kw, c, m = next(w for w in layer.weights if w.name == name).shape
    if c != blob.shape[1]:
        raise _fail(layer, f"depthwise kernel for {c} channels, input has {blob.shape[1]}")
    stride, dilation = _pair(layer, "strides", 1), _pair(layer, "dilation_rate", 1)
    if dilation != (1, 1) and stride != (1, 1):
        raise _fail(layer, "strides and dilation together")
    pads = _pads(layer, blob.shape[2:], (kh, kw), stride, dilation)
    if e.builder is None:
        return _Conv(np.zeros((c * m, 1, kh, kw)), None, c, (kh, kw), stride, dilation, pads)
    weights = _load(e, layer, name).reshape(kh, kw, c * m).transpose(2, 0, 1)[:, None]
    bias = _load(e, layer, bias_name) if bias_name else None
    return _Conv(weights, bias, c, (kh, kw), stride, dilation, pads)


def _depthwise_conv2d(e: _Emitter, layer: Layer, blob: _Blob) -> _Conv:
    _channels_last(layer)
    _need_nchw(layer, blob)
    kernel = (
        "depthwise_kernel" if any(w.name == "depthwise_kernel" for w in layer.weights) else "kernel"
    )
    w = _weights(layer, {kernel}, {"bias"})
    return _depthwise(e, layer, blob, kernel, "bias" if "bias" in w else None)


def _separable_conv2d(e: _Emitter, layer: Layer, blob: _Blob) -> _Conv:
    """Depthwise (written here, without bias) then pointwise (returned, to take the bias and
    any batch norm that follows)."""
    _channels_last(layer)
    _need_nchw(layer, blob)
    w = _weights(layer, {"depthwise_kernel", "pointwise_kernel"}, {"bias"})
    depthwise = _depthwise(e, layer, blob, "depthwise_kernel", None)
    blob = depthwise.emit(e, f"{layer.name}/depthwise", blob)
    _, _, cin, cout = w["pointwise_kernel"].shape
    if cin != blob.shape[1]:
        raise _fail(layer, f"pointwise kernel for {cin} channels, depthwise gives {blob.shape[1]}")
    ones = (1, 1)
    if e.builder is None:
        return _Conv(np.zeros((cout, cin, 1, 1)), None, 1, ones, ones, ones, (0, 0, 0, 0))
    weights = _load(e, layer, "pointwise_kernel").transpose(3, 2, 0, 1)
    bias = _load(e, layer, "bias") if "bias" in w else None
    return _Conv(weights, bias, 1, ones, ones, ones, (0, 0, 0, 0))


CONVOLUTIONS: dict[str, Callable[[_Emitter, Layer, _Blob], _Conv]] = {
    "Conv2D": _conv2d,
    "DepthwiseConv2D": _depthwise_conv2d,
    "SeparableConv2D": _separable_conv2d,
}


def _batchnorm_axis_ok(layer: Layer, rank: int) -> bool:
    axis = layer.config.get("axis", -1)
    if isinstance(axis, list):
        if len(axis) != 1:
            return False
        axis = axis[0]
    return isinstance(axis, int) and axis % rank == rank - 1


def _batchnorm_affine(e: _Emitter, layer: Layer, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel such that BN(x) = x * scale + shift, in float64."""
    cfg = layer.config
    for key in ("renorm", "virtual_batch_size", "adjustment", "synchronized"):
        if cfg.get(key):
            raise _fail(layer, f"{key} is not covered")
    optional = {n for n, on in (("gamma", "scale"), ("beta", "center")) if cfg.get(on, True)}
    found = _weights(layer, {"moving_mean", "moving_variance"}, optional)
    for w in found.values():
        if tuple(w.shape) != (channels,):
            raise _fail(layer, f"{w.name} {list(w.shape)} does not fit {channels} channels")
    if e.builder is None:
        return np.ones(channels), np.zeros(channels)
    eps = float(cfg.get("epsilon", 1e-3))
    gamma = _load(e, layer, "gamma") if "gamma" in found else np.ones(channels)
    beta = _load(e, layer, "beta") if "beta" in found else np.zeros(channels)
    scale = gamma / np.sqrt(_load(e, layer, "moving_variance") + eps)
    return scale, beta - _load(e, layer, "moving_mean") * scale


def _convolution(
    e: _Emitter, node: Node, blob: _Blob, consumers: dict[int, list[int]], output: int
) -> _Blob:
    layer = node.layer
    conv = CONVOLUTIONS[layer.class_name](e, layer, blob)
    blob = e.current()  # a separable convolution has written its depthwise half
    activation = fast_head._activation_name(layer, layer.config.get("activation"))
    out = node.outputs[0]
    readers = consumers.get(out, [])
    if activation == "linear" and out != output and len(readers) == 1:
        bn = e.graph.nodes[readers[0]]
        if (
            bn.layer.class_name == "BatchNormalization"
            and bn.inputs == [out]
            and _batchnorm_axis_ok(bn.layer, 4)
        ):
            conv.fold(*_batchnorm_affine(e, bn.layer, conv.weights.shape[0]))
            e.folded.add(bn.index)
            blob = conv.emit(e, layer.name, blob)
            e.blobs[bn.outputs[0]] = blob
            return blob
    blob = conv.emit(e, layer.name, blob)
    _no_channel_softmax(layer, blob, layer.config.get("activation"))
    _activation(e, layer, layer.config.get("activation"), layer.name)
    return e.current()


# -- other layers -----------------------------------------------------------------------------


def _batchnorm(e: _Emitter, layer: Layer, blob: _Blob) -> _Blob:
    if not blob.nchw:
        fast_head._batchnorm(e, layer)
        return e.current()
    if not _batchnorm_axis_ok(layer, 4):
        raise _fail(layer, "normalises an axis other than the channels")
    c = blob.shape[1]
    scale, shift = _batchnorm_affine(e, layer, c)

    def write(name: str, x: str) -> None:
        e.builder.add_scale(
            name,
            _as32(scale),
            _as32(shift),
            True,
            x,
            name,
            shape_scale=[c, 1, 1],
            shape_bias=[c, 1, 1],
        )

    e.add(layer.name, blob.shape, write)
    return e.current()


def _as32(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _no_channel_softmax(layer: Layer, blob: _Blob, value: Any) -> None:
    """A softmax runs over the last Keras axis, which NCHW does not keep last."""
    if blob.nchw and fast_head._activation_name(layer, value) == "softmax":
        raise _fail(layer, "a softmax over the channels of an image-like tensor")


def _elementwise_layer(e: _Emitter, layer: Layer, blob: _Blob) -> _Blob:
    """Activations and the other one-input layers fast heads already cover, on any layout."""
    _no_channel_softmax(layer, blob, layer.config.get("activation"))
    handler = fast_head.HANDLERS[layer.class_name]
    handler(e, layer)
    return e.current()


def _edges(layer: Layer, key: str, default: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of ZeroPadding2D's ``padding`` / Cropping2D's ``cropping``:
    one int, one per axis, or a pair per axis."""
    _channels_last(layer)
    value = layer.config.get(key, default)
    if isinstance(value, int):
        return value, value, value, value
    if len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[0], value[1], value[1]
    if len(value) == 2 and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
        (top, bottom), (left, right) = value
        return top, bottom, left, right
    raise _fail(layer, f"{key} {value}")


def _zero_padding(e: _Emitter, layer: Layer, blob: _Blob) -> _Blob:
    _need_nchw(layer, blob)
    top, bottom, left, right = _edges(layer, "padding", 1)
    n, c, h, w = blob.shape
    shape = [n, c, h + top + bottom, w + left + right]
    e.add(
        layer.name,
        shape,
        lambda name, x: e.builder.add_padding(name, left, right, top, bottom, 0.0, x, name),
    )
    return e.current()


def _cropping(e: _Emitter, layer: Layer, blob: _Blob) -> _Blob:
    _need_nchw(layer, blob)
    top, bottom, left, right = _edges(layer, "cropping", 0)
    n, c, h, w = blob.shape
    if top + bottom >= h or left + right >= w:
        raise _fail(layer, f"cropping {layer.config.get('cropping')} leaves nothing of {h}x{w}")
    begin, end = [0, 0, top, left], [n, c, h - bottom, w - right]
    e.add(
        layer.name,
        [n, c, h - top - bottom, w - left - right],
        lambda name, x: e.builder.add_slice_static(
            name, x, name, begin, end, [1, 1, 1, 1], [False] * 4, [False] * 4
        ),
    )
    return e.current()


def _pooling(e: _Emitter, layer: Layer, blob: _Blob) -> _Blob:
    _channels_last(layer)
    _need_nchw(layer, blob)
    kernel = _pair(layer, "pool_size", 2)
    stride = layer.config.get("strides")
    stride = kernel if stride is None else _pair(layer, "strides", 2)
    pads = _pads(layer, blob.shape[2:], kernel, stride)
    shape = [*blob.shape[:2], *_out_hw(blob.shape[2:], pads, kernel, stride)]
    same = str(layer.config.get("padding", "valid")).lower() == "same"
    kind = "MAX" if layer.class_name.startswith("Max") else "AVERAGE"

    def write(name: str, x: str) -> None:
        e.builder.add_pooling(
            name,
            kernel[0],
            kernel[1],
            stride[0],
            stride[1],
            kind,
            "SAME" if same else "VALID",
            x,
            name,
            exclude_pad_area=True,  # TensorFlow averages over real pixels only
        )

    e.add(layer.name, shape, write)
    return e.current()


def _global_pooling(e: _Emitter, layer: Layer, blob: _Blob) -> _Blob:
    _channels_last(layer)
    _need_nchw(layer, blob)
    keep = bool(layer.config.get("keepdims", False))
    n, c = blob.shape[:2]
    shape = [n, c, 1, 1] if keep else [n, c]
    mean = layer.class_name.startswith("GlobalAverage")

    def write(name: str, x: str) -> None:
        add = e.builder.add_reduce_mean if mean else e.builder.add_reduce_max
        add(name, x, name, axes=[2, 3], keepdims=keep, reduce_all=False)

    e.add(layer.name, shape, write)
    return e.current()


def _to_keras_order(e: _Emitter, base: str, blob: _Blob) -> _Blob:
    if not blob.nchw:
        return blob
    e.use(blob)
    e.add(
        f"{base}/to_nhwc",
        blob.keras_shape(),
        lambda name, x: e.builder.add_transpose(name, [0, 2, 3, 1], x, name),
    )
    return _Blob(e.blob, e.shape)


def _reshape_blob(e: _Emitter, layer: Layer, blob: _Blob, target: list[int]) -> _Blob:
    """Reshape to the Keras shape ``target`` (batch 1 first): Keras reshapes in NHWC order, so an
    NCHW blob goes through NHWC unless its H and W are 1, where both orders agree."""
    base = layer.name
    flat_ok = lambda shape: len(shape) == 2 or (len(shape) == 4 and shape[1] == shape[2] == 1)  # noqa: E731
    if len(target) not in (2, 4):
        raise _fail(layer, f"output rank {len(target)}")
    if flat_ok(blob.keras_shape()) and flat_ok(target):
        core = target if len(target) == 2 else [1, target[3], 1, 1]
        if core != blob.shape:
            e.use(blob)
            e.add(
                f"{base}/reshape",
                core,
                lambda name, x: e.builder.add_reshape_static(name, x, name, core),
            )
        return e.current() if core != blob.shape else blob
    blob = _to_keras_order(e, base, blob)
    e.use(blob)
    if target != blob.shape:
        e.add(
            f"{base}/reshape",
            target,
            lambda name, x: e.builder.add_reshape_static(name, x, name, target),
        )
    if len(target) == 4:
        n, h, w, c = target
        e.add(
            f"{base}/to_nchw",
            [n, c, h, w],
            lambda name, x: e.builder.add_transpose(name, [0, 3, 1, 2], x, name),
        )
    return e.current()


def _flatten(e: _Emitter, layer: Layer, blob: _Blob) -> _Blob:
    if blob.nchw:
        _channels_last(layer)
    return _reshape_blob(e, layer, blob, [1, math.prod(blob.shape[1:])])


def _reshape(e: _Emitter, layer: Layer, blob: _Blob) -> _Blob:
    target = fast_head.reshape_target(layer, blob.keras_shape()[1:])
    return _reshape_blob(e, layer, blob, [1, *target])


def _scalar_or_channels(layer: Layer, value: Any, channels: int) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64).ravel()
    if array.size == 1:
        return np.full(channels, array[0])
    if array.size != channels:
        raise _fail(layer, f"{array.size} values for {channels} channels")
    return array


def _channel_affine(
    e: _Emitter, layer: Layer, blob: _Blob, scale: np.ndarray, shift: np.ndarray
) -> _Blob:
    """y = x * scale + shift per channel (the last Keras axis)."""
    c = blob.shape[1] if blob.nchw else blob.shape[-1]
    if not blob.nchw and len(blob.shape) != 2:
        raise _fail(layer, f"input rank {len(blob.shape)}")
    where = [c, 1, 1]
    if np.all(scale == scale[0]) and np.all(shift == shift[0]):
        params = [float(scale[0]), float(shift[0])]
        write = lambda name, x: e.builder.add_activation(name, "LINEAR", x, name, params=params)  # noqa: E731
    elif not blob.nchw:  # Core ML's scale layer needs C, H, W
        raise _fail(layer, "per-channel values on a flat tensor")
    else:

        def write(name: str, x: str) -> None:
            e.builder.add_scale(
                name, _as32(scale), _as32(shift), True, x, name, shape_scale=where, shape_bias=where
            )

    e.add(layer.name, blob.shape, write)
    return e.current()


def _rescaling(e: _Emitter, layer: Layer, blob: _Blob) -> _Blob:
    c = blob.shape[1] if blob.nchw else blob.shape[-1]
    scale = _scalar_or_channels(layer, layer.config.get("scale", 1.0), c)
    shift = _scalar_or_channels(layer, layer.config.get("offset", 0.0), c)
    return _channel_affine(e, layer, blob, scale, shift)


def _normalization(e: _Emitter, layer: Layer, blob: _Blob) -> _Blob:
    """Keras' Normalization: (x - mean) / max(sqrt(variance), epsilon) on the last axis."""
    cfg = layer.config
    if cfg.get("invert"):
        raise _fail(layer, "invert=True")
    axis = cfg.get("axis", -1)
    if isinstance(axis, list):
        axis = axis[0] if len(axis) == 1 else None
    rank = len(blob.shape)
    if not isinstance(axis, int) or axis % rank != rank - 1:
        raise _fail(layer, f"axis {cfg.get('axis')} is not the channels")
    c = blob.shape[1] if blob.nchw else blob.shape[-1]
    if cfg.get("mean") is not None or cfg.get("variance") is not None:
        # given when the layer was made (EfficientNetV2, ConvNeXt): no weights then
        _weights(layer, set(), set())
        mean = _scalar_or_channels(layer, cfg.get("mean"), c)
        variance = _scalar_or_channels(layer, cfg.get("variance"), c)
    else:
        found = _weights(layer, {"mean", "variance"}, {"count"})
        for name in ("mean", "variance"):
            if math.prod(found[name].shape) != c:
                raise _fail(layer, f"{name} {list(found[name].shape)} does not fit {c} channels")
        if e.builder is None:
            return _channel_affine(e, layer, blob, np.ones(c), np.zeros(c) + 0.5)
        mean = _load(e, layer, "mean").ravel()
        variance = _load(e, layer, "variance").ravel()
    std = np.maximum(np.sqrt(variance), KERAS_EPSILON)
    return _channel_affine(e, layer, blob, 1.0 / std, -mean / std)


MERGES = {
    "Add": ("ADD", "add_add_broadcastable"),
    "Multiply": ("MULTIPLY", "add_multiply_broadcastable"),
    "Maximum": ("MAX", "add_max_broadcastable"),
    "Minimum": ("MIN", "add_min_broadcastable"),
    "Average": ("AVE", None),
    "Subtract": (None, "add_subtract_broadcastable"),
}


def _broadcast(layer: Layer, shapes: list[list[int]]) -> list[int]:
    rank = len(shapes[0])
    if any(len(s) != rank for s in shapes):
        raise _fail(layer, f"inputs of ranks {[len(s) for s in shapes]}")
    out = []
    for dims in zip(*shapes):
        size = max(dims)
        if any(d not in (1, size) for d in dims):
            raise _fail(layer, f"shapes {shapes} do not broadcast")
        out.append(size)
    return out


def _merge(e: _Emitter, node: Node, inputs: list[_Blob]) -> _Blob:
    layer = node.layer
    mode, broadcastable = MERGES[layer.class_name]
    shape = _broadcast(layer, [b.shape for b in inputs])
    same = all(b.shape == shape for b in inputs)
    if len(inputs) < 2 or (layer.class_name == "Subtract" and len(inputs) != 2):
        raise _fail(layer, f"{len(inputs)} inputs")
    base = layer.name
    if same and mode is not None:
        return e.merge(
            base, inputs, shape, lambda name, xs: e.builder.add_elementwise(name, xs, name, mode)
        )
    if broadcastable is None:
        raise _fail(layer, "inputs of different shapes")
    # Broadcasting layers take two inputs: fold left.
    current = inputs[0]
    for i, other in enumerate(inputs[1:], 1):
        step = f"{base}/{i}" if len(inputs) > 2 else base
        pair = [current, other]
        out = _broadcast(layer, [current.shape, other.shape])
        current = e.merge(
            step, pair, out, lambda name, xs: getattr(e.builder, broadcastable)(name, xs, name)
        )
    return current


def _concatenate(e: _Emitter, node: Node, inputs: list[_Blob]) -> _Blob:
    layer = node.layer
    ranks = {len(b.shape) for b in inputs}
    if len(ranks) != 1:
        raise _fail(layer, f"inputs of ranks {sorted(ranks)}")
    rank = ranks.pop()
    axis = layer.config.get("axis", -1)
    if not isinstance(axis, int) or not -rank <= axis < rank or axis % rank == 0:
        raise _fail(layer, f"axis {axis}")
    keras_axis = axis % rank
    core_axis = {1: 2, 2: 3, 3: 1}[keras_axis] if rank == 4 else keras_axis
    shapes = [b.shape for b in inputs]
    for s in shapes:
        if any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != core_axis):
            raise _fail(layer, f"shapes {[b.keras_shape() for b in inputs]} do not concatenate")
    shape = list(shapes[0])
    shape[core_axis] = sum(s[core_axis] for s in shapes)
    base = layer.name
    if rank == 4 and core_axis == 1:
        return e.merge(
            base,
            inputs,
            shape,
            lambda name, xs: e.builder.add_elementwise(name, xs, name, "CONCAT"),
        )
    return e.merge(
        base, inputs, shape, lambda name, xs: e.builder.add_concat_nd(name, xs, name, core_axis)
    )


# Arithmetic written as keras.ops calls (Keras 3 saves ``x + 3.0`` as a node of class "Add"
# without a layer config) or tf_keras TFOpLambda functions: x op y, each a tensor or a number.
OPS_ARITHMETIC = {"Add": "add", "Subtract": "sub", "Multiply": "mul", "Divide": "div"}
OPS_ARITHMETIC |= {"TrueDivide": "div"}
TF_ARITHMETIC = {
    "__operators__.add": "add",
    "math.add": "add",
    "math.subtract": "sub",
    "math.multiply": "mul",
    "math.truediv": "div",
    "math.divide": "div",
}
BROADCASTING = {
    "add": "add_add_broadcastable",
    "sub": "add_subtract_broadcastable",
    "mul": "add_multiply_broadcastable",
    "div": "add_divide_broadcastable",
}


def _is_ops_call(layer: Layer) -> bool:
    return "trainable" not in layer.config and "dtype" not in layer.config


def _arithmetic_kind(layer: Layer) -> str | None:
    if layer.class_name == "TFOpLambda":
        return TF_ARITHMETIC.get(str(layer.config.get("function")))
    if _is_ops_call(layer):
        return OPS_ARITHMETIC.get(layer.class_name)
    return None


def _operands(node: Node) -> list[Any]:
    """[x, y] of a binary arithmetic call: tensor refs or numbers, from the positional
    arguments (flat, or one list of them) and then the keywords ``x`` / ``y``."""
    from convert.read.graph import is_tensor_ref

    args = list(node.args)
    if len(args) == 1 and isinstance(args[0], list):
        args = list(args[0])
    kwargs = {k: v for k, v in node.kwargs.items() if k in ("x", "y")}
    extra = {k for k, v in node.kwargs.items() if k not in ("x", "y") and v is not None}
    if extra - {"name"}:
        raise _Unsupported(f"{_label(node.layer)} takes keywords {sorted(extra)}")
    for key in ("x", "y"):
        if key in kwargs:
            args.append(kwargs[key])
    if len(args) != 2:
        raise _Unsupported(f"{_label(node.layer)} has {len(args)} operands")
    for value in args:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number or is_tensor_ref(value)):
            raise _Unsupported(f"{_label(node.layer)} has an operand {str(value)[:40]}")
    return args


def _arithmetic(e: _Emitter, node: Node, kind: str) -> _Blob:
    from convert.read.graph import TENSOR_KEY, is_tensor_ref

    layer = node.layer
    x, y = _operands(node)
    base = layer.name
    if is_tensor_ref(x) and is_tensor_ref(y):
        inputs = [e.blobs[x[TENSOR_KEY]], e.blobs[y[TENSOR_KEY]]]
        shape = _broadcast(layer, [b.shape for b in inputs])
        method = BROADCASTING[kind]
        return e.merge(
            base, inputs, shape, lambda name, xs: getattr(e.builder, method)(name, xs, name)
        )
    if not (is_tensor_ref(x) or is_tensor_ref(y)):
        raise _Unsupported(f"{_label(layer)} has no tensor operand")
    tensor_first = is_tensor_ref(x)
    blob = e.blobs[(x if tensor_first else y)[TENSOR_KEY]]
    c = float(y if tensor_first else x)
    if kind == "add":
        alpha, beta = 1.0, c
    elif kind == "mul":
        alpha, beta = c, 0.0
    elif kind == "sub":
        alpha, beta = (1.0, -c) if tensor_first else (-1.0, c)
    elif tensor_first and c != 0.0:  # x / c
        alpha, beta = 1.0 / c, 0.0
    else:  # c / x
        raise _fail(layer, "a number divided by a tensor")
    e.use(blob)
    params = [alpha, beta]
    e.add(
        base,
        blob.shape,
        lambda name, v: e.builder.add_activation(name, "LINEAR", v, name, params=params),
    )
    return e.current()


def _identity(e: _Emitter, layer: Layer, blob: _Blob) -> _Blob:
    return blob


OneInput = Callable[[_Emitter, Layer, _Blob], _Blob]
SINGLE: dict[str, OneInput] = {
    "BatchNormalization": _batchnorm,
    "ZeroPadding2D": _zero_padding,
    "Cropping2D": _cropping,
    "MaxPooling2D": _pooling,
    "AveragePooling2D": _pooling,
    "GlobalAveragePooling2D": _global_pooling,
    "GlobalMaxPooling2D": _global_pooling,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Rescaling": _rescaling,
    "Normalization": _normalization,
    **dict.fromkeys(["Activation", "ReLU", "LeakyReLU", "ELU"], _elementwise_layer),
    **dict.fromkeys(fast_head.IDENTITY_LAYERS, _identity),
}
FLAT_ONLY = {"Dense": fast_head._dense, "Softmax": fast_head._softmax_layer}


# -- the backbone -----------------------------------------------------------------------------


def _nodes(graph: Graph, output: int) -> list[Node]:
    return [graph.nodes[i] for i in sorted(graph.ancestors([output]))]


def _check_shape(graph: Graph, node: Node, blob: _Blob) -> None:
    expected = graph.tensors[node.outputs[0]].shape
    got = blob.keras_shape()
    if expected is not None and (
        len(expected) != len(got)
        or any(d is not None and d != s for d, s in zip(expected[1:], got[1:]))
    ):
        raise _Unsupported(
            f"{_label(node.layer)}: computed shape {got[1:]} but the file says {list(expected[1:])}"
        )


def _translate(e: _Emitter, graph: Graph, start: int, first: _Blob, output: int) -> _Blob:
    """Write the nodes between tensor ``start`` (held in blob ``first``) and ``output``;
    raises _Unsupported."""
    nodes = _nodes(graph, output)
    if start in graph.inputs:
        if len(graph.inputs) != 1:
            raise _Unsupported(f"{len(graph.inputs)} model inputs")
    else:
        before = graph.ancestors([start])
        nodes = [n for n in nodes if n.index not in before]
    consumers = graph.consumers()
    e.blobs[start] = first
    for node in nodes:
        layer = node.layer
        if layer.class_name == "InputLayer":
            if node.outputs[0] != graph.inputs[0]:
                raise _Unsupported(f"{_label(layer)} is a second input")
            continue
        if node.index in e.folded:
            continue
        arithmetic = _arithmetic_kind(layer)
        if arithmetic is None and (_is_ops_call(layer) or layer.class_name == "TFOpLambda"):
            raise _Unsupported(f"{_label(layer)} is a keras.ops or TensorFlow call not covered")
        if len(node.outputs) != 1:
            raise _Unsupported(f"{_label(layer)} has {len(node.outputs)} outputs")
        missing = [t for t in node.inputs if t not in e.blobs]
        if missing or not node.inputs:
            raise _Unsupported(f"{_label(layer)} reads a tensor that is not computed here")
        inputs = [e.blobs[t] for t in node.inputs]
        name = layer.class_name
        if arithmetic is not None:
            blob = _arithmetic(e, node, arithmetic)
        elif name in MERGES or name == "Concatenate":
            fn = _concatenate if name == "Concatenate" else _merge
            blob = fn(e, node, inputs)
        elif len(inputs) != 1:
            raise _Unsupported(f"{_label(layer)} takes {len(inputs)} inputs")
        elif name in CONVOLUTIONS:
            e.use(inputs[0])
            blob = _convolution(e, node, inputs[0], consumers, output)
        elif name in SINGLE:
            e.use(inputs[0])
            blob = SINGLE[name](e, layer, inputs[0])
        elif name in FLAT_ONLY and not inputs[0].nchw:
            e.use(inputs[0])
            FLAT_ONLY[name](e, layer)
            blob = e.current()
        else:
            raise _Unsupported(f"{_label(layer)} is not covered by direct backbones")
        _check_shape(graph, node, blob)
        e.blobs[node.outputs[0]] = blob
    if output not in e.blobs:
        raise _Unsupported("the split tensor is not computed from the input")
    return e.blobs[output]


def supported(graph: Graph, split_tensor: int) -> str | None:
    """None if the backbone (input to ``split_tensor``) can be built directly; else the reason."""
    shape = graph.tensors[graph.inputs[0]].shape if len(graph.inputs) == 1 else None
    if shape is None or len(shape) != 4 or any(d is None for d in shape[1:]):
        return "the input is not one image of static size"
    h, w, c = (int(d) for d in shape[1:])
    if c not in (1, 3):
        return f"the input has {c} channels"
    try:
        first = _Blob(IMAGE, [1, c, h, w])
        out = _translate(_Emitter(graph), graph, graph.inputs[0], first, split_tensor)
    except _Unsupported as exc:
        return str(exc)
    if len(out.shape) not in (2, 4):
        return f"the split tensor has rank {len(out.shape)}"
    return None


def _features_blob(shape: list[int]) -> _Blob:
    """The head's input as the translation sees it: rank 4 NCHW (after a transpose)."""
    if len(shape) == 4:
        n, h, w, c = shape
        return _Blob(FEATURES, [n, c, h, w])
    return _Blob(FEATURES, list(shape))


def head_supported(graph: Graph, split_tensor: int, output: int) -> str | None:
    """None if the head (``split_tensor`` to ``output``) can be built directly; else why."""
    shape = graph.tensors[split_tensor].shape
    if shape is None or len(shape) not in (2, 4) or any(d is None for d in shape[1:]):
        return "the split tensor is not of static rank 2 or 4"
    first = _features_blob([1, *[int(d) for d in shape[1:]]])
    try:
        out = _translate(_Emitter(graph), graph, split_tensor, first, output)
    except _Unsupported as exc:
        return str(exc)
    if len(out.shape) != 2:
        return f"the output has rank {len(out.shape)}, not [1, classes]"
    return None


def build_head(graph: Graph, split_tensor: int, labels: list[str], feature_shape: list[int]) -> Any:
    """Split tensor -> class probabilities as a NeuralNetworkClassifier: the interface of
    :func:`convert.build.fast_head.build_head`, for heads that hold more than its chain of layers
    (the blocks a partially shared model fine-tuned). Check with :func:`head_supported`."""
    return _network(
        graph, split_tensor, graph.outputs[0], [str(x) for x in labels], None, None, feature_shape
    )


def build_backbone(graph: Graph, split_tensor: int, pre: Preprocessing, hwc: list[int]) -> Any:
    """NeuralNetwork spec: input IMAGE (``hwc`` image, ``pre`` in the image scaler), output
    FEATURES (FLOAT32 multi-array, the split tensor's NHWC shape with its batch 1).

    Raises :class:`ConversionError` if the backbone is not :func:`supported`."""
    return _network(graph, graph.inputs[0], split_tensor, None, pre, hwc, None)


def build_classifier(graph: Graph, labels: list[str], pre: Preprocessing, hwc: list[int]) -> Any:
    """The whole model as one NeuralNetworkClassifier, the interface
    :func:`convert.build.emit.convert_standalone` gives: input IMAGE, outputs CLASS_PROBS then
    CLASS_LABEL. For models that share nothing; check with ``supported(graph, output)``."""
    labels = [str(label) for label in labels]
    return _network(graph, graph.inputs[0], graph.outputs[0], labels, pre, hwc, None)


def _network(
    graph: Graph,
    start: int,
    output: int,
    labels: list[str] | None,
    pre: Preprocessing | None,
    hwc: list[int] | None,
    feature_shape: list[int] | None,
) -> Any:
    """From the image (``pre``, ``hwc``) or from the features (``feature_shape``, NHWC with
    batch 1) to ``output``: a NeuralNetwork with output FEATURES, or with ``labels`` a
    NeuralNetworkClassifier."""
    coremltools()
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    from convert.build.spec import rename_blob

    if feature_shape is None:
        assert pre is not None and hwc is not None
        h, w, c = (int(d) for d in hwc)
        input_name, input_shape = IMAGE, [c, h, w]
    else:
        input_name, input_shape = FEATURES, [int(d) for d in feature_shape]
    builder = NeuralNetworkBuilder(
        input_features=[(input_name, datatypes.Array(*input_shape))],
        output_features=[(FEATURES if labels is None else CLASS_PROBS, None)],
        mode=None if labels is None else "classifier",
        disable_rank5_shape_mapping=True,
        use_float_arraytype=True,
    )
    e = _Emitter(graph, builder)
    what = "backbone" if labels is None else ("model" if feature_shape is None else "head")
    try:
        if feature_shape is None:
            first = _image(e, pre, h, w, c)
        else:
            first = _features_blob(input_shape)
            if first.nchw:
                e.use(_Blob(FEATURES, input_shape))
                e.add(
                    "features/to_nchw",
                    first.shape,
                    lambda name, x: builder.add_transpose(name, [0, 3, 1, 2], x, name),
                )
                first = e.current()
        out = _translate(e, graph, start, first, output)
        out = _to_keras_order(e, "output", out)
        if out.name in (IMAGE, FEATURES) or e.layers == 0:
            e.use(out)
            e.add(
                "output/copy",
                out.shape,
                lambda n, x: builder.add_activation(n, "LINEAR", x, n, params=[1.0, 0.0]),
            )
            out = e.current()
        if labels is not None and (len(out.shape) != 2 or out.shape[1] != len(labels)):
            raise _Unsupported(f"{len(labels)} labels for an output of shape {out.shape}")
    except _Unsupported as exc:
        raise ConversionError(graph.source, f"cannot build the {what} directly: {exc}") from None
    spec = builder.spec
    if feature_shape is None:
        _image_input(spec, pre, h, w, c)
    else:
        set_array_shape(spec.description.input[0], input_shape)
    if labels is None:
        rename_blob(spec, out.name, FEATURES)
        set_array_shape(spec.description.output[0], out.shape)
    else:
        rename_blob(spec, out.name, CLASS_PROBS)
        builder.set_class_labels(
            labels, predicted_feature_name=CLASS_LABEL, prediction_blob=CLASS_PROBS
        )
        spec = builder.spec
    spec.specificationVersion = max(spec.specificationVersion, SPEC_VERSION)
    return spec


def _image(e: _Emitter, pre: Preprocessing, h: int, w: int, c: int) -> _Blob:
    """The image blob, divided by a per-channel std when the preprocessing has one (Core ML's
    image scaler has one scale for all channels)."""
    image = _Blob(IMAGE, [1, c, h, w])
    if pre.std is None or c != 3:
        return image
    std = np.asarray(pre.std[::-1] if pre.bgr else pre.std, dtype=np.float64)
    e.use(image)
    e.add(
        "preprocessing/std",
        image.shape,
        lambda name, x: e.builder.add_scale(
            name, _as32(1.0 / std), None, False, x, name, shape_scale=[3, 1, 1]
        ),
    )
    return e.current()


def _image_input(spec: Any, pre: Preprocessing, h: int, w: int, c: int) -> None:
    from coremltools.proto import FeatureTypes_pb2

    image = spec.description.input[0].type
    image.Clear()
    image.imageType.width, image.imageType.height = w, h
    if c == 1:
        image.imageType.colorSpace = FeatureTypes_pb2.ImageFeatureType.GRAYSCALE
    else:
        image.imageType.colorSpace = (
            FeatureTypes_pb2.ImageFeatureType.BGR
            if pre.bgr
            else FeatureTypes_pb2.ImageFeatureType.RGB
        )
    nn = getattr(spec, spec.WhichOneof("Type"))
    del nn.preprocessing[:]
    scaler = nn.preprocessing.add()
    scaler.featureName = IMAGE
    scaler.scaler.channelScale = pre.scale
    if c == 1:
        scaler.scaler.grayBias = pre.bias[0]
    else:
        scaler.scaler.redBias, scaler.scaler.greenBias, scaler.scaler.blueBias = pre.bias
