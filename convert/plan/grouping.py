"""Grouping: which models share which backbone, chosen to save the most bytes over the zoo."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from convert.plan.cuts import Analysis
from convert.plan.types import BYTES_PER_PARAMETER, DEFAULT_MIN_SHARED, GroupPlan
from convert.read.families import detect_family

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


def _key_forest(analyses: list[Analysis], min_shared: float) -> dict[tuple[str, str], _Key]:
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
    analyses: list[Analysis], min_shared: float = DEFAULT_MIN_SHARED
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
    by_name: dict[str, Analysis],
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
