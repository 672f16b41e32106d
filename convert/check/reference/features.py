"""Features in and out: user values -> batches, images -> tensors, blobs -> user outputs.

Between models a feature travels as a *batch*: a multi-array is a float32 array (N, *shape)
(see :mod:`convert.check.reference.registry`), an image a float32 array (N, H, W, C) of 0-255 pixels
in RGB (C = 3) or gray (C = 1) order, any other value a list of N items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from convert.check.reference.errors import ReferenceError

PROBABILITIES = "__probabilities__"
COLOUR_SPACES = {10: "GRAYSCALE", 20: "RGB", 30: "BGR", 40: "GRAYSCALE_FLOAT16"}


def feature_kind(feature: Any) -> str:
    return feature.type.WhichOneof("Type") or "(no type)"


def declared_shape(feature: Any) -> tuple[int, ...]:
    """A multi-array's fixed shape: ``shape``, else the first enumerated shape; () if none."""
    array = feature.type.multiArrayType
    if len(array.shape):
        return tuple(int(d) for d in array.shape)
    enumerated = array.enumeratedShapes.shapes
    if len(enumerated):
        return tuple(int(d) for d in enumerated[0].shape)
    return ()


# -- user inputs -----------------------------------------------------------------------------


def user_input(path: Path | None, feature: Any, value: Any) -> Any:
    """The batch of one model input given by the user."""
    kind = feature_kind(feature)
    if kind == "imageType":
        return image_batch(path, feature, value)
    if kind == "multiArrayType":
        return array_batch(path, feature, value)
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def image_batch(path: Path | None, feature: Any, value: Any) -> np.ndarray:
    """PIL image(s) or uint8 array(s) -> float32 (N, H, W, C) checked against the feature."""
    image = feature.type.imageType
    gray = COLOUR_SPACES.get(image.colorSpace) in ("GRAYSCALE", "GRAYSCALE_FLOAT16")
    channels = 1 if gray else 3
    if isinstance(value, list | tuple):
        items = [_one_image(path, feature, v, channels) for v in value]
        if not items:
            raise ReferenceError(path, f"input {feature.name!r}: an empty list of images")
        sizes = sorted({f"{item.shape[1]}x{item.shape[0]}" for item in items})
        if len(sizes) > 1:
            raise ReferenceError(path, f"input {feature.name!r}: images of sizes {sizes}")
        batch = np.stack(items)
    else:
        batch = _image_array(path, feature, value, channels)
    _check_size(path, feature, batch.shape[2], batch.shape[1])
    return batch


def _one_image(path: Path | None, feature: Any, value: Any, channels: int) -> np.ndarray:
    batch = _image_array(path, feature, value, channels)
    if batch.shape[0] != 1:
        raise ReferenceError(path, f"input {feature.name!r}: a list item holds several images")
    return batch[0]


def _image_array(path: Path | None, feature: Any, value: Any, channels: int) -> np.ndarray:
    if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image
        value = np.asarray(value.convert("L" if channels == 1 else "RGB"))
    a = np.asarray(value)
    if a.dtype.kind not in "uif":
        raise ReferenceError(path, f"input {feature.name!r}: pixels of dtype {a.dtype}")
    if channels == 1 and (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] != 1)):
        a = a[..., None]
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != channels:
        want = "(H, W) or (N, H, W)" if channels == 1 else "(H, W, 3) or (N, H, W, 3)"
        raise ReferenceError(
            path, f"input {feature.name!r}: expected an image array {want}, got shape {a.shape}"
        )
    return a.astype(np.float32)


def _check_size(path: Path | None, feature: Any, width: int, height: int) -> None:
    image = feature.type.imageType
    if _size_allowed(image, width, height):
        return
    raise ReferenceError(
        path,
        f"input {feature.name!r} takes {image.width}x{image.height} images (width x height), "
        f"got {width}x{height}; resize them first",
    )


def _size_allowed(image: Any, width: int, height: int) -> bool:
    if (width, height) == (image.width, image.height):
        return True
    flexibility = image.WhichOneof("SizeFlexibility")
    if flexibility == "enumeratedSizes":
        return any((s.width, s.height) == (width, height) for s in image.enumeratedSizes.sizes)
    if flexibility == "imageSizeRange":
        r = image.imageSizeRange
        return _in_range(width, r.widthRange) and _in_range(height, r.heightRange)
    return False


def _in_range(value: int, r: Any) -> bool:
    return value >= r.lowerBound and (r.upperBound < 0 or value <= r.upperBound)


def array_batch(path: Path | None, feature: Any, value: Any) -> np.ndarray:
    """A float array of the declared shape, or a batch of them (leading axis N). A declared
    shape starting with 1 may be given without that 1."""
    a = np.asarray(value, dtype=np.float32)
    shape = declared_shape(feature)
    if not shape:
        return a[None]
    size = math.prod(shape)
    if a.size == size:
        return a.reshape((1, *shape))
    if a.ndim >= 2 and a.shape[1:] in _item_shapes(shape):
        return a.reshape((a.shape[0], *shape))
    raise ReferenceError(
        path, f"input {feature.name!r} takes arrays of shape {shape} (or a batch), got {a.shape}"
    )


def _item_shapes(shape: tuple[int, ...]) -> set[tuple[int, ...]]:
    """Shapes accepted for one item: the declared one, without its leading 1s, or flat."""
    stripped = shape
    while len(stripped) > 1 and stripped[0] == 1:
        stripped = stripped[1:]
    return {shape, stripped, (math.prod(shape),)}


# -- tensors for a neural network ------------------------------------------------------------


def image_tensor(path: Path | None, feature: Any, batch: np.ndarray, nn: Any) -> np.ndarray:
    """(N, H, W, C) pixels -> the network's input blob: colour order, preprocessing, rank."""
    space = COLOUR_SPACES.get(feature.type.imageType.colorSpace)
    if space not in ("RGB", "BGR", "GRAYSCALE"):
        raise ReferenceError(path, f"input {feature.name!r}: colour space {space} not supported")
    x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)  # N, C, H, W
    if space == "BGR":
        x = x[:, ::-1].copy()
    for pre in nn.preprocessing:
        if pre.featureName in ("", feature.name):
            x = _preprocess(path, feature, pre, x, space)
    mapping = nn.imageInputShapeMapping
    if mapping == 1:  # RANK4_IMAGE_MAPPING: [1, C, H, W]
        return x[:, None]
    if mapping == 0:  # RANK5_IMAGE_MAPPING: [1, 1, C, H, W]
        return x[:, None, None]
    raise ReferenceError(path, f"imageInputShapeMapping {mapping} is not supported")


def _preprocess(path: Path | None, feature: Any, pre: Any, x: np.ndarray, space: str):
    kind = pre.WhichOneof("preprocessor")
    if kind == "scaler":
        s = pre.scaler
        biases = {
            "RGB": (s.redBias, s.greenBias, s.blueBias),
            "BGR": (s.blueBias, s.greenBias, s.redBias),
            "GRAYSCALE": (s.grayBias,),
        }[space]
        bias = np.asarray(biases, dtype=np.float32).reshape(-1, 1, 1)
        return x * np.float32(s.channelScale) + bias
    if kind == "meanImage":
        mean = np.asarray(pre.meanImage.meanImage, dtype=np.float32)
        if mean.size != math.prod(x.shape[1:]):
            raise ReferenceError(path, f"meanImage of {feature.name!r} has {mean.size} values")
        return x - mean.reshape(x.shape[1:])
    return x


def array_tensor(path: Path | None, feature: Any, batch: np.ndarray, nn: Any) -> np.ndarray:
    """(N, ...) multi-array batch -> the network's input blob for its array shape mapping."""
    shape = declared_shape(feature)
    if nn.arrayInputShapeMapping == 0:  # RANK5_ARRAY_MAPPING: [C] or [C, H, W] -> rank 5
        if len(shape) == 1:
            shape = (1, 1, shape[0], 1, 1)
        elif len(shape) == 3:
            shape = (1, 1, *shape)
        else:
            raise ReferenceError(path, f"rank-5 mapping of {feature.name!r} needs rank 1 or 3")
    elif nn.arrayInputShapeMapping != 1:
        raise ReferenceError(path, f"arrayInputShapeMapping {nn.arrayInputShapeMapping}")
    if not shape:
        return batch.astype(np.float32, copy=False)
    if math.prod(batch.shape[1:]) != math.prod(shape):
        raise ReferenceError(
            path, f"input {feature.name!r} of shape {batch.shape[1:]} does not fit {shape}"
        )
    return batch.reshape((batch.shape[0], *shape)).astype(np.float32, copy=False)


# -- user outputs ----------------------------------------------------------------------------


def user_outputs(features: dict[str, Any], outputs: Sequence[Any]) -> dict[str, Any]:
    """The model's declared outputs (and the probability array of a classifier), for the user:
    multi-arrays as float32 (N, *shape), the declared shape's leading 1 dropped."""
    result: dict[str, Any] = {}
    for feature in outputs:
        value = features[feature.name]
        if isinstance(value, np.ndarray):
            value = _user_array(feature, value)
        result[feature.name] = value
    if PROBABILITIES in features:
        result[PROBABILITIES] = features[PROBABILITIES]
    return result


def _user_array(feature: Any, blob: np.ndarray) -> np.ndarray:
    shape = declared_shape(feature) if feature_kind(feature) == "multiArrayType" else ()
    if shape and math.prod(shape) == math.prod(blob.shape[1:]):
        blob = blob.reshape((blob.shape[0], *shape))
    if blob.ndim >= 3 and blob.shape[1] == 1:
        blob = blob.reshape((blob.shape[0], *blob.shape[2:]))
    return np.ascontiguousarray(blob, dtype=np.float32)
