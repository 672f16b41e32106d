"""Convolutions: Conv2D (grouped too), DepthwiseConv2D and SeparableConv2D, on NCHW tensors.

Weights are held in float64, Core ML's order [out, in / groups, kh, kw], until they are written,
so that a BatchNormalization right after a linear convolution is folded into them without loss
(as ``ct.convert``'s passes do); the folded BatchNorm writes no layer of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convert.build.layers import activation, normalisation, weights
from convert.build.layers.registry import Unsupported, expect_weights, fail, register
from convert.read.graph import Layer


def channels_last(layer: Layer) -> None:
    fmt = layer.config.get("data_format") or "channels_last"
    if fmt != "channels_last":
        raise fail(layer, f"data_format {fmt}")


def need_nchw(layer: Layer, blob: Any) -> None:
    if not blob.nchw:
        raise fail(layer, f"input of rank {blob.rank}, expected an image-like rank 4")


def pair(layer: Layer, key: str, default: int) -> tuple[int, int]:
    value = layer.config.get(key, default)
    if isinstance(value, int):
        return value, value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise fail(layer, f"{key} {value}")


def pads(
    layer: Layer, hw: list[int], kernel: tuple[int, int], stride, dilation=(1, 1)
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) as TensorFlow pads for ``padding``: none for valid; for same,
    the output is ceil(size / stride) and the odd pixel goes to the bottom / right."""
    padding = str(layer.config.get("padding", "valid")).lower()
    if padding == "valid":
        return 0, 0, 0, 0
    if padding != "same":
        raise fail(layer, f"padding '{padding}'")
    out = []
    for size, k, s, d in zip(hw, kernel, stride, dilation):
        span = (k - 1) * d + 1
        total = max((-(-size // s) - 1) * s + span - size, 0)
        out.extend([total // 2, total - total // 2])
    return out[0], out[1], out[2], out[3]


def out_hw(hw: list[int], pad, kernel, stride, dilation=(1, 1)) -> list[int]:
    sizes = []
    for i, (size, k, s, d) in enumerate(zip(hw, kernel, stride, dilation)):
        span = (k - 1) * d + 1
        padded = size + pad[2 * i] + pad[2 * i + 1]
        if padded < span:
            raise Unsupported(f"kernel {span} wider than the padded input {padded}")
        sizes.append((padded - span) // s + 1)
    return sizes


class Conv:
    """One Core ML convolution: weights [out, in / groups, kh, kw] and a bias, both float64
    until written so that folding a batch norm into them loses nothing."""

    def __init__(self, w, bias, groups, kernel, stride, dilation, pad) -> None:
        self.weights, self.bias, self.groups = w, bias, groups
        self.kernel, self.stride, self.dilation, self.pads = kernel, stride, dilation, pad

    def fold(self, scale: np.ndarray, shift: np.ndarray) -> None:
        """y -> y * scale + shift, per output channel."""
        self.weights = self.weights * scale[:, None, None, None]
        bias = self.bias if self.bias is not None else np.zeros_like(scale)
        self.bias = bias * scale + shift

    def emit(self, e: Any, base: str, blob: Any) -> Any:
        out_c, in_per_group, kh, kw = self.weights.shape
        hw = out_hw(blob.shape[2:], self.pads, self.kernel, self.stride, self.dilation)

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
            stored = e.precision
            weights.write(conv.weights, self.weights, stored.kernel(layer.name), kernel=True)
            conv.hasBias = self.bias is not None
            if self.bias is not None:
                weights.write(conv.bias, self.bias, stored.other(layer.name))

        e.use(blob)
        return e.raw_layer(base, [1, out_c, *hw], fill)


def _window(layer: Layer, blob: Any, kernel: tuple[int, int]) -> tuple[Any, Any, Any]:
    """(strides, dilation, pads) of a convolution with ``kernel`` on ``blob``."""
    stride, dilation = pair(layer, "strides", 1), pair(layer, "dilation_rate", 1)
    if dilation != (1, 1) and stride != (1, 1):
        raise fail(layer, "strides and dilation together")
    return stride, dilation, pads(layer, blob.shape[2:], kernel, stride, dilation)


def _conv2d(e: Any, layer: Layer, blob: Any) -> Conv:
    w = expect_weights(layer, {"kernel"}, {"bias"})
    kh, kw, cin_g, cout = w["kernel"].shape
    groups = int(layer.config.get("groups", 1) or 1)
    if cin_g * groups != blob.shape[1] or cout % groups:
        raise fail(layer, f"kernel {list(w['kernel'].shape)} does not fit {blob.shape[1]} channels")
    stride, dilation, pad = _window(layer, blob, (kh, kw))
    if e.builder is None:
        return Conv(np.zeros((cout, cin_g, kh, kw)), None, groups, (kh, kw), stride, dilation, pad)
    kernel = e.weight(layer, "kernel", np.float64).transpose(3, 2, 0, 1)
    bias = e.weight(layer, "bias", np.float64) if "bias" in w else None
    return Conv(kernel, bias, groups, (kh, kw), stride, dilation, pad)


def _depthwise(e: Any, layer: Layer, blob: Any, name: str, bias_name: str | None) -> Conv:
    """Depthwise kernel [kh, kw, C, m] -> Core ML [C * m, 1, kh, kw], groups C: output channel
    c * m + k reads input channel c, as in TensorFlow."""
    kh, kw, c, m = next(w for w in layer.weights if w.name == name).shape
    if c != blob.shape[1]:
        raise fail(layer, f"depthwise kernel for {c} channels, input has {blob.shape[1]}")
    stride, dilation, pad = _window(layer, blob, (kh, kw))
    if e.builder is None:
        return Conv(np.zeros((c * m, 1, kh, kw)), None, c, (kh, kw), stride, dilation, pad)
    kernel = e.weight(layer, name, np.float64).reshape(kh, kw, c * m).transpose(2, 0, 1)[:, None]
    bias = e.weight(layer, bias_name, np.float64) if bias_name else None
    return Conv(kernel, bias, c, (kh, kw), stride, dilation, pad)


def _depthwise_conv2d(e: Any, layer: Layer, blob: Any) -> Conv:
    names = {w.name for w in layer.weights}
    kernel = "depthwise_kernel" if "depthwise_kernel" in names else "kernel"
    w = expect_weights(layer, {kernel}, {"bias"})
    return _depthwise(e, layer, blob, kernel, "bias" if "bias" in w else None)


def _separable_conv2d(e: Any, layer: Layer, blob: Any) -> Conv:
    """Depthwise (written here, without bias) then pointwise (returned, to take the bias and
    any batch norm that follows)."""
    w = expect_weights(layer, {"depthwise_kernel", "pointwise_kernel"}, {"bias"})
    depthwise = _depthwise(e, layer, blob, "depthwise_kernel", None)
    blob = depthwise.emit(e, f"{layer.name}/depthwise", blob)
    _, _, cin, cout = w["pointwise_kernel"].shape
    if cin != blob.shape[1]:
        raise fail(layer, f"pointwise kernel for {cin} channels, depthwise gives {blob.shape[1]}")
    ones = (1, 1)
    if e.builder is None:
        return Conv(np.zeros((cout, cin, 1, 1)), None, 1, ones, ones, ones, (0, 0, 0, 0))
    kernel = e.weight(layer, "pointwise_kernel", np.float64).transpose(3, 2, 0, 1)
    bias = e.weight(layer, "bias", np.float64) if "bias" in w else None
    return Conv(kernel, bias, 1, ones, ones, ones, (0, 0, 0, 0))


KINDS = {
    "Conv2D": _conv2d,
    "DepthwiseConv2D": _depthwise_conv2d,
    "SeparableConv2D": _separable_conv2d,
}


@register(*KINDS, family="convolution")
def _convolution(e: Any, node: Any, inputs: list) -> Any:
    layer = node.layer
    channels_last(layer)
    need_nchw(layer, inputs[0])
    conv = KINDS[layer.class_name](e, layer, inputs[0])
    blob = e.current()  # a separable convolution has written its depthwise half
    value = layer.config.get("activation")
    out = node.outputs[0]
    readers = e.consumers.get(out, [])
    if activation.activation_name(layer, value) == "linear" and out != e.stop and len(readers) == 1:
        bn = e.graph.nodes[readers[0]]
        if (
            bn.layer.class_name == "BatchNormalization"
            and bn.inputs == [out]
            and normalisation.last_axis(bn.layer, 4)
        ):
            conv.fold(*normalisation.affine(e, bn.layer, conv.weights.shape[0]))
            e.folded.add(bn.index)
            blob = conv.emit(e, layer.name, blob)
            e.blobs[bn.outputs[0]] = blob
            return blob
    conv.emit(e, layer.name, blob)
    activation.apply(e, layer, value, layer.name)
    return e.current()
