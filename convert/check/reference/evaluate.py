"""Evaluating a Core ML Model spec: one function per model type, features passed by name.

Neural networks (plain, classifier, regressor), pipelines (plain, classifier, regressor) and
linked models are supported. Each sub-model sees only the features it declares as inputs; a
pipeline's outputs are whatever its models produced under the declared output names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from convert.check.reference import features as feat
from convert.check.reference import linking
from convert.check.reference.errors import ReferenceError
from convert.check.reference.network import Network
from convert.check.reference.registry import COMPUTES

Features = dict[str, Any]


def read_spec(path: Path) -> Any:
    """Parse a ``.mlmodel`` file (a serialized CoreML.Specification.Model)."""
    from convert.heavy import coremltools

    coremltools()
    from coremltools.proto import Model_pb2

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ReferenceError(path, f"cannot read the model file: {exc.strerror or exc}") from None
    try:
        return Model_pb2.Model.FromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise ReferenceError(path, f"not a Core ML model file: {exc}") from None


@dataclass
class Cache:
    """Parsed linked models and prepared networks, reused across predictions. A network is
    prepared once per compute precision: its layers hold weights rounded to that precision."""

    specs: dict[Path, tuple[tuple[int, int], Any]] = field(default_factory=dict)
    networks: dict[tuple[str, str, str], Network] = field(default_factory=dict)

    def spec(self, path: Path) -> tuple[str, Any]:
        """(source key, spec) of a model file, re-read when the file changed."""
        stat = os.stat(path)
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self.specs.get(path)
        if cached is None or cached[0] != stamp:
            self.specs[path] = (stamp, read_spec(path))
        return f"{path}@{stamp}", self.specs[path][1]


@dataclass(frozen=True)
class Scope:
    """Where a (sub-)model lives: its file (for messages), the folder links are relative to,
    the cache key of that file and the model's place in it, and its place in the model being
    predicted (``models[0]``..., what ``bound`` reports)."""

    path: Path | None
    model_dir: Path
    source: str
    key: str = ""
    where: str = ""

    def child(self, index: int) -> Scope:
        return replace(self, key=_join(self.key, index), where=_join(self.where, index))


def _join(prefix: str, index: int) -> str:
    return f"{prefix}.models[{index}]" if prefix else f"models[{index}]"


class Evaluator:
    """Runs specs for one prediction call in one compute precision (``"float32"`` or
    ``"float16"``); records the linked models it binds."""

    def __init__(self, cache: Cache, bundle_main: Path | None, compute: str = "float32") -> None:
        if compute not in COMPUTES:
            raise ValueError(f"compute {compute!r} is not one of {', '.join(COMPUTES)}")
        self.cache = cache
        self.bundle_main = bundle_main
        self.compute = compute
        self.bound: list[tuple[str, Path]] = []

    def run(self, spec: Any, inputs: Features, scope: Scope) -> Features:
        kind = spec.WhichOneof("Type")
        runner = _RUNNERS.get(kind or "")
        if runner is None:
            raise ReferenceError(
                scope.path, f"model type {kind!r} is not supported by the reference evaluator"
            )
        return runner(self, spec, inputs, scope)

    # -- neural networks ----------------------------------------------------------------------

    def network(self, spec: Any, scope: Scope) -> Network:
        key = (scope.source, scope.key, self.compute)
        if key not in self.cache.networks:
            nn = getattr(spec, spec.WhichOneof("Type"))
            self.cache.networks[key] = Network(nn, scope.path, self.compute)
        return self.cache.networks[key]

    def run_network(self, spec: Any, inputs: Features, scope: Scope, keep: set[str]) -> Features:
        net = self.network(spec, scope)
        blobs: dict[str, np.ndarray] = {}
        for feature in spec.description.input:
            value = _need(scope, inputs, feature.name)
            kind = feat.feature_kind(feature)
            if kind == "imageType":
                blobs[feature.name] = feat.image_tensor(scope.path, feature, value, net.nn)
            elif kind == "multiArrayType":
                blobs[feature.name] = feat.array_tensor(scope.path, feature, value, net.nn)
            else:
                raise ReferenceError(
                    scope.path, f"network input {feature.name!r} of type {kind} is not supported"
                )
        return net.run(blobs, keep | {o.name for o in spec.description.output})


def _need(scope: Scope, features: Features, name: str, what: str = "input") -> Any:
    if name not in features:
        place = f" of {scope.where}" if scope.where else ""
        verb = "has no value" if what == "input" else "is produced by nothing"
        raise ReferenceError(scope.path, f"{what} {name!r}{place} {verb}")
    return features[name]


def _plain_network(ev: Evaluator, spec: Any, inputs: Features, scope: Scope) -> Features:
    blobs = ev.run_network(spec, inputs, scope, set())
    return {o.name: _need(scope, blobs, o.name, "output") for o in spec.description.output}


def _classifier(ev: Evaluator, spec: Any, inputs: Features, scope: Scope) -> Features:
    nn = spec.neuralNetworkClassifier
    d = spec.description
    source = nn.labelProbabilityLayerName or d.predictedProbabilitiesName
    if not source and nn.layers:
        source = nn.layers[-1].output[0]
    blobs = ev.run_network(spec, inputs, scope, {source})
    probs = _need(scope, blobs, source, "probability blob")
    probs = probs.reshape(probs.shape[0], -1)
    labels = _labels(scope, nn)
    if probs.shape[1] != len(labels):
        raise ReferenceError(
            scope.path, f"blob {source!r} holds {probs.shape[1]} scores for {len(labels)} labels"
        )
    label_name = d.predictedFeatureName or "classLabel"
    out: Features = {label_name: [labels[i] for i in probs.argmax(axis=1)]}
    if d.predictedProbabilitiesName:
        out[d.predictedProbabilitiesName] = [
            {label: float(p) for label, p in zip(labels, row)} for row in probs
        ]
    for o in d.output:
        if o.name not in out:
            out[o.name] = _need(scope, blobs, o.name, "output")
    out[feat.PROBABILITIES] = probs
    return out


def _labels(scope: Scope, nn: Any) -> list[Any]:
    kind = nn.WhichOneof("ClassLabels")
    if kind == "stringClassLabels":
        return list(nn.stringClassLabels.vector)
    if kind == "int64ClassLabels":
        return [int(v) for v in nn.int64ClassLabels.vector]
    raise ReferenceError(scope.path, "classifier without class labels")


# -- pipelines and links ---------------------------------------------------------------------


def _pipeline(ev: Evaluator, spec: Any, inputs: Features, scope: Scope) -> Features:
    kind = spec.WhichOneof("Type")
    pipeline = spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline
    available = dict(inputs)
    for index, model in enumerate(pipeline.models):
        sub_scope = scope.child(index)
        sub_inputs = {f.name: _need(sub_scope, available, f.name) for f in model.description.input}
        available.update(ev.run(model, sub_inputs, sub_scope))
    out = {o.name: _need(scope, available, o.name, "output") for o in spec.description.output}
    if feat.PROBABILITIES in available:
        out[feat.PROBABILITIES] = available[feat.PROBABILITIES]
    return out


def _linked(ev: Evaluator, spec: Any, inputs: Features, scope: Scope) -> Features:
    name, search = linking.link_of(scope.path, spec)
    bundle = ev.bundle_main or scope.model_dir
    file = linking.resolve(scope.path, name, search, scope.model_dir, bundle)
    source, linked = ev.cache.spec(file)
    _check_interface(scope, spec, linked, file)
    ev.bound.append((scope.where or "model", file))
    inner = Scope(file, file.parent, source, where=scope.where)
    sub_inputs = {f.name: _need(inner, inputs, f.name) for f in linked.description.input}
    return ev.run(linked, sub_inputs, inner)


def _check_interface(scope: Scope, stub: Any, linked: Any, file: Path) -> None:
    """The stub promises the linked model's interface; a mismatch would fail on device."""
    produced = {o.name: o for o in linked.description.output}
    for declared in stub.description.output:
        actual = produced.get(declared.name)
        if actual is None:
            raise ReferenceError(
                scope.path,
                f"linked model {file} has no output {declared.name!r} (it has: "
                f"{', '.join(produced) or 'none'})",
            )
        if _shape_of(declared) and _shape_of(actual) and _shape_of(declared) != _shape_of(actual):
            raise ReferenceError(
                scope.path,
                f"output {declared.name!r} is {_shape_of(declared)} in the stub but "
                f"{_shape_of(actual)} in {file}",
            )


def _shape_of(feature: Any) -> tuple[Any, ...]:
    kind = feat.feature_kind(feature)
    if kind == "multiArrayType":
        return feat.declared_shape(feature)
    if kind == "imageType":
        image = feature.type.imageType
        return ("image", image.width, image.height, image.colorSpace)
    return ()


_RUNNERS: dict[str, Callable[[Evaluator, Any, Features, Scope], Features]] = {
    "neuralNetwork": _plain_network,
    "neuralNetworkRegressor": _plain_network,
    "neuralNetworkClassifier": _classifier,
    "pipeline": _pipeline,
    "pipelineClassifier": _pipeline,
    "pipelineRegressor": _pipeline,
    "linkedModel": _linked,
}
