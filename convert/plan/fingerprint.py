"""Merkle fingerprints of tensors: identity is what a tensor computes, never what it is called.

A tensor's fingerprint hashes the producing layer's class, its config with everything that does
not change inference removed (names, trainable flags, initializers, ...), the digests of its
weights, the non-tensor call arguments, and the fingerprints of its inputs. Two tensors with the
same fingerprint are computed by the same function of the model input.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from convert.read.graph import IDENTITY_AT_INFERENCE, Graph, Layer, Node, is_tensor_ref

# Config keys that never change what a layer computes at inference.
IGNORED_KEYS = {
    "name",
    "trainable",
    "batch_input_shape",
    "batch_shape",
    "build_config",
    "sparse",
    "ragged",
    "optional",
    "momentum",
    "fused",
    "renorm",
    "renorm_clipping",
    "renorm_momentum",
    "virtual_batch_size",
    "adjustment",
    "synchronized",
    "seed",
    "module",
    "registered_name",
    "activity_regularizer",
    "lora_rank",
    "lora_alpha",
    "quantization_config",
    "input_dim",
}
IGNORED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")

# Keys some Keras versions omit when they hold their default: absent and default are the same.
DEFAULTS = {
    "keepdims": False,
    "groups": 1,
    "data_format": "channels_last",
    "dilation_rate": [1, 1],
    "depth_multiplier": 1,
}

CALL_KWARGS_IGNORED = {"training", "mask"}


# Names Keras 2 and Keras 3 give to the same activation function.
ACTIVATION_ALIASES = {"swish": "silu"}


def _canonical(value: Any) -> Any:
    """Numbers compare by value (6 == 6.0), tuples like lists; dict keys sorted by json."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return repr(value)


def _dtype_name(value: Any) -> Any:
    """Keras 2 writes "float32"; Keras 3 writes a DTypePolicy dict naming the same policy."""
    if isinstance(value, dict):
        return value.get("config", {}).get("name", value.get("class_name"))
    return value


def normalised_config(layer: Layer, input_ranks: list[int | None]) -> dict[str, Any]:
    """The part of a layer's config that decides what it computes."""
    out: dict[str, Any] = {}
    for key, value in layer.config.items():
        if key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES) or value is None:
            continue
        if key == "dtype":
            value = _dtype_name(value)
            if value in ("float32", None):
                continue
        if key in DEFAULTS and _canonical(value) == _canonical(DEFAULTS[key]):
            continue
        if key == "activation" and isinstance(value, str):
            value = ACTIVATION_ALIASES.get(value, value)
        out[key] = value
    if "axis" in out and layer.class_name in {"BatchNormalization", "LayerNormalization"}:
        out["axis"] = _normalise_axis(out["axis"], input_ranks[0] if input_ranks else None)
    return _canonical(out)


def _normalise_axis(axis: Any, rank: int | None) -> Any:
    """Keras 2 writes BatchNormalization axis [3]; Keras 3 writes -1. Both mean the last axis."""
    axes = axis if isinstance(axis, list) else [axis]
    if rank is not None:
        axes = [a - rank if isinstance(a, int) and a >= 0 else a for a in axes]
    return axes[0] if len(axes) == 1 else sorted(axes)


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _call_signature(node: Node, fps: list[str | None]) -> Any:
    """Call arguments with tensors replaced by their fingerprints."""

    def walk(value: Any) -> Any:
        if is_tensor_ref(value):
            return {"tensor": fps[value["__tensor__"]]}
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items() if k not in CALL_KWARGS_IGNORED}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return _canonical(value)

    return [walk(node.args), walk(node.kwargs)]


def is_identity(layer: Layer) -> bool:
    if layer.class_name in IDENTITY_AT_INFERENCE:
        return True
    return layer.class_name == "Activation" and layer.config.get("activation") == "linear"


def tensor_fingerprints(graph: Graph) -> list[str]:
    """Fingerprint of every tensor in ``graph``, indexed by tensor id."""
    fps: list[str | None] = [None] * len(graph.tensors)
    for node in graph.nodes:
        layer = node.layer
        if layer.class_name == "InputLayer":
            shape = layer.config.get("shape") or []
            fps[node.outputs[0]] = _digest("Input", _canonical(list(shape)[1:]))
            continue
        inputs = node.inputs
        if is_identity(layer) and len(inputs) == 1 and len(node.outputs) == 1:
            fps[node.outputs[0]] = fps[inputs[0]]
            continue
        ranks = [
            len(graph.tensors[t].shape) if graph.tensors[t].shape is not None else None
            for t in inputs
        ]
        node_fp = _digest(
            layer.class_name,
            normalised_config(layer, ranks),
            [w.digest for w in layer.weights],
            _call_signature(node, fps),
        )
        for j, tensor in enumerate(node.outputs):
            fps[tensor] = _digest(node_fp, j)
    return [fp or "" for fp in fps]
