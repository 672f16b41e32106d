"""Carrying out a plan: convert each group's backbone once, then every head, and write the files.

Only one Keras model is held in memory at a time. A failure is recorded against the files it
concerns and the rest of the zoo still converts.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

from convert import emit
from convert.errors import SplitError
from convert.families import PREPROCESSING
from convert.graph import Graph
from convert.labels import complete_labels
from convert.plan import ErrorEntry, GroupPlan, ModelPlan, Plan
from convert.report import BackboneReport, ClassifierReport, Report

Progress = Callable[[str], None]


def build(
    plan: Plan, graphs: dict[str, Graph], out: Path, progress: Progress | None = None
) -> Report:
    say = progress or (lambda _msg: None)
    report = Report(errors=list(plan.errors), lower_bound_bytes=plan.lower_bound_bytes)
    out.mkdir(parents=True, exist_ok=True)
    steps = len(plan.groups) + sum(1 for m in plan.models if m.group is None)
    step = 0
    for group in plan.groups:
        step += 1
        say(f"[{step}/{steps}] {group.id}: backbone once, then {len(group.members)} heads")
        _build_group(plan, group, graphs, out, report, say)
    for model in plan.models:
        if model.group is None:
            step += 1
            say(f"[{step}/{steps}] {model.name}: standalone ({model.standalone_reason})")
            _build_standalone(model, graphs[model.name], out, report)
    return report


def _load(graph: Graph, plan: ModelPlan):
    """Load the Keras model; settle labels the file's static shapes could not check."""
    from convert.keras_exec import layer_objects, load_keras_model, output_size

    model = load_keras_model(graph)
    if not plan.output_size_known:
        plan.labels = complete_labels(
            Path(plan.source), plan.labels, plan.labels_source, output_size(model, graph)
        )
        plan.output_size_known = True
    return model, layer_objects(model, graph)


def _release() -> None:
    """Drop Keras' global state between models so memory does not grow with the zoo."""
    from convert.heavy import keras

    keras(3).backend.clear_session()
    keras(2).backend.clear_session()
    gc.collect()


def _build_group(
    plan: Plan, group: GroupPlan, graphs: dict[str, Graph], out: Path, report: Report, say: Progress
) -> None:
    """The backbone from the first member whose file loads, then every member's head.

    A file that fails to load or whose head fails costs only that classifier. A backbone that
    coremltools cannot convert costs the whole group, and every member is told why.
    """
    backbone_file = f"{group.id}.mlmodel"
    backbone = None
    for index, name in enumerate(group.members):
        model, graph = plan.model(name), graphs[name]
        started = time.perf_counter()
        try:
            _keras_model, objects = _load(graph, model)
            if backbone is None:
                try:
                    backbone = _write_backbone(group, graph, objects, model, out, report)
                except SplitError as exc:
                    report.errors.append(ErrorEntry(str(exc.path or model.source), exc.reason))
                    for other in group.members[index + 1 :]:
                        report.errors.append(
                            ErrorEntry(
                                plan.model(other).source,
                                f"not converted: its shared backbone {group.id} failed "
                                f"to convert ({exc.reason})",
                            )
                        )
                    return
            head = emit.convert_head(graph, objects, model)
            report.classifiers.append(
                _emit_pipeline(model, group, backbone, head, backbone_file, out)
            )
            say(f"    {name}: {time.perf_counter() - started:.1f}s")
        except SplitError as exc:
            report.errors.append(ErrorEntry(str(exc.path or model.source), exc.reason))
        finally:
            _release()


def _write_backbone(group: GroupPlan, graph: Graph, objects, model: ModelPlan, out: Path, report):
    backbone = emit.convert_backbone(graph, objects, model, group)
    emit.describe(
        backbone,
        f"{group.family} backbone shared by {len(group.members)} classifiers "
        f"(split after {group.split_layer})",
        {
            "role": "backbone",
            "fingerprint": group.fingerprint,
            "preprocessing": group.preprocessing,
            "members": ",".join(group.members),
        },
        PREPROCESSING[group.preprocessing],
    )
    file = f"{group.id}.mlmodel"
    size = emit.write_spec(out / file, backbone, graph.source)
    report.backbones.append(
        BackboneReport(
            id=group.id,
            file=file,
            bytes=size,
            parameters=group.backbone_parameters,
            members=list(group.members),
            split_layer=group.split_layer,
            preprocessing=group.preprocessing,
        )
    )
    return backbone


def _emit_pipeline(
    model: ModelPlan, group: GroupPlan, backbone, head, backbone_file: str, out: Path
) -> ClassifierReport:
    pre = PREPROCESSING[model.preprocessing]
    user = _source_metadata(model) | {"role": "head"}
    emit.describe(head, f"{model.name} head ({model.num_classes} classes)", user, None)
    stub = emit.make_stub(backbone, backbone_file)
    pipeline = emit.make_pipeline(stub, head)
    emit.describe(
        pipeline,
        f"{model.name}: {model.num_classes}-class image classifier on the shared {group.family} "
        f"backbone {emit.compiled_name(backbone_file)}",
        user
        | {"role": "pipeline", "backbone": backbone_file, "split_layer": model.split_layer or ""},
        pre,
    )
    merged = emit.merge_standalone(backbone, head)
    emit.describe(merged, f"{model.name} (standalone)", user | {"role": "standalone"}, pre)
    file = f"{model.name}.mlmodel"
    size = emit.write_spec(out / file, pipeline, Path(model.source))
    return _classifier_report(
        model, group.id, file, size, len(emit.serialise(head)), len(emit.serialise(merged))
    )


def _source_metadata(model: ModelPlan) -> dict[str, str]:
    source = Path(model.source)
    return {
        "source": source.name,
        "source_sha256": emit.file_sha256(source),
        "labels": emit.labels_metadata(model.labels),
    }


def _classifier_report(
    model: ModelPlan, group: str | None, file: str, size: int, head: int, standalone: int
) -> ClassifierReport:
    return ClassifierReport(
        name=model.name,
        source=model.source,
        group=group,
        file=file,
        bytes=size,
        head_bytes=head,
        standalone_bytes=standalone,
        classes=model.num_classes,
        labels=list(model.labels),
        preprocessing=model.preprocessing,
    )


def _build_standalone(model: ModelPlan, graph: Graph, out: Path, report: Report) -> None:
    try:
        _keras_model, objects = _load(graph, model)
        spec = emit.convert_standalone(graph, objects, model)
        emit.describe(
            spec,
            f"{model.name}: {model.num_classes}-class image classifier (standalone)",
            _source_metadata(model) | {"role": "standalone"},
            PREPROCESSING[model.preprocessing],
        )
        file = f"{model.name}.mlmodel"
        size = emit.write_spec(out / file, spec, Path(model.source))
        report.classifiers.append(_classifier_report(model, None, file, size, size, size))
    except SplitError as exc:
        report.errors.append(ErrorEntry(str(exc.path or model.source), exc.reason))
    finally:
        _release()
