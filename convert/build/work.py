"""Doing one job: a group's backbone (from the cache, from the weights, or with ct.convert), then
each stale member's head and pipeline; or one standalone classifier.

A file that fails costs only that classifier; a backbone that cannot be built costs its group,
and every member is told why.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from convert.build import ct_convert, network
from convert.build import pipeline as pipelines
from convert.build import spec as specs
from convert.build.cache import Cache, recipe
from convert.build.jobs import DIRECT, Job, JobResult, Progress, head_layout
from convert.build.layers import weights
from convert.build.layers.weights import FULL, Precision
from convert.build.spec import FEATURES, IMAGE
from convert.build.updatable import frozen, make_updatable, mark_pipeline
from convert.errors import ConversionError, SplitError
from convert.files import file_sha256
from convert.plan.types import ErrorEntry, GroupPlan, ModelPlan
from convert.read.families import PREPROCESSING
from convert.read.graph import Graph
from convert.read.labels import complete_labels
from convert.read.manifest import AUTO, FLOAT16, FLOAT32, ModelSettings, calibrated
from convert.report import ClassifierReport


def run_job(job: Job, say: Progress) -> JobResult:
    """Carry out one job (in a worker process or here). An exception the job did not foresee
    is reported against each of its stale files; it never ends the build."""
    try:
        if job.tensorflow_free:
            from convert.heavy import forgo_tensorflow

            forgo_tensorflow()
        return _standalone_job(job, say) if job.group is None else _group_job(job, say)
    except Exception as exc:
        stale = [m for m in job.models if m.name in job.stale] or job.models
        return JobResult(errors=[ErrorEntry.internal(m.source, exc) for m in stale])


def _load(graph: Graph, plan: ModelPlan):
    """Load the Keras model; settle labels the file's static shapes could not check."""
    from convert.check.keras_model import layer_objects, load_keras_model, output_size

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
    cache = Cache(job.out, state=False)
    backbone_file = f"{group.id}.mlmodel"
    key = job.recipes[backbone_file]
    backbone = _cached_spec(cache, key)
    loaded: dict[str, _Objects] = {}
    auto = group.weights == AUTO
    calibration = _Calibration(job)
    choice = _cached_choice(cache, key) if auto else None
    if backbone is None or (auto and choice is None):
        backbone = None
        failure = None
        if job.backbone_builder == DIRECT:
            backbone = _direct_backbone(job, result, say)
        else:
            backbone, failure = _converted_backbone(job, result, loaded, say)
        if backbone is not None and calibrated(group.weights):
            try:
                choice = _store_backbone(job, backbone, loaded, say, calibration)
            except SplitError as exc:  # the images do not read: the group cannot be stored
                backbone, failure = None, exc
            else:
                if choice is not None:
                    cache.put(choice_key(key), json.dumps(choice.to_json()).encode())
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
            result.warnings.extend(cache.warnings)
            return result
        specs.name_features(backbone, image=job.input_name)
        _describe_backbone(backbone, group, job.backbone_settings)
        cache.put(key, specs.serialise(backbone))
    if job.write_backbone:
        size = specs.write_spec(job.out / backbone_file, backbone, job.models[0].source)
        result.written[backbone_file] = {"file": backbone_file, "bytes": size}
    shared = _Shared(backbone, backbone_file, _sha_of(job.out / backbone_file))
    calibration.backbone = backbone
    for model in job.models:
        if model.name not in job.stale:
            continue
        started = time.perf_counter()
        objects = loaded.get(model.name) or _Objects(job.graphs[model.name], model)
        storage = choice.heads if choice and model.weights == AUTO else model.weights
        try:
            head = _head(objects, model, storage, calibration)
            file = f"{model.name}.mlmodel"
            row = _emit_pipeline(model, group, shared, head, job, file) | {"weights": storage}
            result.written[file] = row
            say(f"{model.name}: head and pipeline in {_duration(time.perf_counter() - started)}")
        except SplitError as exc:
            result.errors.append(ErrorEntry(str(exc.path or model.source), exc.reason))
        except Exception as exc:  # not foreseen: this classifier's one line
            result.errors.append(ErrorEntry.internal(model.source, exc))
        finally:
            if objects.loaded:
                _release()
    result.warnings.extend(cache.warnings)
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
            backbone = ct_convert.convert_backbone(objects.graph, keras_layers, model, group)
            weights.restore(backbone, _precision(group.weights), model.source)
        except SplitError as exc:  # coremltools failed: no member will do
            return None, exc
        loaded[model.name] = objects
        return backbone, None
    return None, None


def _direct_backbone(job: Job, result: JobResult, say: Progress):
    """The backbone built from the weights of the first member whose file reads; None (with
    every member told why) if none does."""
    group = job.group
    assert group is not None
    started = time.perf_counter()
    for model in job.models:
        assert model.split_tensor is not None
        try:
            spec = network.build_backbone(
                job.graphs[model.name],
                model.split_tensor,
                PREPROCESSING[group.preprocessing],
                model.input_shape,
                _precision(group.weights),
            )
        except SplitError as exc:  # this file's weights do not read; another member's may
            result.errors.append(ErrorEntry(str(exc.path or model.source), exc.reason))
            continue
        except Exception as exc:  # not foreseen: said against this member, the next may do
            result.errors.append(ErrorEntry.internal(model.source, exc))
            continue
        say(
            f"{group.id}: backbone built from the weights in "
            f"{_duration(time.perf_counter() - started)}"
        )
        return spec
    return None


def _precision(storage: str) -> Precision:
    """What the builder writes: float16 as it goes; anything quantized in float32 first, then
    stored after calibration (:func:`convert.build.precision.store`)."""
    return Precision(FLOAT16 if storage == FLOAT16 else FLOAT32)


def _calibration_images(job: Job, hwc: list[int]):
    """The images that calibrate quantization: --images, or deterministic synthetic ones."""
    from convert.check.verify import load_images, synthetic_images

    calibration = job.calibration
    if calibration is None or calibration.images is None:
        return synthetic_images(hwc, CALIBRATION_IMAGES)
    return load_images(calibration.images, hwc, calibration.count or None)


def _store_backbone(
    job: Job, backbone, loaded: dict[str, _Objects], say: Progress, calibration: _Calibration
):
    """Quantize a float32 backbone in place, calibrated on the images; with auto, choose the
    storage per layer first (the choice is returned)."""
    from convert.build.precision import choose, input_statistics, mirrored, store

    group = job.group
    assert group is not None
    images = calibration.images()
    inputs = input_statistics(backbone, IMAGE, mirrored(images))
    choice = None
    if group.weights == AUTO:
        assert job.calibration is not None
        heads = {}
        for model in job.models:
            objects = loaded.get(model.name) or _Objects(job.graphs[model.name], model)
            loaded[model.name] = objects
            heads[model.name] = _head(objects, model, FLOAT32, None)
        say(f"{group.id}: choosing the weight storage on {len(images)} images")
        choice = choose(
            backbone,
            heads,
            images,
            job.calibration.max_dprob,
            say=lambda msg: say(f"{group.id}: {msg}"),
            fixed_heads={m.name: m.weights for m in job.models if m.weights != AUTO},
            inputs=inputs,
        )
        precision = choice.backbone
    else:
        precision = Precision(group.weights)
    store(backbone, precision, inputs)
    return choice


class _Calibration:
    """A group's calibration images, and the backbone's features on them (a quantized head is
    calibrated on those), each read or computed once, on first use."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.backbone = None  # set once the backbone is built (or read from the cache)
        self._images = self._features = None

    def images(self):
        if self._images is None:
            self._images = _calibration_images(self.job, self.job.models[0].input_shape)
        return self._images

    def features(self):
        if self._features is None:
            from convert.build.precision import run

            assert self.backbone is not None
            feed = self.backbone.description.input[0].name
            self._features = run(self.backbone, feed, self.images(), FEATURES)
        return self._features


CALIBRATION_IMAGES = 16  # synthetic images, when no --images are given


def choice_key(key: str) -> str:
    return recipe(key, "weights choice")


def _cached_choice(cache: Cache, key: str):
    from convert.build.precision import Choice

    data = cache.get(choice_key(key))
    if data is None:
        return None
    try:
        return Choice.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError):
        cache.drop(choice_key(key), "not a weights choice")
        return None


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _cached_spec(cache: Cache, key: str):
    data = cache.get(key)
    if data is None:
        return None
    Model_pb2, _ = specs.protos()
    try:
        return Model_pb2.Model.FromString(data)
    except Exception:  # protobuf's DecodeError, or worse: the object is not a spec
        cache.drop(key, "not a Core ML spec")
        return None


def _sha_of(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return ""


def _head(objects: _Objects, model: ModelPlan, storage: str, calibration: _Calibration | None):
    """The head spec: built straight from the weights when its layers allow, else converted;
    made updatable when the model learns on the device; then, for a quantized storage,
    calibrated on the backbone's features. Updatable layers stay float32."""
    graph = objects.graph
    assert model.split_tensor is not None
    layout = head_layout(graph, model)
    keep = {}  # layers kept float32 whatever the storage
    precision = _precision(storage) if model.training is None else FULL
    if layout is None:
        head = ct_convert.convert_head(graph, objects.get(), model)
        weights.restore(head, precision, model.source)
    else:
        shape = specs.feature_shape(graph, model.split_tensor)
        head = network.build_head(
            graph, model.split_tensor, list(model.labels), shape, layout, precision
        )
    if model.training is not None:
        make_updatable(head, model.training, model.source)
        keep = frozen(head, model.training)
        if storage == FLOAT16:
            weights.restore(head, Precision(FLOAT16, keep), model.source)
    if calibrated(storage) and storage != AUTO:
        from convert.build.precision import input_statistics, store

        assert calibration is not None
        inputs = input_statistics(head, FEATURES, calibration.features())
        store(head, Precision(storage, keep), inputs)
    return head


def _describe_backbone(backbone, group: GroupPlan, settings: ModelSettings) -> None:
    specs.describe(
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
            self._layer_bytes = pipelines.layers_size(self.spec)
        return self._layer_bytes


def _emit_pipeline(
    model: ModelPlan, group: GroupPlan, shared: _Shared, head, job: Job, file: str
) -> dict[str, Any]:
    backbone, backbone_file, backbone_sha = shared.spec, shared.file, shared.sha256
    settings = job.settings[model.name]
    pre = PREPROCESSING[model.preprocessing]
    user = _source_metadata(model, settings, job.sha256[model.name]) | {"role": "head"}
    specs.name_features(head, label=settings.label_name, probs=settings.probabilities_name)
    specs.describe(head, f"{model.name} head ({model.num_classes} classes)", user, None)
    stub = pipelines.make_stub(backbone, backbone_file)
    pipeline = pipelines.make_pipeline(stub, head)
    title = settings.display_name or model.name
    if model.training is not None:
        mark_pipeline(pipeline)
    specs.describe(
        pipeline,
        settings.description
        or f"{title}: {model.num_classes}-class image classifier on the shared {group.family} "
        f"backbone {pipelines.compiled_name(backbone_file)}",
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
    merged = pipelines.merge_standalone(backbone, head, backbone_layers=False)
    specs.describe(merged, f"{model.name} (standalone)", user | {"role": "standalone"}, pre)
    one_by_one = pipelines.standalone_size(merged, shared.layer_bytes)
    size = specs.write_spec(job.out / file, pipeline, Path(model.source))
    row = _classifier_report(model, group.id, file, size, head.ByteSize(), one_by_one)
    row.updatable = [layer.name for layer in specs.network(head).layers if layer.isUpdatable]
    return asdict(row)


def _source_metadata(model: ModelPlan, settings: ModelSettings, sha256: str) -> dict[str, str]:
    source = Path(model.source)
    user = {
        "source": source.name,
        "source_sha256": sha256,
        "labels": specs.labels_metadata(model.labels),
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
        weights=model.weights,
    )


def _standalone_job(job: Job, say: Progress) -> JobResult:
    model = job.models[0]
    settings = job.settings[model.name]
    result = JobResult()
    how = "building from the weights" if job.backbone_builder == DIRECT else "converting"
    say(f"{model.name}: {how} standalone ({model.standalone_reason})")
    try:
        if model.training is not None:
            raise ConversionError(
                model.source,
                "updatable: only a classifier on a shared backbone gets an updatable head; "
                f"this one converts standalone ({model.standalone_reason})",
            )
        graph = job.graphs[model.name]
        precision = _precision(model.weights)
        if job.backbone_builder == DIRECT:
            pre = PREPROCESSING[model.preprocessing]
            spec = network.build_classifier(graph, model.labels, pre, model.input_shape, precision)
        else:
            _keras_model, objects = _load(graph, model)
            spec = ct_convert.convert_standalone(graph, objects, model)
            weights.restore(spec, precision, model.source)
        if calibrated(model.weights):
            from convert.build.precision import input_statistics, mirrored, store

            images = mirrored(_calibration_images(job, model.input_shape))
            store(spec, Precision(model.weights), input_statistics(spec, IMAGE, images))
        specs.name_features(
            spec, settings.input_name, settings.label_name, settings.probabilities_name
        )
        title = settings.display_name or model.name
        specs.describe(
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
        size = specs.write_spec(job.out / file, spec, Path(model.source))
        result.written[file] = asdict(_classifier_report(model, None, file, size, size, size))
    except SplitError as exc:
        result.errors.append(ErrorEntry(str(exc.path or model.source), exc.reason))
    finally:
        _release()
    return result
