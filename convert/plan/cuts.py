"""Per model: the tensors it can be split at, and everything else the planner needs from it.

The candidate split points are the tensors that every input-to-output path passes through (the
output's dominators), so that a head depends on the split tensor alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convert.errors import ModelFileError, SplitError
from convert.plan.fingerprint import tensor_fingerprints
from convert.plan.types import ModelPlan
from convert.read.families import (
    PREPROCESSING,
    default_preprocessing,
    detect_family,
    is_teachable_machine,
    scales_input_inside,
)
from convert.read.graph import Graph
from convert.read.h5 import read_model
from convert.read.labels import complete_labels, resolve_labels


def image_input_shape(graph: Graph) -> list[int]:
    """(H, W, C) of the single image input; a clear error otherwise. An input of shape
    (None, H, W), without a channel axis (MNIST's 28 x 28), is a grayscale image: (H, W, 1)."""
    if len(graph.inputs) != 1:
        raise ModelFileError(graph.source, f"has {len(graph.inputs)} inputs; expected one image")
    shape = graph.tensors[graph.inputs[0]].shape
    if graph.channel_less_input:
        shape = (*shape, 1)
    if shape is None or len(shape) != 4 or shape[3] not in (1, 3):
        raise ModelFileError(
            graph.source,
            f"input shape {_fmt_shape(shape)} is not an image (expected (None, H, W, 1 or 3), "
            "or (None, H, W) for grayscale)",
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
class Analysis:
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
    aliases: dict[str, str] | None = None,
) -> Analysis:
    """Read one model and everything the planner needs from it. Raises SplitError.

    ``labels`` (from the manifest) replace the labels files beside the model."""
    graph = graph or read_model(path, aliases=aliases)
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
    return Analysis(plan, graph, fps, cuts, cut_params)


def _fmt_shape(shape: Any) -> str:
    if shape is None:
        return "unknown"
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
