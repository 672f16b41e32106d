"""What a plan is: the decisions, as dataclasses that go to JSON and back.

A :class:`Plan` holds one :class:`ModelPlan` per classifier, one :class:`GroupPlan` per shared
backbone, and an :class:`ErrorEntry` per file that could not be planned. The build stage carries
it out; the report shows it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from convert.errors import internal_reason, traceback_text
from convert.read.manifest import FLOAT32, STORAGES, palette_bits, storage_bits
from convert.read.training import Training

BYTES_PER_PARAMETER = 4  # float32; the estimates below count every weight so
# Share a backbone only if it holds at least this much of each member: a frozen prefix worth a
# quarter of a model (MobileNetV2 up to its last block) is worth a linked model; a stem of a few
# layers is not.
DEFAULT_MIN_SHARED = 0.25
MODEL_SUFFIXES = (".h5", ".hdf5", ".keras")


@dataclass
class ModelPlan:
    """One classifier: what it is and where it is split."""

    name: str
    source: str
    keras_version: str
    family: str | None
    teachable_machine: bool
    input_shape: list[int]  # H, W, C
    preprocessing: str
    labels: list[str]
    labels_source: str | None
    output_size_known: bool
    parameters: int
    group: str | None = None  # backbone id, or None when the model converts standalone
    split_layer: str | None = None  # qualified name of the layer producing the split tensor
    split_tensor: int | None = None  # tensor id in this model's graph
    head_parameters: int = 0
    standalone_reason: str | None = None
    weights: str = "float32"  # how its head (or, standalone, the whole model) stores weights
    training: Training | None = None  # how its head learns on the device; None: not updatable

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def head_bytes(self) -> int:
        """Estimated from parameters, at the head's storage."""
        return self.head_parameters * storage_bits(self.weights) // 8


@dataclass
class GroupPlan:
    """A backbone converted once and shared by ``members``."""

    id: str  # also the backbone file's stem, e.g. MobileNetV2-3fa9c2d1
    family: str
    fingerprint: str
    preprocessing: str
    members: list[str]
    split_layer: str
    feature_shape: list[int | None]  # with the batch dimension
    backbone_parameters: int
    saved_bytes: int  # estimated from parameters: (members - 1) x backbone bytes
    alternative: str = ""  # the best plan without this split, for these members
    alternative_saved_bytes: int = 0  # what that plan saves over the whole zoo
    weights: str = "float32"  # how the backbone stores its weights (or auto: chosen when built)

    @property
    def backbone_bytes(self) -> int:
        """Estimated from parameters, at the backbone's storage."""
        return self.backbone_parameters * storage_bits(self.weights) // 8


@dataclass
class ErrorEntry:
    file: str
    reason: str
    trace: str = ""  # the traceback of an internal error, shown with --debug

    @classmethod
    def internal(cls, file: str | Path, exc: BaseException) -> ErrorEntry:
        """An exception the tool did not foresee, while handling ``file``."""
        return cls(str(file), internal_reason(exc), traceback_text(exc))

    @property
    def line(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass
class UniqueWeights:
    """The zoo's distinct weights (by digest) written in one storage, counted for lower bounds:
    kernels (quantizable) apart from the rest, with the tables quantization adds."""

    kernel_parameters: int = 0
    kernel_tensors: int = 0  # each palettized kernel carries a table
    kernel_channels: int = 0  # each int8 kernel a scale and a bias per output channel
    other_parameters: int = 0  # biases, batch norm statistics, ...

    def add(self, size: int, kernel: bool, channels: int) -> None:
        if kernel:
            self.kernel_parameters += size
            self.kernel_tensors += 1
            self.kernel_channels += channels
        else:
            self.other_parameters += size

    def bytes(self, storage: str) -> int:
        """Parameters x bits / 8, plus the tables: the least any file format can take."""
        if storage == FLOAT32:
            return 4 * (self.kernel_parameters + self.other_parameters)
        others = 2 * self.other_parameters  # float16 beside any kernel smaller than float32
        bits = palette_bits(storage)
        if bits is not None:  # a table per kernel, and a float16 scale per channel
            tables = 4 * (2**bits) * self.kernel_tensors + 2 * self.kernel_channels
            return -(-self.kernel_parameters * bits // 8) + tables + others
        if storage == "int8":
            return self.kernel_parameters + 8 * self.kernel_channels + others
        return 2 * self.kernel_parameters + others  # float16 (and auto, until it is built)


@dataclass
class Plan:
    models: list[ModelPlan] = field(default_factory=list)
    groups: list[GroupPlan] = field(default_factory=list)
    errors: list[ErrorEntry] = field(default_factory=list)
    unique_parameters: int = 0
    # the distinct weights of the zoo: all of them, and those written in each storage used
    unique: UniqueWeights = field(default_factory=UniqueWeights)
    stored: dict[str, UniqueWeights] = field(default_factory=dict)

    @property
    def lower_bound_bytes(self) -> int:
        """The least the build can take: each distinct weight once, in its storage."""
        if not self.stored:
            return self.unique_parameters * BYTES_PER_PARAMETER
        return sum(u.bytes(s) for s, u in self.stored.items())

    def lower_bounds(self) -> dict[str, int]:
        """The lower bound of the whole zoo in each storage, as if every weight were so."""
        return {s: self.unique.bytes(s) for s in STORAGES}

    def model(self, name: str) -> ModelPlan:
        return next(m for m in self.models if m.name == name)

    def group(self, group_id: str) -> GroupPlan:
        return next(g for g in self.groups if g.id == group_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "models": [asdict(m) | {"head_bytes": m.head_bytes} for m in self.models],
            "groups": [asdict(g) | {"backbone_bytes": g.backbone_bytes} for g in self.groups],
            "standalone": [m.name for m in self.models if m.group is None],
            "errors": [{"file": e.file, "reason": e.reason} for e in self.errors],
            "unique_parameters": self.unique_parameters,
            "lower_bound_bytes": self.lower_bound_bytes,
        }
