"""Model descriptions and feature types: InterfaceValidators.cpp (validateModelDescription,
validateFeatureDescription, validateOptional, validateCanModelBeUpdatable, with
validateFeatureDescriptions from Validators.hpp), plus the model-level updatable check of
Model.cpp validateGeneric.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from convert.check.rules.common import (
    COLOR_SPACES,
    DOUBLE,
    FLOAT16,
    FLOAT32,
    GRAYSCALE_FLOAT16,
    INT8,
    INT32,
    NN_TYPES,
    PIPELINE_TYPES,
    SPEC_IOS12,
    SPEC_IOS13,
    SPEC_IOS14,
    SPEC_IOS16,
    SPEC_IOS18,
    SPEC_IOS26,
    Message,
)

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


# --------------------------------------------------------------------------------------------
# Model descriptions: InterfaceValidators.cpp validateModelDescription


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
