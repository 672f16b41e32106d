"""Weights: the one place where a weight's values go into a Core ML layer, in their stored form.

Every translation hands its weights, already in Core ML's order (folded BatchNorms included, in
float64 until here), to :func:`write`, with the storage its layer gets from the build's
:class:`Precision`. The forms, as NeuralNetwork.proto defines them:

- ``float32``: ``floatValue``;
- ``float16``: ``float16Value``, little-endian half floats (specification version 2);
- ``int8``: 8-bit ``rawValue`` with linear quantization, a scale and a bias per output channel
  (version 3);
- ``paletteN`` (N = 1..8): N-bit ``rawValue`` indices into a lookup table of 2^N floats, found by
  k-means over the whole tensor (the format has one table per weight, not per channel; version
  3).

Only kernels (convolution, innerProduct and batchedMatMul weights) are ever quantized: Core ML
takes quantized values nowhere else that we write. Every other weight of a layer whose kernel is
not float32 (its bias, a batch norm's statistics, a scale layer) is stored as float16, which the
validator allows beside a quantized kernel; beside a float32 kernel the bias stays float32, as
the two must then agree.

:func:`restore` rewrites the float32 weights of a finished spec (a ``ct.convert`` fallback) in the
same forms, through the same :func:`write`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from convert.build import quantize
from convert.errors import ConversionError
from convert.read.manifest import FLOAT16, FLOAT32, INT8, calibrated, palette_bits

# the layer kinds whose ``weights`` field is a kernel (output channels first, in Core ML's order)
KERNELS = frozenset({"convolution", "innerProduct", "batchedMatmul"})


@dataclass(frozen=True)
class Precision:
    """How one network's weights are stored: ``kernels`` for every kernel, unless ``layers``
    (Core ML layer name -> storage) says otherwise for that layer."""

    kernels: str = FLOAT32
    layers: Mapping[str, str] = field(default_factory=dict)

    def kernel(self, layer: str) -> str:
        return self.layers.get(layer, self.kernels)

    def other(self, layer: str) -> str:
        """The storage of a layer's other weights (bias, statistics): float32 beside a float32
        kernel, float16 beside anything smaller. Layers without a kernel follow ``kernels``."""
        return FLOAT32 if self.kernel(layer) == FLOAT32 else FLOAT16

    @property
    def float32(self) -> bool:
        return self.kernels == FLOAT32 and all(s == FLOAT32 for s in self.layers.values())


FULL = Precision()


@dataclass(frozen=True)
class Inputs:
    """What calibration images say about one layer's input: its ``mean`` per channel (over
    space too, for a convolution), and the ``second`` moment of what each output reads,
    [groups, inputs, inputs] (a convolution's window per group, an innerProduct's vector), or
    None when too few samples were seen to pin it down."""

    mean: np.ndarray
    second: np.ndarray | None = None


class StorageError(ValueError):
    """Values that the chosen storage cannot hold (a float16 overflow)."""


def write(
    params: Any,
    values: np.ndarray,
    storage: str = FLOAT32,
    kernel: bool = False,
    axis: int = 0,
    second: np.ndarray | None = None,
) -> None:
    """Fill the ``WeightParams`` message ``params`` with ``values`` (flattened in C order) as
    ``storage``. A non-kernel weight is never quantized (float16 at most); a kernel's
    per-channel quantization runs along ``axis``. Quantization starts from the float32 value,
    so that a spec rewritten by :func:`restore` holds exactly what a direct build writes.
    ``second``: the kernel's inputs' second moment (:class:`Inputs`), for compensated
    rounding."""
    values = np.asarray(values, dtype=np.float32)
    if storage == FLOAT32:
        # protobuf takes a list of floats about 4x faster than the numpy array
        params.floatValue.extend(values.ravel().tolist())
        return
    bits = palette_bits(storage)
    if storage == FLOAT16 or not kernel:
        try:
            params.float16Value = quantize.float16_bytes(values)
        except ValueError as exc:
            raise StorageError(str(exc)) from None
        return
    if storage == INT8:
        q = quantize.linear(values.astype(np.float64), 8, axis if values.ndim > 1 else None, second)
    elif bits is not None:
        q = quantize.palette(values.astype(np.float64), bits, second)
    else:
        raise ValueError(f"unknown weight storage {storage!r}")
    params.rawValue = q.packed
    params.quantization.numberOfBits = q.bits
    if q.table:
        params.quantization.lookupTableQuantization.floatValue.extend(q.table)
    else:
        params.quantization.linearQuantization.scale.extend(q.scale)
        params.quantization.linearQuantization.bias.extend(q.bias)


# -- rewriting a finished spec -----------------------------------------------------------------


def restore(spec: Any, precision: Precision, source: Any = None) -> None:
    """Rewrite every float32 weight of ``spec``'s network(s) as ``precision`` says, in place
    (pipelines included). ``source`` names the file in an overflow's error."""
    if precision.float32:
        return
    for nn in _networks(spec):
        for layer in nn.layers:
            try:
                restore_layer(layer, precision)
            except StorageError as exc:
                raise ConversionError(source, f"layer '{layer.name}': {exc}") from None


def restore_layer(layer: Any, precision: Precision, inputs: Inputs | None = None) -> None:
    """Rewrite one NeuralNetworkLayer's float32 weights as ``precision`` says, in place.

    With ``inputs`` (what calibration images say about the layer's input), a quantized kernel
    is rounded with compensation where the second moment is known, and its bias is corrected:
    quantization moves each output by dW . x on average, dW . mean, and the bias takes that
    back (a layer without a bias gets one). On a fine-tuned MobileNetV2 in int8 the correction
    takes the largest change of a probability from 0.30 to 0.06, and compensation to 0.03."""
    kind = layer.WhichOneof("layer")
    correction = None
    for params, is_kernel, shape, name in _weights_of(layer):
        if not len(params.floatValue):
            continue
        storage = precision.kernel(layer.name) if is_kernel else precision.other(layer.name)
        if storage == FLOAT32:
            continue
        values = np.asarray(params.floatValue, dtype=np.float32)
        if shape is not None and int(np.prod(shape)) == values.size:
            values = values.reshape(shape)
        if correction is not None and name == "bias":
            values = (values.astype(np.float64) - correction).astype(np.float32)
            correction = None
        params.ClearField("floatValue")
        second = _second(inputs, values) if is_kernel else None
        write(params, values, storage, kernel=is_kernel, second=second)
        if is_kernel and calibrated(storage) and inputs is not None and shape is not None:
            correction = _mean_shift(kind, getattr(layer, kind), params, values, inputs.mean)
    if correction is not None and np.any(correction):  # no bias to correct: give it one
        p = getattr(layer, kind)
        p.hasBias = True
        write(p.bias, -correction, precision.other(layer.name))


def _second(inputs: Inputs | None, values: np.ndarray) -> np.ndarray | None:
    """The second moment to round ``values`` with, when it fits them."""
    if inputs is None or inputs.second is None or values.ndim < 2:
        return None
    groups, width = inputs.second.shape[:2]
    fits = values.shape[0] % groups == 0 and values[0].size == width
    return inputs.second if fits else None


def _mean_shift(
    kind: str,
    p: Any,
    params: Any,
    values: np.ndarray,
    mean: np.ndarray,
    stored: np.ndarray | None = None,
) -> np.ndarray | None:
    """How far the stored kernel (``params`` decoded, or ``stored``) moves each output on
    average: (stored - values) . mean."""
    if stored is None:
        from convert.check.reference.weights import decode

        stored = decode(params, values.shape)
    error = np.asarray(stored, dtype=np.float64) - values.astype(np.float64)
    mean = np.asarray(mean, dtype=np.float64).ravel()
    if kind == "convolution":
        groups = p.nGroups or 1
        per_in, out = p.kernelChannels, p.outputChannels
        if mean.size != per_in * groups:
            return None
        summed = error.sum(axis=(2, 3))  # [out, in / groups]: the mean is flat over space
        per_out = out // groups
        shift = np.empty(out)
        for g in range(groups):
            rows = slice(g * per_out, (g + 1) * per_out)
            shift[rows] = summed[rows] @ mean[g * per_in : (g + 1) * per_in]
        return shift
    if mean.size != error.shape[1]:
        return None
    return error @ mean  # innerProduct and batchedMatmul: [out, in]


def store_layer(layer: Any, precision: Precision, inputs: Inputs | None = None) -> list[Any]:
    """The layers that replace a float32 ``layer`` once stored as ``precision`` says.

    Most layers are rewritten in place (:func:`restore_layer`). A convolution stored in a
    palette becomes two: the convolution with each output channel's kernel divided by its
    largest magnitude, so that one table serves channels whose ranges differ by decades (as
    BatchNorm folding leaves them), then a ``scale`` layer that multiplies each channel back and
    adds the bias, in float16. The format has no table per channel; this is the next best, for
    2 bytes a channel. On a fine-tuned MobileNetV2 in palette8 it takes the largest change of a
    probability from 0.16 to 0.04."""
    kind = layer.WhichOneof("layer")
    storage = precision.kernel(layer.name)
    p = getattr(layer, kind) if kind else None
    if kind != "convolution" or palette_bits(storage) is None or p.isDeconvolution:
        restore_layer(layer, precision, inputs)
        return [layer]
    if not len(p.weights.floatValue):
        return [layer]
    shape = _kernel_shape(kind, p)
    values = np.asarray(p.weights.floatValue, dtype=np.float64).reshape(shape)
    peak = np.abs(values).reshape(shape[0], -1).max(axis=1)
    peak[peak == 0] = 1.0
    # the scale layer holds float16: a peak below its smallest value is as good as one
    peak = np.clip(peak, 2.0**-14, quantize.FLOAT16_MAX).astype(np.float16).astype(np.float64)
    bias = np.asarray(p.bias.floatValue, dtype=np.float64) if p.hasBias else np.zeros(shape[0])
    normalised = (values / peak[:, None, None, None]).astype(np.float32)
    p.ClearField("weights")
    p.ClearField("bias")
    p.hasBias = False
    # rounding with compensation is the same for a row and for that row divided by its peak
    write(p.weights, normalised, storage, kernel=True, second=_second(inputs, normalised))
    if inputs is not None:
        from convert.check.reference.weights import decode

        stored = decode(p.weights, shape).astype(np.float64) * peak[:, None, None, None]
        shift = _mean_shift(kind, p, None, values, inputs.mean, stored)
        if shift is not None:
            bias = bias - shift
    output = layer.output[0]
    layer.output[0] = f"{output}/unscaled"
    scale = type(layer)()
    scale.name = f"{layer.name}/scale"
    scale.input.append(layer.output[0])
    scale.output.append(output)
    scale.scale.shapeScale.extend([shape[0], 1, 1])
    scale.scale.shapeBias.extend([shape[0], 1, 1])
    scale.scale.hasBias = True
    write(scale.scale.scale, peak, FLOAT16)
    write(scale.scale.bias, bias, FLOAT16)
    return [layer, scale]


def has_kernel(layer: Any) -> bool:
    """Whether the layer holds a kernel that quantization may shrink."""
    kind = layer.WhichOneof("layer")
    return kind in KERNELS and len(getattr(layer, kind).weights.floatValue) > 0


def _networks(spec: Any) -> Iterator[Any]:
    kind = spec.WhichOneof("Type")
    if kind in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"):
        yield getattr(spec, kind)
    elif kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        inner = spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline
        for model in inner.models:
            yield from _networks(model)


def _weights_of(layer: Any) -> Iterator[tuple[Any, bool, tuple[int, ...] | None, str]]:
    """(WeightParams, is a kernel, kernel shape in Core ML's order or None, field name) of one
    layer, in field order: a kernel comes before its bias."""
    kind = layer.WhichOneof("layer")
    params = getattr(layer, kind) if kind else None
    if params is None:
        return
    for descriptor, value in params.ListFields():
        if descriptor.message_type is None or descriptor.message_type.name != "WeightParams":
            continue
        is_kernel = kind in KERNELS and descriptor.name == "weights"
        shape = _kernel_shape(kind, params) if is_kernel else None
        yield value, is_kernel, shape, descriptor.name


def _kernel_shape(kind: str, p: Any) -> tuple[int, ...] | None:
    if kind == "convolution" and not p.isDeconvolution:
        kh, kw = (list(p.kernelSize) + [3, 3])[:2]
        return (p.outputChannels, p.kernelChannels, kh, kw)
    if kind == "innerProduct":
        return (p.outputChannels, p.inputChannels)
    if kind == "batchedMatmul":
        # stored [second dimension, first dimension]: output channels first
        return (p.weightMatrixSecondDimension, p.weightMatrixFirstDimension)
    return None
