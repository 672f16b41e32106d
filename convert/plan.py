"""Deciding: which classifiers share which backbone, and where each one is split.

Works on neutral graphs only (no TensorFlow). For every model the candidate split points are the
tensors that every input-to-output path passes through (the output's dominators), so that the
head depends on the split tensor alone. Candidates are matched across models by fingerprint and
preprocessing; groups are then chosen greedily by the bytes they save, deepest split first.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from convert.errors import ModelFileError, SplitError
from convert.families import (
    PREPROCESSING,
    default_preprocessing,
    detect_family,
    is_teachable_machine,
    scales_input_inside,
)
from convert.fingerprint import tensor_fingerprints
from convert.graph import Graph
from convert.h5reader import read_model
from convert.labels import resolve_labels

BYTES_PER_PARAMETER = 4  # the backbone and heads are written as float32
DEFAULT_MIN_SHARED = 0.5  # share a backbone only if it holds at least half of each member
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

    @property
    def backbone_bytes(self) -> int:
        return self.backbone_parameters * BYTES_PER_PARAMETER


@dataclass
class ErrorEntry:
    file: str
    reason: str

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
            "errors": [asdict(e) for e in self.errors],
            "unique_parameters": self.unique_parameters,
            "lower_bound_bytes": self.lower_bound_bytes,
        }


# -- discovery ------------------------------------------------------------------------------


def find_models(root: Path) -> list[Path]:
    """Every .h5/.hdf5 under ``root`` (or ``root`` itself), in a stable order."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise SplitError(root, "no such file or folder")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in MODEL_SUFFIXES and p.is_file())


def model_names(paths: list[Path]) -> dict[Path, str]:
    """A unique, file-system-safe name per model: the file's stem, or its folder's name for
    Teachable Machine's ``keras_model.h5``; folders are prepended only where names collide."""

    def candidate(path: Path, depth: int) -> str:
        own = [] if path.stem == "keras_model" else [path.stem]
        folders = [p.name for p in path.parents if p.name][: depth + (0 if own else 1)]
        name = "-".join([*reversed(folders), *own]) or path.stem
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)

    depth = {p: 0 for p in paths}
    for _ in range(16):
        names = {p: candidate(p, depth[p]) for p in paths}
        seen: dict[str, list[Path]] = {}
        for p, name in names.items():
            seen.setdefault(name, []).append(p)
        clashes = [p for group in seen.values() if len(group) > 1 for p in group]
        if not clashes:
            return names
        for p in clashes:
            depth[p] += 1
    return {p: f"{candidate(p, 0)}_{i}" for i, p in enumerate(paths)}


# -- per-model analysis ---------------------------------------------------------------------


def image_input_shape(graph: Graph) -> list[int]:
    """(H, W, C) of the single image input; a clear error otherwise."""
    if len(graph.inputs) != 1:
        raise ModelFileError(graph.source, f"has {len(graph.inputs)} inputs; expected one image")
    shape = graph.tensors[graph.inputs[0]].shape
    if shape is None or len(shape) != 4 or shape[3] not in (1, 3):
        raise ModelFileError(
            graph.source,
            f"input shape {_fmt_shape(shape)} is not an image (expected (None, H, W, 1 or 3))",
        )
    if shape[1] is None or shape[2] is None:
        raise ModelFileError(graph.source, "image input has no fixed height and width")
    return [int(shape[1]), int(shape[2]), int(shape[3])]


def output_classes(graph: Graph) -> int | None:
    if len(graph.outputs) != 1:
        raise ModelFileError(graph.source, f"has {len(graph.outputs)} outputs; expected one")
    shape = graph.tensors[graph.outputs[0]].shape
    if shape is None:
        return None
    if len(shape) != 2:
        raise ModelFileError(
            graph.source, f"output shape {_fmt_shape(shape)} is not (None, classes)"
        )
    return shape[1]


def cut_tensors(graph: Graph) -> list[int]:
    """Tensors that every path from the input to the output passes through, input side first.

    These are the output's dominators in the tensor DAG (tensor ids are topologically ordered).
    The input and the output themselves are excluded.
    """
    root = graph.inputs[0]
    idom: dict[int, int] = {root: root}
    depth: dict[int, int] = {root: 0}
    for tensor in graph.tensors:
        if tensor.id == root:
            continue
        preds = [t for t in graph.producer(tensor.id).inputs if t in idom]
        if not preds:
            continue  # does not depend on the input (a constant)
        dom = preds[0]
        for other in preds[1:]:
            dom = _common_dominator(dom, other, idom, depth)
        idom[tensor.id] = dom
        depth[tensor.id] = depth[dom] + 1
    out = graph.outputs[0]
    if out not in idom:
        return []
    chain = []
    t = idom[out]
    while t != root:
        chain.append(t)
        t = idom[t]
    return list(reversed(chain))


def _common_dominator(a: int, b: int, idom: dict[int, int], depth: dict[int, int]) -> int:
    while a != b:
        if depth[a] > depth[b]:
            a = idom[a]
        else:
            b = idom[b]
    return a


@dataclass
class _Analysis:
    plan: ModelPlan
    graph: Graph
    fingerprints: list[str]
    cuts: list[int]  # tensor ids, input side first
    cut_parameters: dict[int, int]  # tensor id -> backbone parameters up to it


def analyse(
    path: Path, name: str, preprocessing: str | None = None, graph: Graph | None = None
) -> _Analysis:
    """Read one model and everything the planner needs from it. Raises SplitError."""
    graph = graph or read_model(path)
    hwc = image_input_shape(graph)
    classes = output_classes(graph)
    labels, labels_source = resolve_labels(path, classes)
    family = detect_family(graph)
    tm = is_teachable_machine(graph)
    chosen = preprocessing or default_preprocessing(family, tm, scales_input_inside(graph))
    if chosen not in PREPROCESSING:
        raise SplitError(path, f"unknown preprocessing '{chosen}' ({', '.join(PREPROCESSING)})")
    fps = tensor_fingerprints(graph)
    cuts = cut_tensors(graph)
    cut_params = {t: graph.parameter_count(graph.ancestors([t])) for t in cuts}
    plan = ModelPlan(
        name=name,
        source=str(path),
        keras_version=graph.keras_version,
        family=family,
        teachable_machine=tm,
        input_shape=hwc,
        preprocessing=chosen,
        labels=labels,
        labels_source=labels_source,
        output_size_known=classes is not None,
        parameters=graph.parameter_count(),
    )
    return _Analysis(plan, graph, fps, cuts, cut_params)


# -- grouping -------------------------------------------------------------------------------


def group_models(
    analyses: list[_Analysis], min_shared: float = DEFAULT_MIN_SHARED
) -> list[GroupPlan]:
    """Choose groups greedily by bytes saved; within ties, the deeper split wins.

    A model joins a group only if the shared backbone holds at least ``min_shared`` of its
    parameters: a shared stem of a few layers is not worth a linked backbone.
    """
    candidates: dict[tuple[str, str], dict[str, int]] = {}
    for a in analyses:
        for t in a.cuts:
            if a.cut_parameters[t] == 0 or a.cut_parameters[t] < min_shared * a.plan.parameters:
                continue
            key = (a.fingerprints[t], a.plan.preprocessing)
            # Identity layers (Dropout, ...) repeat a fingerprint; split at its first tensor so
            # every member splits at the same layer, and the identity stays in the head.
            candidates.setdefault(key, {}).setdefault(a.plan.name, t)
    by_name = {a.plan.name: a for a in analyses}
    assigned: set[str] = set()
    groups: list[GroupPlan] = []
    while True:
        best = None
        for key, members in candidates.items():
            free = sorted(m for m in members if m not in assigned)
            if len(free) < 2:
                continue
            first = by_name[free[0]]
            params = first.cut_parameters[members[free[0]]]
            score = ((len(free) - 1) * params, params, first.cuts.index(members[free[0]]))
            if best is None or score > best[0]:
                best = (score, key, free)
        if best is None:
            break
        (_, params, _), (fp, preprocessing), free = best
        members = candidates[(fp, preprocessing)]
        first = by_name[free[0]]
        split = members[free[0]]
        family = detect_family(first.graph, first.graph.ancestors([split])) or "Backbone"
        short = hashlib.sha256(f"{fp}:{preprocessing}".encode()).hexdigest()[:8]
        group = GroupPlan(
            id=f"{family}-{short}",
            family=family,
            fingerprint=fp,
            preprocessing=preprocessing,
            members=free,
            split_layer=first.graph.producer(split).layer.qualified_name,
            feature_shape=list(first.graph.tensors[split].shape or []),
            backbone_parameters=params,
            saved_bytes=(len(free) - 1) * params * BYTES_PER_PARAMETER,
        )
        groups.append(group)
        for name in free:
            a = by_name[name]
            t = members[name]
            a.plan.group = group.id
            a.plan.split_tensor = t
            a.plan.split_layer = a.graph.producer(t).layer.qualified_name
            a.plan.head_parameters = a.plan.parameters - a.cut_parameters[t]
            assigned.add(name)
    for a in analyses:
        if a.plan.group is None:
            a.plan.head_parameters = a.plan.parameters
            a.plan.standalone_reason = (
                "no split point: the output does not depend on a single tensor"
                if not a.cuts
                else "shares no backbone (identical weights and preprocessing, at least "
                f"{min_shared:.0%} of its parameters) with another model"
            )
    return groups


def make_plan(
    root: Path,
    preprocessing: dict[str, str] | None = None,
    default_preprocessing_name: str | None = None,
    min_shared: float = DEFAULT_MIN_SHARED,
) -> tuple[Plan, dict[str, Graph]]:
    """Plan a whole zoo. Bad files become :class:`ErrorEntry` rows; the rest are still planned."""
    preprocessing = preprocessing or {}
    paths = find_models(root)
    names = model_names(paths)
    plan = Plan()
    analyses: list[_Analysis] = []
    for path in paths:
        name = names[path]
        choice = (
            preprocessing.get(name) or preprocessing.get(path.name) or default_preprocessing_name
        )
        try:
            analyses.append(analyse(path, name, choice))
        except SplitError as exc:
            plan.errors.append(ErrorEntry(str(exc.path or path), exc.reason))
    plan.groups = group_models(analyses, min_shared)
    plan.models = [a.plan for a in analyses]
    unique: dict[str, int] = {}
    for a in analyses:
        for layer in a.graph.layers():
            for w in layer.weights:
                unique[w.digest] = w.size
    plan.unique_parameters = sum(unique.values())
    return plan, {a.plan.name: a.graph for a in analyses}


def _fmt_shape(shape: Any) -> str:
    if shape is None:
        return "unknown"
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
