"""The network walker: Keras graph nodes in, Core ML NeuralNetwork layers out.

One walk serves every network the builder writes from the weights: a backbone (image to split
tensor), a head (split tensor to class probabilities) and a whole classifier (image to
probabilities). The caller says where the walk starts and stops and how tensors are laid out:

- ``NCHW``: rank-4 tensors are kept in Core ML's NCHW order, so a convolution needs no
  transposes, and the graph may branch and merge (residual adds, concatenations). Backbones,
  standalone classifiers and heads that hold blocks of a backbone are walked so.
- ``VECTOR``: every tensor stays in Keras order at whatever rank it has, and the nodes form one
  chain. Most heads (Dense, BatchNorm, activations, pooling, reshapes) are walked so: the result
  has no transposes at all.

The walker looks every node up in :mod:`convert.build.layers` and checks the shape each
translation computes against the one the file declares. With ``builder=None`` nothing is written
and no weight is read: the walk only says whether the network can be built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from convert.build.layers.registry import Unsupported, label, lookup
from convert.build.layers.weights import FULL, Precision
from convert.build.spec import CLASS_LABEL, CLASS_PROBS, FEATURES, IMAGE
from convert.errors import ModelFileError
from convert.read.graph import Graph, Layer, Node
from convert.read.h5 import load_weight

NCHW = "nchw"
VECTOR = "vector"


class Blob:
    """A Keras tensor as Core ML holds it: ``shape`` in Core ML's order with the batch 1 first;
    rank 4 as NCHW when ``nchw``, in Keras order otherwise."""

    def __init__(self, name: str, shape: list[int], nchw: bool = False) -> None:
        self.name = name
        self.shape = list(shape)
        self.nchw = nchw

    @property
    def rank(self) -> int:
        return len(self.shape)

    def keras_shape(self) -> list[int]:
        if self.nchw:
            n, c, h, w = self.shape
            return [n, h, w, c]
        return list(self.shape)


class Emitter:
    """The network being written into ``builder`` (a NeuralNetworkBuilder), or, with
    ``builder=None``, only checked. ``blob`` and ``shape`` are the current tensor: a translation
    writes layers from it with :meth:`add`, each of which moves it on."""

    def __init__(
        self, graph: Graph, layout: str, builder: Any = None, precision: Precision = FULL
    ) -> None:
        if layout not in (NCHW, VECTOR):
            raise ValueError(f"unknown layout {layout}")
        self.graph = graph
        self.layout = layout
        self.builder = builder
        self.precision = precision  # how each layer's weights are stored
        self.blob = ""
        self.shape: list[int] = []
        self.layers = 0
        self.blobs: dict[int, Blob] = {}  # tensor id -> the blob that holds it
        self.folded: set[int] = set()  # BatchNormalization nodes folded into a convolution
        self.stop: int | None = None  # the tensor the walk ends at
        self._consumers: dict[int, list[int]] | None = None
        self._taken = {IMAGE, FEATURES, CLASS_PROBS, CLASS_LABEL}

    @property
    def vector(self) -> bool:
        return self.layout == VECTOR

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def consumers(self) -> dict[int, list[int]]:
        if self._consumers is None:
            self._consumers = self.graph.consumers()
        return self._consumers

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name

    # -- the current tensor --------------------------------------------------------------------

    def use(self, blob: Blob) -> None:
        self.blob, self.shape = blob.name, list(blob.shape)

    def current(self) -> Blob:
        """The current tensor; rank 4 is NCHW exactly when the walk keeps the image layout."""
        return Blob(self.blob, self.shape, self.layout == NCHW and self.rank == 4)

    # -- writing layers ------------------------------------------------------------------------

    def add(self, base: str, shape: list[int], write: Callable[[str, str], None]) -> Blob:
        """One layer from the current blob; ``write(name, input)`` adds it to the builder, its
        output blob named like the layer. Returns the new current blob."""
        name = self._unique(base)
        if self.builder is not None:
            write(name, self.blob)
        self.blob = name
        self.shape = list(shape)
        self.layers += 1
        return self.current()

    def merge(
        self, base: str, inputs: list[Blob], shape: list[int], write: Callable[[str, list], None]
    ) -> Blob:
        """A layer with several inputs; ``write(name, input_names)``."""
        name = self._unique(base)
        if self.builder is not None:
            write(name, [b.name for b in inputs])
        self.layers += 1
        self.use(Blob(name, shape))
        return self.current()

    def raw_layer(self, base: str, shape: list[int], fill: Callable[[Any], None]) -> Blob:
        """A layer written straight into the protobuf; ``fill(layer)`` sets its parameters (and
        its weights, through :func:`convert.build.layers.weights.write`)."""

        def write(name: str, x: str) -> None:
            layer = self.builder.nn_spec.layers.add()
            layer.name = name
            layer.input.append(x)
            layer.output.append(name)
            fill(layer)

        return self.add(base, shape, write)

    # -- the file's weights --------------------------------------------------------------------

    def weight(self, layer: Layer, name: str, dtype: Any = np.float32) -> np.ndarray:
        """The values of ``layer``'s weight ``name``, as float32 (then ``dtype``). The builder
        loads no Keras, so it checks what Keras would: the weight is there, of the shape the
        file declared (:func:`load_weight` checks), and finite. Raises ModelFileError."""
        found = next((w for w in layer.weights if w.name == name), None)
        if found is None:
            raise ModelFileError(
                self.graph.source,
                f"layer '{layer.qualified_name}': weight '{name}' is missing from the file",
            )
        values = np.asarray(load_weight(self.graph.source, found), dtype=np.float32)
        finite = np.isfinite(values)
        if not finite.all():
            bad = values.size - int(np.count_nonzero(finite))
            raise ModelFileError(
                self.graph.source,
                f"layer '{layer.qualified_name}': weight '{name}' holds NaN or Inf "
                f"({bad} of {values.size} values)",
            )
        return values if dtype == np.float32 else values.astype(dtype)


def _check_shape(graph: Graph, node: Node, blob: Blob) -> None:
    expected = graph.tensors[node.outputs[0]].shape
    got = blob.keras_shape()
    if expected is not None and (
        len(expected) != len(got)
        or any(d is not None and d != s for d, s in zip(expected[1:], got[1:]))
    ):
        raise Unsupported(
            f"{label(node.layer)}: computed shape {got[1:]} but the file says {list(expected[1:])}"
        )


def walk(e: Emitter, start: int, first: Blob, stop: int) -> Blob:
    """Write the nodes between tensor ``start`` (held in blob ``first``) and tensor ``stop``;
    returns the blob that holds ``stop``. Raises :class:`Unsupported` naming the first layer
    that cannot be written."""
    graph = e.graph
    nodes = [graph.nodes[i] for i in sorted(graph.ancestors([stop]))]
    if start in graph.inputs:
        if len(graph.inputs) != 1:
            raise Unsupported(f"{len(graph.inputs)} model inputs")
    else:
        before = graph.ancestors([start])
        nodes = [n for n in nodes if n.index not in before]
    e.stop = stop
    e.blobs[start] = first
    previous = start
    for node in nodes:
        layer = node.layer
        if layer.class_name == "InputLayer":
            if node.outputs[0] != graph.inputs[0]:
                raise Unsupported(f"{label(layer)} is a second input")
            continue
        if node.index in e.folded:
            continue
        translation = lookup(layer, e.vector)
        if len(node.outputs) != 1:
            raise Unsupported(f"{label(layer)} has {len(node.outputs)} outputs")
        if e.vector and node.inputs != [previous]:
            raise Unsupported(f"{label(layer)} is not part of a single chain of layers")
        if not node.inputs or any(t not in e.blobs for t in node.inputs):
            raise Unsupported(f"{label(layer)} reads a tensor that is not computed here")
        inputs = [e.blobs[t] for t in node.inputs]
        if not translation.merge and len(inputs) != 1:
            raise Unsupported(f"{label(layer)} takes {len(inputs)} inputs")
        e.use(inputs[0])
        blob = translation.fn(e, node, inputs)
        _check_shape(graph, node, blob)
        e.blobs[node.outputs[0]] = blob
        previous = node.outputs[0]
    if stop not in e.blobs:
        raise Unsupported("the output is not computed from the split tensor")
    return e.blobs[stop]


def to_keras_order(e: Emitter, base: str, blob: Blob) -> Blob:
    """``blob`` in Keras order: an NCHW blob through a transpose, anything else as it is."""
    if not blob.nchw:
        return blob
    e.use(blob)
    e.add(
        f"{base}/to_nhwc",
        blob.keras_shape(),
        lambda name, x: e.builder.add_transpose(name, [0, 2, 3, 1], x, name),
    )
    return Blob(e.blob, e.shape)
