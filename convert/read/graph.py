"""The neutral layer graph that every other part of coreml-split works on.

The HDF5 reader (:mod:`convert.read.h5`) turns a Keras 2 or Keras 3 file, flat or with nested
sub-models, into one :class:`Graph` of *primitive* layers: nested models are expanded in place, so
a Teachable Machine file and a hand-written Functional model look the same from here on. Weights
are not held in memory; each :class:`Weight` records where its bytes live and a digest of them.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keras layers that compute the identity at inference (dropouts, noise, augmentation): a
# fingerprint passes through them, and the builder writes no layer for them.
IDENTITY_AT_INFERENCE = {
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Identity",
    "RandomFlip",
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomContrast",
    "RandomBrightness",
}

# Placeholder for a tensor inside a layer call's argument structure: {"__tensor__": <tensor id>}.
TENSOR_KEY = "__tensor__"


def tensor_ref(tensor_id: int) -> dict[str, int]:
    return {TENSOR_KEY: tensor_id}


def is_tensor_ref(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {TENSOR_KEY}


def tensor_ids_in(structure: Any) -> list[int]:
    """Tensor ids in a call-argument structure, in order of appearance."""
    if is_tensor_ref(structure):
        return [structure[TENSOR_KEY]]
    if isinstance(structure, dict):
        return [t for v in structure.values() for t in tensor_ids_in(v)]
    if isinstance(structure, (list, tuple)):
        return [t for v in structure for t in tensor_ids_in(v)]
    return []


@dataclass(frozen=True)
class Weight:
    """One weight array, by reference: its dataset path in the .h5 file and its bytes' digest."""

    dataset: str
    name: str  # the variable's short name: kernel, gamma, moving_mean, ...
    shape: tuple[int, ...]
    dtype: str
    digest: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class Layer:
    """A primitive Keras layer (never a model). ``path`` runs from the top model down."""

    path: tuple[str, ...]
    class_name: str
    config: dict[str, Any]
    weights: list[Weight] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def qualified_name(self) -> str:
        return "/".join(self.path)

    @property
    def parameter_count(self) -> int:
        return sum(w.size for w in self.weights)


@dataclass
class Node:
    """One call of a layer. ``args``/``kwargs`` hold tensor refs where the call took tensors."""

    index: int
    layer: Layer
    args: list[Any]
    kwargs: dict[str, Any]
    outputs: list[int] = field(default_factory=list)

    @property
    def inputs(self) -> list[int]:
        return tensor_ids_in(self.args) + tensor_ids_in(self.kwargs)


@dataclass
class Tensor:
    id: int
    producer: int  # node index
    output_index: int
    shape: tuple[int | None, ...] | None = None  # with the batch dimension; None if unknown


@dataclass
class Graph:
    """A whole model: nodes in topological order, the tensors between them, inputs and outputs."""

    source: Path
    keras_version: str
    model_class: str  # class of the top model: Functional, Sequential, ...
    nodes: list[Node]
    tensors: list[Tensor]
    inputs: list[int]
    outputs: list[int]
    # zoo.toml's [aliases] that this file used: its class name -> the Keras class read instead
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def channel_less_input(self) -> bool:
        """Whether the (first) input is (None, H, W): a grayscale image without a channel axis
        (MNIST's 28 x 28), which Core ML's image gives as (1, H, W, 1)."""
        return bool(self.inputs) and len(self.tensors[self.inputs[0]].shape or ()) == 3

    @property
    def keras_major(self) -> int:
        head = self.keras_version.split(".", 1)[0]
        return int(head) if head.isdigit() else 2

    def producer(self, tensor_id: int) -> Node:
        return self.nodes[self.tensors[tensor_id].producer]

    def layers(self) -> list[Layer]:
        """Distinct layers, in first-call order (a shared layer appears once)."""
        seen: dict[int, Layer] = {}
        for node in self.nodes:
            seen.setdefault(id(node.layer), node.layer)
        return list(seen.values())

    def consumers(self) -> dict[int, list[int]]:
        """tensor id -> indices of the nodes that read it."""
        out: dict[int, list[int]] = {t.id: [] for t in self.tensors}
        for node in self.nodes:
            for t in node.inputs:
                out[t].append(node.index)
        return out

    def ancestors(self, tensor_ids: list[int]) -> set[int]:
        """Indices of the nodes that the given tensors depend on, the producers included."""
        todo = [self.tensors[t].producer for t in tensor_ids]
        seen: set[int] = set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            todo.extend(self.tensors[t].producer for t in self.nodes[n].inputs)
        return seen

    def parameter_count(self, node_indices: set[int] | None = None) -> int:
        """Parameters of the distinct layers called by the given nodes (all nodes by default)."""
        chosen = self.nodes if node_indices is None else [self.nodes[i] for i in node_indices]
        layers = {id(n.layer): n.layer for n in chosen}
        return sum(layer.parameter_count for layer in layers.values())


class PackedGraphs(Mapping[str, Graph]):
    """Graphs by model name, held pickled and unpickled on each access.

    A read graph holds every layer's configuration as Python objects, about 1 MB for a
    MobileNetV2; pickled it is a tenth of that, and unpickling takes a few milliseconds. A zoo's
    graphs stay with the plan until the build is over, so this keeps the memory they need
    small as the zoo grows. Each access gives a fresh copy: changes to it are not kept.
    """

    def __init__(self, graphs: Mapping[str, Graph] | None = None) -> None:
        self._packed: dict[str, bytes] = {}
        for name, graph in (graphs or {}).items():
            self.add(name, graph)

    def add(self, name: str, graph: Graph) -> None:
        self._packed[name] = pickle.dumps(graph, protocol=pickle.HIGHEST_PROTOCOL)

    def subset(self, names: list[str]) -> PackedGraphs:
        out = PackedGraphs()
        out._packed = {name: self._packed[name] for name in names}
        return out

    def __getitem__(self, name: str) -> Graph:
        return pickle.loads(self._packed[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)
