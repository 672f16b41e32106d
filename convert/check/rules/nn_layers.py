"""Per-layer checks: NeuralNetwork/NeuralNetworkLayerValidator.cpp (input and output counts,
ranks, parameters), with the weight rules of NeuralNetworkValidatorUtils.hpp,
ValidatorUtils-inl.hpp and QuantizationValidationUtils.cpp. :class:`_Net`, the state of one walk
over a network (NeuralNetworkSpecValidator), lives here because every layer check reads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from convert.check.rules.common import Message

WEIGHT_PARAMS = "CoreML.Specification.WeightParams"
NN_LAYER = "CoreML.Specification.NeuralNetworkLayer"


@dataclass
class _Net:
    """State of one walk over a network's layers (NeuralNetworkSpecValidator)."""

    where: str
    nd_arrays: bool
    io_ranks: dict[str, int]
    ranks: dict[str, int] = field(default_factory=dict)
    blobs: dict[str, list[str]] = field(default_factory=dict)
    producers: dict[str, Message] = field(default_factory=dict)


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
