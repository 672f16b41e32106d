"""Reductions: the ND family (reduceMean, reduceSum, ... with axes / keepDims / reduceAll), the
legacy ``reduce`` layer (over C, H, W, keeping the rank) and argMax / argMin."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from convert.check.reference.registry import Layer, axes, axis, rank, register

Reduction = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # keepdims=True


def _logsumexp(x: np.ndarray, over: tuple[int, ...]) -> np.ndarray:
    top = x.max(axis=over, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=over, keepdims=True))


_ND: dict[str, Reduction] = {
    "reduceSum": lambda x, a: x.sum(axis=a, keepdims=True),
    "reduceMean": lambda x, a: x.mean(axis=a, keepdims=True),
    "reduceMax": lambda x, a: x.max(axis=a, keepdims=True),
    "reduceMin": lambda x, a: x.min(axis=a, keepdims=True),
    "reduceProd": lambda x, a: x.prod(axis=a, keepdims=True),
    "reduceL1": lambda x, a: np.abs(x).sum(axis=a, keepdims=True),
    "reduceL2": lambda x, a: np.sqrt((x * x).sum(axis=a, keepdims=True)),
    "reduceSumSquare": lambda x, a: (x * x).sum(axis=a, keepdims=True),
    "reduceLogSum": lambda x, a: np.log(x.sum(axis=a, keepdims=True)),
    "reduceLogSumExp": _logsumexp,
}


def _nd(reduction: Reduction):
    def run(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
        p = layer.params
        x = xs[0]
        over = tuple(range(1, x.ndim)) if p.reduceAll else axes(list(p.axes), rank(x))
        with np.errstate(divide="ignore", invalid="ignore"):
            y = reduction(x, over).astype(np.float32, copy=False)
        if p.keepDims:
            return y
        y = np.squeeze(y, axis=over)
        return y if rank(y) else y.reshape(-1, 1)

    return run


for _kind, _reduction in _ND.items():
    register(_kind)(_nd(_reduction))


_LEGACY_AXES = {"CHW": (-3, -2, -1), "HW": (-2, -1), "C": (-3,), "H": (-2,), "W": (-1,)}


@register("reduce")
def reduce_legacy(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """Over C, H and/or W; the reduced axes stay, with size 1. LOGSUM adds epsilon (0 -> 1e-6)."""
    p = layer.params
    x = xs[0]
    over = _LEGACY_AXES[layer.enum("axis")]
    if rank(x) < -min(over):
        raise ValueError(f"reduce over {layer.enum('axis')} needs rank >= {-min(over)}")
    mode = layer.enum("mode")
    eps = np.float32(p.epsilon or 1e-6)
    modes: dict[str, Reduction] = {
        "SUM": _ND["reduceSum"],
        "AVG": _ND["reduceMean"],
        "PROD": _ND["reduceProd"],
        "LOGSUM": lambda v, a: np.log(v + eps).sum(axis=a, keepdims=True),
        "SUMSQUARE": _ND["reduceSumSquare"],
        "L1": _ND["reduceL1"],
        "L2": _ND["reduceL2"],
        "MAX": _ND["reduceMax"],
        "MIN": _ND["reduceMin"],
    }
    if mode == "ARGMAX" and len(over) == 1:
        return np.argmax(x, axis=over[0], keepdims=True).astype(np.float32)
    if mode not in modes:
        layer.unsupported(f"reduce mode {mode} over {layer.enum('axis')}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return modes[mode](x, over).astype(np.float32, copy=False)


def _arg(pick: Callable[..., np.ndarray]):
    def run(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
        x = xs[0]
        along = axis(int(layer.params.axis), rank(x))
        y = pick(x, axis=along, keepdims=True).astype(np.float32)
        if layer.params.removeDim and rank(x) > 1:
            y = np.squeeze(y, axis=along)
        return y

    return run


register("argMax")(_arg(np.argmax))
register("argMin")(_arg(np.argmin))
