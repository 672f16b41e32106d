"""Running one NeuralNetwork message (plain, classifier or regressor) over a batch of blobs.

Layers run in spec order, each through its registry function. A blob is dropped as soon as no
later layer reads it and it is not an output, so memory stays near the widest point of the
network rather than its sum.

In float16 compute (see :mod:`convert.check.reference.registry`) the network's inputs and every
layer's outputs are rounded to float16 as they are written into the blobs, so every layer reads
float16 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import convert.check.reference.layers  # noqa: F401  (fills the registry)
from convert.check.reference.errors import ReferenceError, Unsupported, UnsupportedLayer
from convert.check.reference.registry import REGISTRY, Layer, LayerFn, rounded


@dataclass
class _Step:
    layer: Layer
    fn: LayerFn
    inputs: list[str]
    outputs: list[str]


class Network:
    """The layers of one NeuralNetwork message, resolved against the registry once, for one
    compute precision (``"float32"`` or ``"float16"``)."""

    def __init__(self, nn: Any, path: Path | None, compute: str = "float32") -> None:
        self.path = path
        self.nn = nn
        self.compute = compute
        self.steps = [self._step(layer) for layer in nn.layers]
        self.last_read: dict[str, int] = {}
        for index, step in enumerate(self.steps):
            for name in step.inputs:
                self.last_read[name] = index

    def _step(self, spec_layer: Any) -> _Step:
        kind = spec_layer.WhichOneof("layer") or "(none)"
        if kind not in REGISTRY:
            raise UnsupportedLayer(self.path, spec_layer.name, kind)
        layer = Layer(spec_layer.name, kind, getattr(spec_layer, kind, None), self.compute)
        return _Step(layer, REGISTRY[kind], list(spec_layer.input), list(spec_layer.output))

    def run(self, blobs: dict[str, np.ndarray], keep: set[str]) -> dict[str, np.ndarray]:
        """Run every layer; ``blobs`` holds the inputs and receives the outputs. Blobs not in
        ``keep`` are dropped after their last reader."""
        for name, value in blobs.items():
            blobs[name] = rounded(value, self.compute)
        for index, step in enumerate(self.steps):
            xs = [self._read(blobs, step, name) for name in step.inputs]
            for name, value in zip(step.outputs, self._call(step, xs), strict=True):
                blobs[name] = value
            del xs
            for name in step.inputs:
                if self.last_read.get(name) == index and name not in keep:
                    blobs.pop(name, None)
        return blobs

    def _read(self, blobs: dict[str, np.ndarray], step: _Step, name: str) -> np.ndarray:
        if name not in blobs:
            raise ReferenceError(
                self.path,
                f"layer {step.layer.name!r} reads blob {name!r}, which no input or earlier "
                "layer provides",
            )
        return blobs[name]

    def _call(self, step: _Step, xs: list[np.ndarray]) -> list[np.ndarray]:
        layer = step.layer
        try:
            result = step.fn(layer, xs)
        except Unsupported as exc:
            raise UnsupportedLayer(self.path, layer.name, layer.kind, str(exc)) from None
        except (ValueError, IndexError, TypeError, KeyError) as exc:
            shapes = ", ".join(str(tuple(x.shape[1:])) for x in xs) or "no inputs"
            raise ReferenceError(
                self.path,
                f"layer {layer.name!r} of type {layer.kind!r} failed on inputs of shape "
                f"{shapes}: {exc}",
            ) from exc
        outputs = result if isinstance(result, list | tuple) else [result]
        if len(outputs) != len(step.outputs):
            raise ReferenceError(
                self.path,
                f"layer {layer.name!r} produced {len(outputs)} outputs for "
                f"{len(step.outputs)} names",
            )
        return [rounded(np.asarray(y, dtype=np.float32), self.compute) for y in outputs]
