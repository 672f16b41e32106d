"""Deciding: which classifiers share which backbone, and where each one is split.

Works on neutral graphs only (no TensorFlow). For every model the candidate split points are the
tensors that every input-to-output path passes through (the output's dominators), so that the
head depends on the split tensor alone. Candidates are matched across models by fingerprint and
preprocessing; the backbones are then chosen to save the most bytes over the whole zoo.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from convert.cache import SourceCache
from convert.errors import ModelFileError, SplitError
from convert.families import (
    PREPROCESSING,
    default_preprocessing,
    detect_family,
    is_teachable_machine,
    scales_input_inside,
)
from convert.fingerprint import tensor_fingerprints
from convert.graph import Graph, PackedGraphs
from convert.h5reader import read_model
from convert.labels import complete_labels, resolve_labels
from convert.manifest import Manifest

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


def _parameters_up_to(graph: Graph, cuts: list[int]) -> dict[int, int]:
    """Backbone parameters up to each cut. Each cut's ancestors include the previous cut's, so
    one walk over the graph, cut by cut, counts every layer once."""
    seen_nodes: set[int] = set()
    seen_layers: set[int] = set()
    total = 0
    out: dict[int, int] = {}
    for cut in cuts:
        todo = [graph.tensors[cut].producer]
        while todo:
            n = todo.pop()
            if n in seen_nodes:
                continue
            seen_nodes.add(n)
            layer = graph.nodes[n].layer
            if id(layer) not in seen_layers:
                seen_layers.add(id(layer))
                total += layer.parameter_count
            todo.extend(graph.tensors[t].producer for t in graph.nodes[n].inputs)
        out[cut] = total
    return out


@dataclass
class _Analysis:
    plan: ModelPlan
    graph: Graph
    fingerprints: list[str]
    cuts: list[int]  # tensor ids, input side first
    cut_parameters: dict[int, int]  # tensor id -> backbone parameters up to it


def analyse(
    path: Path,
    name: str,
    preprocessing: str | None = None,
    graph: Graph | None = None,
    labels: tuple[str, ...] | None = None,
    labels_source: str | None = None,
) -> _Analysis:
    """Read one model and everything the planner needs from it. Raises SplitError.

    ``labels`` (from the manifest) replace the labels files beside the model."""
    graph = graph or read_model(path)
    hwc = image_input_shape(graph)
    classes = output_classes(graph)
    if labels is None:
        labels, labels_source = resolve_labels(path, classes)
    else:
        source = labels_source or "zoo.toml"
        labels = list(labels)
        if classes is not None:
            labels = complete_labels(path, labels, source, classes)
    family = detect_family(graph)
    tm = is_teachable_machine(graph)
    chosen = preprocessing or default_preprocessing(family, tm, scales_input_inside(graph))
    if chosen not in PREPROCESSING:
        raise SplitError(path, f"unknown preprocessing '{chosen}' ({', '.join(PREPROCESSING)})")
    fps = tensor_fingerprints(graph)
    cuts = cut_tensors(graph)
    cut_params = _parameters_up_to(graph, cuts)
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
#
# A split candidate ("key") is a cut tensor's fingerprint plus the preprocessing. Two models that
# share a key share everything before that cut (fingerprints are Merkle hashes), hence every
# shallower key too; so the keys form a forest, each model's cuts a path from a root down to its
# deepest shared cut. Opening key K as a backbone ships it once and saves its bytes v(K) for
# every member but the first; each model joins at most one backbone, the deepest opened key on its
# path for which it is eligible (the backbone holds >= min_shared of its parameters); the rest of
# its network goes into its head. The opened set that saves most bytes over the whole zoo is a
# facility-location problem on a tree, solved exactly by dynamic programming over (key, nearest
# opened ancestor).


@dataclass
class _Key:
    id: tuple[str, str]  # (fingerprint, preprocessing)
    parameters: int  # backbone parameters up to this cut
    parent: tuple[str, str] | None
    depth: int = 0
    tensors: dict[str, int] = field(default_factory=dict)  # model -> split tensor
    eligible: set[str] = field(default_factory=set)
    children: list[tuple[str, str]] = field(default_factory=list)
    ends: list[str] = field(default_factory=list)  # models whose deepest shared key this is


def _key_forest(analyses: list[_Analysis], min_shared: float) -> dict[tuple[str, str], _Key]:
    keys: dict[tuple[str, str], _Key] = {}
    for a in analyses:
        parent = None
        for t in a.cuts:
            if a.cut_parameters[t] == 0:
                continue
            kid = (a.fingerprints[t], a.plan.preprocessing)
            if kid == parent:
                # Identity layers (Dropout, ...) repeat a fingerprint; split at its first tensor
                # so every member splits at the same layer, and the identity stays in the head.
                continue
            key = keys.setdefault(kid, _Key(kid, a.cut_parameters[t], parent))
            key.tensors.setdefault(a.plan.name, t)
            if a.cut_parameters[t] >= min_shared * a.plan.parameters:
                key.eligible.add(a.plan.name)
            parent = kid
    shared = {kid: k for kid, k in keys.items() if len(k.tensors) >= 2}
    for k in shared.values():  # parents come first: a model meets them before
        if k.parent is not None and k.parent not in shared:  # cannot happen for Merkle keys
            k.parent = None
        if k.parent is not None:
            shared[k.parent].children.append(k.id)
        k.depth = 0 if k.parent is None else shared[k.parent].depth + 1
    for a in analyses:
        mine = [k for k in shared.values() if a.plan.name in k.tensors]
        if mine:
            max(mine, key=lambda k: (k.parameters, k.depth)).ends.append(a.plan.name)
    return shared


def _best_opening(
    keys: dict[tuple[str, str], _Key], forbidden: frozenset[tuple[str, str]] = frozenset()
) -> tuple[int, dict[tuple[str, str], list[str]]]:
    """Parameters saved by the best set of opened keys, and each opened key's members."""
    order = sorted(keys.values(), key=lambda k: -k.depth)  # children before parents
    ancestors: dict[tuple[str, str], list[tuple[str, str] | None]] = {}
    for k in sorted(keys.values(), key=lambda k: k.depth):
        up = ancestors[k.parent] + [k.parent] if k.parent is not None else []
        ancestors[k.id] = [None, *[u for u in up if u is not None]]

    def value(model: str, opened: tuple[str, str] | None) -> int:
        if opened is None or model not in keys[opened].eligible:
            return 0
        return keys[opened].parameters

    # best[(key, nearest opened ancestor)] = (saving, opened keys in the subtree)
    best: dict[tuple[tuple[str, str], tuple[str, str] | None], tuple[int, tuple]] = {}
    for k in order:
        for above in ancestors[k.id]:
            closed = sum(value(m, above) for m in k.ends)
            closed_open: tuple = ()
            for c in k.children:
                saving, opened = best[(c, above)]
                closed += saving
                closed_open += opened
            choice = (closed, closed_open)
            if k.id not in forbidden:
                gain = -k.parameters + sum(value(m, k.id) for m in k.ends)
                opened_here: tuple = (k.id,)
                for c in k.children:
                    saving, opened = best[(c, k.id)]
                    gain += saving
                    opened_here += opened
                if gain > closed:
                    choice = (gain, opened_here)
            best[(k.id, above)] = choice
    total, opened_keys = 0, ()
    for k in keys.values():
        if k.parent is None:
            saving, opened = best[(k.id, None)]
            total += saving
            opened_keys += opened
    members: dict[tuple[str, str], list[str]] = {kid: [] for kid in opened_keys}
    for k in keys.values():
        for model in k.ends:
            for kid in [k.id, *reversed(ancestors[k.id][1:])]:
                if kid in members:
                    if model in keys[kid].eligible:
                        members[kid].append(model)
                    break
    return total, {kid: sorted(ms) for kid, ms in members.items() if len(ms) >= 2}


def group_models(
    analyses: list[_Analysis], min_shared: float = DEFAULT_MIN_SHARED
) -> list[GroupPlan]:
    """Choose the backbones that minimise the bytes of the whole zoo (see above).

    A model joins a group only if the shared backbone holds at least ``min_shared`` of its
    parameters: a shared stem of a few layers is not worth a linked backbone.
    """
    keys = _key_forest(analyses, min_shared)
    _, chosen = _best_opening(keys)
    by_name = {a.plan.name: a for a in analyses}
    groups: list[GroupPlan] = []
    for kid, members in chosen.items():
        key = keys[kid]
        first = by_name[members[0]]
        split = key.tensors[members[0]]
        fp, preprocessing = kid
        # a prefix of a known backbone (fine-tuned last blocks cut off) keeps its family's name
        family = (
            detect_family(first.graph, first.graph.ancestors([split]))
            or first.plan.family
            or "Backbone"
        )
        short = hashlib.sha256(f"{fp}:{preprocessing}".encode()).hexdigest()[:8]
        saved = (len(members) - 1) * key.parameters
        group = GroupPlan(
            id=f"{family}-{short}",
            family=family,
            fingerprint=fp,
            preprocessing=preprocessing,
            members=members,
            split_layer=first.graph.producer(split).layer.qualified_name,
            feature_shape=list(first.graph.tensors[split].shape or []),
            backbone_parameters=key.parameters,
            saved_bytes=saved * BYTES_PER_PARAMETER,
        )
        group.alternative, group.alternative_saved_bytes = _alternative(keys, kid, members, by_name)
        groups.append(group)
        for name in members:
            a = by_name[name]
            t = key.tensors[name]
            a.plan.group = group.id
            a.plan.split_tensor = t
            a.plan.split_layer = a.graph.producer(t).layer.qualified_name
            a.plan.head_parameters = a.plan.parameters - a.cut_parameters[t]
    groups.sort(key=lambda g: (-g.saved_bytes, g.id))
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


def _alternative(
    keys: dict[tuple[str, str], _Key],
    kid: tuple[str, str],
    members: list[str],
    by_name: dict[str, _Analysis],
) -> tuple[str, int]:
    """The best plan for the zoo without this split, told from these members' side.

    Cuts just above it that add no parameters (a pooling's input) are the same choice, so
    they are excluded too."""
    same = {kid}
    up = keys[kid].parent
    while up is not None and keys[up].parameters == keys[kid].parameters:
        same.add(up)
        up = keys[up].parent
    saved, chosen = _best_opening(keys, frozenset(same))
    parts = []
    for other, others in sorted(chosen.items(), key=lambda item: -keys[item[0]].parameters):
        mine = [m for m in others if m in members]
        if not mine:
            continue
        layer = by_name[others[0]].graph.producer(keys[other].tensors[others[0]]).layer
        parts.append(f"{', '.join(others)} split after {layer.qualified_name}")
    alone = [m for m in members if not any(m in ms for ms in chosen.values())]
    if alone:
        parts.append(f"{', '.join(alone)} standalone")
    return "; ".join(parts), saved * BYTES_PER_PARAMETER


def make_plan(
    root: Path,
    preprocessing: dict[str, str] | None = None,
    default_preprocessing_name: str | None = None,
    min_shared: float = DEFAULT_MIN_SHARED,
    manifest: Manifest | None = None,
    sources: SourceCache | None = None,
) -> tuple[Plan, PackedGraphs]:
    """Plan a whole zoo. Bad files become :class:`ErrorEntry` rows; the rest are still planned.

    Preprocessing: the command line's choice for a model, else its default, else the
    manifest's, else what the model's family prescribes."""
    preprocessing = preprocessing or {}
    manifest = manifest or Manifest()
    paths = find_models(root)
    names = model_names(paths)
    plan = Plan()
    analyses: list[_Analysis] = []
    graphs = PackedGraphs()
    for path in paths:
        name = names[path]
        settings = manifest.for_model(name)
        choice = (
            preprocessing.get(name)
            or preprocessing.get(path.name)
            or default_preprocessing_name
            or settings.preprocessing
        )
        labels_source = settings.labels_source
        if settings.labels is not None and labels_source == "zoo.toml":  # inline in the manifest
            labels_source = f"{manifest.path} (models.{name}.labels)"
        try:
            graph = sources.graph(path) if sources is not None else None
            fresh = graph is None
            analyses.append(
                analyse(
                    path,
                    name,
                    choice,
                    graph=graph,
                    labels=settings.labels,
                    labels_source=labels_source,
                )
            )
            if fresh and sources is not None:
                sources.remember(path, analyses[-1].graph)
            graphs.add(name, analyses[-1].graph)
        except SplitError as exc:
            plan.errors.append(ErrorEntry(str(exc.path or path), exc.reason))
    for unknown in manifest.unused_models(names.values()):
        plan.errors.append(
            ErrorEntry(str(manifest.path), f"models.{unknown}: no model of that name in {root}")
        )
    plan.groups = group_models(analyses, min_shared)
    plan.models = [a.plan for a in analyses]
    _name_backbones(plan, manifest)
    _check_input_names(plan, manifest)
    unique: dict[str, int] = {}
    for a in analyses:
        for layer in a.graph.layers():
            for w in layer.weights:
                unique[w.digest] = w.size
    plan.unique_parameters = sum(unique.values())
    return plan, graphs


def _check_input_names(plan: Plan, manifest: Manifest) -> None:
    """Members of a group share the backbone's image input, so they must agree on its name; and
    a model's three feature names must differ once the defaults fill in the unset ones."""
    for model in plan.models:
        s = manifest.for_model(model.name)
        names = [s.input_name or "image", s.label_name or "classLabel"]
        names.append(s.probabilities_name or "classLabelProbs")
        if len(set(names)) < 3:
            plan.errors.append(
                ErrorEntry(
                    str(manifest.path),
                    f"models.{model.name}: input, label and probabilities names must differ "
                    f"({', '.join(names)})",
                )
            )
    for group in plan.groups:
        names = {m: manifest.for_model(m).input_name or "image" for m in group.members}
        if len(set(names.values())) > 1:
            said = ", ".join(f"{m}: {n}" for m, n in names.items())
            plan.errors.append(
                ErrorEntry(
                    str(manifest.path),
                    f"input_name: the members of backbone {group.id} share its input, so they "
                    f"need one name ({said})",
                )
            )


def _name_backbones(plan: Plan, manifest: Manifest) -> None:
    """Backbone file names from the manifest; a name that would overwrite another output is an
    error, and that backbone keeps its family-hash name."""
    taken = {m.name for m in plan.models}
    wanted: dict[str, list[GroupPlan]] = {}
    for group in plan.groups:
        name = manifest.for_backbone(group.id, group.family).name
        if name:
            wanted.setdefault(name, []).append(group)
    taken |= {g.id for g in plan.groups}
    for name, groups in wanted.items():
        ids = ", ".join(g.id for g in groups)
        if len(groups) > 1 or (name in taken and name != groups[0].id):
            reason = (
                f"backbones: name '{name}' is given to {len(groups)} backbones ({ids}); "
                "name them by id"
                if len(groups) > 1
                else f"backbones: name '{name}' for {ids} is taken by a classifier or backbone"
            )
            plan.errors.append(ErrorEntry(str(manifest.path), reason))
            continue
        old = groups[0].id
        groups[0].id = name
        for model in plan.models:
            if model.group == old:
                model.group = name


def _fmt_shape(shape: Any) -> str:
    if shape is None:
        return "unknown"
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
