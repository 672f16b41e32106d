"""Deciding: which classifiers share which backbone, and where each one is split.

Works on neutral graphs only (no TensorFlow). :func:`make_plan` reads every model of a zoo
(:mod:`convert.plan.cuts` finds where each can be split), matches the candidates across models
by fingerprint and preprocessing, and chooses the backbones that save the most bytes over the
whole zoo (:mod:`convert.plan.grouping`).
"""

from __future__ import annotations

import re
from pathlib import Path

from convert.errors import SplitError
from convert.plan.cuts import Analysis, analyse
from convert.plan.grouping import group_models
from convert.plan.types import DEFAULT_MIN_SHARED, MODEL_SUFFIXES, ErrorEntry, GroupPlan, Plan
from convert.read.graph import PackedGraphs
from convert.read.manifest import Manifest
from convert.read.sources import SourceCache

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
    analyses: list[Analysis] = []
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
        except Exception as exc:  # not foreseen: this file's one line, the zoo goes on
            plan.errors.append(ErrorEntry.internal(path, exc))
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
