"""Weight storage numerics: float16 bytes, linear quantization and k-means lookup tables.

Core ML's NeuralNetwork stores a quantized weight as ``rawValue``: unsigned indices of
``numberOfBits`` bits each (1 to 8), packed most significant bit first and padded with zero
bits to a whole byte. The indices mean either ``q * scale + bias`` (linear quantization, one
scale and bias for the whole weight or one per output channel) or ``table[q]`` (a lookup table
of exactly ``2**numberOfBits`` floats, one per weight). This module turns numpy arrays into
those indices and parameters and back; writing them into a ``WeightParams`` is
``layers/weights.py``'s job, so nothing here imports coremltools or protobuf.

Both quantizers can take the second moment of the weight's inputs, measured on calibration
images. Each value is then not simply rounded to its nearest grid value or table entry: the
weights are rounded one input at a time, and the error of each rounding is spread over the
weights of the inputs not yet rounded, so that the layer's outputs on those inputs move as
little as possible (:func:`compensated`).

Everything is deterministic: the same values give the same bytes on every run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

FLOAT16_MAX = 65504.0
LLOYD_ITERATIONS = 30  # per start; each is O(k log n) on the sorted values
DENSITY_BINS = 4096  # at most, for the histogram the first k-means start is read from
DAMPING = 0.01  # added to the second moment's diagonal, as a fraction of its mean


def float16_bytes(values: np.ndarray) -> bytes:
    """Little-endian IEEE half floats of ``values`` (C order).

    Raises ValueError naming the value when one is not finite or when the largest |value|
    exceeds :data:`FLOAT16_MAX`, which float16 would turn into infinity or round down to 65504.
    """
    values = np.asarray(values)
    if values.size:
        bad = values[~np.isfinite(values)]
        if bad.size:
            raise ValueError(f"float16 cannot hold {float(bad.flat[0])}: values must be finite")
        largest = float(np.max(np.abs(values)))
        if largest > FLOAT16_MAX:
            raise ValueError(
                f"float16 cannot hold {largest:g}: the largest |value| exceeds {FLOAT16_MAX:g}"
            )
    return np.ascontiguousarray(values, dtype="<f2").tobytes()


@dataclass(frozen=True)
class Quantized:
    """A quantized weight as Core ML stores it.

    ``packed`` is the ``rawValue``: ``bits``-bit indices, most significant bit first, padded to a
    whole byte. Linear quantization fills ``scale`` and ``bias`` (one of each, or one per
    channel); a lookup table fills ``table`` (exactly ``2**bits`` float32 values).
    """

    bits: int
    packed: bytes
    scale: list[float]
    bias: list[float]
    table: list[float]


# -- linear quantization -----------------------------------------------------------------------


def linear(
    values: np.ndarray, bits: int = 8, axis: int | None = 0, second: np.ndarray | None = None
) -> Quantized:
    """Asymmetric linear quantization, ``w ≈ q * scale + bias``, one scale and bias per slice
    along ``axis`` (Core ML's output channels: axis 0 for convolution weights
    ``[C_out, C_in/groups, kH, kW]`` and innerProduct weights ``[C_out, C_in]``), or one for the
    whole tensor when ``axis`` is None.

    Per slice, bias = min and scale = (max - min) / (2**bits - 1), computed in float64 and
    stored as float32. A constant slice gets scale 1.0 and q = 0, which gives its value back.
    Each q is the index of the grid value nearest to w, where the grid is what Core ML computes
    in float32, ``q * scale + bias``; that is ``round((w - bias) / scale)`` except where float32
    rounding moves a grid value across a midpoint.

    With ``second`` (the inputs' second moment, see :func:`compensated`; ``axis`` must be 0),
    the grid stays the same but the values are rounded with compensation.
    """
    _check_bits(bits)
    x = _finite(values, "linear quantization")
    rows = _rows(x, axis)
    channels = rows.shape[0]
    if not x.size:
        return Quantized(bits, b"", [1.0] * channels, [0.0] * channels, [])
    levels = 2**bits
    lo = rows.min(axis=1)
    hi = rows.max(axis=1)
    with np.errstate(over="ignore"):
        bias = lo.astype(np.float32)
        scale = ((hi - lo) / (levels - 1)).astype(np.float32)
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(bias))):
        raise ValueError("linear quantization: the values' range exceeds float32")
    # a range too small for a float32 scale is constant as far as the grid can tell
    constant = scale == 0
    scale[constant] = 1.0

    grid = np.arange(levels, dtype=np.float32) * scale[:, None] + bias[:, None]
    if second is not None:
        if axis != 0:
            raise ValueError("compensated rounding quantizes per output channel (axis 0)")
        per_group = _grouped(rows, second)

        def snap(w: np.ndarray) -> np.ndarray:
            flat = w.reshape(channels, 1)
            return grid[np.arange(channels)[:, None], _nearest_in_rows(grid, flat)].reshape(w.shape)

        rows = compensated(per_group, second, snap).reshape(channels, -1)
    q = _nearest_in_rows(grid, rows)
    q[constant] = 0
    q = np.moveaxis(q.reshape(_moved_shape(x.shape, axis)), 0, axis or 0).ravel()
    return Quantized(bits, pack(q, bits), scale.tolist(), bias.tolist(), [])


def _rows(x: np.ndarray, axis: int | None) -> np.ndarray:
    """``x`` as one row per slice along ``axis`` (one row when ``axis`` is None)."""
    if axis is None:
        return x.reshape(1, -1)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is outside a tensor of shape {x.shape}")
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _moved_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return (1, *shape)
    rest = [n for i, n in enumerate(shape) if i != axis % len(shape)]
    return (shape[axis], *rest)


def _nearest_in_rows(grid: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each value of ``rows``, the index of the nearest value of its row of ``grid``.

    Each grid row is non-decreasing, so the nearest index is the number of midpoints between
    consecutive grid values that lie below the value (a value on a midpoint takes the lower
    index). That count is found by a binary search run on all rows at once, one step per bit.
    The midpoints of float32 values are exact in float64.
    """
    levels = grid.shape[1]
    mids = ((grid[:, :-1].astype(np.float64) + grid[:, 1:]) / 2).ravel()
    first = (np.arange(grid.shape[0]) * (levels - 1))[:, None]
    q = np.zeros(rows.shape, dtype=np.int64)
    step = levels // 2
    while step:
        candidate = q + step
        q = np.where(mids[first + candidate - 1] < rows, candidate, q)
        step //= 2
    return q


# -- compensated rounding ------------------------------------------------------------------------


def compensated(
    rows: np.ndarray, second: np.ndarray, snap: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Round ``rows`` ([groups, rows per group, inputs]: output channels in groups, as a grouped
    convolution has them) to values ``snap`` allows, so that each row's outputs
    ``row . x`` move as little as possible on average over the inputs x whose second moment
    E[x x^T] is ``second`` ([groups, inputs, inputs]).

    Rounding one input's weights at a time, the error e it makes in each row is taken back, as
    far as the inputs' correlation allows, by the inputs still to round: with H the second
    moment and U the upper Cholesky factor of its inverse, the later weights move by
    ``-e / U[i, i] * U[i, later]``. This is optimal brain surgery done greedily, in the form
    Frantar et al. (2022, "GPTQ") made practical. The inputs go in order of decreasing
    E[x_i^2], so the weights that matter most are rounded while the most inputs remain to take
    their error. :data:`DAMPING` times the mean of H's diagonal is added to it, and an input
    that is always zero is rounded to nearest and moves nothing.

    ``snap`` maps values shaped [groups, rows per group] to the nearest allowed ones.
    """
    groups, per_group, inputs = rows.shape
    if second.shape != (groups, inputs, inputs):
        raise ValueError(f"second moment {second.shape} does not fit rows {rows.shape}")
    h = np.array(second, dtype=np.float64)
    diagonal = np.diagonal(h, axis1=1, axis2=2).copy()
    dead = ~(diagonal > 0)
    g, i = np.nonzero(dead)
    h[g, i, :] = 0.0
    h[g, :, i] = 0.0
    h[g, i, i] = 1.0
    diagonal[dead] = 0.0  # dead inputs go last
    order = np.argsort(-diagonal, axis=1, kind="stable")
    at = np.arange(groups)[:, None, None]
    h = h[at, order[:, :, None], order[:, None, :]]
    w = np.take_along_axis(rows.astype(np.float64), order[:, None, :], axis=2)
    mean = np.trace(h, axis1=1, axis2=2) / inputs
    h += DAMPING * mean[:, None, None] * np.eye(inputs)
    lower_inverse = np.linalg.inv(np.linalg.cholesky(h))
    upper = np.linalg.cholesky(np.einsum("gki,gkj->gij", lower_inverse, lower_inverse))
    upper = upper.transpose(0, 2, 1)  # inverse(h) = upper^T upper
    out = np.empty_like(w)
    for column in range(inputs):
        q = snap(w[:, :, column])
        out[:, :, column] = q
        error = (w[:, :, column] - q) / upper[:, column, column][:, None]
        w[:, :, column + 1 :] -= error[:, :, None] * upper[:, None, column, column + 1 :]
    return np.take_along_axis(out, np.argsort(order, axis=1)[:, None, :], axis=2)


def _grouped(rows: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Rows [channels, ...] as [groups, channels per group, inputs] for a second moment
    [groups, inputs, inputs]."""
    groups, inputs = second.shape[0], second.shape[-1]
    if rows.shape[0] % groups or rows[0].size != inputs:
        raise ValueError(f"second moment {second.shape} does not fit a weight {rows.shape}")
    return rows.reshape(groups, rows.shape[0] // groups, inputs)


# -- lookup tables -------------------------------------------------------------------------------


def palette(values: np.ndarray, bits: int, second: np.ndarray | None = None) -> Quantized:
    """A lookup table of ``2**bits`` float32 entries for the whole tensor (Core ML has no
    per-channel tables), by 1-D k-means, and each value's index into it.

    When the tensor has at most ``2**bits`` distinct values, the table holds them (padded with
    copies of the largest), so dequantization gives every value back. Otherwise Lloyd's
    algorithm runs on the sorted values from two fixed starts and the table with the smaller
    squared error is kept:

    - entries spaced as the cube root of the values' density (the spacing that minimises the
      squared error of a fine quantizer), read from a histogram;
    - the uniform grid from min to max. Lloyd's iterations never increase the error, so this
      start makes the table at least as good as linear quantization with one scale.

    An iteration costs O(k log n): the cluster boundaries are ``np.searchsorted`` of the
    midpoints between centroids in the sorted values, and each cluster's mean comes from prefix
    sums. It stops after :data:`LLOYD_ITERATIONS` or when no boundary moves; an empty cluster
    keeps its centroid. A value on a midpoint goes to the lower centroid. Finally each value
    takes the index of its nearest float32 table entry; with ``second`` (the inputs' second
    moment, rows along axis 0, see :func:`compensated`), the entry compensated rounding picks.
    """
    _check_bits(bits)
    x = _finite(values, "a lookup table").ravel()
    k = 2**bits
    if not x.size:
        return Quantized(bits, b"", [], [], [0.0] * k)
    xs = np.sort(x)
    distinct = xs[np.concatenate(([True], xs[1:] != xs[:-1]))]
    if distinct.size <= k:
        table = distinct.astype(np.float32)
    else:
        prefix = _Prefix(xs)
        candidates = [_lloyd(prefix, start) for start in (_density_start(xs, k), _uniform(xs, k))]
        tables = [np.sort(c.astype(np.float32)) for c in candidates]
        errors = [_squared_error(xs, t) for t in tables]
        table = tables[int(np.argmin(errors))]  # the first on a tie
    table = np.concatenate((table, np.repeat(table[-1:], k - table.size)))
    if second is not None and distinct.size > k:
        rows = values.reshape(values.shape[0], -1).astype(np.float64)
        entries = table.astype(np.float64)
        x = compensated(_grouped(rows, second), second, lambda w: entries[_nearest(table, w)])
        x = x.ravel()
    return Quantized(bits, pack(_nearest(table, x), bits), [], [], table.tolist())


class _Prefix:
    """Sorted values and their prefix sums, for the mean of any run of them in O(1).

    The sums are of the values minus the median, which keeps them small when the values share
    a large offset."""

    def __init__(self, xs: np.ndarray) -> None:
        self.xs = xs
        self.offset = float(xs[xs.size // 2])
        self.sums = np.concatenate(([0.0], np.cumsum(xs - self.offset)))


def _lloyd(prefix: _Prefix, centroids: np.ndarray) -> np.ndarray:
    xs = prefix.xs
    n = xs.size
    edges = None
    for _ in range(LLOYD_ITERATIONS):
        mids = (centroids[:-1] + centroids[1:]) / 2
        new = np.concatenate(([0], np.searchsorted(xs, mids, side="right"), [n]))
        if edges is not None and np.array_equal(new, edges):
            break
        edges = new
        start, stop = edges[:-1], edges[1:]
        filled = stop > start
        start, stop = start[filled], stop[filled]
        means = (prefix.sums[stop] - prefix.sums[start]) / (stop - start) + prefix.offset
        centroids = centroids.copy()
        # clipped to the cluster's own values, so rounding cannot reorder the centroids
        centroids[filled] = np.clip(means, xs[start], xs[stop - 1])
    return centroids


def _density_start(xs: np.ndarray, k: int) -> np.ndarray:
    """k values at the quantiles (i + 1/2) / k of the cube root of the values' density."""
    bins = int(np.clip(xs.size // 8, k, DENSITY_BINS))
    edges = np.linspace(xs[0], xs[-1], bins + 1)
    inside = np.searchsorted(xs, edges[1:-1], side="right")
    counts = np.diff(np.concatenate(([0], inside, [xs.size])))
    weight = np.concatenate(([0.0], np.cumsum(np.cbrt(counts))))
    return np.interp((np.arange(k) + 0.5) / k, weight / weight[-1], edges)


def _uniform(xs: np.ndarray, k: int) -> np.ndarray:
    return np.linspace(xs[0], xs[-1], k)


def _squared_error(xs: np.ndarray, table: np.ndarray) -> float:
    """The summed squared error of the sorted values ``xs`` against their nearest entries of
    the sorted ``table``."""
    mids = (table[:-1].astype(np.float64) + table[1:]) / 2
    edges = np.concatenate(([0], np.searchsorted(xs, mids, side="right"), [xs.size]))
    back = np.repeat(table.astype(np.float64), np.diff(edges))
    return float(np.sum((back - xs) ** 2))


def _nearest(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The index of each value's nearest entry of the sorted ``table``: the number of midpoints
    below it, so a value on a midpoint, or equal to repeated entries, takes the lower index."""
    mids = (table[:-1].astype(np.float64) + table[1:]) / 2
    return np.searchsorted(mids, x, side="left")


# -- bits ------------------------------------------------------------------------------------------


def pack(q: np.ndarray, bits: int) -> bytes:
    """The indices ``q`` (unsigned, below ``2**bits``), ``bits`` each, most significant bit
    first, padded with zero bits to a whole byte. For 8 bits that is just the bytes."""
    _check_bits(bits)
    q = np.asarray(q).ravel()
    if not q.size:
        return b""
    if not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"indices must be integers, not {q.dtype}")
    if int(q.min()) < 0 or int(q.max()) >= 2**bits:
        raise ValueError(f"indices {int(q.min())}..{int(q.max())} do not fit in {bits} bits")
    q = q.astype(np.uint8)
    if bits == 8:
        return q.tobytes()
    stream = np.unpackbits(q[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(stream.ravel()).tobytes()


def _unpack(packed: bytes, bits: int, count: int) -> np.ndarray:
    """The first ``count`` indices of ``packed``. An index of at most 8 bits lies within two
    consecutive bytes, so each is read out of a big-endian 16-bit word."""
    raw = np.frombuffer(packed, dtype=np.uint8)
    need = -(-count * bits // 8)
    if raw.size < need:
        raise ValueError(f"{raw.size} bytes cannot hold {count} {bits}-bit indices")
    if bits == 8:
        return raw[:count].astype(np.int64)
    words = np.concatenate((raw[:need], [0])).astype(np.int64)
    start = np.arange(count, dtype=np.int64) * bits
    byte = start >> 3
    word = (words[byte] << 8) | words[byte + 1]
    return (word >> (16 - bits - (start & 7))) & (2**bits - 1)


# -- back to floats --------------------------------------------------------------------------------


def dequantize(qz: Quantized, shape: tuple[int, ...], axis: int | None = 0) -> np.ndarray:
    """The float32 values ``qz`` stands for, in ``shape``, computed as Core ML does: ``table[q]``,
    or ``q * scale + bias`` in float32 with per-channel parameters along ``axis``."""
    _check_bits(qz.bits)
    count = math.prod(shape)
    q = _unpack(qz.packed, qz.bits, count)
    if qz.table:
        if len(qz.table) != 2**qz.bits:
            raise ValueError(f"{len(qz.table)} table entries for {qz.bits} bits")
        return np.asarray(qz.table, dtype=np.float32)[q].reshape(shape)
    scale = np.asarray(qz.scale, dtype=np.float32)
    bias = np.asarray(qz.bias, dtype=np.float32) if qz.bias else np.zeros_like(scale)
    if scale.size != bias.size or not scale.size:
        raise ValueError(f"{scale.size} scales and {bias.size} biases")
    values = q.astype(np.float32)
    if scale.size == 1:
        return (values * scale[0] + bias[0]).reshape(shape)
    if axis is None or shape[axis] != scale.size:
        where = "one tensor" if axis is None else f"{shape[axis]} channels"
        raise ValueError(f"{scale.size} scales for {where}")
    view = [1] * len(shape)
    view[axis] = scale.size
    return values.reshape(shape) * scale.reshape(view) + bias.reshape(view)


def error(values: np.ndarray, qz: Quantized, shape: tuple[int, ...], axis: int | None = 0) -> float:
    """Relative RMS error of ``qz`` against ``values``: rms(dequantized - values) / rms(values).
    0.0 for an empty or all-zero tensor given back as zeros (infinity if it is not)."""
    x = np.asarray(values, dtype=np.float64).reshape(shape)
    if not x.size:
        return 0.0
    off = math.sqrt(float(np.mean((dequantize(qz, shape, axis) - x) ** 2)))
    scale = math.sqrt(float(np.mean(x**2)))
    if scale == 0:
        return 0.0 if off == 0 else math.inf
    return off / scale


# -- checks ----------------------------------------------------------------------------------------


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"{bits} bits: Core ML quantizes to 1 to 8 bits")


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.size and not np.all(np.isfinite(x)):
        raise ValueError(f"{what} needs finite values, not {float(x[~np.isfinite(x)][0])}")
    return x
