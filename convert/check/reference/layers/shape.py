"""Layers that move data without computing on it: reshapes, transposes, concatenation, slicing,
splitting, squeezing, constants and broadcasts.

Static shapes in the parameters describe one prediction; the prediction axis is kept in front.
"""

from __future__ import annotations

import math

import numpy as np

from convert.check.reference.registry import (
    Layer,
    axes,
    axis,
    batch_broadcast,
    need_rank,
    rank,
    register,
)


def _ints(values) -> list[int]:
    return [int(v) for v in values]


# -- reshapes --------------------------------------------------------------------------------


@register("reshapeStatic")
def reshape_static(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    return x.reshape((x.shape[0], *_ints(layer.params.targetShape)))


@register("reshapeLike")
def reshape_like(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    x, like = xs
    return x.reshape((x.shape[0], *like.shape[1:]))


@register("rankPreservingReshape")
def rank_preserving_reshape(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    target = _ints(layer.params.targetShape)
    if len(target) != rank(x):
        raise ValueError(f"targetShape {target} does not have the input's rank {rank(x)}")
    shape = [size if t == 0 else t for t, size in zip(target, x.shape[1:])]
    return x.reshape((x.shape[0], *shape))


@register("reshape")
def reshape(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """Rank-5 [Seq, 1, C, H, W] reshape; a 3-value target keeps Seq."""
    x = xs[0]
    if rank(x) != 5 or x.shape[2] != 1:
        raise ValueError(f"reshape needs a rank 5 [Seq, 1, C, H, W] input, got {x.shape[1:]}")
    target = _ints(layer.params.targetShape)
    if len(target) not in (3, 4):
        raise ValueError(f"reshape targetShape must have 3 or 4 values, got {target}")
    seq = x.shape[1] if len(target) == 3 else target[0]
    c, h, w = target[-3:]
    if layer.enum("mode") == "CHANNEL_LAST":
        hwc = x.transpose(0, 1, 2, 4, 5, 3).reshape(x.shape[0], seq, 1, h, w, c)
        return np.ascontiguousarray(hwc.transpose(0, 1, 2, 5, 3, 4))
    return x.reshape(x.shape[0], seq, 1, c, h, w)


@register("flatten")
def flatten(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """(..., C, H, W) -> (..., C*H*W, 1, 1), in C, H, W order or H, W, C order (CHANNEL_LAST)."""
    x = xs[0]
    need_rank(layer, x, 3)
    if layer.enum("mode") == "CHANNEL_LAST":
        x = np.moveaxis(x, -3, -1)
    return x.reshape(x.shape[:-3] + (-1, 1, 1))


@register("flattenTo2D")
def flatten_to_2d(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    r = rank(x)
    a = int(layer.params.axis)
    split = a + r if a < 0 else a
    if not 0 <= split <= r:
        raise ValueError(f"flattenTo2D axis {a} out of range for rank {r}")
    return x.reshape(x.shape[0], math.prod(x.shape[1 : split + 1]), -1)


# -- axis order ------------------------------------------------------------------------------


@register("transpose")
def transpose(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    order = _ints(layer.params.axes)
    if sorted(order) != list(range(rank(x))):
        raise ValueError(f"axes {order} are not a permutation for rank {rank(x)}")
    return np.ascontiguousarray(x.transpose(0, *(a + 1 for a in order)))


@register("permute")
def permute(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """Rank-5 [Seq, B, C, H, W]; ``axis`` permutes (Seq, C, H, W) and keeps B in place."""
    x = xs[0]
    if rank(x) != 5:
        raise ValueError(f"permute needs a rank 5 input, got shape {x.shape[1:]}")
    order = _ints(layer.params.axis) or [0, 1, 2, 3]
    if sorted(order) != [0, 1, 2, 3]:
        raise ValueError(f"permute axis {order} is not a permutation of [0, 1, 2, 3]")
    logical = [1, 3, 4, 5]  # array axes of Seq, C, H, W
    moved = [logical[a] for a in order]
    return np.ascontiguousarray(x.transpose(0, moved[0], 2, *moved[1:]))


# -- joining and splitting -------------------------------------------------------------------


@register("concat")
def concat(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """Along axis -3 (channels), or -5 with sequenceConcat."""
    along = -5 if layer.params.sequenceConcat else -3
    for x in xs:
        need_rank(layer, x, -along)
    return np.concatenate(batch_broadcast(xs), axis=along)


@register("concatND")
def concat_nd(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    xs = batch_broadcast(xs)
    along = axis(int(layer.params.axis), rank(xs[0]))
    if not layer.params.interleave:
        return np.concatenate(xs, axis=along)
    stacked = np.stack(xs, axis=along + 1)
    shape = list(xs[0].shape)
    shape[along] *= len(xs)
    return stacked.reshape(shape)


@register("stack")
def stack(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    xs = batch_broadcast(xs)
    return np.stack(xs, axis=axis(int(layer.params.axis), rank(xs[0]) + 1))


@register("split")
def split(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    x = xs[0]
    need_rank(layer, x, 3)
    return np.split(x, int(layer.params.nOutputs), axis=-3)


@register("splitND")
def split_nd(layer: Layer, xs: list[np.ndarray]) -> list[np.ndarray]:
    p = layer.params
    x = xs[0]
    along = axis(int(p.axis), rank(x))
    sizes = _ints(p.splitSizes)
    if not sizes:
        return np.split(x, int(p.numSplits), axis=along)
    if sum(sizes) != x.shape[along]:
        raise ValueError(f"split sizes {sizes} do not add up to {x.shape[along]}")
    return np.split(x, np.cumsum(sizes)[:-1], axis=along)


# -- slicing ---------------------------------------------------------------------------------


@register("sliceStatic")
def slice_static(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    x = xs[0]
    r = rank(x)
    begin, end, strides = _ints(p.beginIds), _ints(p.endIds), _ints(p.strides)
    begin_masks, end_masks = list(p.beginMasks), list(p.endMasks)
    squeeze = list(p.squeezeMasks) or [False] * r
    if not all(len(v) == r for v in (begin, end, strides, begin_masks, end_masks, squeeze)):
        raise ValueError(f"sliceStatic parameters do not all have the input's rank {r}")
    index: list[slice | int] = [slice(None)]
    for i in range(r):
        if squeeze[i]:
            index.append(begin[i])
            continue
        start = None if begin_masks[i] else begin[i]
        stop = None if end_masks[i] else end[i]
        index.append(slice(start, stop, strides[i] or 1))
    y = x[tuple(index)]
    return y if rank(y) else y.reshape(-1, 1)


@register("slice")
def slice_legacy(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """One of axes -3 / -2 / -1, numpy semantics ``[start:end:stride]``."""
    p = layer.params
    x = xs[0]
    along = {"CHANNEL_AXIS": -3, "HEIGHT_AXIS": -2, "WIDTH_AXIS": -1}[layer.enum("axis")]
    need_rank(layer, x, -along)
    index = [slice(None)] * x.ndim
    index[along] = slice(int(p.startIndex), int(p.endIndex), int(p.stride) or 1)
    return x[tuple(index)]


# -- rank changes ----------------------------------------------------------------------------


@register("squeeze")
def squeeze(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    x = xs[0]
    if p.squeezeAll:
        drop = tuple(i for i in range(1, x.ndim) if x.shape[i] == 1)
    else:
        drop = axes(_ints(p.axes), rank(x))
    if any(x.shape[i] != 1 for i in drop):
        raise ValueError(f"cannot squeeze axes of size != 1 from shape {x.shape[1:]}")
    y = np.squeeze(x, axis=drop)
    return y if rank(y) else y.reshape(-1, 1)


@register("expandDims")
def expand_dims(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    new = _ints(layer.params.axes)
    return np.expand_dims(x, axes(new, rank(x) + len(new)))


# -- constants and broadcasts ----------------------------------------------------------------


@register("loadConstantND")
def load_constant_nd(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    shape = _ints(layer.params.shape)
    return layer.weight("data", shape)[None]


@register("loadConstant")
def load_constant(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """A [C, H, W] constant as the rank-5 blob [1, 1, C, H, W]."""
    shape = _ints(layer.params.shape)
    if len(shape) != 3:
        raise ValueError(f"loadConstant shape must be [C, H, W], got {shape}")
    return layer.weight("data", shape)[None, None, None]


@register("fillStatic")
def fill_static(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    shape = _ints(layer.params.targetShape)
    return np.full((1, *shape), layer.params.value, dtype=np.float32)


@register("fillLike")
def fill_like(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    return np.full(xs[0].shape, layer.params.value, dtype=np.float32)


@register("broadcastToStatic")
def broadcast_to_static(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    shape = _ints(layer.params.targetShape)
    x = x.reshape(x.shape[:1] + (1,) * max(0, len(shape) - rank(x)) + x.shape[1:])
    return np.ascontiguousarray(np.broadcast_to(x, (x.shape[0], *shape)))


@register("tile")
def tile(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    if len(xs) > 1:
        layer.unsupported("reps given as an input")
    reps = _ints(layer.params.reps)
    reps = [1] * (rank(x) - len(reps)) + reps
    return np.tile(x, [1, *reps])


@register("copy")
def copy(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    return xs[0]


@register("reverse")
def reverse(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    flags = list(layer.params.reverseDim)
    if len(flags) != rank(x):
        raise ValueError(f"reverseDim has {len(flags)} values for rank {rank(x)}")
    return np.flip(x, axis=tuple(i + 1 for i, f in enumerate(flags) if f)).copy()
