"""Specification versions: the version check of Model.cpp validateGeneric, and the minimum
version a model's features need, after Utils.cpp (downgradeSpecificationVersion,
isIOS12NeuralNetworkLayer and the hasIOS*Features family).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from convert.check.rules.common import (
    NEWEST_SPEC_VERSION,
    NN_TYPES,
    SPEC_IOS11_2,
    SPEC_IOS12,
    SPEC_IOS13,
    SPEC_IOS14,
    Message,
)
from convert.check.rules.nn_layers import _weight_kind, _weight_params


def _check_spec_version(spec: Message, where: str) -> Iterator[str]:
    version = spec.specificationVersion
    if version <= 0:
        yield f"{where}: specificationVersion is missing or not positive ({version})"
        return
    if version > NEWEST_SPEC_VERSION:
        yield (
            f"{where}: specificationVersion {version} is newer than any Core ML release "
            f"(newest is {NEWEST_SPEC_VERSION})"
        )
    needed = _required_spec_version(spec)
    if needed and version < needed[0]:
        yield (
            f"{where}: specificationVersion {version} is too low: {needed[1]} needs "
            f"specificationVersion >= {needed[0]}"
        )


# --------------------------------------------------------------------------------------------
# Minimum specification version: Utils.cpp downgradeSpecificationVersion / hasIOS*Features.
# The validator itself only rejects version 0 and versions newer than it knows; these are the
# versions the format assigns to features, which Core ML uses to decide what an OS can load.

_IOS12_LAYERS = frozenset(
    "convolution innerProduct batchnorm activation pooling padding concat lrn softmax split add "
    "multiply unary upsample bias l2normalize reshape flatten permute reduce loadConstant scale "
    "simpleRecurrent gru uniDirectionalLSTM biDirectionalLSTM crop average max min dot mvn "
    "embedding sequenceRepeat reorganizeData slice custom resizeBilinear cropResize".split()
)
_IOS14_LAYERS = frozenset(
    "cumSum oneHot clampedReLU argSort pooling3d globalPooling3d sliceBySize convolution3d".split()
)
_PIXEL_SHUFFLE = 2


def _required_spec_version(spec: Message) -> tuple[int, str] | None:
    """The highest version this model's own features need, with the reason (None if 1)."""
    needs = list(_description_needs(spec.description))
    kind = spec.WhichOneof("Type")
    if spec.isUpdatable:
        needs.append((SPEC_IOS13, "an updatable model"))
    type_needs = {
        "customModel": SPEC_IOS12,
        "linkedModel": SPEC_IOS13,
        "kNearestNeighborsClassifier": SPEC_IOS13,
        "itemSimilarityRecommender": SPEC_IOS13,
        "soundAnalysisPreprocessing": SPEC_IOS13,
        "serializedModel": SPEC_IOS14,
    }
    if kind in type_needs:
        needs.append((type_needs[kind], f"a {kind} model"))
    if kind in NN_TYPES:
        needs.extend(_network_needs(getattr(spec, kind)))
    return max(needs, default=None, key=lambda need: need[0])


def _description_needs(desc: Message) -> Iterator[tuple[int, str]]:
    for feature in (*desc.input, *desc.output):
        ftype = feature.type
        kind = ftype.WhichOneof("Type")
        if kind == "multiArrayType" and ftype.multiArrayType.WhichOneof("ShapeFlexibility"):
            yield SPEC_IOS12, f"the flexible shape of '{feature.name}'"
        if kind == "imageType" and ftype.imageType.WhichOneof("SizeFlexibility"):
            yield SPEC_IOS12, f"the flexible image size of '{feature.name}'"
        if kind == "sequenceType":
            yield SPEC_IOS12, f"the sequence feature '{feature.name}'"
    for feature in desc.input:
        ftype = feature.type
        if ftype.isOptional and ftype.multiArrayType.WhichOneof("defaultOptionalValue"):
            yield SPEC_IOS14, f"the default value of optional input '{feature.name}'"


def _network_needs(network: Message) -> Iterator[tuple[int, str]]:
    if network.arrayInputShapeMapping != 0:
        yield SPEC_IOS13, "arrayInputShapeMapping other than RANK5_ARRAY_MAPPING"
    if network.imageInputShapeMapping != 0:
        yield SPEC_IOS13, "imageInputShapeMapping other than RANK5_IMAGE_MAPPING"
    for layer in network.layers:
        kind = layer.WhichOneof("layer")
        if kind is None:
            continue  # reported by the layer checks
        label = f"layer '{layer.name}' ({kind})"
        if kind == "custom":
            yield SPEC_IOS11_2, label
        if kind in ("resizeBilinear", "cropResize"):
            yield SPEC_IOS12, label
        if not _is_ios12_layer(layer, kind):
            yield SPEC_IOS13, label
        if _is_ios14_layer(layer, kind):
            yield SPEC_IOS14, label
        storage = {_weight_kind(w) for w in _weight_params(layer)}
        if "float16" in storage:
            yield SPEC_IOS11_2, f"float16 weights in {label}"
        if "quint" in storage:
            yield SPEC_IOS12, f"quantized weights in {label}"


def _is_ios12_layer(layer: Message, kind: str | None) -> bool:
    """Utils.cpp isIOS12NeuralNetworkLayer."""
    if kind not in _IOS12_LAYERS:
        return False
    if kind == "convolution":
        return len(layer.input) == 1
    if kind == "innerProduct":
        return not layer.innerProduct.int8DynamicQuantize
    if kind == "upsample":
        up = layer.upsample
        return up.linearUpsampleMode == 0 and not up.fractionalScalingFactor
    if kind == "reorganizeData":
        return layer.reorganizeData.mode != _PIXEL_SHUFFLE
    return True


def _is_ios14_layer(layer: Message, kind: str | None) -> bool:
    """Utils.cpp hasIOS14NeuralNetworkFeatures, for one layer."""
    if kind in _IOS14_LAYERS:
        return True
    checks: dict[str, Callable[[], bool]] = {
        "sliceDynamic": lambda: len(layer.input) == 7 or bool(layer.sliceDynamic.squeezeMasks),
        "upsample": lambda: not _is_ios12_layer(layer, kind),
        "reorganizeData": lambda: layer.reorganizeData.mode == _PIXEL_SHUFFLE,
        "innerProduct": lambda: layer.innerProduct.int8DynamicQuantize,
        "batchedMatmul": lambda: layer.batchedMatmul.int8DynamicQuantize,
        "concatND": lambda: layer.concatND.interleave,
    }
    check = checks.get(kind or "")
    return bool(check and check())
