"""Shape layers: Flatten, Reshape, ZeroPadding2D, Cropping2D, and the layers that are the identity
at inference (no Core ML layer at all)."""

from __future__ import annotations

import math
from typing import Any

from convert.build.layers.convolution import channels_last, need_nchw
from convert.build.layers.registry import fail, register
from convert.build.walker import to_keras_order
from convert.read.graph import IDENTITY_AT_INFERENCE, Layer


@register(*sorted(IDENTITY_AT_INFERENCE), family="shape", vector=True)
def _identity(e: Any, node: Any, inputs: list) -> Any:
    return inputs[0]


def reshape_target(layer: Layer, shape: list[int]) -> list[int]:
    """A Reshape layer's target shape (without the batch) for an input of ``shape`` (without
    the batch, Keras order), its -1 resolved; raises Unsupported if it does not fit."""
    target = layer.config.get("target_shape")
    if not isinstance(target, list) or not all(isinstance(d, int) for d in target):
        raise fail(layer, f"target shape {target}")
    size = math.prod(shape)
    if target.count(-1) > 1 or any(d == 0 or d < -1 for d in target):
        raise fail(layer, f"target shape {target}")
    known = math.prod(d for d in target if d != -1)
    if -1 in target:
        if size % known:
            raise fail(layer, f"cannot reshape {shape} to {target}")
        target = [size // known if d == -1 else d for d in target]
    if math.prod(target) != size:
        raise fail(layer, f"cannot reshape {shape} to {target}")
    return target


def _reshape_static(e: Any, base: str, shape: list[int]) -> Any:
    return e.add(base, shape, lambda name, x: e.builder.add_reshape_static(name, x, name, shape))


def _reshape_vector(e: Any, layer: Layer, shape: list[int]) -> Any:
    """Reshape a tensor kept in Keras order: one static reshape, none if nothing changes."""
    if shape == e.shape:
        return e.current()
    if len(shape) > 5:
        raise fail(layer, f"output rank {len(shape)}")
    return _reshape_static(e, f"{layer.name}/reshape", shape)


def _flat(shape: list[int]) -> bool:
    return len(shape) == 2 or (len(shape) == 4 and shape[1] == shape[2] == 1)


def _reshape_image(e: Any, layer: Layer, blob: Any, target: list[int]) -> Any:
    """Reshape to the Keras shape ``target`` (batch 1 first) in the image layout: Keras reshapes
    in NHWC order, so an NCHW blob goes through NHWC unless its H and W are 1, where both orders
    agree; a rank-4 result is NCHW again."""
    base = layer.name
    if len(target) not in (2, 4):
        raise fail(layer, f"output rank {len(target)}")
    if _flat(blob.keras_shape()) and _flat(target):
        core = target if len(target) == 2 else [1, target[3], 1, 1]
        if core == blob.shape:
            return blob
        e.use(blob)
        return _reshape_static(e, f"{base}/reshape", core)
    blob = to_keras_order(e, base, blob)
    e.use(blob)
    if target != blob.shape:
        _reshape_static(e, f"{base}/reshape", target)
    if len(target) == 4:
        n, h, w, c = target
        e.add(
            f"{base}/to_nchw",
            [n, c, h, w],
            lambda name, x: e.builder.add_transpose(name, [0, 3, 1, 2], x, name),
        )
    return e.current()


@register("Flatten", family="shape", vector=True)
def _flatten(e: Any, node: Any, inputs: list) -> Any:
    layer, blob = node.layer, inputs[0]
    if blob.nchw or (e.vector and blob.rank > 2):
        channels_last(layer)
    target = [1, math.prod(blob.shape[1:])]
    if e.vector:
        return _reshape_vector(e, layer, target)
    return _reshape_image(e, layer, blob, target)


@register("Reshape", family="shape", vector=True)
def _reshape(e: Any, node: Any, inputs: list) -> Any:
    layer, blob = node.layer, inputs[0]
    target = [1, *reshape_target(layer, blob.keras_shape()[1:])]
    if e.vector:
        return _reshape_vector(e, layer, target)
    return _reshape_image(e, layer, blob, target)


def _edges(layer: Layer, blob: Any, key: str, default: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of ZeroPadding2D's ``padding`` / Cropping2D's ``cropping``:
    one int, one per axis, or a pair per axis; the input must be an NCHW image."""
    need_nchw(layer, blob)
    channels_last(layer)
    value = layer.config.get(key, default)
    if isinstance(value, int):
        return value, value, value, value
    if len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[0], value[1], value[1]
    if len(value) == 2 and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in value):
        (top, bottom), (left, right) = value
        return top, bottom, left, right
    raise fail(layer, f"{key} {value}")


@register("ZeroPadding2D", family="shape")
def _zero_padding(e: Any, node: Any, inputs: list) -> Any:
    layer = node.layer
    top, bottom, left, right = _edges(layer, inputs[0], "padding", 1)
    n, c, h, w = inputs[0].shape
    return e.add(
        layer.name,
        [n, c, h + top + bottom, w + left + right],
        lambda name, x: e.builder.add_padding(name, left, right, top, bottom, 0.0, x, name),
    )


@register("Cropping2D", family="shape")
def _cropping(e: Any, node: Any, inputs: list) -> Any:
    layer = node.layer
    top, bottom, left, right = _edges(layer, inputs[0], "cropping", 0)
    n, c, h, w = inputs[0].shape
    if top + bottom >= h or left + right >= w:
        raise fail(layer, f"cropping {layer.config.get('cropping')} leaves nothing of {h}x{w}")
    begin, end = [0, 0, top, left], [n, c, h - bottom, w - right]
    return e.add(
        layer.name,
        [n, c, h - top - bottom, w - left - right],
        lambda name, x: e.builder.add_slice_static(
            name, x, name, begin, end, [1, 1, 1, 1], [False] * 4, [False] * 4
        ),
    )
