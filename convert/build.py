"""Carrying out a plan: convert each group's backbone once, then every head, and write the files.

The work is cut into jobs: one per group (its backbone, then its members' heads and pipelines)
and one per standalone model. Before anything runs, every output's recipe (see
``convert/cache.py``) is compared with the one it was last written from; jobs with nothing stale
are skipped, so a rerun with nothing changed imports neither TensorFlow nor coremltools. The
remaining jobs run in worker processes, two at a time by default (each converts one backbone
with one Keras model in memory, so peak memory depends on the largest backbone, not on the number
of models), or in this process when there is one job.

A failure is recorded against the files it concerns and the rest of the zoo still converts.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from convert import emit
from convert.cache import Cache, SourceCache, file_sha256, recipe, tool_versions
from convert.errors import SplitError
from convert.families import PREPROCESSING
from convert.graph import Graph, PackedGraphs
from convert.labels import complete_labels
from convert.manifest import Manifest, ModelSettings
from convert.plan import ErrorEntry, GroupPlan, ModelPlan, Plan
from convert.report import BackboneReport, ClassifierReport, Report

Progress = Callable[[str], None]
DEFAULT_JOBS = 2
DIRECT = "direct"  # built layer by layer from the .h5 weights (convert/fast_backbone.py)
COREMLTOOLS = "coremltools"  # traced through TensorFlow and converted with ct.convert
BACKBONE_CONVERTERS = ("auto", COREMLTOOLS)


@dataclass
class Job:
    """One unit of work for a worker: a group, or one standalone model."""

    group: GroupPlan | None
    models: list[ModelPlan]  # the group's members (in order), or the standalone model
    graphs: Mapping[str, Graph]  # each access may read a fresh copy (PackedGraphs)
    settings: dict[str, ModelSettings]
    out: Path
    recipes: dict[str, str]  # output file -> recipe
    sha256: dict[str, str]  # model -> its source file's sha256
    stale: list[str]  # names of the models whose file must be (re)written
    write_backbone: bool
    backbone_settings: ModelSettings = field(default_factory=ModelSettings)
    input_name: str | None = None  # the backbone's image input, if zoo.toml renames it
    backbone_builder: str = COREMLTOOLS  # DIRECT: from the weights; COREMLTOOLS: ct.convert
    needs_tensorflow: bool = True  # a ct.convert or a Keras load may be needed
    tensorflow_free: bool = False  # no job of this run needs TensorFlow: do not import it

    @property
    def label(self) -> str:
        if self.group is None:
            return self.models[0].name
        return self.group.id


@dataclass
class JobResult:
    written: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> report row
    errors: list[ErrorEntry] = field(default_factory=list)


def build(
    plan: Plan,
    graphs: Mapping[str, Graph],
    out: Path,
    progress: Progress | None = None,
    manifest: Manifest | None = None,
    jobs: int = DEFAULT_JOBS,
    sources: SourceCache | None = None,
    backbone_converter: str = "auto",
) -> Report:
    """Build what is stale: one job here, several in up to ``jobs`` worker processes.

    ``backbone_converter``: "auto" builds each backbone straight from the weights when every
    layer is covered (convert/fast_backbone.py) and converts it with ct.convert otherwise;
    "coremltools" always converts with ct.convert."""
    say = progress or (lambda _msg: None)
    manifest = manifest or Manifest()
    report = Report(errors=list(plan.errors), lower_bound_bytes=plan.lower_bound_bytes)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache(out)
    work = _jobs(
        plan, graphs, out, manifest, cache, sources or SourceCache(None), backbone_converter
    )
    todo = [job for job in work if job.stale or job.write_backbone]
    # TensorFlow costs seconds to import; coremltools imports it unless told not to. When no
    # job converts with ct.convert or loads a Keras model, the whole run goes without it.
    free = not any(job.needs_tensorflow for job in todo)
    for job in todo:
        job.tensorflow_free = free
    fresh = len(work) - len(todo)
    if fresh:
        say(f"{fresh} of {len(work)} jobs up to date")
    workers = Workers(jobs) if len(todo) > 1 and jobs > 1 else None
    try:
        results = _run(todo, workers, say)
    finally:
        if workers is not None:
            workers.close()
    for job in work:
        result = results.get(job.label, JobResult())
        report.errors.extend(result.errors)
        for file, wanted in job.recipes.items():
            if file in result.written:
                cache.record(file, wanted, result.written[file])
            elif cache.fresh(file, wanted) is None:
                cache.forget(file)
        _collect(job, cache, report)
    _remove_leftovers(plan, work, cache, say)
    cache.save()
    return report


def _remove_leftovers(plan: Plan, work: list[Job], cache: Cache, say: Progress) -> None:
    """Delete files an earlier build wrote for models or backbones the zoo no longer has, so that
    ``build/`` never offers an orphan to Xcode. Only files this tool recorded writing are
    touched, and none while a file of the zoo could not be read (its outputs stay)."""
    if plan.errors:
        return
    current = {file for job in work for file in job.recipes}
    for file in sorted(set(cache.entries) - current):
        (cache.out / file).unlink(missing_ok=True)
        cache.forget(file)
        say(f"removed {file}: no longer in the zoo")


# -- planning the jobs ----------------------------------------------------------------------


def _jobs(
    plan: Plan,
    graphs: Mapping[str, Graph],
    out: Path,
    manifest: Manifest,
    cache: Cache,
    sources: SourceCache,
    backbone_converter: str = "auto",
) -> list[Job]:
    versions = tool_versions()
    sha = {m.name: sources.sha256(Path(m.source)) for m in plan.models}
    jobs = []
    for group in plan.groups:
        members = [plan.model(n) for n in group.members]
        settings = {m.name: manifest.for_model(m.name) for m in members}
        backbone_file = f"{group.id}.mlmodel"
        input_name = settings[members[0].name].input_name  # make_plan checked they agree
        builder = _backbone_builder(members[0], graphs[members[0].name], backbone_converter)
        backbone_recipe = recipe(
            "backbone",
            versions,
            _backbone_key(group, members[0]) | {"builder": builder},
            input_name,
        )
        recipes = {backbone_file: backbone_recipe}
        for m in members:
            recipes[f"{m.name}.mlmodel"] = recipe(
                "pipeline", versions, backbone_recipe, _model_key(m, sha[m.name], settings[m.name])
            )
        stale = [m.name for m in members if not cache.fresh(*_output(m, recipes))]
        write_backbone = cache.fresh(backbone_file, backbone_recipe) is None
        needs_tf = (write_backbone and builder != DIRECT) or any(
            _head_needs_tensorflow(plan.model(name), graphs[name]) for name in stale
        )
        jobs.append(
            Job(
                group=group,
                models=members,
                graphs=_subset(graphs, [m.name for m in members]),
                settings=settings,
                out=out,
                recipes=recipes,
                sha256={m.name: sha[m.name] for m in members},
                stale=stale,
                write_backbone=write_backbone,
                backbone_settings=manifest.defaults,
                input_name=input_name,
                backbone_builder=builder,
                needs_tensorflow=needs_tf,
            )
        )
    for m in plan.models:
        if m.group is None:
            settings = manifest.for_model(m.name)
            file = f"{m.name}.mlmodel"
            builder = _standalone_builder(m, graphs[m.name], backbone_converter)
            key = _model_key(m, sha[m.name], settings) | {"builder": builder}
            wanted = recipe("standalone", versions, key)
            jobs.append(
                Job(
                    group=None,
                    models=[m],
                    graphs=_subset(graphs, [m.name]),
                    settings={m.name: settings},
                    out=out,
                    recipes={file: wanted},
                    sha256={m.name: sha[m.name]},
                    stale=[] if cache.fresh(file, wanted) else [m.name],
                    write_backbone=False,
                    backbone_builder=builder,
                    needs_tensorflow=builder != DIRECT,
                )
            )
    return jobs


def _subset(graphs: Mapping[str, Graph], names: list[str]) -> Mapping[str, Graph]:
    if isinstance(graphs, PackedGraphs):
        return graphs.subset(names)
    return {name: graphs[name] for name in names}


def _backbone_builder(first: ModelPlan, graph: Graph, converter: str) -> str:
    """DIRECT when the backbone's layers are all covered by fast_backbone, else COREMLTOOLS.
    Members share the backbone's weights and structure, so the first member decides."""
    from convert import fast_backbone

    if converter == COREMLTOOLS or first.split_tensor is None:
        return COREMLTOOLS
    return DIRECT if fast_backbone.supported(graph, first.split_tensor) is None else COREMLTOOLS


def _standalone_builder(model: ModelPlan, graph: Graph, converter: str) -> str:
    """DIRECT when every layer of the model is covered by fast_backbone and its labels are
    settled without loading it, else COREMLTOOLS."""
    from convert import fast_backbone

    if converter == COREMLTOOLS or not model.output_size_known:
        return COREMLTOOLS
    return DIRECT if fast_backbone.supported(graph, graph.outputs[0]) is None else COREMLTOOLS


def _head_needs_tensorflow(model: ModelPlan, graph: Graph) -> bool:
    if not model.output_size_known or model.split_tensor is None:
        return True  # the labels wait for the loaded model's output size
    return _head_builder(graph, model) is None


def _head_builder(graph: Graph, model: ModelPlan) -> Any:
    """The module that builds this head from the weights (fast_head for a chain of Dense-like
    layers, fast_backbone for anything else it covers), or None: ct.convert it."""
    from convert import fast_backbone, fast_head

    split, output = model.split_tensor, graph.outputs[0]
    assert split is not None
    if fast_head.supported(graph, split, output) is None:
        return fast_head
    if fast_backbone.head_supported(graph, split, output) is None:
        return fast_backbone
    return None


def _output(model: ModelPlan, recipes: dict[str, str]) -> tuple[str, str]:
    file = f"{model.name}.mlmodel"
    return file, recipes[file]


def _backbone_key(group: GroupPlan, first: ModelPlan) -> dict[str, Any]:
    """What the backbone's bytes depend on: its weights and structure (the fingerprint), the
    preprocessing, the input, the file name. Not its members: a new classifier on the same
    backbone leaves the backbone file as it is."""
    return {
        "fingerprint": group.fingerprint,
        "preprocessing": group.preprocessing,
        "input_shape": first.input_shape,
        "file": group.id,
        "family": group.family,
        "split_layer": group.split_layer,
        "feature_shape": group.feature_shape,
    }


def _model_key(model: ModelPlan, sha256: str, settings: ModelSettings) -> dict[str, Any]:
    """What a classifier's file depends on. Where the zoo lies on disk is not part of it: the
    files carry the source's name and hash, not its path."""
    where = {"source": Path(model.source).name, "labels_source": None}
    return {
        "source_sha256": sha256,
        "plan": asdict(model) | where,
        "settings": asdict(settings) | {"labels_source": None},
    }


# -- running them ---------------------------------------------------------------------------


class Workers:
    """Worker processes for the jobs, spawned (not forked) so that each starts clean."""

    def __init__(self, jobs: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        self.queue = context.Queue()
        self.pool = ProcessPoolExecutor(
            max(1, min(jobs, os.cpu_count() or 1)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(self.queue,),
        )

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.queue.close()
        self.queue.join_thread()


_QUEUE: Any = None


def _init_worker(queue: Any) -> None:
    global _QUEUE
    _QUEUE = queue


def _run_in_worker(job: Job) -> JobResult:
    return run_job(job, _QUEUE.put)


def _run(todo: list[Job], workers: Workers | None, say: Progress) -> dict[str, JobResult]:
    if not todo:
        return {}
    if workers is None:
        return {job.label: run_job(job, say) for job in todo}
    results: dict[str, JobResult] = {}
    futures = {workers.pool.submit(_run_in_worker, job): job for job in todo}
    pending = set(futures)
    while pending:
        _drain(workers.queue, say)
        done = {f for f in pending if f.done()}
        for future in done:
            job = futures[future]
            try:
                results[job.label] = future.result()
            except Exception as exc:  # a worker that died: its files are reported, not lost
                results[job.label] = JobResult(
                    errors=[
                        ErrorEntry(m.source, f"conversion process failed: {exc}")
                        for m in job.models
                        if m.name in job.stale
                    ]
                )
        pending -= done
        if pending:
            time.sleep(0.05)
    _drain(workers.queue, say)
    return results


def _drain(queue: Any, say: Progress) -> None:
    import queue as queues

    while True:
        try:
            say(queue.get_nowait())
        except queues.Empty:
            return


def run_job(job: Job, say: Progress) -> JobResult:
    """Carry out one job (in a worker process or here)."""
    if job.tensorflow_free:
        from convert.heavy import forgo_tensorflow

        forgo_tensorflow()
    return _standalone_job(job, say) if job.group is None else _group_job(job, say)


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
    import sys

    from convert.heavy import keras

    if "keras" in sys.modules:
        keras(3).backend.clear_session()
    if "tf_keras" in sys.modules:
        keras(2).backend.clear_session()
    gc.collect()


class _Objects:
    """Loaded Keras layer objects for one model, loaded on first use."""

    def __init__(self, graph: Graph, model: ModelPlan) -> None:
        self.graph, self.model, self._objects = graph, model, None

    def get(self):
        if self._objects is None:
            _keras_model, self._objects = _load(self.graph, self.model)
        return self._objects

    @property
    def loaded(self) -> bool:
        return self._objects is not None


def _group_job(job: Job, say: Progress) -> JobResult:
    """The backbone (from the cache, built from the weights, or converted with ct.convert from
    the first member whose file loads), then the heads and pipelines of the stale members.

    A file that fails to load or whose head fails costs only that classifier. A backbone that
    coremltools cannot convert costs the whole group, and every member is told why.
    """
    group = job.group
    assert group is not None
    result = JobResult()
    cache = Cache(job.out)
    backbone_file = f"{group.id}.mlmodel"
    key = job.recipes[backbone_file]
    backbone = _cached_spec(cache, key)
    loaded: dict[str, _Objects] = {}
    if backbone is None:
        failure = None
        if job.backbone_builder == DIRECT:
            backbone = _direct_backbone(job, result, say)
        else:
            backbone, failure = _converted_backbone(job, result, loaded, say)
        if backbone is None:
            reported = {e.file for e in result.errors}
            for model in job.models:
                if model.source in reported:
                    continue  # its own file failed to load: already said
                if failure is not None and str(failure.path) == model.source:
                    result.errors.append(ErrorEntry(model.source, failure.reason))
                else:
                    reason = failure.reason if failure else "no member file loads"
                    result.errors.append(
                        ErrorEntry(
                            model.source,
                            f"not converted: its shared backbone {group.id} failed to convert "
                            f"({reason})",
                        )
                    )
            _release()
            return result
        emit.name_features(backbone, image=job.input_name)
        _describe_backbone(backbone, group, job.backbone_settings)
        cache.put(key, emit.serialise(backbone))
    if job.write_backbone:
        size = emit.write_spec(job.out / backbone_file, backbone, job.models[0].source)
        result.written[backbone_file] = {"file": backbone_file, "bytes": size}
    shared = _Shared(backbone, backbone_file, _sha_of(job.out / backbone_file))
    for model in job.models:
        if model.name not in job.stale:
            continue
        started = time.perf_counter()
        objects = loaded.get(model.name) or _Objects(job.graphs[model.name], model)
        try:
            head = _head(objects, model)
            file = f"{model.name}.mlmodel"
            row = _emit_pipeline(model, group, shared, head, job, file)
            result.written[file] = row
            say(f"{model.name}: head and pipeline in {_duration(time.perf_counter() - started)}")
        except SplitError as exc:
            result.errors.append(ErrorEntry(str(exc.path or model.source), exc.reason))
        finally:
            if objects.loaded:
                _release()
    return result


def _converted_backbone(job: Job, result: JobResult, loaded: dict[str, _Objects], say: Progress):
    """(backbone, None) converted with ct.convert from the first member whose file loads, or
    (None, the coremltools failure) - or (None, None) if no member loads."""
    group = job.group
    assert group is not None
    say(f"{group.id}: converting the backbone with coremltools")
    for model in job.models:
        objects = _Objects(job.graphs[model.name], model)
        try:
            keras_layers = objects.get()
        except SplitError as exc:  # this file does not load; another member's may
            result.errors.append(ErrorEntry(str(exc.path or model.source), exc.reason))
            continue
        try:
            backbone = emit.convert_backbone(objects.graph, keras_layers, model, group)
        except SplitError as exc:  # coremltools failed: no member will do
            return None, exc
        loaded[model.name] = objects
        return backbone, None
    return None, None


def _direct_backbone(job: Job, result: JobResult, say: Progress):
    """The backbone built from the weights of the first member whose file reads; None (with
    every member told why) if none does."""
    from convert import fast_backbone

    group = job.group
    assert group is not None
    started = time.perf_counter()
    for model in job.models:
        assert model.split_tensor is not None
        try:
            spec = fast_backbone.build_backbone(
                job.graphs[model.name],
                model.split_tensor,
                PREPROCESSING[group.preprocessing],
                model.input_shape,
            )
        except SplitError as exc:  # this file's weights do not read; another member's may
            result.errors.append(ErrorEntry(str(exc.path or model.source), exc.reason))
            continue
        say(
            f"{group.id}: backbone built from the weights in "
            f"{_duration(time.perf_counter() - started)}"
        )
        return spec
    return None


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _cached_spec(cache: Cache, key: str):
    data = cache.get(key)
    if data is None:
        return None
    Model_pb2, _ = emit._proto()
    return Model_pb2.Model.FromString(data)


def _sha_of(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return ""


def _head(objects: _Objects, model: ModelPlan):
    """The head spec: built straight from the weights when its layers allow, else converted."""
    graph = objects.graph
    assert model.split_tensor is not None
    builder = _head_builder(graph, model)
    if builder is None:
        return emit.convert_head(graph, objects.get(), model)
    shape = emit.feature_shape(graph, model.split_tensor)
    return builder.build_head(graph, model.split_tensor, list(model.labels), shape)


def _describe_backbone(backbone, group: GroupPlan, settings: ModelSettings) -> None:
    emit.describe(
        backbone,
        f"{group.family} backbone, split after {group.split_layer}; shared by coreml-split "
        "pipelines",
        {
            "role": "backbone",
            "fingerprint": group.fingerprint,
            "preprocessing": group.preprocessing,
        },
        PREPROCESSING[group.preprocessing],
        author=settings.author,
        license=settings.license,
        version=settings.version,
    )


class _Shared:
    """A group's backbone spec, its file and that file's SHA-256; its layers' size in bytes is
    measured once, on first use."""

    def __init__(self, spec: Any, file: str, sha256: str) -> None:
        self.spec, self.file, self.sha256 = spec, file, sha256
        self._layer_bytes: int | None = None

    @property
    def layer_bytes(self) -> int:
        if self._layer_bytes is None:
            self._layer_bytes = emit.layers_size(self.spec)
        return self._layer_bytes


def _emit_pipeline(
    model: ModelPlan, group: GroupPlan, shared: _Shared, head, job: Job, file: str
) -> dict[str, Any]:
    backbone, backbone_file, backbone_sha = shared.spec, shared.file, shared.sha256
    settings = job.settings[model.name]
    pre = PREPROCESSING[model.preprocessing]
    user = _source_metadata(model, settings, job.sha256[model.name]) | {"role": "head"}
    emit.name_features(head, label=settings.label_name, probs=settings.probabilities_name)
    emit.describe(head, f"{model.name} head ({model.num_classes} classes)", user, None)
    stub = emit.make_stub(backbone, backbone_file)
    pipeline = emit.make_pipeline(stub, head)
    title = settings.display_name or model.name
    emit.describe(
        pipeline,
        settings.description
        or f"{title}: {model.num_classes}-class image classifier on the shared {group.family} "
        f"backbone {emit.compiled_name(backbone_file)}",
        user
        | {
            "role": "pipeline",
            "backbone": backbone_file,
            "backbone_fingerprint": group.fingerprint,
            "backbone_sha256": backbone_sha,
            "split_layer": model.split_layer or "",
        },
        pre,
        author=settings.author,
        license=settings.license,
        version=settings.version,
    )
    merged = emit.merge_standalone(backbone, head, backbone_layers=False)
    emit.describe(merged, f"{model.name} (standalone)", user | {"role": "standalone"}, pre)
    one_by_one = emit.standalone_size(merged, shared.layer_bytes)
    size = emit.write_spec(job.out / file, pipeline, Path(model.source))
    return asdict(_classifier_report(model, group.id, file, size, head.ByteSize(), one_by_one))


def _source_metadata(model: ModelPlan, settings: ModelSettings, sha256: str) -> dict[str, str]:
    source = Path(model.source)
    user = {
        "source": source.name,
        "source_sha256": sha256,
        "labels": emit.labels_metadata(model.labels),
    }
    if settings.display_name:
        user["display_name"] = settings.display_name
    return user


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


def _standalone_job(job: Job, say: Progress) -> JobResult:
    model = job.models[0]
    settings = job.settings[model.name]
    result = JobResult()
    how = "building from the weights" if job.backbone_builder == DIRECT else "converting"
    say(f"{model.name}: {how} standalone ({model.standalone_reason})")
    try:
        graph = job.graphs[model.name]
        if job.backbone_builder == DIRECT:
            from convert import fast_backbone

            pre = PREPROCESSING[model.preprocessing]
            spec = fast_backbone.build_classifier(graph, model.labels, pre, model.input_shape)
        else:
            _keras_model, objects = _load(graph, model)
            spec = emit.convert_standalone(graph, objects, model)
        emit.name_features(
            spec, settings.input_name, settings.label_name, settings.probabilities_name
        )
        title = settings.display_name or model.name
        emit.describe(
            spec,
            settings.description
            or f"{title}: {model.num_classes}-class image classifier (standalone)",
            _source_metadata(model, settings, job.sha256[model.name]) | {"role": "standalone"},
            PREPROCESSING[model.preprocessing],
            author=settings.author,
            license=settings.license,
            version=settings.version,
        )
        file = f"{model.name}.mlmodel"
        size = emit.write_spec(job.out / file, spec, Path(model.source))
        result.written[file] = asdict(_classifier_report(model, None, file, size, size, size))
    except SplitError as exc:
        result.errors.append(ErrorEntry(str(exc.path or model.source), exc.reason))
    finally:
        _release()
    return result


# -- the report -----------------------------------------------------------------------------


def _collect(job: Job, cache: Cache, report: Report) -> None:
    """Report rows for the job's files that exist and are current."""
    if job.group is not None:
        group = job.group
        file = f"{group.id}.mlmodel"
        entry = cache.fresh(file, job.recipes[file])
        if entry is not None:
            report.backbones.append(
                BackboneReport(
                    id=group.id,
                    file=file,
                    bytes=entry.size,
                    parameters=group.backbone_parameters,
                    members=list(group.members),
                    split_layer=group.split_layer,
                    preprocessing=group.preprocessing,
                    builder=job.backbone_builder,
                )
            )
    for model in job.models:
        file = f"{model.name}.mlmodel"
        entry = cache.fresh(file, job.recipes[file])
        if entry is not None and entry.row:
            report.classifiers.append(ClassifierReport(**(entry.row | {"source": model.source})))
