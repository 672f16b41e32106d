"""Spatial layers on the last three axes (C, H, W): convolution, pooling, padding.

Leading axes are batch. Convolutions run as im2col + matmul (1x1 convolutions as a plain
matmul, depthwise ones as one vectorised multiply-add per kernel tap); nothing loops over pixels
or channels in Python.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from convert.check.reference.registry import Layer, need_rank, rank, register

Pads = tuple[int, int, int, int]  # top, bottom, left, right


# -- padding arithmetic ----------------------------------------------------------------------


def _pair(values, default: int) -> tuple[int, int]:
    values = [int(v) for v in values]
    if not values:
        return default, default
    if len(values) != 2:
        raise ValueError(f"expected 2 values [H, W], got {values}")
    return values[0], values[1]


def _border(valid) -> Pads:
    amounts = list(valid.paddingAmounts.borderAmounts)
    if not amounts:
        return 0, 0, 0, 0
    if len(amounts) != 2:
        raise ValueError(f"expected 2 border amounts [H, W], got {len(amounts)}")
    h, w = amounts
    return int(h.startEdgeSize), int(h.endEdgeSize), int(w.startEdgeSize), int(w.endEdgeSize)


def _same_1d(size: int, kernel: int, stride: int, top_left_heavy: bool) -> tuple[int, int]:
    out = -(-size // stride)
    return _split((out - 1) * stride + kernel - size, top_left_heavy)


def _same(layer: Layer, same, hw: tuple[int, int], kernel, stride) -> Pads:
    mode = layer.enum("asymmetryMode", same)
    if mode not in ("BOTTOM_RIGHT_HEAVY", "TOP_LEFT_HEAVY"):
        layer.unsupported(f"same padding mode {mode}")
    heavy = mode == "TOP_LEFT_HEAVY"
    return (
        *_same_1d(hw[0], kernel[0], stride[0], heavy),
        *_same_1d(hw[1], kernel[1], stride[1], heavy),
    )


def _pad_hw(x: np.ndarray, pads: Pads, value: float = 0.0) -> np.ndarray:
    if not any(pads):
        return x
    top, bottom, left, right = pads
    width = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
    return np.pad(x, width, constant_values=value)


def _windows(x: np.ndarray, kernel, stride, dilation=(1, 1)) -> np.ndarray:
    """View (..., Ho, Wo, kh, kw) of the windows of x (..., H, W); no copy."""
    span = ((kernel[0] - 1) * dilation[0] + 1, (kernel[1] - 1) * dilation[1] + 1)
    view = sliding_window_view(x, span, axis=(-2, -1))
    return view[..., :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]]


def _as_nchw(x: np.ndarray) -> np.ndarray:
    return x.reshape((-1, *x.shape[-3:]))


# -- convolution -----------------------------------------------------------------------------


@register("convolution")
def convolution(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    x = xs[0]
    need_rank(layer, x, 4)
    if p.isDeconvolution:
        return deconvolution(layer, x)
    kernel, stride = _pair(p.kernelSize, 3), _pair(p.stride, 1)
    dilation = _pair(p.dilationFactor, 1)
    groups = int(p.nGroups) or 1
    shape = (int(p.outputChannels), int(p.kernelChannels), *kernel)
    w = _dynamic_weights(layer, xs[1]) if len(xs) > 1 else layer.weight("weights", shape)
    if w.shape != shape or x.shape[-3] != shape[1] * groups:
        raise ValueError(f"weights {w.shape} / input channels {x.shape[-3]} / groups {groups}")
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    x4 = _pad_hw(_as_nchw(x), _conv_pads(layer, x.shape[-2:], span, stride))
    if groups == 1:
        y = _dense_conv(x4, w, stride, dilation)
    elif shape[1] == 1 and groups == x.shape[-3]:
        y = _depthwise_conv(x4, w, stride, dilation)
    else:
        y = _grouped_conv(x4, w, groups, stride, dilation)
    if p.hasBias:
        y += layer.weight("bias", (shape[0],))[:, None, None]
    return y.reshape(x.shape[:-3] + y.shape[-3:])


def windows(params: Any, x: np.ndarray) -> np.ndarray:
    """The windows that a convolution with ``params`` (not a deconvolution) reads from ``x``
    (N, C, H, W), padding applied: a view (N, C, Ho, Wo, kh, kw) of the padded input."""
    layer = Layer(params.DESCRIPTOR.name, "convolution", params)
    kernel, stride = _pair(params.kernelSize, 3), _pair(params.stride, 1)
    dilation = _pair(params.dilationFactor, 1)
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    x4 = _pad_hw(_as_nchw(x), _conv_pads(layer, x.shape[-2:], span, stride))
    return _windows(x4, kernel, stride, dilation)


def _dynamic_weights(layer: Layer, blob: np.ndarray) -> np.ndarray:
    """Weights given as a second input: one set for the whole batch (a constant) only."""
    if blob.shape[0] != 1:
        layer.unsupported("weights that differ between the predictions of a batch")
    return blob[0]


def _conv_pads(layer: Layer, hw, span, stride) -> Pads:
    kind = layer.params.WhichOneof("ConvolutionPaddingType")
    if kind == "same":
        return _same(layer, layer.params.same, hw, span, stride)
    if kind == "valid":
        return _border(layer.params.valid)
    return 0, 0, 0, 0


def _out_size(size: int, span: int, stride: int) -> int:
    out = (size - span) // stride + 1
    if out < 1:
        raise ValueError(f"kernel span {span} larger than the padded input {size}")
    return out


def _dense_conv(x: np.ndarray, w: np.ndarray, stride, dilation) -> np.ndarray:
    n, c = x.shape[:2]
    cout, _, kh, kw = w.shape
    if (kh, kw) == (1, 1):
        x = x[:, :, :: stride[0], :: stride[1]]
        ho, wo = x.shape[2:]
        cols = x.reshape(n, c, ho * wo)
    else:
        view = _windows(x, (kh, kw), stride, dilation)  # n, c, ho, wo, kh, kw
        ho, wo = view.shape[2:4]
        cols = view.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)
    y = np.matmul(w.reshape(cout, -1), cols)
    return y.reshape(n, cout, ho, wo)


def _grouped_conv(x: np.ndarray, w: np.ndarray, groups: int, stride, dilation) -> np.ndarray:
    n, c, _, _ = x.shape
    cout, cg, kh, kw = w.shape
    view = _windows(x, (kh, kw), stride, dilation)  # n, c, ho, wo, kh, kw
    ho, wo = view.shape[2:4]
    cols = view.transpose(0, 1, 4, 5, 2, 3).reshape(n, groups, cg * kh * kw, ho * wo)
    y = np.matmul(w.reshape(groups, cout // groups, cg * kh * kw), cols)
    return y.reshape(n, cout, ho, wo)


def _depthwise_conv(x: np.ndarray, w: np.ndarray, stride, dilation) -> np.ndarray:
    """groups == input channels, one kernel channel: output channel o reads input o // m."""
    cout, _, kh, kw = w.shape
    multiplier = cout // x.shape[1]
    if multiplier > 1:
        x = np.repeat(x, multiplier, axis=1)
    ho = _out_size(x.shape[2], (kh - 1) * dilation[0] + 1, stride[0])
    wo = _out_size(x.shape[3], (kw - 1) * dilation[1] + 1, stride[1])
    y = np.zeros((x.shape[0], cout, ho, wo), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation[0], j * dilation[1]
            tap = x[:, :, top : top + (ho - 1) * stride[0] + 1 : stride[0]]
            tap = tap[..., left : left + (wo - 1) * stride[1] + 1 : stride[1]]
            y += tap * w[:, 0, i, j][:, None, None]
    return y


def deconvolution(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Transposed convolution: every input pixel adds ``value * kernel`` into the output, then
    the padding is cropped. (Core ML ignores dilation for deconvolution.)"""
    p = layer.params
    kernel, stride = _pair(p.kernelSize, 3), _pair(p.stride, 1)
    groups = int(p.nGroups) or 1
    cin, cout = int(p.kernelChannels), int(p.outputChannels)
    w = layer.weight("weights", (cin, cout // groups, *kernel), axis=1)
    x4 = _as_nchw(x)
    if x4.shape[1] != cin:
        raise ValueError(f"deconvolution expects {cin} input channels, got {x4.shape[1]}")
    full = _scatter_taps(x4, w.reshape(groups, cin // groups, cout // groups, *kernel), stride)
    y = _deconv_crop(layer, full, x4.shape[-2:], kernel, stride)
    if p.hasBias:
        y = y + layer.weight("bias", (cout,))[:, None, None]
    return y.reshape(x.shape[:-3] + y.shape[-3:])


def _scatter_taps(x: np.ndarray, w: np.ndarray, stride) -> np.ndarray:
    """x (n, cin, h, w), w (groups, cin/g, cout/g, kh, kw) -> (n, cout, full h, full w)."""
    n, _, h, wd = x.shape
    groups, cin_g, cout_g, kh, kw = w.shape
    xg = x.reshape(n, groups, cin_g, h * wd)
    full = np.zeros(
        (n, groups, cout_g, (h - 1) * stride[0] + kh, (wd - 1) * stride[1] + kw), np.float32
    )
    rows, cols = (h - 1) * stride[0] + 1, (wd - 1) * stride[1] + 1
    for i in range(kh):
        for j in range(kw):
            tap = np.matmul(w[:, :, :, i, j].transpose(0, 2, 1), xg)  # n, g, cout/g, h*w
            target = full[..., i : i + rows : stride[0], j : j + cols : stride[1]]
            target += tap.reshape(n, groups, cout_g, h, wd)
    return full.reshape(n, groups * cout_g, *full.shape[-2:])


def _deconv_crop(layer: Layer, full: np.ndarray, hw, kernel, stride) -> np.ndarray:
    """Crop the full transposed convolution to the output size. With ``outputShape`` set, the
    difference is cropped like TensorFlow's conv2d_transpose, which coremltools converts from:
    split by the asymmetry mode for ``same``, from the end (or zero-padded there) otherwise."""
    p = layer.params
    kind = p.WhichOneof("ConvolutionPaddingType")
    if len(p.outputShape):
        out = _pair(p.outputShape, 0)
        if kind == "same":
            heavy = layer.enum("asymmetryMode", p.same) == "TOP_LEFT_HEAVY"
            starts = [_split(f - o, heavy)[0] for f, o in zip(full.shape[-2:], out)]
        else:
            starts = [0, 0]
        pads = [(0, 0)] * (full.ndim - 2) + [
            (0, max(0, s + o - f)) for s, o, f in zip(starts, out, full.shape[-2:])
        ]
        full = np.pad(full, pads)
        return full[..., starts[0] : starts[0] + out[0], starts[1] : starts[1] + out[1]]
    if kind == "same":
        out = (hw[0] * stride[0], hw[1] * stride[1])
        heavy = layer.enum("asymmetryMode", p.same) == "TOP_LEFT_HEAVY"
        starts = [_split(f - o, heavy)[0] for f, o in zip(full.shape[-2:], out)]
        return full[..., starts[0] : starts[0] + out[0], starts[1] : starts[1] + out[1]]
    top, bottom, left, right = _border(p.valid) if kind == "valid" else (0, 0, 0, 0)
    return full[..., top : full.shape[-2] - bottom, left : full.shape[-1] - right]


def _split(total: int, top_left_heavy: bool) -> tuple[int, int]:
    total = max(0, total)
    small = total // 2
    return (total - small, small) if top_left_heavy else (small, total - small)


# -- pooling ---------------------------------------------------------------------------------


@register("pooling")
def pooling(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    x = xs[0]
    need_rank(layer, x, 3)
    kind = layer.enum("type")
    if kind not in ("MAX", "AVERAGE"):
        layer.unsupported(f"{kind} pooling")
    if p.globalPooling:
        reduce = np.max if kind == "MAX" else np.mean
        return reduce(x, axis=(-2, -1), keepdims=True)
    kernel, stride = _pair(p.kernelSize, 3), _pair(p.stride, 1)
    pads, counted = _pool_pads(layer, x.shape[-2:], kernel, stride)
    if kind == "MAX":
        return _windows(_pad_hw(x, pads, -np.inf), kernel, stride).max(axis=(-2, -1))
    sums = _windows(_pad_hw(x, pads), kernel, stride).sum(axis=(-2, -1))
    return sums / _pool_counts(x.shape[-2:], pads, counted, kernel, stride)


def _pool_pads(layer: Layer, hw, kernel, stride) -> tuple[Pads, Pads]:
    """(padding applied, padding that counts in an average's denominator)."""
    p = layer.params
    kind = p.WhichOneof("PoolingPaddingType")
    if kind == "same":
        pads = _same(layer, p.same, hw, kernel, stride)
    elif kind == "includeLastPixel":
        return _include_last_pixel(layer, hw, kernel, stride)
    else:
        pads = _border(p.valid) if kind == "valid" else (0, 0, 0, 0)
    return pads, (0, 0, 0, 0) if p.avgPoolExcludePadding else pads


def _include_last_pixel(layer: Layer, hw, kernel, stride) -> tuple[Pads, Pads]:
    """Symmetric padding, output size rounded up (Caffe's pooling); windows that run past the
    padded input are completed with padding that never counts in an average."""
    ph, pw = _pair(layer.params.includeLastPixel.paddingAmounts, 0)
    extra = []
    for size, pad, k, s in zip(hw, (ph, pw), kernel, stride):
        out = math.ceil((size + 2 * pad - k) / s) + 1
        if (ph or pw) and (out - 1) * s >= size + pad:
            out -= 1
        extra.append(max(0, (out - 1) * s + k - (size + 2 * pad)))
    pads = (ph, ph + extra[0], pw, pw + extra[1])
    counted = (0, 0, 0, 0) if layer.params.avgPoolExcludePadding else (ph, ph, pw, pw)
    return pads, counted


def _pool_counts(hw, pads: Pads, counted: Pads, kernel, stride) -> np.ndarray:
    """How many cells of each window count: real pixels plus the counted padding."""
    mask = np.ones(hw, dtype=np.float32)
    mask = np.pad(mask, ((counted[0], counted[1]), (counted[2], counted[3])), constant_values=1)
    rest = tuple(a - b for a, b in zip(pads, counted))
    mask = np.pad(mask, ((rest[0], rest[1]), (rest[2], rest[3])))
    return _windows(mask, kernel, stride).sum(axis=(-2, -1))


# -- padding ---------------------------------------------------------------------------------


@register("padding")
def padding(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    x = xs[0]
    need_rank(layer, x, 2)
    top, bottom, left, right = _border(p)
    width = [(0, 0)] * (x.ndim - 2) + [(top, bottom), (left, right)]
    kind = p.WhichOneof("PaddingType")
    if kind == "constant":
        return np.pad(x, width, constant_values=p.constant.value)
    if kind == "reflection":
        return np.pad(x, width, mode="reflect")
    if kind == "replication":
        return np.pad(x, width, mode="edge")
    layer.unsupported(f"padding type {kind}")


@register("constantPad")
def constant_pad(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    x = xs[0]
    if len(xs) > 1:
        layer.unsupported("pad amounts given as an input")
    amounts = [int(a) for a in p.padAmounts]
    if len(amounts) != 2 * rank(x):
        raise ValueError(f"{len(amounts)} pad amounts for rank {rank(x)}")
    pairs = [(amounts[2 * i], amounts[2 * i + 1]) for i in range(rank(x))]
    if p.padToGivenOutputSizeMode:
        pairs = [_to_size(size, pair) for size, pair in zip(x.shape[1:], pairs)]
    return np.pad(x, [(0, 0), *pairs], constant_values=p.value)


def _to_size(size: int, pair: tuple[int, int]) -> tuple[int, int]:
    before, after = pair
    if before:
        return max(0, before - size), 0
    return 0, max(0, after - size)


@register("upsample")
def upsample(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    x = xs[0]
    need_rank(layer, x, 3)
    if layer.enum("mode") != "NN" or len(p.fractionalScalingFactor):
        layer.unsupported(f"{layer.enum('mode')} upsampling / fractional factors")
    fh, fw = _pair(p.scalingFactor, 1)
    return np.repeat(np.repeat(x, fh, axis=-2), fw, axis=-1)
