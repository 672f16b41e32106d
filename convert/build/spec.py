"""Core ML specs: the feature names every emitted file agrees on, renaming, metadata, writing.

Everything here works on protobuf specs that are already built; what builds them lives in
:mod:`convert.build.network` (from the weights) and :mod:`convert.build.ct_convert` (the
coremltools fallback).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convert import __version__
from convert.errors import ConversionError
from convert.files import write_atomic
from convert.heavy import coremltools
from convert.read.families import Preprocessing

SPEC_VERSION = 4  # iOS 13 / macOS 10.15: the minimum for linked models
IMAGE = "image"
FEATURES = "features"
CLASS_LABEL = "classLabel"
CLASS_PROBS = "classLabelProbs"
SEARCH_PATH = ".:$BUNDLE_MAIN"
TOOL = f"coreml-split {__version__}"


def protos():
    coremltools()
    from coremltools.proto import FeatureTypes_pb2, Model_pb2

    return Model_pb2, FeatureTypes_pb2


def feature_shape(graph: Any, tensor: int) -> list[int]:
    shape = graph.tensors[tensor].shape
    if shape is None or any(d is None for d in shape[1:]):
        raise ConversionError(graph.source, "the split tensor's shape is not static")
    return [1, *[int(d) for d in shape[1:]]]


def network(spec: Any) -> Any:
    kind = spec.WhichOneof("Type")
    if kind not in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"):
        raise ValueError(f"not a neural network spec: {kind}")
    return getattr(spec, kind)


def rename_blob(spec: Any, old: str, new: str) -> None:
    """Rename a feature/blob everywhere a NeuralNetwork spec mentions it."""
    d = spec.description
    for feature in [*d.input, *d.output, *d.trainingInput]:
        if feature.name == old:
            feature.name = new
    if d.predictedFeatureName == old:
        d.predictedFeatureName = new
    if d.predictedProbabilitiesName == old:
        d.predictedProbabilitiesName = new
    nn = network(spec)
    for layer in nn.layers:
        for i, name in enumerate(layer.input):
            if name == old:
                layer.input[i] = new
        for i, name in enumerate(layer.output):
            if name == old:
                layer.output[i] = new
    for pre in nn.preprocessing:
        if pre.featureName == old:
            pre.featureName = new
    if spec.WhichOneof("Type") == "neuralNetworkClassifier":
        if nn.labelProbabilityLayerName == old:
            nn.labelProbabilityLayerName = new
    for loss in nn.updateParams.lossLayers:
        kind = loss.WhichOneof("LossLayerType")
        if kind:
            params = getattr(loss, kind)
            if params.input == old:
                params.input = new


def rename_output(spec: Any, new: str) -> None:
    if len(spec.description.output) != 1:
        raise ValueError("expected one output")
    rename_blob(spec, spec.description.output[0].name, new)


def name_classifier_outputs(spec: Any) -> None:
    d = spec.description
    if d.predictedFeatureName != CLASS_LABEL:
        rename_blob(spec, d.predictedFeatureName, CLASS_LABEL)
    if d.predictedProbabilitiesName != CLASS_PROBS:
        rename_blob(spec, d.predictedProbabilitiesName, CLASS_PROBS)
    # Apple's classifiers list the probabilities first, then the label; keep one stable order.
    outputs = sorted(d.output, key=lambda f: f.name != CLASS_PROBS)
    copies = [type(f)() for f in outputs]
    for copy, f in zip(copies, outputs):
        copy.CopyFrom(f)
    del d.output[:]
    d.output.extend(copies)


def name_features(
    spec: Any, image: str | None = None, label: str | None = None, probs: str | None = None
) -> None:
    """Give a backbone, head or standalone classifier the feature names a user asked for."""
    for old, new in ((IMAGE, image), (CLASS_LABEL, label), (CLASS_PROBS, probs)):
        if new and new != old and any(f.name == old for f in _features(spec)):
            rename_blob(spec, old, new)


def _features(spec: Any) -> list[Any]:
    return [*spec.description.input, *spec.description.output]


def set_array_shape(feature: Any, shape: list[int]) -> None:
    """Make a feature a FLOAT32 multi-array of exactly ``shape`` (no flexible shapes)."""
    Model_pb2, FeatureTypes_pb2 = protos()
    array = feature.type.multiArrayType
    del array.shape[:]
    array.shape.extend(shape)
    array.dataType = FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    array.ClearField("ShapeFlexibility")


def _utf8(text: str) -> str:
    """Text for a protobuf string: a file name that is not UTF-8 (held by Python with
    surrogates for its bad bytes) gets U+FFFD in their place."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def describe(
    spec: Any,
    short: str,
    user: dict[str, str],
    preprocessing: Preprocessing | None,
    *,
    author: str | None = None,
    license: str | None = None,
    version: str | None = None,
) -> None:
    """Replace coremltools' metadata (which carries the date) with our own, deterministic one.

    ``author``, ``license`` and ``version`` come from the manifest; without them the author is
    the tool and the version the tool's."""
    meta = spec.description.metadata
    meta.Clear()
    meta.shortDescription = _utf8(short)
    meta.versionString = version or __version__
    meta.author = author or TOOL
    if license:
        meta.license = license
    meta.userDefined["com.github.apple.coremltools.version"] = _coremltools_version()
    meta.userDefined["coreml-split.version"] = __version__
    for key, value in sorted(user.items()):
        meta.userDefined[f"coreml-split.{key}"] = _utf8(value)
    for feature in spec.description.input:
        if feature.name == IMAGE and feature.type.WhichOneof("Type") == "imageType":
            feature.shortDescription = _image_description(feature, preprocessing)
        elif feature.name == FEATURES:
            feature.shortDescription = "Backbone feature tensor"
    for feature in spec.description.output:
        feature.shortDescription = {
            CLASS_LABEL: "Most likely class",
            CLASS_PROBS: "Probability of each class",
            FEATURES: "Backbone feature tensor",
        }.get(feature.name, feature.shortDescription)


def _image_description(feature: Any, preprocessing: Preprocessing | None) -> str:
    image = feature.type.imageType
    text = f"{image.width}x{image.height} image"
    if preprocessing is not None:
        text += f"; scaled inside the model: {preprocessing.description}"
    return text


def _coremltools_version() -> str:
    return coremltools().__version__


def labels_metadata(labels: list[str]) -> str:
    return json.dumps(labels, ensure_ascii=False)


def serialise(spec: Any) -> bytes:
    return spec.SerializeToString(deterministic=True)


def write_spec(path: Path, spec: Any, source: Path) -> int:
    """Check ``spec`` against Core ML's validation rules, then write it atomically.

    A violation here is a bug in coreml-split, not in the user's model; it is reported against
    the source file and nothing is written.
    """
    from convert.check.validate import validate_spec

    problems = validate_spec(spec, path.name, strict_types=True)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConversionError(
            source, f"emitted {path.name} breaks a Core ML rule: {problems[0]}{more}"
        )
    return write_atomic(path, serialise(spec))
