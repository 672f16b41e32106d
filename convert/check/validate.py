"""Static checks of Core ML ``.mlmodel`` specs, following Core ML's own validator.

Core ML cannot load a model on Linux, so nothing here runs the real validator
(libmlmodelspec, ``mlmodel/src/Validation`` in apple/coremltools). Instead this module
re-states its rules for the model types coreml-split writes: NeuralNetwork,
NeuralNetworkClassifier, LinkedModel, Pipeline and PipelineClassifier, recursing into
pipeline sub-models. A few further checks (marked "project rule" in the messages' source
comments) catch mistakes that the open-source validator lets through but that break a
model at compile or run time, or that break this project's conventions.

Where the C++ stops at the first problem, :func:`validate_spec` reports every problem it
finds, one line each, prefixed with where it is (``pipeline.models[1] (head): ...``).

Nothing in this module imports coremltools unless a file has to be parsed, so the checks
run on any ``Model_pb2.Model`` message without pulling in TensorFlow a second time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "NEWEST_SPEC_VERSION",
    "SpecInvalid",
    "check_file",
    "describe_type",
    "validate_file",
    "validate_spec",
]

# A coremltools protobuf message (Model_pb2.Model and friends). The generated classes have no
# static types, so annotations use this alias.
Message = Any

# Specification versions (mlmodel/src/Globals.hpp).
SPEC_IOS11_2 = 2
SPEC_IOS12 = 3
SPEC_IOS13 = 4
SPEC_IOS14 = 5
SPEC_IOS16 = 7
SPEC_IOS18 = 9
SPEC_IOS26 = 10
NEWEST_SPEC_VERSION = SPEC_IOS26

# Enum numbers from FeatureTypes.proto, kept here so validation needs no coremltools import.
ARRAY_DTYPES = {
    65568: "FLOAT32",
    65600: "DOUBLE",
    131104: "INT32",
    131080: "INT8",
    65552: "FLOAT16",
}
FLOAT32, DOUBLE, INT32, INT8, FLOAT16 = 65568, 65600, 131104, 131080, 65552
COLOR_SPACES = {10: "GRAYSCALE", 20: "RGB", 30: "BGR", 40: "GRAYSCALE_FLOAT16"}
GRAYSCALE, GRAYSCALE_FLOAT16 = 10, 40

NN_TYPES = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")
PIPELINE_TYPES = ("pipeline", "pipelineClassifier", "pipelineRegressor")
# Model.cpp modelTypeAllowsEmptyInput.
EMPTY_INPUT_TYPES = (*NN_TYPES, *PIPELINE_TYPES, "mlProgram")
# InterfaceValidators.cpp validateCanModelBeUpdatable.
UPDATABLE_TYPES = (*NN_TYPES, *PIPELINE_TYPES, "kNearestNeighborsClassifier")
# InterfaceValidators.cpp validateOptional: types that accept optional inputs freely.
OPTIONAL_INPUT_TYPES = (
    *PIPELINE_TYPES,
    "imputer",
    "identity",
    "itemSimilarityRecommender",
    "treeEnsembleClassifier",
    "treeEnsembleRegressor",
)
WEIGHT_PARAMS = "CoreML.Specification.WeightParams"
NN_LAYER = "CoreML.Specification.NeuralNetworkLayer"


class SpecInvalid(Exception):
    """A Core ML model file breaks Core ML's rules. ``str()`` is one line: file, first problem."""

    def __init__(self, path: str | Path, violations: Sequence[str]) -> None:
        self.path = Path(path)
        self.violations = list(violations)
        first = " ".join(self.violations[0].split()) if self.violations else "invalid model"
        if not first.startswith(str(self.path)):
            first = f"{self.path}: {first}"
        more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        super().__init__(first + more)


def validate_spec(spec: Message, where: str = "model", *, strict_types: bool = False) -> list[str]:
    """Return human-readable violations (empty list = valid).

    ``spec`` is a coremltools ``Model_pb2.Model``. ``where`` prefixes every message.
    With ``strict_types``, pipeline connections must have byte-identical FeatureType messages
    (isOptional, shape ranges and image size flexibility included); by default they are
    compared the way Core ML compares them (see :func:`_equivalent_types`).
    """
    return list(_check_model(spec, where, strict_types))


def validate_file(
    path: str | Path, *, where: str | None = None, strict_types: bool = False
) -> list[str]:
    """Load an ``.mlmodel`` file and return its violations.

    Each message starts with ``where``, by default the file's name.
    """
    path = Path(path)
    where = where or path.name or str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [f"{where}: cannot read the file ({exc.strerror or exc})"]
    from coremltools.proto import Model_pb2
    from google.protobuf.message import DecodeError

    try:
        spec = Model_pb2.Model.FromString(data)
    except DecodeError as exc:
        return [f"{where}: not a Core ML model file ({exc})"]
    return validate_spec(spec, where, strict_types=strict_types)


def check_file(path: str | Path, *, strict_types: bool = False) -> None:
    """Raise :class:`SpecInvalid` if the ``.mlmodel`` file at ``path`` has any violation."""
    violations = validate_file(path, where=str(path), strict_types=strict_types)
    if violations:
        raise SpecInvalid(path, violations)


# --------------------------------------------------------------------------------------------
# Describing feature types in messages


def describe_type(ftype: Message) -> str:
    """A short text for a FeatureType, e.g. ``MultiArray<FLOAT32>[1280]``."""
    kind = ftype.WhichOneof("Type")
    text = _TYPE_DESCRIBERS.get(kind, lambda _t: "<no type>")(ftype)
    return text + ("?" if ftype.isOptional else "")


def _describe_array(arr: Message) -> str:
    dtype = ARRAY_DTYPES.get(arr.dataType, f"dataType {arr.dataType}")
    shape = f"[{', '.join(str(d) for d in arr.shape)}]" if arr.shape else " (no shape)"
    flex = arr.WhichOneof("ShapeFlexibility")
    if flex == "shapeRange":
        ranges = ", ".join(_describe_range(r) for r in arr.shapeRange.sizeRanges)
        shape += f" range[{ranges}]"
    elif flex == "enumeratedShapes":
        shapes = ", ".join(str(list(s.shape)) for s in arr.enumeratedShapes.shapes)
        shape += f" one of {{{shapes}}}"
    return f"MultiArray<{dtype}>{shape}"


def _describe_range(size_range: Message) -> str:
    upper = "inf" if size_range.upperBound < 0 else str(size_range.upperBound)
    return f"{size_range.lowerBound}..{upper}"


def _describe_image(img: Message) -> str:
    space = COLOR_SPACES.get(img.colorSpace, "no colorSpace")
    text = f"Image<{space}> {img.width}x{img.height}"
    flex = img.WhichOneof("SizeFlexibility")
    if flex == "imageSizeRange":
        rng = img.imageSizeRange
        text += f" range w {_describe_range(rng.widthRange)} h {_describe_range(rng.heightRange)}"
    elif flex == "enumeratedSizes":
        text += " one of {" + ", ".join(f"{s.width}x{s.height}" for s in img.enumeratedSizes.sizes)
        text += "}"
    return text


_KEY_NAMES = {
    "int64KeyType": "Int64",
    "stringKeyType": "String",
    "int64Type": "Int64",
    "stringType": "String",
}


def _key_name(case: str | None) -> str:
    """Int64 or String, for a dictionary key / sequence element / label type oneof case."""
    return _KEY_NAMES.get(case or "", "<unset>")


_TYPE_DESCRIBERS: dict[str | None, Callable[[Message], str]] = {
    "int64Type": lambda t: "Int64",
    "doubleType": lambda t: "Double",
    "stringType": lambda t: "String",
    "multiArrayType": lambda t: _describe_array(t.multiArrayType),
    "imageType": lambda t: _describe_image(t.imageType),
    "dictionaryType": lambda t: (
        f"Dictionary<{_key_name(t.dictionaryType.WhichOneof('KeyType'))}, ...>"
    ),
    "sequenceType": lambda t: f"Sequence<{_key_name(t.sequenceType.WhichOneof('Type'))}>",
    "stateType": lambda t: "State<" + _describe_array(t.stateType.arrayType) + ">",
}


# --------------------------------------------------------------------------------------------
# Model level: Model.cpp (validateGeneric, validate) and InterfaceValidators.cpp


def _check_model(spec: Message, where: str, strict: bool) -> Iterator[str]:
    kind = spec.WhichOneof("Type")
    yield from _check_spec_version(spec, where)
    yield from _check_description(spec, where)
    yield from _check_updatable(spec, kind, where)
    yield from _check_optional(spec, kind, where)
    if kind is None:
        yield f"{where}: the model did not specify a model type (Model.Type is not set)"
    elif kind in PIPELINE_TYPES:
        yield from _check_pipeline(spec, kind, where, strict)
    elif kind in NN_TYPES:
        yield from _check_neural_network(spec, kind, where)
    elif kind == "linkedModel":
        yield from _check_linked_model(spec, where)
    # Other model types only get the generic checks above.


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


def _check_description(spec: Message, where: str) -> Iterator[str]:
    """InterfaceValidators.cpp validateModelDescription / validateFeatureDescriptions."""
    desc = spec.description
    kind = spec.WhichOneof("Type")
    version = spec.specificationVersion
    if len(desc.functions) or desc.defaultFunctionName:
        if kind != "mlProgram":
            yield f"{where}: this model type does not support multi-function descriptions"
        return
    if not desc.input:
        if kind not in EMPTY_INPUT_TYPES:
            yield f"{where}: the model has no inputs; this model type needs one or more"
        elif version < SPEC_IOS18:
            yield (
                f"{where}: the model has no inputs, which needs specificationVersion >= "
                f"{SPEC_IOS18} (this model has {version})"
            )
    if not desc.output:
        yield f"{where}: the model has no outputs; models must have one or more"
    for role, features in (("input", desc.input), ("output", desc.output), ("state", desc.state)):
        yield from _check_unique_names(features, role, where)
        for feature in features:
            yield from _check_feature(feature, version, role, where)


def _check_unique_names(features: Iterable[Message], role: str, where: str) -> Iterator[str]:
    """Project rule: feature names are unique within the inputs and within the outputs."""
    seen: set[str] = set()
    for feature in features:
        if feature.name and feature.name in seen:
            yield f"{where}: {role} name '{feature.name}' is declared more than once"
        seen.add(feature.name)


def _check_updatable(spec: Message, kind: str | None, where: str) -> Iterator[str]:
    """Model.cpp validateGeneric + InterfaceValidators.cpp validateCanModelBeUpdatable."""
    if not spec.isUpdatable:
        return
    if spec.specificationVersion < SPEC_IOS13:
        yield f"{where}: an updatable model needs specificationVersion >= {SPEC_IOS13}"
    if kind not in UPDATABLE_TYPES and kind != "linkedModel":
        yield f"{where}: model type '{kind}' cannot be marked updatable"


def _check_optional(spec: Message, kind: str | None, where: str) -> Iterator[str]:
    """InterfaceValidators.cpp validateOptional (and validateDefaultOptionalValues)."""
    desc = spec.description
    for feature in desc.input:
        ftype = feature.type
        if not ftype.isOptional:
            continue
        if ftype.multiArrayType.WhichOneof("defaultOptionalValue") is None:
            continue
        if kind not in (*NN_TYPES, "serializedModel", "mlProgram"):
            yield f"{where}: input '{feature.name}' has a default value; only networks may have one"
        elif spec.specificationVersion < SPEC_IOS14:
            yield (
                f"{where}: input '{feature.name}' has a default value, which needs "
                f"specificationVersion >= {SPEC_IOS14}"
            )
    if kind in (*NN_TYPES, "serializedModel", "mlProgram"):
        required = [f for f in desc.input if f.type.WhichOneof("Type") == "stateType"]
        required += [f for f in desc.input if not f.type.isOptional]
        if desc.input and not required:
            yield f"{where}: at least one input of a neural network must not be optional"
    elif kind not in OPTIONAL_INPUT_TYPES:
        for feature in desc.input:
            if feature.type.isOptional:
                yield f"{where}: input '{feature.name}' is optional; this model type forbids it"
    for feature in desc.output:
        if feature.type.isOptional:
            yield f"{where}: output '{feature.name}' is optional; outputs cannot be optional"


# --------------------------------------------------------------------------------------------
# Feature descriptions: InterfaceValidators.cpp validateFeatureDescription


def _check_feature(feature: Message, version: int, role: str, where: str) -> Iterator[str]:
    if not feature.name:
        yield f"{where}: an {role} has an empty name"
    label = f"{where}: {role} '{feature.name}'"
    if not feature.HasField("type"):
        yield f"{label} has no type"
        return
    ftype = feature.type
    kind = ftype.WhichOneof("Type")
    if kind == "stateType" and role == "output":
        yield f"{label} is a State feature; states may only be declared as states (or inputs)"
    if kind != "stateType" and role == "state":
        yield f"{label} is not a State feature but is declared as a state"
    if kind is None:
        yield f"{label} has no type set (FeatureType.Type is empty)"
    elif kind == "multiArrayType":
        yield from _check_array_feature(ftype.multiArrayType, version, role, label)
    elif kind == "dictionaryType":
        if ftype.dictionaryType.WhichOneof("KeyType") is None:
            yield f"{label} is a dictionary without a key type (Int64 or String)"
    elif kind == "imageType":
        yield from _check_image_feature(ftype.imageType, version, label)
    elif kind == "sequenceType":
        yield from _check_sequence_feature(ftype.sequenceType, version, label)
    elif kind == "stateType":
        yield from _check_state_feature(ftype, version, label)


def _range_problem(size_range: Message) -> str | None:
    """InterfaceValidators.cpp validateSizeRange."""
    if 0 < size_range.upperBound < size_range.lowerBound:
        return f"size range {size_range.lowerBound}..{size_range.upperBound} is empty"
    return None


def _check_array_feature(arr: Message, version: int, role: str, label: str) -> Iterator[str]:
    default = list(arr.shape)
    implicit_default = False
    if version >= SPEC_IOS12:
        flex = arr.WhichOneof("ShapeFlexibility")
        implicit_default = flex is not None
        if flex == "enumeratedShapes":
            yield from _check_enumerated_shapes(arr, default, label)
        elif flex == "shapeRange":
            yield from _check_shape_range(arr, default, label)
    if role == "input" and not default and not implicit_default:
        yield f"{label} is a multiArray without shape constraints (no shape, no flexible shape)"
    for index, dim in enumerate(default):
        if dim < 0:
            yield f"{label} has a negative dimension {dim} at index {index}"
    yield from _check_array_dtype(arr, version, label)
    yield from _check_default_value(arr, label)


def _check_enumerated_shapes(arr: Message, default: list[int], label: str) -> Iterator[str]:
    shapes = [list(s.shape) for s in arr.enumeratedShapes.shapes]
    if not shapes:
        yield f"{label} enumerates zero allowed shapes"
    if any(not s for s in shapes):
        yield f"{label} enumerates a shape with zero dimensions"
    if default and shapes and default not in shapes:
        yield f"{label} has default shape {default}, which is not among its enumerated shapes"


def _check_shape_range(arr: Message, default: list[int], label: str) -> Iterator[str]:
    ranges = list(arr.shapeRange.sizeRanges)
    for index, size_range in enumerate(ranges):
        problem = _range_problem(size_range)
        if problem:
            yield f"{label} has an invalid range for dimension {index}: {problem}"
    if not default:
        return
    if len(default) != len(ranges):
        yield f"{label} has a {len(default)}-d default shape but a {len(ranges)}-d shape range"
        return
    for dim, size_range in zip(default, ranges, strict=True):
        upper = size_range.upperBound
        if dim < size_range.lowerBound or (upper >= 0 and dim > upper):
            yield f"{label} has default shape {default} outside its shape range"
            return


def _check_array_dtype(arr: Message, version: int, label: str) -> Iterator[str]:
    dtype = arr.dataType
    if dtype in (DOUBLE, FLOAT32, INT32):
        return
    if dtype == FLOAT16 and version < SPEC_IOS16:
        yield f"{label} is FLOAT16, which needs specificationVersion >= {SPEC_IOS16}"
    elif dtype == INT8 and version < SPEC_IOS26:
        yield f"{label} is INT8, which needs specificationVersion >= {SPEC_IOS26}"
    elif dtype not in (FLOAT16, INT8):
        yield f"{label} has no valid multiArray dataType (DOUBLE, FLOAT32, FLOAT16 or INT32)"


def _check_default_value(arr: Message, label: str) -> Iterator[str]:
    case = arr.WhichOneof("defaultOptionalValue")
    allowed = {
        "doubleDefaultValue": (DOUBLE,),
        "floatDefaultValue": (FLOAT32, FLOAT16),
        "intDefaultValue": (INT32, INT8),
    }
    if case is None:
        return
    if arr.dataType not in allowed[case]:
        yield f"{label} has a default value of a type that does not match its dataType"
    elif (
        case == "intDefaultValue" and arr.dataType == INT8 and not -128 <= arr.intDefaultValue < 128
    ):
        yield f"{label} has default value {arr.intDefaultValue}, out of range for INT8"


def _check_image_feature(img: Message, version: int, label: str) -> Iterator[str]:
    width, height = img.width, img.height
    has_default = width > 0 and height > 0
    if version >= SPEC_IOS12:
        flex = img.WhichOneof("SizeFlexibility")
        if flex == "enumeratedSizes":
            sizes = [(s.width, s.height) for s in img.enumeratedSizes.sizes]
            if not sizes:
                yield f"{label} enumerates zero allowed image sizes"
            elif not has_default:
                width, height = sizes[0]
            elif (width, height) not in sizes:
                yield f"{label} default size {width}x{height} is not among its enumerated sizes"
        elif flex == "imageSizeRange":
            width, height = yield from _check_image_range(img, has_default, label)
    if width <= 0:
        yield f"{label} is an image with missing or non-positive width {img.width}"
    if height <= 0:
        yield f"{label} is an image with missing or non-positive height {img.height}"
    space = img.colorSpace
    if space == GRAYSCALE_FLOAT16 and version < SPEC_IOS16:
        yield f"{label} is GRAYSCALE_FLOAT16, which needs specificationVersion >= {SPEC_IOS16}"
    elif space not in COLOR_SPACES:
        yield f"{label} is an image with missing or invalid colorSpace (RGB, BGR or GRAYSCALE)"


def _check_image_range(img: Message, has_default: bool, label: str) -> Iterator[str]:
    """Checks an image size range; its return value is the (width, height) Core ML assumes."""
    rng = img.imageSizeRange
    for name, size_range in (("width", rng.widthRange), ("height", rng.heightRange)):
        problem = _range_problem(size_range)
        if problem:
            yield f"{label} has an invalid flexible {name} range: {problem}"
    if not has_default:
        return rng.widthRange.lowerBound, rng.heightRange.lowerBound
    for name, value, size_range in (
        ("width", img.width, rng.widthRange),
        ("height", img.height, rng.heightRange),
    ):
        upper = size_range.upperBound
        if value < size_range.lowerBound or (upper >= 0 and value > upper):
            yield f"{label} default {name} {value} is outside its flexible {name} range"
    return img.width, img.height


def _check_sequence_feature(seq: Message, version: int, label: str) -> Iterator[str]:
    if version < SPEC_IOS12:
        yield f"{label} is a sequence, which needs specificationVersion >= {SPEC_IOS12}"
    problem = _range_problem(seq.sizeRange)
    if problem:
        yield f"{label} has invalid allowed sequence sizes: {problem}"
    if seq.WhichOneof("Type") is None:
        yield f"{label} is a sequence without an element type (Int64 or String)"


def _check_state_feature(ftype: Message, version: int, label: str) -> Iterator[str]:
    arr = ftype.stateType.arrayType
    if version < SPEC_IOS18:
        yield f"{label} is a State, which needs specificationVersion >= {SPEC_IOS18}"
    if ftype.isOptional:
        yield f"{label} is a State and cannot be optional"
    if not arr.shape:
        yield f"{label} is a State without a shape"
    if any(dim < 0 for dim in arr.shape):
        yield f"{label} is a State with a negative dimension"
    if arr.dataType not in (FLOAT16, INT8):
        yield f"{label} is a State whose dataType is not FLOAT16"
    if arr.WhichOneof("ShapeFlexibility") is not None:
        yield f"{label} is a State and cannot have a flexible shape"
    if arr.WhichOneof("defaultOptionalValue") is not None:
        yield f"{label} is a State and cannot have a default value"


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


# --------------------------------------------------------------------------------------------
# Classifier interfaces: Validators.hpp validateClassifierInterface and
# InterfaceValidators.cpp validateClassifierFeatureDescriptions


def _check_classifier_outputs(desc: Message, label_kind: str | None, where: str) -> Iterator[str]:
    """Check predictedFeatureName / predictedProbabilitiesName against the outputs.

    ``label_kind`` is "int64Type" or "stringType" when the class labels fix it, else None
    (a PipelineClassifier, whose labels live in its last model).
    """
    outputs = {o.name: o.type for o in desc.output}
    predicted = desc.predictedFeatureName
    predicted_kind: str | None = None
    if not predicted:
        yield f"{where}: classifier has no predictedFeatureName"
    elif predicted not in outputs:
        yield f"{where}: predictedFeatureName '{predicted}' is not one of the model's outputs"
    else:
        predicted_kind = outputs[predicted].WhichOneof("Type")
        allowed = (label_kind,) if label_kind else ("int64Type", "stringType")
        if predicted_kind not in allowed:
            wanted = " or ".join(_key_name(k) for k in allowed)
            yield (
                f"{where}: predicted label output '{predicted}' is "
                f"{describe_type(outputs[predicted])}, expected {wanted}"
            )
    probs = desc.predictedProbabilitiesName
    if not probs:
        return
    if probs not in outputs:
        yield f"{where}: predictedProbabilitiesName '{probs}' is not one of the model's outputs"
        return
    yield from _check_probability_output(probs, outputs[probs], label_kind or predicted_kind, where)


def _check_probability_output(
    name: str, ftype: Message, label_kind: str | None, where: str
) -> Iterator[str]:
    kind = ftype.WhichOneof("Type")
    if kind not in ("dictionaryType", "multiArrayType"):
        yield f"{where}: probabilities output '{name}' is {describe_type(ftype)}, not a Dictionary"
        return
    if kind != "dictionaryType" or label_kind not in ("int64Type", "stringType"):
        return
    # Project rule: the dictionary is keyed by class label, so its key type must match.
    key = ftype.dictionaryType.WhichOneof("KeyType")
    expected = "int64KeyType" if label_kind == "int64Type" else "stringKeyType"
    if key is not None and key != expected:
        yield (
            f"{where}: probabilities output '{name}' is keyed by {_key_name(key)} but the class "
            f"labels are {_key_name(label_kind)}"
        )


def _class_labels(classifier: Message) -> tuple[str | None, list[Any]]:
    case = classifier.WhichOneof("ClassLabels")
    if case == "stringClassLabels":
        return "stringType", list(classifier.stringClassLabels.vector)
    if case == "int64ClassLabels":
        return "int64Type", list(classifier.int64ClassLabels.vector)
    return None, []


def _check_class_labels(classifier: Message, where: str) -> Iterator[str]:
    label_kind, labels = _class_labels(classifier)
    if label_kind is None:
        yield f"{where}: classifier has no class labels (stringClassLabels or int64ClassLabels)"
    elif not labels:
        yield f"{where}: classifier declares {_key_name(label_kind)} class labels but lists none"


# --------------------------------------------------------------------------------------------
# Pipelines: PipelineValidator.cpp, with FeatureType comparison from Comparison.cpp


def _rank_of(arr: Message) -> int:
    """Comparison.cpp rankOf."""
    flex = arr.WhichOneof("ShapeFlexibility")
    if flex == "enumeratedShapes":
        shapes = arr.enumeratedShapes.shapes
        return len(shapes[0].shape) if shapes else 0
    if flex == "shapeRange":
        return len(arr.shapeRange.sizeRanges)
    return len(arr.shape)


def _equivalent_arrays(a: Message, b: Message, fixed_shapes_only: bool = True) -> bool:
    if a.dataType != b.dataType or _rank_of(a) != _rank_of(b):
        return False
    flexible = a.WhichOneof("ShapeFlexibility") or b.WhichOneof("ShapeFlexibility")
    if fixed_shapes_only and flexible:
        return True
    return list(a.shape) == list(b.shape)


def _equivalent_types(a: Message, b: Message) -> bool:
    """Comparison.cpp ``operator==(FeatureType)``, which PipelineValidator uses via isEquivalent.

    It ignores isOptional (commented out upstream so that T may feed optional<T>), compares
    multiArrays by dataType, rank and (only when neither is flexible) shape; images by width,
    height and colorSpace; dictionaries by key type; sequences by element type.
    """
    kind = a.WhichOneof("Type")
    if kind != b.WhichOneof("Type"):
        return False
    if kind == "multiArrayType":
        return _equivalent_arrays(a.multiArrayType, b.multiArrayType)
    if kind == "imageType":
        x, y = a.imageType, b.imageType
        return (x.width, x.height, x.colorSpace) == (y.width, y.height, y.colorSpace)
    if kind == "dictionaryType":
        return a.dictionaryType.WhichOneof("KeyType") == b.dictionaryType.WhichOneof("KeyType")
    if kind == "sequenceType":
        return a.sequenceType.WhichOneof("Type") == b.sequenceType.WhichOneof("Type")
    if kind == "stateType":
        x, y = a.stateType.arrayType, b.stateType.arrayType
        return _equivalent_arrays(x, y, fixed_shapes_only=False)
    return True


@dataclass
class _Source:
    """Where a feature name in a pipeline comes from."""

    ftype: Message
    producer: str


def _sub_label(index: int, names: Sequence[str]) -> str:
    """``models[1] (head)``: the index, and the pipeline's name for the model if it has one."""
    name = f" ({names[index]})" if index < len(names) and names[index] else ""
    return f"models[{index}]{name}"


def _check_pipeline(spec: Message, kind: str, where: str, strict: bool) -> Iterator[str]:
    pipeline = getattr(spec, kind) if kind == "pipeline" else getattr(spec, kind).pipeline
    models, names = list(pipeline.models), list(pipeline.names)
    if not models:
        yield f"{where}: a pipeline must contain one or more models"
    table = {f.name: _Source(f.type, "the pipeline input") for f in spec.description.input}
    for index, model in enumerate(models):
        label = _sub_label(index, names)
        sub = f"{where}.{label}"
        yield from _check_connections(model, table, sub, strict)
        yield from _check_model(model, sub, strict)
        for output in model.description.output:
            table[output.name] = _Source(output.type, f"{label}'s output")
    yield from _check_sub_versions(spec, models, names, where)
    for output in spec.description.output:
        yield from _check_pipeline_output(output, table, where, strict)
    yield from _check_pipeline_updatable(spec, models, where)
    yield from _check_pipeline_names(names, len(models), where)
    if kind == "pipelineClassifier":
        # Project rule: PipelineValidator.cpp leaves "validate classifier interface" as a TODO,
        # but Model.proto requires predictedFeatureName for classifiers.
        yield from _check_classifier_outputs(spec.description, None, where)
    elif kind == "pipelineRegressor" and not spec.description.predictedFeatureName:
        yield f"{where}: regressor has no predictedFeatureName"


def _types_match(a: Message, b: Message, strict: bool) -> bool:
    return a == b if strict else _equivalent_types(a, b)


def _check_connections(
    model: Message, table: dict[str, _Source], sub: str, strict: bool
) -> Iterator[str]:
    for feature in model.description.input:
        source = table.get(feature.name)
        if source is None:
            yield (
                f"{sub}: input '{feature.name}' is neither a pipeline input nor an output of an "
                "earlier model"
            )
        elif not _types_match(feature.type, source.ftype, strict):
            yield (
                f"{sub}: input '{feature.name}' type differs from producer: expects "
                f"{describe_type(feature.type)}, {source.producer} is "
                f"{describe_type(source.ftype)}"
            )


def _check_pipeline_output(
    output: Message, table: dict[str, _Source], where: str, strict: bool
) -> Iterator[str]:
    source = table.get(output.name)
    if source is None:
        yield (
            f"{where}: pipeline output '{output.name}' is produced neither by a pipeline input nor "
            "by a contained model"
        )
    elif not _types_match(output.type, source.ftype, strict):
        yield (
            f"{where}: pipeline output '{output.name}' type differs from producer: declared "
            f"{describe_type(output.type)}, {source.producer} is {describe_type(source.ftype)}"
        )


def _check_sub_versions(
    spec: Message, models: list[Message], names: list[str], where: str
) -> Iterator[str]:
    """Project rule (Utils.cpp walks sub-models when choosing a pipeline's version)."""
    versions = [model.specificationVersion for model in models]
    if not versions or not 0 < spec.specificationVersion < max(versions):
        return
    highest = versions.index(max(versions))
    yield (
        f"{where}: specificationVersion {spec.specificationVersion} is lower than "
        f"{_sub_label(highest, names)}'s {versions[highest]}; a pipeline's version must be at "
        "least every sub-model's"
    )


def _check_pipeline_updatable(spec: Message, models: list[Message], where: str) -> Iterator[str]:
    if spec.isUpdatable:
        for index, model in enumerate(models[:-1]):
            if model.isUpdatable:
                yield (
                    f"{where}: only the last model of a pipeline may be updatable; models[{index}] "
                    "is marked updatable"
                )
        if models and not models[-1].isUpdatable:
            yield f"{where}: the last model of an updatable pipeline must be marked updatable"
        return
    for index, model in enumerate(models):
        if model.isUpdatable:
            yield f"{where}: models[{index}] is updatable inside a pipeline that is not"


def _check_pipeline_names(names: list[str], count: int, where: str) -> Iterator[str]:
    if not names:
        return
    if len(names) != count:
        yield f"{where}: the pipeline has {len(names)} model names for {count} models"
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            yield f"{where}: pipeline model name '{name}' at index {index} is already used"
        seen.add(name)


# --------------------------------------------------------------------------------------------
# Linked models: LinkedModelValidator.cpp


def _check_linked_model(spec: Message, where: str) -> Iterator[str]:
    if spec.isUpdatable:
        yield f"{where}: a LinkedModel cannot be marked updatable"
    linked = spec.linkedModel
    if linked.WhichOneof("LinkType") is None:
        yield f"{where}: LinkedModel link type is not set (linkedModelFile)"
        return
    file_name = linked.linkedModelFile.linkedModelFileName.defaultValue
    if not file_name:
        yield f"{where}: LinkedModel linkedModelFile.linkedModelFileName.defaultValue is empty"
    elif not file_name.rstrip("/").endswith(".mlmodelc"):
        # Project rule: LinkedModel.proto says the link names a compiled model.
        yield (
            f"{where}: LinkedModel file name '{file_name}' is not a compiled model "
            "(expected a name ending in .mlmodelc)"
        )


# --------------------------------------------------------------------------------------------
# Neural networks: NeuralNetworkValidator.cpp (validateNeuralNetworkTopLevel and the
# validate<MLModelType_neuralNetwork*> specialisations)


@dataclass
class _Net:
    """State of one walk over a network's layers (NeuralNetworkSpecValidator)."""

    where: str
    nd_arrays: bool
    io_ranks: dict[str, int]
    ranks: dict[str, int] = field(default_factory=dict)
    blobs: dict[str, list[str]] = field(default_factory=dict)
    producers: dict[str, Message] = field(default_factory=dict)


def _check_neural_network(spec: Message, kind: str, where: str) -> Iterator[str]:
    network = getattr(spec, kind)
    desc = spec.description
    if kind == "neuralNetwork":
        yield from _check_io_types(desc.output, "output", where)
    elif kind == "neuralNetworkClassifier":
        yield from _check_class_labels(network, where)
        yield from _check_classifier_outputs(desc, _class_labels(network)[0], where)
    elif not desc.predictedFeatureName:
        yield f"{where}: regressor has no predictedFeatureName"
    nd_arrays = yield from _check_shape_mapping(desc, network, where)
    if not network.layers:
        yield f"{where}: a neural network needs at least one layer"
    yield from _check_io_types(desc.input, "input", where)
    yield from _check_array_input_ranks(desc, nd_arrays, where)
    net = _Net(where, nd_arrays, _io_ranks(desc, network) if nd_arrays else {})
    inputs = {f.name for f in desc.input}
    for name in inputs:
        net.blobs[name] = ["__input"]
    yield from _walk_layers(network.layers, net)
    produced = {b for b, by in net.blobs.items() if b not in inputs or len(by) > 1}
    yield from _check_network_outputs(spec, kind, produced, where)
    yield from _check_preprocessing(desc, network, where)
    if kind == "neuralNetworkClassifier":
        yield from _check_probability_layer(network, produced, net, where)


def _check_io_types(features: Iterable[Message], role: str, where: str) -> Iterator[str]:
    """NeuralNetworkValidatorUtils.hpp validateInputOutputTypes."""
    for feature in features:
        kind = feature.type.WhichOneof("Type")
        if kind not in ("imageType", "multiArrayType", "stateType"):
            yield (
                f"{where}: {role} '{feature.name}' is {describe_type(feature.type)}; neural "
                f"network {role}s must be images, multiArrays or states"
            )


def _check_shape_mapping(desc: Message, network: Message, where: str) -> Iterator[str]:
    """Decide whether tensors are N-d (ndArrayInterpretation); returns that flag."""
    has_array_input = any(f.type.WhichOneof("Type") == "multiArrayType" for f in desc.input)
    new_array_mapping = network.arrayInputShapeMapping != 0
    new_image_mapping = network.imageInputShapeMapping != 0
    late_layers = [
        layer.name
        for layer in network.layers
        if not _is_ios12_layer(layer, layer.WhichOneof("layer"))
    ]
    if late_layers and not new_array_mapping and has_array_input:
        yield (
            f"{where}: arrayInputShapeMapping is RANK5_ARRAY_MAPPING but layer '{late_layers[0]}' "
            "needs specification 4 or later; use EXACT_ARRAY_MAPPING"
        )
    if not new_array_mapping and new_image_mapping and has_array_input:
        yield (
            f"{where}: arrayInputShapeMapping cannot be RANK5_ARRAY_MAPPING when "
            "imageInputShapeMapping is not RANK5_IMAGE_MAPPING"
        )
    return bool(late_layers) or new_array_mapping or new_image_mapping


def _check_array_input_ranks(desc: Message, nd_arrays: bool, where: str) -> Iterator[str]:
    for feature in desc.input:
        if feature.type.WhichOneof("Type") != "multiArrayType":
            continue
        arr = feature.type.multiArrayType
        label = f"{where}: input '{feature.name}'"
        if nd_arrays:
            if not arr.shape:
                yield f"{label} needs at least one dimension in its shape"
            elif arr.WhichOneof("ShapeFlexibility") == "shapeRange" and len(
                arr.shapeRange.sizeRanges
            ) != len(arr.shape):
                yield f"{label} has a shape range whose rank differs from its default shape"
        elif not _rank5_input_ok(arr):
            yield (
                f"{label} must have 1 (vector) or 3 (image-like) dimensions under "
                "RANK5_ARRAY_MAPPING"
            )


def _rank5_input_ok(arr: Message) -> bool:
    rank = len(arr.shape)
    if rank and rank not in (1, 3):
        return False
    flex = arr.WhichOneof("ShapeFlexibility")
    if flex == "enumeratedShapes":
        flex_ok = all(len(s.shape) in (1, 3) for s in arr.enumeratedShapes.shapes)
    elif flex == "shapeRange":
        flex_ok = len(arr.shapeRange.sizeRanges) in (1, 3)
    else:
        flex_ok = False
    return bool(rank) or flex_ok


def _io_ranks(desc: Message, network: Message) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for feature in desc.input:
        kind = feature.type.WhichOneof("Type")
        if kind == "multiArrayType":
            rank5 = network.arrayInputShapeMapping == 0
            ranks[feature.name] = 5 if rank5 else len(feature.type.multiArrayType.shape)
        elif kind == "imageType":
            ranks[feature.name] = 5 if network.imageInputShapeMapping == 0 else 4
    for feature in desc.output:
        shape = feature.type.multiArrayType.shape
        if feature.type.WhichOneof("Type") == "multiArrayType" and shape:
            ranks[feature.name] = len(shape)
    return ranks


def _check_network_outputs(
    spec: Message, kind: str, produced: set[str], where: str
) -> Iterator[str]:
    desc = spec.description
    extra = {desc.predictedFeatureName, desc.predictedProbabilitiesName} - {""}
    for output in desc.output:
        if output.name in produced:
            continue
        if kind == "neuralNetworkClassifier" and output.name in extra:
            continue
        yield f"{where}: output '{output.name}' is not produced by any layer of the network"


def _check_probability_layer(
    network: Message, produced: set[str], net: _Net, where: str
) -> Iterator[str]:
    blob = network.labelProbabilityLayerName
    if blob and blob not in produced:
        yield (
            f"{where}: labelProbabilityLayerName '{blob}' is not an output of any layer of the "
            "network"
        )
        return
    # Project rule: one probability per class. Follow the blob back through element-wise
    # layers to a dense layer and compare its width with the number of labels.
    labels = _class_labels(network)[1]
    width = _dense_width(blob, net) if blob and labels else None
    if width is not None and width[0] != len(labels):
        yield (
            f"{where}: the classifier has {len(labels)} class labels but layer '{width[1]}' "
            f"produces {width[0]} values for '{blob}'"
        )


_SHAPE_KEEPING = frozenset(["softmax", "softmaxND", "activation", "copy", "unary", "clip"])


def _dense_width(blob: str, net: _Net) -> tuple[int, str] | None:
    seen: set[str] = set()
    while blob in net.producers and blob not in seen:
        seen.add(blob)
        layer = net.producers[blob]
        kind = layer.WhichOneof("layer")
        if kind == "innerProduct":
            return layer.innerProduct.outputChannels, layer.name
        if kind == "batchedMatmul" and len(layer.input) == 1:
            return layer.batchedMatmul.weightMatrixSecondDimension, layer.name
        if kind not in _SHAPE_KEEPING or not layer.input:
            return None
        blob = layer.input[0]
    return None


def _check_preprocessing(desc: Message, network: Message, where: str) -> Iterator[str]:
    """Project rule: each preprocessing entry applies to one declared image input."""
    images = {
        f.name: f.type.imageType for f in desc.input if f.type.WhichOneof("Type") == "imageType"
    }
    inputs = {f.name for f in desc.input}
    seen: set[str] = set()
    for index, entry in enumerate(network.preprocessing):
        label = f"{where}: preprocessing[{index}]"
        name = entry.featureName
        if not name:
            yield f"{label} has an empty featureName"
        elif name not in inputs:
            yield f"{label} refers to '{name}', which is not an input of the model"
        elif name not in images:
            yield f"{label} refers to '{name}', which is not an image input"
        elif name in seen:
            yield f"{label} is a second preprocessing entry for input '{name}'"
        else:
            yield from _check_mean_image(entry, images[name], label)
        seen.add(name)


def _check_mean_image(entry: Message, img: Message, label: str) -> Iterator[str]:
    if entry.WhichOneof("preprocessor") != "meanImage" or img.WhichOneof("SizeFlexibility"):
        return
    channels = 1 if img.colorSpace in (GRAYSCALE, GRAYSCALE_FLOAT16) else 3
    expected = channels * img.width * img.height
    actual = len(entry.meanImage.meanImage)
    if actual != expected:
        shape = f"{channels}x{img.height}x{img.width}"
        yield f"{label} has a mean image of {actual} values; expected {shape} = {expected}"


# ---- the layer walk: NeuralNetworkSpecValidator::validateNeuralNetwork


def _walk_layers(layers: Iterable[Message], net: _Net) -> Iterator[str]:
    names: set[str] = set()
    for layer in layers:
        kind = layer.WhichOneof("layer")
        label = f"{net.where}: layer '{layer.name}' ({kind or 'no type'})"
        if not layer.name:
            yield f"{net.where}: a layer of type {kind or 'none'} has an empty name"
        elif layer.name in names:
            yield f"{net.where}: layer name '{layer.name}' is used by more than one layer"
        names.add(layer.name)
        if net.nd_arrays:
            yield from _check_tensors(layer, "input", net, label)
            yield from _check_tensors(layer, "output", net, label)
        yield from _check_layer(layer, kind, net, label)
        yield from _check_layer_topology(layer, kind, net, label)


def _check_layer_topology(layer: Message, kind: str | None, net: _Net, label: str) -> Iterator[str]:
    for blob in layer.input:
        if blob not in net.blobs:
            yield f"{label}: input '{blob}' is not a model input or an earlier layer's output"
    for blob in layer.output:
        earlier = net.blobs.get(blob)
        if earlier and kind != "copy":
            by = "the model input" if earlier[0] == "__input" else f"layer '{earlier[0]}'"
            yield f"{label}: output '{blob}' is already produced by {by}"
        net.blobs.setdefault(blob, []).append(layer.name)
        net.producers.setdefault(blob, layer)
    for nested in _nested_outputs(layer, kind):
        net.blobs.setdefault(nested, []).append(layer.name)


def _nested_outputs(layer: Message, kind: str | None) -> Iterator[str]:
    """Blobs made inside branch/loop bodies join the outer scope (not validated further)."""
    bodies: list[Message] = []
    if kind == "branch":
        bodies = [layer.branch.ifBranch, layer.branch.elseBranch]
    elif kind == "loop":
        bodies = [layer.loop.conditionNetwork, layer.loop.bodyNetwork]
    for body in bodies:
        for inner in body.layers:
            yield from inner.output
            yield from _nested_outputs(inner, inner.WhichOneof("layer"))


def _check_tensors(layer: Message, role: str, net: _Net, label: str) -> Iterator[str]:
    blobs = layer.input if role == "input" else layer.output
    tensors = layer.inputTensor if role == "input" else layer.outputTensor
    if not tensors:
        return
    if len(tensors) != len(blobs):
        yield f"{label}: has {len(blobs)} {role}s but {len(tensors)} {role}Tensor entries"
        return
    for blob, tensor in zip(blobs, tensors, strict=True):
        rank = tensor.rank
        dims = len(tensor.dimValue)
        if dims and rank != dims:
            yield f"{label}: {role}Tensor for '{blob}' has rank {rank} but {dims} dims"
        if tensor.dimValue and rank < 1:
            yield f"{label}: {role}Tensor for '{blob}' must have a positive rank"
        if blob in net.io_ranks and net.io_ranks[blob] != rank:
            yield (
                f"{label}: {role}Tensor gives '{blob}' rank {rank} but the model description "
                f"implies rank {net.io_ranks[blob]}"
            )
        if net.ranks.setdefault(blob, rank) != rank:
            yield f"{label}: inconsistent rank for blob '{blob}'"


# ---- per-layer checks: NeuralNetworkLayerValidator.cpp

# (min, max) inputs and (min, max) outputs per layer type; max -1 means unbounded. Layer types
# whose counts depend on their parameters (branch, loop, comparisons, rangeDynamic) are left out.
_ONE_TO_ONE = (1, 1), (1, 1)
_TWO_TO_ONE = (2, 2), (1, 1)
_COUNTS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    **dict.fromkeys(
        "innerProduct batchnorm activation pooling pooling3d globalPooling3d padding lrn "
        "softmax unary upsample bias l2normalize reshape flatten permute reduce reorganizeData "
        "slice scale mvn embedding embeddingND sequenceRepeat resizeBilinear transpose copy "
        "softmaxND reverse fillLike fillDynamic reshapeStatic exp2 upperTriangular "
        "lowerTriangular matrixBandPart broadcastToStatic whereNonZero ceil floor round sign clip "
        "sliceStatic slidingWindows erf gelu clampedReLU rankPreservingReshape flattenTo2D "
        "expandDims squeeze getShape randomNormalLike randomNormalDynamic randomUniformLike "
        "randomUniformDynamic randomBernoulliLike randomBernoulliDynamic argMax argMin "
        "categoricalDistribution layerNormalization argSort convolution3d sin cos tan asin acos "
        "atan sinh cosh tanh asinh acosh atanh reduceL1 reduceL2 reduceMax reduceMin reduceSum "
        "reduceProd reduceMean reduceLogSum reduceSumSquare reduceLogSumExp".split(),
        _ONE_TO_ONE,
    ),
    **dict.fromkeys(
        "dot cropResize reshapeLike reshapeDynamic powBroadcastable broadcastToLike "
        "broadcastToDynamic addBroadcastable subtractBroadcastable multiplyBroadcastable "
        "divideBroadcastable maxBroadcastable minBroadcastable floorDivBroadcastable "
        "modBroadcastable gather gatherND gatherAlongAxis reverseSeq sliceBySize".split(),
        _TWO_TO_ONE,
    ),
    **dict.fromkeys(
        "scatter scatterND scatterAlongAxis whereBroadcastable".split(), ((3, 3), (1, 1))
    ),
    **dict.fromkeys("add multiply average max min".split(), ((1, -1), (1, 1))),
    **dict.fromkeys("concat concatND stack".split(), ((2, -1), (1, 1))),
    **dict.fromkeys("split splitND".split(), ((1, 1), (2, -1))),
    **dict.fromkeys("convolution crop batchedMatmul tile".split(), ((1, 2), (1, 1))),
    **dict.fromkeys("constantPad oneHot cumSum".split(), ((1, 2), (1, 1))),
    **dict.fromkeys(
        "loadConstant loadConstantND fillStatic rangeStatic randomNormalStatic "
        "randomUniformStatic randomBernoulliStatic".split(),
        ((0, 0), (1, 1)),
    ),
    "custom": ((1, -1), (1, -1)),
    "simpleRecurrent": ((2, 2), (2, 2)),
    "gru": ((1, 2), (2, 2)),
    "uniDirectionalLSTM": ((1, 3), (3, 3)),
    "biDirectionalLSTM": ((1, 5), (5, 5)),
    "sliceDynamic": ((2, 7), (1, 1)),
    "topK": ((1, 2), (2, 2)),
    "NonMaximumSuppression": ((2, 5), (4, 4)),
}

# Rank limits checked in N-d mode (validateRankCount / validateInputOutputRankEquality):
# (min rank, max rank, input and output ranks must be equal); -1 means unbounded.
_RANKS: dict[str, tuple[int, int, bool]] = {
    "convolution": (4, -1, True),
    "innerProduct": (1, 5, True),
    "batchnorm": (3, -1, True),
    "pooling": (4, -1, True),
    "padding": (2, -1, True),
    "lrn": (3, -1, True),
    "softmax": (3, -1, True),
    "split": (3, -1, True),
    "unary": (-1, -1, True),
    "upsample": (3, -1, True),
    "bias": (3, -1, True),
    "l2normalize": (3, -1, True),
    "reshape": (5, 5, True),
    "flatten": (3, -1, True),
    "permute": (5, 5, True),
    "scale": (3, -1, True),
    "reorganizeData": (3, -1, True),
    "embedding": (4, -1, True),
    "embeddingND": (2, 5, True),
    "pooling3d": (5, -1, True),
    "globalPooling3d": (5, -1, True),
}


def _count_problem(count: int, low: int, high: int, what: str) -> str | None:
    """NeuralNetworkValidatorUtils.hpp validateInputCount / validateOutputCount."""
    if high > 0 and high == low and count != high:
        return f"has {count} {what}s but expects exactly {low}"
    if low > 0 and count < low:
        return f"has {count} {what}s but expects at least {low}"
    if high > 0 and count > high:
        return f"has {count} {what}s but expects at most {high}"
    return None


def _check_layer(layer: Message, kind: str | None, net: _Net, label: str) -> Iterator[str]:
    if kind is None:
        yield f"{label}: the layer type is not set"
        return
    counts = _COUNTS.get(kind)
    if counts:
        for count, (low, high), what in (
            (len(layer.input), counts[0], "input"),
            (len(layer.output), counts[1], "output"),
        ):
            problem = _count_problem(count, low, high, what)
            if problem:
                yield f"{label}: {problem}"
                return
    if net.nd_arrays:
        yield from _check_layer_ranks(layer, kind, net, label)
    checker = _LAYER_CHECKERS.get(kind)
    if checker:
        yield from checker(layer, net, label)


def _check_layer_ranks(layer: Message, kind: str, net: _Net, label: str) -> Iterator[str]:
    limits = _RANKS.get(kind)
    if limits is None or not layer.input or not layer.output:
        return
    low, high, equal = limits
    if kind == "activation" and layer.activation.WhichOneof("NonlinearityType") not in (
        "PReLU",
        "parametricSoftplus",
    ):
        return
    in_rank, out_rank = net.ranks.get(layer.input[0]), net.ranks.get(layer.output[0])
    if equal and in_rank is not None and out_rank is not None and in_rank != out_rank:
        yield f"{label}: input rank {in_rank} and output rank {out_rank} must be equal"
    for role, rank in (("input", in_rank), ("output", out_rank)):
        if rank is None:
            continue
        if low > 0 and rank < low:
            yield f"{label}: {role} rank {rank} is below the minimum {low}"
        elif high > 0 and rank > high:
            yield f"{label}: {role} rank {rank} is above the maximum {high}"


# ---- weights: ValidatorUtils-inl.hpp (valueType) and NeuralNetworkValidatorUtils.hpp


def _weight_kind(weights: Message) -> str:
    """ValidatorUtils-inl.hpp valueType: float32, float16, quint, qint, empty or mixed."""
    filled = [
        len(weights.floatValue) > 0,
        len(weights.float16Value) > 0,
        len(weights.rawValue) > 0,
        len(weights.int8RawValue) > 0,
    ]
    if sum(filled) > 1:
        return "mixed"
    quantized = weights.HasField("quantization")
    if filled[0]:
        return "float32"
    if filled[1]:
        return "float16"
    if filled[2] and quantized:
        return "quint"
    if filled[3] and quantized:
        return "qint"
    return "empty"


def _weight_count(weights: Message) -> int:
    kind = _weight_kind(weights)
    if kind == "float32":
        return len(weights.floatValue)
    if kind == "float16":
        return len(weights.float16Value) // 2
    return 0


def _weight_params(message: Message) -> Iterator[Message]:
    """Every WeightParams message inside ``message`` (set fields only)."""
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        values = value if _is_repeated(descriptor) else [value]
        for item in values:
            if descriptor.message_type.full_name == WEIGHT_PARAMS:
                yield item
            elif descriptor.message_type.full_name != NN_LAYER:
                yield from _weight_params(item)


def _is_repeated(descriptor: Message) -> bool:
    flag = getattr(descriptor, "is_repeated", None)  # protobuf >= 6 (``label`` is gone in 7)
    if flag is not None:
        return bool(flag)
    return descriptor.label == descriptor.LABEL_REPEATED


def _quantization_problem(weights: Message, out_channels: int) -> str | None:
    """QuantizationValidationUtils.cpp hasValidQuantizationParams."""
    quant = weights.quantization
    bits = quant.numberOfBits
    if not 1 <= bits <= 8:
        return f"numberOfBits {bits} is not between 1 and 8"
    method = quant.WhichOneof("QuantizationType")
    if method == "linearQuantization":
        scales, biases = len(quant.linearQuantization.scale), len(quant.linearQuantization.bias)
        if scales not in (1, out_channels):
            return f"{scales} linear quantization scales (expected 1 or {out_channels})"
        if biases not in (0, scales):
            return f"{biases} linear quantization biases (expected 0 or {scales})"
        return None
    if method == "lookupTableQuantization":
        size = len(quant.lookupTableQuantization.floatValue)
        return None if size == 2**bits else f"lookup table of {size} entries (expected {2**bits})"
    return "no quantization method"


def _check_weights(
    weights: Message, expected: int, out_channels: int, what: str, label: str
) -> Iterator[str]:
    """NeuralNetworkValidatorUtils.hpp validateGeneralWeightParams."""
    kind = _weight_kind(weights)
    if kind in ("float32", "float16"):
        count = _weight_count(weights)
        if count != expected:
            yield f"{label}: {what} has {count} {kind} values, expected {expected}"
    elif kind == "quint":
        needed = math.ceil(weights.quantization.numberOfBits * expected / 8)
        if len(weights.rawValue) < needed:
            yield f"{label}: quantized {what} has {len(weights.rawValue)} bytes, needs {needed}"
        problem = _quantization_problem(weights, out_channels)
        if problem:
            yield f"{label}: quantized {what} has invalid quantization parameters: {problem}"
    elif kind == "mixed":
        yield f"{label}: {what} fills more than one storage field (float, float16, raw, int8)"
    else:
        yield f"{label}: {what} is empty (or stored in a form this layer cannot use)"


def _check_matching_precision(
    weights: Message, bias: Message, has_bias: bool, label: str
) -> Iterator[str]:
    kinds = {_weight_kind(weights), _weight_kind(bias) if has_bias else "empty"}
    if "mixed" in kinds:
        yield f"{label}: weights or bias fill more than one storage field"
    elif {"float32", "float16"} <= kinds:
        yield f"{label}: weights and bias mix half and full precision"


def _check_convolution(layer: Message, net: _Net, label: str) -> Iterator[str]:
    params = layer.convolution
    if not net.nd_arrays and len(layer.input) != 1:
        yield f"{label}: weights as a second input need EXACT_ARRAY_MAPPING (N-d tensors)"
    if params.WhichOneof("ConvolutionPaddingType") is None:
        yield f"{label}: padding type (valid or same) is not set"
    if params.isDeconvolution and len(layer.input) != 1:
        yield f"{label}: a deconvolution cannot take its weights as an input"
    if len(layer.input) > 1:
        dilated = any(d > 1 for d in list(params.dilationFactor)[:2])
        if dilated:
            yield f"{label}: a dilated convolution cannot take its weights as an input"
        if params.hasBias:
            yield f"{label}: a convolution with weights as an input cannot have a static bias"
        return
    yield from _check_matching_precision(params.weights, params.bias, params.hasBias, label)
    groups = params.nGroups or 1
    kernel = list(params.kernelSize) + [3, 3][len(params.kernelSize) :]
    if params.isDeconvolution:
        dims = [params.kernelChannels, params.outputChannels // groups, *kernel[:2]]
    else:
        dims = [params.outputChannels, params.kernelChannels, *kernel[:2]]
    expected = math.prod(dims)
    kind = _weight_kind(params.weights)
    if kind in ("float32", "float16", "quint"):
        shape = " x ".join(str(d) for d in dims)
        yield from _check_weights(
            params.weights, expected, params.outputChannels, f"weights ({shape})", label
        )
    elif kind != "mixed":
        yield f"{label}: weights are empty"
    if params.hasBias and _weight_kind(params.bias) != "mixed":
        yield from _check_weights(params.bias, params.outputChannels, 1, "bias", label)


def _check_inner_product(layer: Message, net: _Net, label: str) -> Iterator[str]:
    params = layer.innerProduct
    if params.int8DynamicQuantize:
        yield from _check_int8_dynamic(params.weights, label)
    yield from _check_dense_weights(
        params.weights,
        params.bias,
        params.inputChannels,
        params.outputChannels,
        params.hasBias,
        label,
    )


def _check_batched_matmul(layer: Message, net: _Net, label: str) -> Iterator[str]:
    params = layer.batchedMatmul
    if len(layer.input) > 1 and params.hasBias:
        yield f"{label}: a bias is only supported when the layer has one input"
    if len(layer.input) > 1 and params.int8DynamicQuantize:
        yield f"{label}: int8 dynamic quantization needs a single input"
    if params.int8DynamicQuantize:
        yield from _check_int8_dynamic(params.weights, label)
    if len(layer.input) == 1:
        yield from _check_dense_weights(
            params.weights,
            params.bias,
            params.weightMatrixFirstDimension,
            params.weightMatrixSecondDimension,
            params.hasBias,
            label,
        )


def _check_dense_weights(
    weights: Message, bias: Message, n_in: int, n_out: int, has_bias: bool, label: str
) -> Iterator[str]:
    """NeuralNetworkLayerValidator.cpp validateInnerProductWeightsBias."""
    yield from _check_matching_precision(weights, bias, has_bias, label)
    kind = _weight_kind(weights)
    if kind in ("float32", "float16", "quint"):
        yield from _check_weights(
            weights, n_in * n_out, n_out, f"weights ({n_out} x {n_in})", label
        )
    elif kind == "empty":
        # Project rule: the C++ lets an empty matrix through, but nothing can run it.
        yield f"{label}: weights are empty (expected {n_out} x {n_in} values)"
    if has_bias and _weight_kind(bias) in ("float32", "float16", "quint"):
        yield from _check_weights(bias, n_out, 1, "bias", label)
    if not has_bias and _weight_kind(bias) != "empty":
        yield f"{label}: has bias values but hasBias is false"


def _check_int8_dynamic(weights: Message, label: str) -> Iterator[str]:
    """ValidatorUtils-inl.hpp validateInt8Requirements."""
    quant = weights.quantization
    if _weight_kind(weights) != "qint":
        yield f"{label}: int8DynamicQuantize needs weights stored as int8RawValue"
    elif quant.numberOfBits != 8:
        yield f"{label}: int8DynamicQuantize needs numberOfBits 8"
    elif quant.WhichOneof("QuantizationType") != "linearQuantization":
        yield f"{label}: int8DynamicQuantize needs linear quantization"
    elif len(quant.linearQuantization.scale) != 1 or len(quant.linearQuantization.bias):
        yield f"{label}: int8DynamicQuantize needs one scale and no bias"


def _check_batchnorm(layer: Message, net: _Net, label: str) -> Iterator[str]:
    params = layer.batchnorm
    parts = {"gamma": params.gamma, "beta": params.beta}
    if not params.computeMeanVar:
        parts.update(mean=params.mean, variance=params.variance)
    kinds = {_weight_kind(w) for w in (params.gamma, params.beta, params.mean, params.variance)}
    if "mixed" in kinds or {"float32", "float16"} <= kinds:
        yield f"{label}: parameters mix half and full precision"
        return
    for what, weights in parts.items():
        yield from _check_weights(weights, params.channels, 1, what, label)


def _check_scale(layer: Message, net: _Net, label: str) -> Iterator[str]:
    params = layer.scale
    yield from _check_matching_precision(params.scale, params.bias, params.hasBias, label)
    yield from _check_shaped_weights(params.scale, list(params.shapeScale), "scale", label)
    if params.hasBias:
        yield from _check_shaped_weights(params.bias, list(params.shapeBias), "bias", label)


def _check_bias(layer: Message, net: _Net, label: str) -> Iterator[str]:
    yield from _check_shaped_weights(layer.bias.bias, list(layer.bias.shape), "bias", label)


def _check_load_constant(layer: Message, net: _Net, label: str) -> Iterator[str]:
    params = layer.loadConstant
    if len(params.shape) != 3:
        yield f"{label}: the constant must be 3-d, its shape is {list(params.shape)}"
        return
    yield from _check_shaped_weights(params.data, list(params.shape), "data", label)


def _check_shaped_weights(
    weights: Message, shape: list[int], what: str, label: str
) -> Iterator[str]:
    """Weights with a 1-d or 3-d shape (scale, bias, loadConstant)."""
    if len(shape) not in (1, 3):
        yield f"{label}: {what} shape {shape} must be 1-d or 3-d"
        return
    channels = shape[0] if len(shape) == 3 and shape[0] > 1 else 1
    yield from _check_weights(weights, math.prod(shape), channels, f"{what} {shape}", label)


def _check_load_constant_nd(layer: Message, net: _Net, label: str) -> Iterator[str]:
    params = layer.loadConstantND
    shape = list(params.shape)
    if not 1 <= len(shape) <= 5:
        yield f"{label}: shape {shape} must have 1 to 5 dimensions"
        return
    yield from _check_weights(params.data, math.prod(shape), 1, f"data {shape}", label)


def _check_activation(layer: Message, net: _Net, label: str) -> Iterator[str]:
    """NeuralNetworkValidatorUtils.hpp validateActivationParams."""
    params = layer.activation
    kind = params.WhichOneof("NonlinearityType")
    if kind is None:
        yield f"{label}: the nonlinearity type is not set"
    elif kind == "PReLU" and _weight_kind(params.PReLU.alpha) == "mixed":
        yield f"{label}: PReLU alpha fills more than one storage field"
    elif kind == "parametricSoftplus":
        alpha = _weight_kind(params.parametricSoftplus.alpha)
        beta = _weight_kind(params.parametricSoftplus.beta)
        if alpha != beta or "mixed" in (alpha, beta):
            yield f"{label}: parametricSoftplus alpha and beta have inconsistent storage"


def _check_pooling(layer: Message, net: _Net, label: str) -> Iterator[str]:
    if layer.pooling.WhichOneof("PoolingPaddingType") is None:
        yield f"{label}: padding type is not set"


def _check_padding(layer: Message, net: _Net, label: str) -> Iterator[str]:
    params = layer.padding
    amounts = len(params.paddingAmounts.borderAmounts)
    if amounts not in (0, 2):
        yield f"{label}: has {amounts} padding amounts; it must have 2 (y and x) or 0"
    if params.WhichOneof("PaddingType") is None:
        yield f"{label}: padding type is not set"


def _check_required_fields(*fields: str) -> Callable[[Message, _Net, str], Iterator[str]]:
    """A checker that requires the named repeated parameters of the layer to be non-empty."""

    def check(layer: Message, net: _Net, label: str) -> Iterator[str]:
        params = getattr(layer, layer.WhichOneof("layer"))
        for name in fields:
            if not len(getattr(params, name)):
                yield f"{label}: required parameter '{name}' is empty"

    return check


def _check_copy(layer: Message, net: _Net, label: str) -> Iterator[str]:
    if layer.input and layer.output and layer.input[0] == layer.output[0]:
        yield f"{label}: input and output have the same name"


def _check_axis(attribute: str) -> Callable[[Message, _Net, str], Iterator[str]]:
    def check(layer: Message, net: _Net, label: str) -> Iterator[str]:
        if not layer.inputTensor:
            return
        rank = layer.inputTensor[0].rank
        axis = getattr(layer, attribute).axis
        if not -rank <= axis < rank:
            yield f"{label}: axis {axis} is outside [-{rank}, {rank})"

    return check


def _check_custom(layer: Message, net: _Net, label: str) -> Iterator[str]:
    if not layer.custom.className:
        yield f"{label}: custom layer has an empty className"


def _check_reshape(layer: Message, net: _Net, label: str) -> Iterator[str]:
    if len(layer.reshape.targetShape) not in (3, 4):
        yield f"{label}: target shape must be 3-d or 4-d"


def _check_permute(layer: Message, net: _Net, label: str) -> Iterator[str]:
    if len(layer.permute.axis) != 4:
        yield f"{label}: permute needs 4 axes"


_LAYER_CHECKERS: dict[str, Callable[[Message, _Net, str], Iterator[str]]] = {
    "convolution": _check_convolution,
    "innerProduct": _check_inner_product,
    "batchedMatmul": _check_batched_matmul,
    "batchnorm": _check_batchnorm,
    "scale": _check_scale,
    "bias": _check_bias,
    "loadConstant": _check_load_constant,
    "loadConstantND": _check_load_constant_nd,
    "activation": _check_activation,
    "pooling": _check_pooling,
    "padding": _check_padding,
    "transpose": _check_required_fields("axes"),
    "reshapeStatic": _check_required_fields("targetShape"),
    "sliceStatic": _check_required_fields(
        "beginIds", "endIds", "strides", "beginMasks", "endMasks"
    ),
    "copy": _check_copy,
    "concatND": _check_axis("concatND"),
    "softmaxND": _check_axis("softmaxND"),
    "custom": _check_custom,
    "reshape": _check_reshape,
    "permute": _check_permute,
}
