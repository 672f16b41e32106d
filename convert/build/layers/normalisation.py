"""BatchNormalization at inference: a per-channel scale and shift.

After a convolution it is folded into the convolution's weights (see
:mod:`convert.build.layers.convolution`); on an NCHW tensor it is a ``scale`` layer; on a tensor in
Keras order, Core ML's ``batchnorm`` with the channels moved to axis -3 and back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convert.build.layers import weights
from convert.build.layers.registry import expect_weights, fail, register
from convert.read.graph import Layer

UNCOVERED = ("renorm", "virtual_batch_size", "adjustment", "synchronized")


def last_axis(layer: Layer, rank: int) -> bool:
    """Whether the layer normalises the last Keras axis of a tensor of ``rank``."""
    axis = layer.config.get("axis", -1)
    if isinstance(axis, list):
        if len(axis) != 1:
            return False
        axis = axis[0]
    return isinstance(axis, int) and axis % rank == rank - 1


def _present(layer: Layer, channels: int) -> dict[str, Any]:
    cfg = layer.config
    for key in UNCOVERED:
        if cfg.get(key):
            raise fail(layer, f"{key} is not covered")
    optional = {n for n, on in (("gamma", "scale"), ("beta", "center")) if cfg.get(on, True)}
    found = expect_weights(layer, {"moving_mean", "moving_variance"}, optional)
    for w in found.values():
        if tuple(w.shape) != (channels,):
            raise fail(layer, f"{w.name} {list(w.shape)} does not fit {channels} channels")
    return found


def affine(e: Any, layer: Layer, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel such that BN(x) = x * scale + shift, in float64."""
    found = _present(layer, channels)
    if e.builder is None:
        return np.ones(channels), np.zeros(channels)
    eps = float(layer.config.get("epsilon", 1e-3))
    f64 = np.float64
    gamma = e.weight(layer, "gamma", f64) if "gamma" in found else np.ones(channels)
    beta = e.weight(layer, "beta", f64) if "beta" in found else np.zeros(channels)
    scale = gamma / np.sqrt(e.weight(layer, "moving_variance", f64) + eps)
    return scale, beta - e.weight(layer, "moving_mean", f64) * scale


def scale_layer(
    e: Any, base: str, scale: np.ndarray, shift: np.ndarray | None, where: list[int]
) -> Any:
    """Core ML's ``scale`` layer: y = x * scale (+ shift), both of shape ``where``."""

    def fill(spec: Any) -> None:
        p = spec.scale
        p.hasBias = shift is not None
        p.shapeScale.extend(where)
        stored = e.precision.other(spec.name)
        weights.write(p.scale, scale, stored)
        if shift is not None:
            p.shapeBias.extend(where)
            weights.write(p.bias, shift, stored)

    return e.raw_layer(base, e.shape, fill)


@register("BatchNormalization", family="normalisation", vector=True)
def _batchnorm(e: Any, node: Any, inputs: list) -> Any:
    layer = node.layer
    if inputs[0].nchw:
        if not last_axis(layer, 4):
            raise fail(layer, "normalises an axis other than the channels")
        c = inputs[0].shape[1]
        scale, shift = affine(e, layer, c)
        return scale_layer(e, layer.name, scale, shift, [c, 1, 1])
    return _keras_order(e, layer)


def _keras_order(e: Any, layer: Layer) -> Any:
    cfg = layer.config
    if not last_axis(layer, e.rank):
        raise fail(layer, f"axis {cfg.get('axis', -1)} is not the last axis of rank {e.rank}")
    c = e.shape[-1]
    found = _present(layer, c)
    eps = float(cfg.get("epsilon", 1e-3))
    if eps <= 0.0:  # Core ML reads an epsilon of 0 as its default 1e-5
        eps = float(np.finfo(np.float32).tiny)
    if e.rank not in (2, 3, 4):
        raise fail(layer, f"input rank {e.rank}")
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

    def fill(spec: Any) -> None:
        p = spec.batchnorm
        p.channels = c
        p.epsilon = eps
        ones, zeros = np.ones(c, np.float32), np.zeros(c, np.float32)
        stored = e.precision.other(spec.name)
        weights.write(p.gamma, e.weight(layer, "gamma") if "gamma" in found else ones, stored)
        weights.write(p.beta, e.weight(layer, "beta") if "beta" in found else zeros, stored)
        weights.write(p.mean, e.weight(layer, "moving_mean"), stored)
        weights.write(p.variance, e.weight(layer, "moving_variance"), stored)

    e.raw_layer(base, e.shape, fill)
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
    return e.current()
