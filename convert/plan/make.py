"""Deciding: which classifiers share which backbone, and where each one is split.

Works on neutral graphs only (no TensorFlow). :func:`make_plan` reads every model of a zoo
(:mod:`convert.plan.cuts` finds where each can be split), matches the candidates across models
by fingerprint and preprocessing, and chooses the backbones that save the most bytes over the
whole zoo (:mod:`convert.plan.grouping`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convert.errors import SplitError
from convert.plan.cuts import Analysis, analyse
from convert.plan.grouping import group_models
from convert.plan.types import (
    DEFAULT_MIN_SHARED,
    MODEL_SUFFIXES,
    ErrorEntry,
    GroupPlan,
    Plan,
    UniqueWeights,
)
from convert.read.graph import PackedGraphs
from convert.read.manifest import AUTO, FLOAT16, FLOAT32, Manifest
from convert.read.sources import SourceCache
from convert.read.training import training_from

# -- discovery ------------------------------------------------------------------------------


def find_models(root: Path) -> list[Path]:
    """Every .h5/.hdf5/.keras file under ``root`` (or ``root`` itself), in a stable order."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise SplitError(root, "no such file or folder")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in MODEL_SUFFIXES and p.is_file())


def model_names(paths: list[Path]) -> dict[Path, str]:
    """A unique, file-system-safe name per model: the file's stem, or its folder's name for
    Teachable Machine's ``keras_model.h5``; folders are prepended only where names collide, and
    the file's suffix where one model is saved twice (``m.h5`` and ``m.keras``)."""
    twins = Counter(p.with_suffix("") for p in paths)

    def candidate(path: Path, depth: int) -> str:
        own = [] if path.stem == "keras_model" else [path.stem]
        folders = [p.name for p in path.parents if p.name][: depth + (0 if own else 1)]
        if twins[path.with_suffix("")] > 1:
            own.append(path.suffix.lstrip(".").lower())
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


def make_plan(
    root: Path,
    preprocessing: dict[str, str] | None = None,
    default_preprocessing_name: str | None = None,
    min_shared: float = DEFAULT_MIN_SHARED,
    manifest: Manifest | None = None,
    sources: SourceCache | None = None,
    weights: str | None = None,
    head_weights: str | None = None,
    updatable: bool = False,
    training: dict[str, Any] | None = None,
    step: Callable[[int, int], None] | None = None,
) -> tuple[Plan, PackedGraphs]:
    """Plan a whole zoo. Bad files become :class:`ErrorEntry` rows; the rest are still planned.

    Preprocessing: the command line's choice for a model, else its default, else the
    manifest's, else what the model's family prescribes. Weight storage: see
    :func:`_storages`."""
    preprocessing = preprocessing or {}
    manifest = manifest or Manifest()
    paths = find_models(root)
    names = model_names(paths)
    plan = Plan()
    analyses: list[Analysis] = []
    graphs = PackedGraphs()
    for done, path in enumerate(paths):
        if step is not None:
            step(done, len(paths))
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
            graph = sources.graph(path, manifest.aliases) if sources is not None else None
            fresh = graph is None
            analyses.append(
                analyse(
                    path,
                    name,
                    choice,
                    graph=graph,
                    labels=settings.labels,
                    labels_source=labels_source,
                    aliases=manifest.aliases,
                )
            )
            if fresh and sources is not None:
                sources.remember(path, analyses[-1].graph, manifest.aliases)
            graphs.add(name, analyses[-1].graph)
        except SplitError as exc:
            plan.errors.append(ErrorEntry(str(exc.path or path), exc.reason))
        except Exception as exc:  # not foreseen: this file's one line, the zoo goes on
            plan.errors.append(ErrorEntry.internal(path, exc))
    if step is not None:
        step(len(paths), len(paths))
    for unknown in manifest.unused_models(names.values()):
        plan.errors.append(
            ErrorEntry(str(manifest.path), f"models.{unknown}: no model of that name in {root}")
        )
    plan.groups = group_models(analyses, min_shared)
    plan.models = [a.plan for a in analyses]
    _storages(plan, manifest, weights, head_weights)
    _trainings(plan, manifest, updatable, training or {})
    _name_backbones(plan, manifest)
    _check_input_names(plan, manifest)
    _count_unique(plan, analyses)
    return plan, graphs


_KERNELS = ("kernel", "depthwise_kernel", "pointwise_kernel")
_CONVOLUTIONS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")


def _folded_batchnorms(graph) -> dict[int, bool]:
    """BatchNormalization nodes the builder folds into the convolution before them (the only
    reader of a convolution without activation), each with whether that convolution has a
    bias. Their statistics are not written; the folded bias is."""
    consumers = graph.consumers()
    folded = {}
    for node in graph.nodes:
        if node.layer.class_name != "BatchNormalization" or len(node.inputs) != 1:
            continue
        before = graph.producer(node.inputs[0])
        conv = before.layer
        linear = conv.config.get("activation") in (None, "linear")
        if (
            conv.class_name in _CONVOLUTIONS
            and linear
            and len(consumers.get(node.inputs[0], [])) == 1
        ):
            folded[node.index] = any(w.name.split(":")[0] == "bias" for w in conv.weights)
    return folded


def _count_unique(plan: Plan, analyses: list[Analysis]) -> None:
    """The zoo's distinct weights, by digest: in all, and per storage they are written in (a
    backbone's weights in its storage, the rest of a model in the model's)."""
    everywhere: set[str] = set()
    stored: dict[str, set[str]] = {}
    groups = {g.id: g for g in plan.groups}
    for a in analyses:
        model = a.plan
        group = groups.get(model.group or "")
        inside: set[int] = set()
        if group is not None and model.split_tensor is not None:
            inside = a.graph.ancestors([model.split_tensor])
        folded = _folded_batchnorms(a.graph)
        learning = _updatable_nodes(a, inside)
        for node in a.graph.nodes:
            weights = node.layer.weights
            if node.index in folded:  # written as the convolution's bias: one value a channel
                weights = [w for w in weights if w.name.split(":")[0] == "moving_mean"][:1]
                if folded[node.index]:  # the convolution has a bias already
                    weights = []
            for w in weights:
                storage = group.weights if node.index in inside and group else model.weights
                if node.index in learning:  # updatable layers stay float32
                    storage = FLOAT32
                short = w.name.split(":")[0]
                kernel = short in _KERNELS and len(w.shape) >= 2
                depthwise = (
                    short == "depthwise_kernel" or node.layer.class_name == "DepthwiseConv2D"
                )
                # output channels: [kh, kw, c, m] -> c * m for a depthwise kernel, else the last
                if depthwise and len(w.shape) == 4:
                    channels = math.prod(w.shape[2:])
                else:
                    channels = w.shape[-1] if w.shape else 1  # a scalar (a count, say)
                if w.digest not in everywhere:
                    everywhere.add(w.digest)
                    plan.unique.add(w.size, kernel, channels)
                seen = stored.setdefault(storage, set())
                if w.digest not in seen:
                    seen.add(w.digest)
                    plan.stored.setdefault(storage, UniqueWeights()).add(w.size, kernel, channels)
    plan.unique_parameters = plan.unique.kernel_parameters + plan.unique.other_parameters


def _updatable_nodes(a: Analysis, inside: set[int]) -> set[int]:
    """The head's last Dense nodes that an updatable model learns, as build/updatable marks
    its innerProducts (the last k)."""
    training = a.plan.training
    if training is None:
        return set()
    dense = [n.index for n in a.graph.nodes if n.layer.class_name == "Dense"]
    dense = [i for i in dense if i not in inside]
    return set(dense[-training.updatable_layers :])


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


def _trainings(plan: Plan, manifest: Manifest, updatable: bool, overrides: dict[str, Any]) -> None:
    """Which heads learn on the device, and how: --updatable, else the model's ``updatable``;
    each training setting from the command line, else the model's, else [defaults], else
    :class:`Training`'s defaults."""
    for model in plan.models:
        s = manifest.for_model(model.name)
        if updatable or s.updatable:
            model.training = training_from(dict(s.training or ()) | overrides)


def _storages(
    plan: Plan, manifest: Manifest, weights: str | None, head_weights: str | None
) -> None:
    """How each backbone and head stores its weights. The command line wins over zoo.toml, as
    with the preprocessing. A backbone: --weights, else its [backbones] entry, else [defaults].
    A head (or a standalone model): --head-weights, else the model's head_weights, else
    --weights, else the model's weights, else float32. ``auto`` is chosen per shared backbone,
    for it and its heads, when built; a model that shares no backbone is then float16. A
    backbone stored other than float32 gets an id of its own (family-storage-hash), so that two
    storages never share a file; a backbone named in zoo.toml keeps that name."""
    for model in plan.models:
        s = manifest.for_model(model.name)
        if model.group is None:
            model.weights = weights or s.weights or FLOAT32
            if model.weights == AUTO:  # chosen per shared backbone; a lone model gets float16
                model.weights = FLOAT16
        else:
            model.weights = head_weights or s.head_weights or weights or s.weights or FLOAT32
    for group in plan.groups:
        said = manifest.for_backbone(group.id, group.family)
        group.weights = weights or said.weights or manifest.defaults.weights or FLOAT32
        if group.weights != FLOAT32 and not said.name:  # a name from zoo.toml is kept
            old = group.id
            short = hashlib.sha256(
                f"{group.fingerprint}:{group.preprocessing}:{group.weights}".encode()
            ).hexdigest()[:8]
            group.id = f"{group.family}-{group.weights}-{short}"
            for model in plan.models:
                if model.group == old:
                    model.group = group.id


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
