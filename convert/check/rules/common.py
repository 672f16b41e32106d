"""What several rule modules share: the specification versions of mlmodel/src/Globals.hpp,
the enum numbers of format/FeatureTypes.proto (so that validation needs no coremltools import),
the model type groups Model.cpp dispatches on, and :func:`describe_type`, the short text every
message uses for a FeatureType.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
