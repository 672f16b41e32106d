"""Element-wise layers: arithmetic with (limited or numpy) broadcasting, unary functions,
comparisons, scale and bias.

The legacy layers (add, multiply, average, max, min) broadcast like the ND ones once their
inputs are brought to one rank, which covers the shapes the spec allows ([B,1,1,1], [B,C,1,1],
[B,1,H,W] against [B,C,H,W]).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from convert.check.reference.registry import Layer, aligned, need_rank, register

Binary = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _fold(op: Binary, xs: list[np.ndarray]) -> np.ndarray:
    return functools.reduce(op, aligned(xs)).astype(np.float32, copy=False)


# -- legacy n-ary layers ---------------------------------------------------------------------


@register("add")
def add(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    if len(xs) == 1:
        return xs[0] + np.float32(layer.params.alpha)
    return _fold(np.add, xs)


@register("multiply")
def multiply(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    if len(xs) == 1:
        return xs[0] * np.float32(layer.params.alpha)
    return _fold(np.multiply, xs)


@register("average")
def average(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    return _fold(np.add, xs) / np.float32(len(xs))


@register("max")
def maximum(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    return _fold(np.maximum, xs)


@register("min")
def minimum(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    return _fold(np.minimum, xs)


# -- broadcastable binary layers -------------------------------------------------------------

_BINARY: dict[str, Binary] = {
    "addBroadcastable": np.add,
    "subtractBroadcastable": np.subtract,
    "multiplyBroadcastable": np.multiply,
    "divideBroadcastable": np.divide,
    "maxBroadcastable": np.maximum,
    "minBroadcastable": np.minimum,
    "powBroadcastable": np.power,
    "modBroadcastable": np.mod,
    "floorDivBroadcastable": np.floor_divide,
}


def _binary(op: Binary):
    def run(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
        if len(xs) != 2:
            raise ValueError(f"{layer.kind} needs 2 inputs, got {len(xs)}")
        return _fold(op, xs)

    return run


for _kind, _op in _BINARY.items():
    register(_kind)(_binary(_op))


# -- comparisons and logic (1.0 for true, 0.0 for false) -------------------------------------

_COMPARE: dict[str, Binary] = {
    "equal": np.equal,
    "notEqual": np.not_equal,
    "lessThan": np.less,
    "lessEqual": np.less_equal,
    "greaterThan": np.greater,
    "greaterEqual": np.greater_equal,
}
_LOGIC: dict[str, Binary] = {
    "logicalAnd": np.logical_and,
    "logicalOr": np.logical_or,
    "logicalXor": np.logical_xor,
}


def _compare(op: Binary):
    def run(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
        if len(xs) == 1:
            return op(xs[0], np.float32(layer.params.alpha)).astype(np.float32)
        return _fold(op, xs)

    return run


def _logic(op: Binary):
    def run(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
        return _fold(lambda a, b: op(a != 0, b != 0), xs)

    return run


for _kind, _op in _COMPARE.items():
    register(_kind)(_compare(_op))
for _kind, _op in _LOGIC.items():
    register(_kind)(_logic(_op))


@register("logicalNot")
def logical_not(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    return (xs[0] == 0).astype(np.float32)


@register("whereBroadcastable")
def where_broadcastable(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """``x`` where the condition is non-zero, else ``y``; all three broadcast (ct.convert uses
    it for ELU with alpha != 1)."""
    if len(xs) != 3:
        raise ValueError(f"whereBroadcastable needs 3 inputs (condition, x, y), got {len(xs)}")
    condition, x, y = xs
    return np.where(condition != 0, x, y).astype(np.result_type(x, y))


# -- unary -----------------------------------------------------------------------------------


@register("unary")
def unary(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """``f(scale * x + shift)``; scale 0 means 1, epsilon 0 means 1e-6 (as the spec says)."""
    p = layer.params
    scale = np.float32(p.scale or 1.0)
    eps = np.float32(p.epsilon or 1e-6)
    x = xs[0] * scale + np.float32(p.shift) if (scale != 1 or p.shift) else xs[0]
    kind = layer.enum("type")
    functions: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "SQRT": np.sqrt,
        "RSQRT": lambda v: 1 / np.sqrt(v + eps),
        "INVERSE": lambda v: 1 / (v + eps),
        "POWER": lambda v: np.power(v, np.float32(p.alpha)),
        "EXP": np.exp,
        "LOG": np.log,
        "ABS": np.abs,
        "THRESHOLD": lambda v: np.maximum(v, np.float32(p.alpha)),
    }
    if kind not in functions:
        layer.unsupported(f"unary function {kind}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return functions[kind](x).astype(np.float32, copy=False)


_erf = np.frompyfunc(math.erf, 1, 1)

_ELEMENTWISE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "ceil": np.ceil,
    "floor": np.floor,
    "round": lambda x: np.sign(x) * np.floor(np.abs(x) + 0.5),  # halves away from zero
    "sign": np.sign,
    "exp2": np.exp2,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "asin": np.arcsin,
    "acos": np.arccos,
    "atan": np.arctan,
    "sinh": np.sinh,
    "cosh": np.cosh,
    "tanh": np.tanh,
    "asinh": np.arcsinh,
    "acosh": np.arccosh,
    "atanh": np.arctanh,
    "erf": lambda x: _erf(x).astype(np.float32),
}


def _elementwise(fn: Callable[[np.ndarray], np.ndarray]):
    def run(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return fn(xs[0]).astype(np.float32, copy=False)

    return run


for _kind, _fn in _ELEMENTWISE.items():
    register(_kind)(_elementwise(_fn))


@register("clip")
def clip(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    return np.minimum(np.maximum(xs[0], np.float32(p.minVal)), np.float32(p.maxVal))


# -- scale and bias (legacy, broadcast over C, H, W) -----------------------------------------


def _chw(layer: Layer, name: str, shape: list[int]) -> np.ndarray:
    """A [1], [C], [1, H, W] or [C, H, W] parameter shaped to broadcast over (..., C, H, W)."""
    if len(shape) not in (1, 3):
        raise ValueError(f"{name} shape must be [1], [C], [1,H,W] or [C,H,W], got {shape}")
    values = layer.weight(name, shape)
    return values.reshape(-1, 1, 1) if len(shape) == 1 else values


@register("scale")
def scale(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    x = xs[0]
    need_rank(layer, x, 3)
    y = x * _chw(layer, "scale", [int(d) for d in p.shapeScale] or [1])
    if p.hasBias:
        y = y + _chw(layer, "bias", [int(d) for d in p.shapeBias] or [1])
    return y


@register("bias")
def bias(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    need_rank(layer, x, 3)
    return x + _chw(layer, "bias", [int(d) for d in layer.params.shape] or [1])
