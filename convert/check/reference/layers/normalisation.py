"""Normalisation layers: batchnorm (and instance norm through it), L2 normalisation, layer
normalisation, mean-variance normalisation and local response normalisation, all per the
NeuralNetwork.proto formulas.

The legacy layers work on axis -3 (channels) of a rank >= 3 blob; leading axes are batch.
"""

from __future__ import annotations

import numpy as np

from convert.check.reference.registry import Layer, need_rank, rank, register


@register("batchnorm")
def batchnorm(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` along axis -3; epsilon 0 means 1e-5."""
    p = layer.params
    x = xs[0]
    need_rank(layer, x, 3)
    c = int(p.channels)
    if x.shape[-3] != c:
        raise ValueError(f"batchnorm for {c} channels got shape {x.shape[1:]}")
    eps = np.float32(p.epsilon or 1e-5)
    gamma, beta = (layer.weight(f, (c,)).reshape(c, 1, 1) for f in ("gamma", "beta"))
    if p.computeMeanVar:
        mean, var = _statistics(x, bool(p.instanceNormalization))
    else:
        mean, var = (layer.weight(f, (c,)).reshape(c, 1, 1) for f in ("mean", "variance"))
    factor = gamma / np.sqrt(var + eps)
    return (x - mean) * factor + beta


def _statistics(x: np.ndarray, per_instance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance per channel: over H, W of each instance, or over all axes but the
    prediction axis and the channel axis (the 'batch' of one prediction)."""
    if per_instance:
        over = (-2, -1)
    else:
        over = tuple(range(1, x.ndim - 3)) + (x.ndim - 2, x.ndim - 1)
    return x.mean(axis=over, keepdims=True), x.var(axis=over, keepdims=True)


@register("l2normalize")
def l2normalize(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """``x / sqrt(sum(x^2) + eps)`` over the last three axes; epsilon 0 means 1e-6."""
    x = xs[0]
    need_rank(layer, x, 3)
    eps = np.float32(layer.params.epsilon or 1e-6)
    return x / np.sqrt(np.sum(x * x, axis=(-3, -2, -1), keepdims=True) + eps)


@register("layerNormalization")
def layer_normalization(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    x = xs[0]
    shape = [int(d) for d in p.normalizedShape]
    if not shape or len(shape) > rank(x) or list(x.shape[-len(shape) :]) != shape:
        raise ValueError(f"normalizedShape {shape} does not end the input shape {x.shape[1:]}")
    over = tuple(range(-len(shape), 0))
    mean, var = x.mean(axis=over, keepdims=True), x.var(axis=over, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(p.eps))
    return y * layer.weight("gamma", shape) + layer.weight("beta", shape)


@register("mvn")
def mvn(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """Subtract the mean (and divide by ``sqrt(var + eps)`` if normalizeVariance) over the last
    two axes, or the last three if acrossChannels; epsilon 0 means 1e-6. coremltools maps
    layer_norm onto it with layer_norm's own epsilon, so the epsilon sits inside the root."""
    p = layer.params
    x = xs[0]
    need_rank(layer, x, 3)
    over = (-3, -2, -1) if p.acrossChannels else (-2, -1)
    y = x - x.mean(axis=over, keepdims=True)
    if p.normalizeVariance:
        eps = np.float32(p.epsilon or 1e-6)
        y = y / np.sqrt(np.mean(y * y, axis=over, keepdims=True) + eps)
    return y


@register("lrn")
def lrn(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """``x / (k + alpha / n * sum of x^2 over n neighbouring channels) ^ beta``; the window
    starts (n - 1) // 2 channels before the current one, as in Caffe."""
    p = layer.params
    x = xs[0]
    need_rank(layer, x, 3)
    size = int(p.localSize)
    if size < 1:
        raise ValueError("lrn localSize must be positive")
    before = (size - 1) // 2
    width = [(0, 0)] * x.ndim
    width[-3] = (before + 1, size - 1 - before)
    running = np.cumsum(np.pad(x * x, width), axis=-3, dtype=np.float64)
    sums = (running[..., size:, :, :] - running[..., :-size, :, :]).astype(np.float32)
    k = np.float32(p.k or 1.0)
    return x / (k + np.float32(p.alpha) / size * sums) ** np.float32(p.beta)
