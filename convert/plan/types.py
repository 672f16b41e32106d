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

BYTES_PER_PARAMETER = 4  # the backbone and heads are written as float32
# Share a backbone only if it holds at least this much of each member: a frozen prefix worth a
# quarter of a model (MobileNetV2 up to its last block) is worth a linked model; a stem of a few
# layers is not.
DEFAULT_MIN_SHARED = 0.25
MODEL_SUFFIXES = (".h5", ".hdf5")


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

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def head_bytes(self) -> int:
        """Estimated from parameters, as float32."""
        return self.head_parameters * BYTES_PER_PARAMETER


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

    @property
    def backbone_bytes(self) -> int:
        return self.backbone_parameters * BYTES_PER_PARAMETER


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
class Plan:
    models: list[ModelPlan] = field(default_factory=list)
    groups: list[GroupPlan] = field(default_factory=list)
    errors: list[ErrorEntry] = field(default_factory=list)
    unique_parameters: int = 0

    @property
    def lower_bound_bytes(self) -> int:
        return self.unique_parameters * BYTES_PER_PARAMETER

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
