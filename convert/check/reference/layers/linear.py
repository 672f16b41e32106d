"""Matrix products: innerProduct (dense) and batchedMatmul."""

from __future__ import annotations

import numpy as np

from convert.check.reference.registry import Layer, aligned, rank, register


@register("innerProduct")
def inner_product(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """``W x + b`` with W [C_out, C_in]. Ranks 1-3 use the last axis; rank 4 (x1, C, H, W) and
    rank 5 (x1, x2, C, H, W) flatten their last three axes and give (..., C_out, 1, 1)."""
    p = layer.params
    if p.int8DynamicQuantize:
        layer.unsupported("int8DynamicQuantize")
    x = xs[0]
    cin, cout = int(p.inputChannels), int(p.outputChannels)
    w = layer.weight("weights", (cout, cin))
    wt = layer.cached("weights.T", lambda: np.ascontiguousarray(w.T))
    r = rank(x)
    flat = x.reshape(x.shape[:-3] + (-1,)) if r >= 4 else x
    if flat.shape[-1] != cin:
        raise ValueError(f"innerProduct expects {cin} inputs, got shape {x.shape[1:]}")
    y = flat @ wt
    if p.hasBias:
        y += layer.weight("bias", (cout,))
    return y.reshape(y.shape + (1, 1)) if r >= 4 else y


@register("batchedMatmul")
def batched_matmul(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    if p.int8DynamicQuantize:
        layer.unsupported("int8DynamicQuantize")
    if len(xs) == 2:
        return _two_inputs(xs[0], xs[1], bool(p.transposeA), bool(p.transposeB))
    x1, x2 = int(p.weightMatrixFirstDimension), int(p.weightMatrixSecondDimension)
    # stored column major: the flat values are the [X2, X1] transpose, row major
    w = layer.cached("matrix", lambda: np.ascontiguousarray(layer.weight("weights", (x2, x1)).T))
    x = xs[0]
    if x.shape[-1] != x1:
        raise ValueError(f"batchedMatmul expects a last axis of {x1}, got shape {x.shape[1:]}")
    y = x @ w
    if p.hasBias:
        y += layer.weight("bias", (x2,))
    return y


def _two_inputs(a: np.ndarray, b: np.ndarray, ta: bool, tb: bool) -> np.ndarray:
    """numpy matmul over the last two axes; a 1-D ``a`` becomes (1, D), a 1-D ``b`` (D, 1), and
    the result keeps rank max(2, rank a, rank b)."""
    if rank(a) == 1:
        a = a[:, None, :]
    if rank(b) == 1:
        b = b[:, :, None]
    if ta:
        a = np.swapaxes(a, -1, -2)
    if tb:
        b = np.swapaxes(b, -1, -2)
    a, b = aligned([a, b])
    return np.matmul(a, b)
