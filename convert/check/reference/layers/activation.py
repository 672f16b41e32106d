"""Activations: the ``activation`` layer (ActivationParams), softmax, GELU, clamped ReLU.

PReLU and parametric softplus take one parameter per channel, on axis -3.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from convert.check.reference.registry import Layer, axis, need_rank, rank, register

Activation = Callable[[Layer, object, np.ndarray], np.ndarray]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (np.tanh(0.5 * x) + 1)  # no overflow for large |x|


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(np.float32(0), x)


def _channels(layer: Layer, m, field: str, x: np.ndarray) -> np.ndarray:
    """A length-1 or length-C parameter of the activation, shaped for (..., C, H, W)."""
    need_rank(layer, x, 3)
    values = layer.weight(field, of=m)
    if values.size not in (1, x.shape[-3]):
        raise ValueError(f"{field} has {values.size} values for {x.shape[-3]} channels")
    return values.reshape(-1, 1, 1)


def _prelu(layer: Layer, m, x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, x, x * _channels(layer, m, "alpha", x))


def _parametric_softplus(layer: Layer, m, x: np.ndarray) -> np.ndarray:
    alpha, beta = (_channels(layer, m, f, x) for f in ("alpha", "beta"))
    return alpha * _softplus(beta * x)


_ACTIVATIONS: dict[str, Activation] = {
    "linear": lambda layer, m, x: np.float32(m.alpha) * x + np.float32(m.beta),
    "ReLU": lambda layer, m, x: np.maximum(x, np.float32(0)),
    "leakyReLU": lambda layer, m, x: np.where(x >= 0, x, np.float32(m.alpha) * x),
    "thresholdedReLU": lambda layer, m, x: np.where(x >= np.float32(m.alpha), x, np.float32(0)),
    "PReLU": _prelu,
    "tanh": lambda layer, m, x: np.tanh(x),
    "scaledTanh": lambda layer, m, x: np.float32(m.alpha) * np.tanh(np.float32(m.beta) * x),
    "sigmoid": lambda layer, m, x: _sigmoid(x),
    "sigmoidHard": lambda layer, m, x: np.clip(np.float32(m.alpha) * x + np.float32(m.beta), 0, 1),
    "ELU": lambda layer, m, x: np.where(x >= 0, x, np.float32(m.alpha) * np.expm1(x)),
    "softsign": lambda layer, m, x: x / (1 + np.abs(x)),
    "softplus": lambda layer, m, x: _softplus(x),
    "parametricSoftplus": _parametric_softplus,
}


@register("activation")
def activation(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    kind = layer.params.WhichOneof("NonlinearityType")
    if kind not in _ACTIVATIONS:
        layer.unsupported(f"activation {kind}")
    message = getattr(layer.params, kind)
    with np.errstate(over="ignore"):
        return _ACTIVATIONS[kind](layer, message, xs[0]).astype(np.float32, copy=False)


def _softmax(x: np.ndarray, along: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=along, keepdims=True))
    return e / e.sum(axis=along, keepdims=True)


@register("softmax")
def softmax(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    """Along axis -3 (channels) of a rank >= 3 blob."""
    need_rank(layer, xs[0], 3)
    return _softmax(xs[0], -3)


@register("softmaxND")
def softmax_nd(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    return _softmax(xs[0], axis(int(layer.params.axis), rank(xs[0])))


@register("gelu")
def gelu(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    mode = layer.enum("mode")
    if mode == "TANH_APPROXIMATION":
        inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x**3)
        return 0.5 * x * (1 + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(np.float32(1.702) * x)
    if mode == "EXACT":
        from convert.check.reference.layers.elementwise import _erf

        return (0.5 * x * (1 + _erf(x / np.float32(np.sqrt(2))).astype(np.float32))).astype(
            np.float32
        )
    layer.unsupported(f"GELU mode {mode}")


@register("clampedReLU")
def clamped_relu(layer: Layer, xs: list[np.ndarray]) -> np.ndarray:
    p = layer.params
    x = xs[0]
    return np.minimum(np.where(x >= 0, x, np.float32(p.alpha) * x), np.float32(p.beta))
