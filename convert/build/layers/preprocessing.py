"""Preprocessing inside the model: Rescaling and Normalization layers, and the per-channel
``std`` of a family's preprocessing, which Core ML's image scaler cannot express."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from convert.build.layers.normalisation import scale_layer
from convert.build.layers.registry import expect_weights, fail, register
from convert.read.families import Preprocessing
from convert.read.graph import Layer

KERAS_EPSILON = 1e-7  # keras.backend.epsilon(), the floor of Normalization's std


def _scalar_or_channels(layer: Layer, value: Any, channels: int) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64).ravel()
    if array.size == 1:
        return np.full(channels, array[0])
    if array.size != channels:
        raise fail(layer, f"{array.size} values for {channels} channels")
    return array


def _channels(blob: Any) -> int:
    return blob.shape[1] if blob.nchw else blob.shape[-1]


def _channel_affine(e: Any, layer: Layer, blob: Any, scale: np.ndarray, shift: np.ndarray) -> Any:
    """y = x * scale + shift per channel (the last Keras axis)."""
    if not blob.nchw and blob.rank != 2:
        raise fail(layer, f"input rank {blob.rank}")
    if np.all(scale == scale[0]) and np.all(shift == shift[0]):
        params = [float(scale[0]), float(shift[0])]
        return e.add(
            layer.name,
            blob.shape,
            lambda name, x: e.builder.add_activation(name, "LINEAR", x, name, params=params),
        )
    if not blob.nchw:  # Core ML's scale layer needs C, H, W
        raise fail(layer, "per-channel values on a flat tensor")
    return scale_layer(e, layer.name, scale, shift, [_channels(blob), 1, 1])


@register("Rescaling", family="preprocessing")
def _rescaling(e: Any, node: Any, inputs: list) -> Any:
    layer, blob = node.layer, inputs[0]
    c = _channels(blob)
    scale = _scalar_or_channels(layer, layer.config.get("scale", 1.0), c)
    shift = _scalar_or_channels(layer, layer.config.get("offset", 0.0), c)
    return _channel_affine(e, layer, blob, scale, shift)


@register("Normalization", family="preprocessing")
def _normalization(e: Any, node: Any, inputs: list) -> Any:
    """Keras' Normalization: (x - mean) / max(sqrt(variance), epsilon) on the last axis."""
    layer, blob = node.layer, inputs[0]
    cfg = layer.config
    if cfg.get("invert"):
        raise fail(layer, "invert=True")
    axis = cfg.get("axis", -1)
    if isinstance(axis, list):
        axis = axis[0] if len(axis) == 1 else None
    if not isinstance(axis, int) or axis % blob.rank != blob.rank - 1:
        raise fail(layer, f"axis {cfg.get('axis')} is not the channels")
    c = _channels(blob)
    if cfg.get("mean") is not None or cfg.get("variance") is not None:
        # given when the layer was made (EfficientNetV2, ConvNeXt): no weights then
        expect_weights(layer, set(), set())
        mean = _scalar_or_channels(layer, cfg.get("mean"), c)
        variance = _scalar_or_channels(layer, cfg.get("variance"), c)
    else:
        found = expect_weights(layer, {"mean", "variance"}, {"count"})
        for name in ("mean", "variance"):
            if math.prod(found[name].shape) != c:
                raise fail(layer, f"{name} {list(found[name].shape)} does not fit {c} channels")
        if e.builder is None:
            return _channel_affine(e, layer, blob, np.ones(c), np.zeros(c) + 0.5)
        mean = e.weight(layer, "mean", np.float64).ravel()
        variance = e.weight(layer, "variance", np.float64).ravel()
    std = np.maximum(np.sqrt(variance), KERAS_EPSILON)
    return _channel_affine(e, layer, blob, 1.0 / std, -mean / std)


def image_std(e: Any, pre: Preprocessing, image: Any) -> Any:
    """The image blob divided by the preprocessing's per-channel std, if it has one (Core ML's
    image scaler has one scale for all channels)."""
    if pre.std is None or image.shape[1] != 3:
        return image
    std = np.asarray(pre.std[::-1] if pre.bgr else pre.std, dtype=np.float64)
    e.use(image)
    return scale_layer(e, "preprocessing/std", 1.0 / std, None, [3, 1, 1])
