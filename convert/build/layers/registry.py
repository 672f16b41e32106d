"""The registry of layer translations: one function per Keras layer class, grouped by family.

A translation takes the emitter (:class:`convert.build.walker.Emitter`), the graph node and the
blobs of its inputs, writes the Core ML layers that compute the node, and returns the blob that
holds its output. It is registered under the Keras class name (``Conv2D``), under
``ops.<Class>`` for a Keras 3 ``keras.ops`` call saved without a layer config, or under
``tf.<function>`` for a tf_keras ``TFOpLambda``. A layer that has no entry is a lookup miss that
names the layer, and the caller converts that network with ``ct.convert`` instead.

Translations raise :class:`Unsupported` (made by :func:`fail`) for a configuration they do not
cover; the message names the layer and the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from convert.read.graph import Layer

FAMILIES = (
    "convolution",
    "normalisation",
    "activation",
    "dense",
    "merge",
    "shape",
    "pooling",
    "preprocessing",
)


class Unsupported(Exception):
    """The network cannot be built from the weights; ``str()`` says which layer and why."""


def label(layer: Layer) -> str:
    return f"layer '{layer.qualified_name}' ({layer.class_name})"


def fail(layer: Layer, why: str) -> Unsupported:
    return Unsupported(f"{label(layer)}: {why}")


def expect_weights(layer: Layer, required: set[str], optional: set[str]) -> dict[str, Any]:
    """The layer's weights by name; exactly ``required`` plus any of ``optional``."""
    found = {w.name: w for w in layer.weights}
    extra = sorted(set(found) - required - optional)
    if extra:
        raise fail(layer, f"unexpected weights {', '.join(extra)}")
    missing = sorted(required - set(found))
    if missing:
        raise fail(layer, f"missing weights {', '.join(missing)}")
    return found


Translate = Callable[[Any, Any, list[Any]], Any]  # (emitter, node, input blobs) -> output blob


@dataclass(frozen=True)
class Translation:
    key: str
    family: str
    fn: Translate
    merge: bool  # takes two or more inputs; otherwise exactly one
    vector: bool  # also covered in a vector-rank walk (Keras order, one chain of layers)


REGISTRY: dict[str, Translation] = {}


def register(*keys: str, family: str, merge: bool = False, vector: bool = False):
    """Register the decorated function as the translation of ``keys``.

    ``vector=True`` when it also works on tensors kept in Keras order at any rank, as a head of
    one chain of layers is built; the rest need the image layout (rank 4 as NCHW) of a backbone.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family}")

    def wrap(fn: Translate) -> Translate:
        for key in keys:
            if key in REGISTRY:
                raise ValueError(f"{key} is registered twice")
            REGISTRY[key] = Translation(key, family, fn, merge, vector)
        return fn

    return wrap


def is_ops_call(layer: Layer) -> bool:
    """A Keras 3 ``keras.ops`` call (``x + 3.0``, ``keras.ops.softmax``): saved as a node with the
    operation's class name but without a layer's config."""
    return "trainable" not in layer.config and "dtype" not in layer.config


def key_of(layer: Layer) -> str:
    if layer.class_name == "TFOpLambda":
        return f"tf.{layer.config.get('function')}"
    if is_ops_call(layer):
        return f"ops.{layer.class_name}"
    return layer.class_name


def lookup(layer: Layer, vector: bool) -> Translation:
    """The translation of ``layer``; raises :class:`Unsupported` naming it if there is none."""
    key = key_of(layer)
    found = REGISTRY.get(key)
    if found is None:
        if key.startswith(("ops.", "tf.")):
            raise Unsupported(f"{label(layer)} is a keras.ops or TensorFlow call not covered")
        raise Unsupported(f"{label(layer)} is not covered")
    if vector and not found.vector:
        raise Unsupported(f"{label(layer)} is not covered in a head of one chain of layers")
    return found
