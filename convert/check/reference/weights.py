"""WeightParams -> float32 numpy arrays.

A WeightParams holds its values in exactly one of: ``floatValue`` (float32), ``float16Value``
(little-endian IEEE half floats, as bytes), ``rawValue`` (unsigned ``numberOfBits``-bit integers,
packed most significant bit first, dequantized by ``quantization``) or ``int8RawValue`` (signed
bytes times a single linear scale). Linear quantization is ``w = q * scale + bias`` with one
scale/bias for the whole blob or one per output channel; a lookup table maps ``q`` to
``table[q]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from convert.check.reference.errors import Unsupported


def decode(wp: Any, shape: tuple[int, ...] | None = None, channel_axis: int = 0) -> np.ndarray:
    """The values of ``wp`` as float32, reshaped to ``shape`` when given.

    ``channel_axis`` is the axis of ``shape`` that per-channel quantization parameters index
    (output channels: 0 for most layers, 1 for deconvolution weights). An empty WeightParams
    gives an empty array.
    """
    count = None if shape is None else math.prod(shape)
    if len(wp.floatValue):
        values = np.asarray(wp.floatValue, dtype=np.float32)
    elif len(wp.float16Value):
        values = np.frombuffer(wp.float16Value, dtype="<f2").astype(np.float32)
    elif len(wp.rawValue):
        values = _dequantize(wp, _unpack(wp, count), shape, channel_axis)
    elif len(wp.int8RawValue):
        signed = np.frombuffer(wp.int8RawValue, dtype=np.int8)
        values = _linear(wp.quantization, signed, shape, channel_axis)
    else:
        values = np.zeros(0, dtype=np.float32)
    if shape is None or not values.size:
        return values
    if values.size != count:
        raise ValueError(f"weights hold {values.size} values, expected {count} for {shape}")
    return values.reshape(shape)


def _unpack(wp: Any, count: int | None) -> np.ndarray:
    bits = int(wp.quantization.numberOfBits)
    raw = np.frombuffer(wp.rawValue, dtype=np.uint8)
    if bits == 8:
        return raw[:count] if count is not None else raw
    if not 1 <= bits < 8:
        raise Unsupported(f"{bits}-bit rawValue weights")
    if count is None:
        count = raw.size * 8 // bits
    stream = np.unpackbits(raw)[: count * bits].reshape(count, bits)
    powers = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint16)
    return (stream.astype(np.uint16) @ powers).astype(np.uint16)


def _dequantize(
    wp: Any, q: np.ndarray, shape: tuple[int, ...] | None, channel_axis: int
) -> np.ndarray:
    kind = wp.quantization.WhichOneof("QuantizationType")
    if kind == "linearQuantization":
        return _linear(wp.quantization, q, shape, channel_axis)
    if kind == "lookupTableQuantization":
        table = np.asarray(wp.quantization.lookupTableQuantization.floatValue, dtype=np.float32)
        if q.size and int(q.max()) >= table.size:
            raise ValueError(f"quantized index {int(q.max())} outside a {table.size}-entry table")
        return table[q]
    raise Unsupported("rawValue weights without quantization parameters")


def _linear(
    quantization: Any, q: np.ndarray, shape: tuple[int, ...] | None, channel_axis: int
) -> np.ndarray:
    params = quantization.linearQuantization
    scale = np.asarray(params.scale, dtype=np.float32)
    bias = np.asarray(params.bias, dtype=np.float32)
    if not bias.size:
        bias = np.zeros(1, dtype=np.float32)
    values = q.astype(np.float32)
    if scale.size <= 1 and bias.size <= 1:
        return values * (scale[0] if scale.size else np.float32(1)) + bias[0]
    if shape is None:
        raise ValueError("per-channel quantization needs the weight shape")
    channels = shape[channel_axis]
    if scale.size not in (1, channels) or bias.size not in (1, channels):
        raise ValueError(f"{scale.size} scales / {bias.size} biases for {channels} channels")
    view = [1] * len(shape)
    view[channel_axis] = channels
    grid = values.reshape(shape) * scale.reshape(view if scale.size > 1 else [1])
    return (grid + bias.reshape(view if bias.size > 1 else [1])).reshape(-1)
