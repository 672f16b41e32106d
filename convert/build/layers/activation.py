"""Activations: the Activation, ReLU, LeakyReLU, ELU and Softmax layers, and the ``activation``
argument of Dense and convolution layers (:func:`apply`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from convert.build.layers.registry import fail, register
from convert.read.graph import Layer

# tf.nn.selu / keras.ops.selu
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
FLOAT32_MAX = float(np.finfo(np.float32).max)

Step = Callable[[Any, str], None]  # (emitter, base name): layers from the current blob


def act(kind: str, params: Any = None) -> Step:
    def emit(e: Any, base: str) -> None:
        e.add(
            f"{base}/{kind.lower()}",
            e.shape,
            lambda name, x: e.builder.add_activation(name, kind, x, name, params=params),
        )

    return emit


def clip(low: float, high: float) -> Step:
    def emit(e: Any, base: str) -> None:
        e.add(
            f"{base}/clip",
            e.shape,
            lambda name, x: e.builder.add_clip(name, x, name, min_value=low, max_value=high),
        )

    return emit


def softmax(axis: int = -1) -> Step:
    def emit(e: Any, base: str) -> None:
        e.add(
            f"{base}/softmax",
            e.shape,
            lambda name, x: e.builder.add_softmax_nd(name, x, name, axis=axis),
        )

    return emit


def _gelu(e: Any, base: str) -> None:
    e.add(f"{base}/gelu", e.shape, lambda name, x: e.builder.add_gelu(name, x, name, "EXACT"))


def _exp(e: Any, base: str) -> None:
    e.add(f"{base}/exp", e.shape, lambda name, x: e.builder.add_unary(name, x, name, "exp"))


def _chain(*steps: Step) -> Step:
    def emit(e: Any, base: str) -> None:
        for step in steps:
            step(e, base)

    return emit


def _gated(*gate: Step) -> Step:
    """``x * gate(x)`` (swish, mish, hard swish)."""

    def emit(e: Any, base: str) -> None:
        x = e.blob
        for step in gate:
            step(e, base)
        g = e.blob
        e.blob = x
        e.add(
            f"{base}/multiply",
            e.shape,
            lambda name, _x: e.builder.add_multiply_broadcastable(name, [x, g], name),
        )

    return emit


_SIGMOID = act("SIGMOID")
_SOFTPLUS = act("SOFTPLUS")
_HARD_SIGMOID_3 = act("SIGMOID_HARD", [1.0 / 6.0, 0.5])  # relu6(x + 3) / 6

# Keras activation name -> Core ML layers; the hard sigmoid differs between the two Kerases.
ACTIVATIONS: dict[str, Step] = {
    "relu": act("RELU"),
    "relu6": clip(0.0, 6.0),
    "sigmoid": _SIGMOID,
    "tanh": act("TANH"),
    "softmax": softmax(-1),
    "elu": act("ELU", 1.0),
    "selu": _chain(act("ELU", SELU_ALPHA), act("LINEAR", [SELU_SCALE, 0.0])),
    "softplus": _SOFTPLUS,
    "softsign": act("SOFTSIGN"),
    "swish": _gated(_SIGMOID),
    "silu": _gated(_SIGMOID),
    "gelu": _gelu,  # the string means the exact GELU in both Kerases
    "exponential": _exp,
    "mish": _gated(_SOFTPLUS, act("TANH")),
}
KERAS3_ONLY: dict[str, Step] = {
    "leaky_relu": act("LEAKYRELU", [0.2]),
    "hard_sigmoid": _HARD_SIGMOID_3,
    "hard_silu": _gated(_HARD_SIGMOID_3),
    "hard_swish": _gated(_HARD_SIGMOID_3),
}
KERAS2_ONLY: dict[str, Step] = {
    "hard_sigmoid": act("SIGMOID_HARD", [0.2, 0.5]),  # clip(0.2 x + 0.5, 0, 1)
}


def activation_name(layer: Layer, value: Any) -> str:
    """The Keras name of an ``activation`` argument; a custom function is an error."""
    if value is None:
        return "linear"
    if isinstance(value, dict):  # Keras 3 may serialise a built-in as a "function" object
        module = str(value.get("module") or "")
        if value.get("class_name") == "function" and module.startswith("keras"):
            value = value.get("config")
        if not isinstance(value, str):
            raise fail(layer, "a custom activation")
    return str(value)


def apply(e: Any, layer: Layer, value: Any, base: str) -> None:
    """The activation ``value`` (a Keras ``activation`` argument) on the current blob."""
    name = activation_name(layer, value)
    if name == "linear":
        return
    if e.current().nchw and name == "softmax":  # Keras' last axis is not last in NCHW
        raise fail(layer, "a softmax over the channels of an image-like tensor")
    table = {**ACTIVATIONS, **(KERAS3_ONLY if e.graph.keras_major >= 3 else KERAS2_ONLY)}
    if name not in table:
        raise fail(layer, f"activation '{name}' is not covered")
    table[name](e, base)


@register("Activation", family="activation", vector=True)
def _activation_layer(e: Any, node: Any, inputs: list) -> Any:
    layer = node.layer
    apply(e, layer, layer.config.get("activation"), layer.name)
    return e.current()


@register("ReLU", family="activation", vector=True)
def _relu(e: Any, node: Any, inputs: list) -> Any:
    layer = node.layer
    cfg = layer.config
    slope = float(cfg.get("negative_slope") or 0.0)
    top = cfg.get("max_value")
    if float(cfg.get("threshold") or 0.0) != 0.0:
        raise fail(layer, "a threshold is not covered")
    if slope == 0.0:
        (act("RELU") if top is None else clip(0.0, float(top)))(e, layer.name)
        return e.current()
    act("LEAKYRELU", [slope])(e, layer.name)
    if top is not None:
        clip(-FLOAT32_MAX, float(top))(e, layer.name)
    return e.current()


@register("LeakyReLU", family="activation", vector=True)
def _leaky_relu(e: Any, node: Any, inputs: list) -> Any:
    cfg = node.layer.config
    slope = cfg.get("negative_slope", cfg.get("alpha", 0.3))
    act("LEAKYRELU", [float(slope)])(e, node.layer.name)
    return e.current()


@register("ELU", family="activation", vector=True)
def _elu(e: Any, node: Any, inputs: list) -> Any:
    act("ELU", float(node.layer.config.get("alpha", 1.0)))(e, node.layer.name)
    return e.current()


@register("Softmax", family="activation", vector=True)
def _softmax_layer(e: Any, node: Any, inputs: list) -> Any:
    layer = node.layer
    if inputs[0].nchw:
        raise fail(layer, "a softmax over the channels of an image-like tensor")
    axis = layer.config.get("axis", -1)
    if isinstance(axis, list) and len(axis) == 1:
        axis = axis[0]
    if not isinstance(axis, int) or not -e.rank <= axis < e.rank:
        raise fail(layer, f"softmax axis {axis} for rank {e.rank}")
    softmax(axis - e.rank if axis >= 0 else axis)(e, layer.name)
    return e.current()
