"""Weight storage numerics (convert/build/quantize.py): what they write decodes back through the
reference evaluator's decoder, the bits are packed as coremltools packs them, and the errors are
as small as the storage allows."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest

from convert.build import quantize
from convert.build.quantize import Quantized
from convert.check.reference.weights import decode

KERNELS = (
    (32, 3, 3, 3),  # a first convolution
    (33, 3, 3, 3),  # odd count: the last byte is padded
    (96, 1, 3, 3),  # depthwise
    (95, 1, 3, 3),
    (10, 1280),  # a dense head
    (7, 1279),
)
BITS = range(1, 9)


def _weights(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Gaussian weights, float32 values held as float64 (as layers/weights.py passes them)."""
    rng = np.random.default_rng(seed)
    return rng.normal(scale=0.1, size=shape).astype(np.float32).astype(np.float64)


def _ct() -> Any:
    from convert.heavy import coremltools

    return coremltools()


def _params(qz: Quantized) -> Any:
    """A WeightParams holding ``qz`` as layers/weights.py writes it."""
    _ct()
    from coremltools.proto import NeuralNetwork_pb2

    wp = NeuralNetwork_pb2.WeightParams()
    wp.rawValue = qz.packed
    wp.quantization.numberOfBits = qz.bits
    if qz.table:
        wp.quantization.lookupTableQuantization.floatValue.extend(qz.table)
    else:
        wp.quantization.linearQuantization.scale.extend(qz.scale)
        wp.quantization.linearQuantization.bias.extend(qz.bias)
    return wp


def _channel_errors(values: np.ndarray, back: np.ndarray) -> np.ndarray:
    """Each output channel's (axis 0) relative RMS error."""
    rows = values.reshape(values.shape[0], -1)
    off = (back.reshape(rows.shape) - rows) ** 2
    return np.sqrt(off.mean(axis=1) / (rows**2).mean(axis=1))


# -- round trips through the reference decoder ---------------------------------------------------


@pytest.mark.parametrize("shape", KERNELS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("form", ("per channel", "per tensor", "palette"))
def test_decoder_reads_back_what_was_written(shape: tuple[int, ...], bits: int, form: str) -> None:
    values = _weights(shape, seed=bits)
    if form == "palette":
        qz, axis = quantize.palette(values, bits), 0
    else:
        axis = 0 if form == "per channel" else None
        qz = quantize.linear(values, bits, axis)
    count = math.prod(shape)
    assert len(qz.packed) == -(-count * bits // 8)
    padding = (-count * bits) % 8
    assert qz.packed[-1] & ((1 << padding) - 1) == 0  # the padding bits are zero
    if form == "palette":
        assert len(qz.table) == 2**bits and not qz.scale and not qz.bias
    else:
        assert len(qz.scale) == len(qz.bias) == (shape[0] if axis == 0 else 1)
        assert not qz.table
    back = quantize.dequantize(qz, shape, axis)
    assert back.dtype == np.float32 and back.shape == shape
    np.testing.assert_array_equal(decode(_params(qz), shape, channel_axis=0), back)


def test_decoder_reads_back_deconvolution_channels() -> None:
    """Deconvolution weights [C_in, C_out, kH, kW] carry their output channels on axis 1."""
    shape = (8, 5, 3, 3)
    values = _weights(shape) * np.logspace(-2, 0, 5)[None, :, None, None]
    qz = quantize.linear(values, 8, axis=1)
    assert len(qz.scale) == 5
    back = quantize.dequantize(qz, shape, axis=1)
    np.testing.assert_array_equal(decode(_params(qz), shape, channel_axis=1), back)
    assert quantize.error(values, qz, shape, axis=1) < 0.01


# -- packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", (1, 2, 3, 5, 7, 8))
def test_pack_matches_coremltools(bits: int) -> None:
    _ct()
    from coremltools.models.neural_network.quantization_utils import (
        _convert_array_to_nbit_quantized_bytes,
    )

    q = np.random.default_rng(bits).integers(0, 2**bits, size=203).astype(np.uint8)
    expected = _convert_array_to_nbit_quantized_bytes(q, bits).tobytes()
    assert quantize.pack(q, bits) == expected


def test_pack_by_hand() -> None:
    assert quantize.pack(np.array([1, 0, 1]), 1) == bytes([0b1010_0000])
    assert quantize.pack(np.array([3, 1, 2]), 2) == bytes([0b1101_1000])
    assert quantize.pack(np.array([5, 2, 7]), 3) == bytes([0b1010_1011, 0b1000_0000])
    assert quantize.pack(np.array([200, 7]), 8) == bytes([200, 7])
    assert quantize.pack(np.zeros(0, dtype=np.int64), 4) == b""


def test_pack_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="4 bits"):
        quantize.pack(np.array([0, 16]), 4)
    with pytest.raises(ValueError, match="1 to 8 bits"):
        quantize.pack(np.array([0, 1]), 9)
    with pytest.raises(ValueError, match="integers"):
        quantize.pack(np.array([0.5]), 4)


# -- linear ----------------------------------------------------------------------------------------


def test_per_channel_keeps_small_channels_that_one_scale_loses() -> None:
    """A BatchNorm-folded kernel: channels scaled from 1e-3 to 10. One scale for the whole tensor
    rounds the small channels to nothing; a scale per channel keeps every one within 1%."""
    values = _weights((64, 16, 3, 3)) * np.logspace(-3, 1, 64)[:, None, None, None]
    channel = quantize.linear(values, 8, axis=0)
    tensor = quantize.linear(values, 8, axis=None)
    per_channel = _channel_errors(values, quantize.dequantize(channel, values.shape, 0))
    per_tensor = _channel_errors(values, quantize.dequantize(tensor, values.shape, None))
    assert per_channel.max() < 0.01
    assert per_tensor.max() > 0.5
    assert quantize.error(values, channel, values.shape, 0) < quantize.error(
        values, tensor, values.shape, None
    )


@pytest.mark.parametrize("shape", ((32, 3, 3, 3), (96, 1, 3, 3)))
def test_eight_bit_per_channel_error_on_gaussian_kernels(shape: tuple[int, ...]) -> None:
    values = _weights(shape)
    qz = quantize.linear(values, 8)
    assert quantize.error(values, qz, shape) < 0.005


def test_linear_error_is_the_rounding_noise_of_its_steps() -> None:
    """Rounding to a step s leaves noise of RMS s / sqrt(12): long rows (a dense layer of 1280
    inputs) span a wider range, so their steps, and the error, are larger than a 3x3 kernel's."""
    shape = (10, 1280)
    values = _weights(shape)
    for bits in (4, 8):
        qz = quantize.linear(values, bits)
        noise = math.sqrt(np.mean(np.square(qz.scale)) / 12) / math.sqrt(np.mean(values**2))
        assert quantize.error(values, qz, shape) == pytest.approx(noise, rel=0.1)


@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("offset", (0.0, 1000.0))
def test_linear_picks_the_nearest_float32_grid_value(bits: int, offset: float) -> None:
    """Core ML computes q * scale + bias in float32. Each value's q must give the nearest of those
    grid values, also when float32 rounding is a few percent of the step (a large offset, and
    float64 values between float32 ones): there round((w - bias) / scale) misses some."""
    shape = (6, 200)
    values = offset + np.random.default_rng(bits).normal(scale=0.01, size=shape)
    qz = quantize.linear(values, bits)
    low, high = values.min(axis=1), values.max(axis=1)
    np.testing.assert_array_equal(qz.bias, low.astype(np.float32))
    np.testing.assert_array_equal(qz.scale, ((high - low) / (2**bits - 1)).astype(np.float32))
    back = quantize.dequantize(qz, shape).astype(np.float64)
    scale = np.asarray(qz.scale, dtype=np.float32)[:, None]
    bias = np.asarray(qz.bias, dtype=np.float32)[:, None]
    levels = np.arange(2**bits, dtype=np.float32)
    for c in range(shape[0]):
        grid = (levels * scale[c] + bias[c]).astype(np.float64)
        nearest = np.abs(grid[None, :] - values[c][:, None]).min(axis=1)
        np.testing.assert_array_equal(np.abs(back[c] - values[c]), nearest)
        slack = 4 * np.spacing(np.float32(np.abs(values[c]).max()))
        assert np.all(np.abs(back[c] - values[c]) <= float(scale[c, 0]) / 2 + slack)


def test_constant_channels_come_back_exactly() -> None:
    values = _weights((4, 3, 3, 3))
    values[1] = 0.3
    values[2] = 0.0
    qz = quantize.linear(values, 8)
    assert qz.scale[1] == qz.scale[2] == 1.0
    back = quantize.dequantize(qz, values.shape)
    assert np.all(back[1] == np.float32(0.3)) and np.all(back[2] == 0.0)
    zeros = np.zeros((3, 5))
    assert quantize.error(zeros, quantize.linear(zeros, 4), zeros.shape) == 0.0


def test_bits_outside_core_ml_range_are_refused() -> None:
    values = _weights((4, 4))
    for bits in (0, 9):
        with pytest.raises(ValueError, match="1 to 8 bits"):
            quantize.linear(values, bits)
        with pytest.raises(ValueError, match="1 to 8 bits"):
            quantize.palette(values, bits)
    values[1, 1] = np.nan
    with pytest.raises(ValueError, match="nan"):
        quantize.linear(values, 8)
    with pytest.raises(ValueError, match="nan"):
        quantize.palette(values, 8)


# -- lookup tables ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", (1, 4, 8))
def test_palette_is_deterministic(bits: int) -> None:
    values = _weights((64, 32, 3, 3))
    first, second = quantize.palette(values, bits), quantize.palette(values.copy(), bits)
    assert first.packed == second.packed
    assert np.float32(first.table).tobytes() == np.float32(second.table).tobytes()
    assert first == second


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("distinct", ("fewer", "exactly"))
def test_palette_holds_few_distinct_values_exactly(bits: int, distinct: str) -> None:
    """At most 2**bits distinct values: the table holds each, and every value comes back."""
    count = 2**bits if distinct == "exactly" else max(1, 2**bits - 3)
    rng = np.random.default_rng(bits)
    levels = rng.normal(size=count).astype(np.float32)
    shape = (31, 3, 3, 3)
    values = levels[rng.integers(0, count, size=shape)].astype(np.float64)
    values.flat[:count] = levels  # every level appears
    qz = quantize.palette(values, bits)
    assert len(qz.table) == 2**bits
    assert set(qz.table) == set(levels.astype(np.float64).tolist())
    np.testing.assert_array_equal(quantize.dequantize(qz, shape), values)
    assert quantize.error(values, qz, shape) == 0.0


@pytest.mark.parametrize("bits", (2, 4, 6, 8))
@pytest.mark.parametrize("law", ("normal", "laplace"))
def test_palette_beats_a_uniform_table(bits: int, law: str) -> None:
    """k-means spends its entries where the values are; a uniform grid (linear quantization with
    one scale) spends them evenly up to the outliers, so it can only be worse."""
    rng = np.random.default_rng(bits)
    shape = (256, 128, 3, 3)
    values = getattr(rng, law)(scale=0.05, size=shape).astype(np.float32).astype(np.float64)
    table = quantize.palette(values, bits)
    uniform = quantize.linear(values, bits, axis=None)
    assert len(table.table) == 2**bits
    assert quantize.error(values, table, shape) < quantize.error(values, uniform, shape, axis=None)


def test_palette_indices_are_the_nearest_entries() -> None:
    values = _weights((32, 3, 3, 3)) ** 3  # skewed, with outliers
    for bits in (3, 8):
        qz = quantize.palette(values, bits)
        table = np.asarray(qz.table, dtype=np.float64)
        back = quantize.dequantize(qz, values.shape).astype(np.float64).ravel()
        nearest = np.abs(table[None, :] - values.reshape(-1, 1)).min(axis=1)
        np.testing.assert_array_equal(np.abs(back - values.ravel()), nearest)
        assert np.all(np.diff(table) >= 0)


def test_palette_is_fast_on_a_large_kernel() -> None:
    values = _weights((1280, 1280))
    started = time.perf_counter()
    qz = quantize.palette(values, 8)
    assert time.perf_counter() - started < 2.0  # about 0.15 s
    assert quantize.error(values, qz, values.shape) < 0.01


# -- float16 ---------------------------------------------------------------------------------------


def test_float16_bytes_are_numpy_half_floats() -> None:
    values = np.concatenate(
        (_weights((5, 7)).ravel() * 1000, [65504.0, -65504.0, 1e-6, -0.0, 0.0, 1 / 3])
    )
    assert quantize.float16_bytes(values) == values.astype("<f2").tobytes()
    kernel = _weights((3, 4, 2)).astype(np.float32)
    assert quantize.float16_bytes(kernel) == kernel.astype("<f2").tobytes()
    assert quantize.float16_bytes(np.zeros(0)) == b""


@pytest.mark.parametrize(
    ("bad", "named"), ((70000.0, "70000"), (-1e5, "100000"), (np.nan, "nan"), (np.inf, "inf"))
)
def test_float16_refuses_what_it_cannot_hold(bad: float, named: str) -> None:
    values = _weights((4, 4))
    values[2, 3] = bad
    with pytest.raises(ValueError, match=named):
        quantize.float16_bytes(values)
