"""Updatable heads: a head an app can fine-tune on the user's photos with ``MLUpdateTask``.

Core ML trains only NeuralNetwork layers it can differentiate
(UpdatableNeuralNetworkValidator.cpp): updatable innerProduct (or convolution) layers, then only
innerProduct, convolution, flatten, pooling, batchnorm and ReLU / sigmoid / tanh activations up
to a ``softmax`` (not ``softmaxND``) that feeds a categorical cross-entropy loss. A head is built
from the weights as usual (:func:`convert.build.network.build_head`, float32), then
:func:`make_updatable` rewrites its tail into that form:

- the input of the first updatable layer is reshaped to rank 4, ``[1, C, 1, 1]``, once, before
  any updatable layer (where Core ML allows any layer): a rank-4 innerProduct reads the channel
  axis and writes ``[1, C_out, 1, 1]``, and the softmax layer normalises axis -3, the channels;
- the last ``layers`` innerProduct layers are marked updatable, weights and bias;
- a BatchNormalization between them, which the head in Keras order writes as expandDims,
  batchnorm, squeeze, becomes the batchnorm alone (its blob is rank 4 already);
- the final softmaxND becomes a softmax, and the loss reads its output;
- ``updateParams`` holds the loss, the optimizer, the epochs and the shuffle; the training
  inputs are the features and the true label (the classifier's predicted feature name, a
  String, which Core ML maps to the class index itself).

A layer Core ML cannot train through is a :class:`ConversionError` that names it. Quantized
storage is applied afterwards to the frozen layers only (:func:`frozen`): Core ML refuses
quantized weights on an updatable layer.
"""

from __future__ import annotations

from typing import Any

from convert.build import spec as specs
from convert.errors import ConversionError
from convert.read.manifest import FLOAT32
from convert.read.training import SGD, Training

LOSS = "loss"
# layer kinds Core ML differentiates through (NeuralNetworkValidatorGraph.hpp), as we emit them
BACKPROP = ("innerProduct", "batchnorm", "flatten", "pooling", "convolution")
ACTIVATIONS = ("ReLU", "sigmoid", "tanh")


def updatable_names(spec: Any, training: Training) -> list[str]:
    """The innerProduct layers of a head that :func:`make_updatable` marks, last k of them."""
    nn = specs.network(spec)
    dense = [layer.name for layer in nn.layers if layer.WhichOneof("layer") == "innerProduct"]
    if len(dense) < training.updatable_layers:
        raise ValueError(
            f"{training.updatable_layers} updatable layers asked for, but the head has "
            f"{len(dense)} Dense layer{'s' if len(dense) != 1 else ''}"
        )
    return dense[-training.updatable_layers :]


def frozen(spec: Any, training: Training) -> dict[str, str]:
    """The layer storage that keeps the updatable layers float32 (a Precision's ``layers``)."""
    return {name: FLOAT32 for name in updatable_names(spec, training)}


def make_updatable(spec: Any, training: Training, source: Any = None) -> None:
    """Rewrite a float32 head (a NeuralNetworkClassifier: features in, probabilities and label
    out) in place into an updatable one; ``source`` names the model in an error."""
    problem = training.problem()
    if problem:
        raise ConversionError(source, f"updatable: {problem}")
    if spec.WhichOneof("Type") != "neuralNetworkClassifier":
        raise ConversionError(source, "updatable: only a classifier head can be made updatable")
    nn = spec.neuralNetworkClassifier
    try:
        names = updatable_names(spec, training)
    except ValueError as exc:
        raise ConversionError(source, f"updatable: {exc}") from None
    layers = list(nn.layers)
    first = next(i for i, layer in enumerate(layers) if layer.name == names[0])
    probs = spec.description.predictedProbabilitiesName
    tail = _tail(layers[first:], probs, source)
    reshape = _reshape(layers[first], source)
    del nn.layers[:]
    nn.layers.extend([*layers[:first], reshape, *tail])
    for layer in nn.layers:
        if layer.name in names:
            _mark(layer)
    _update_params(spec, nn, training, probs)
    spec.isUpdatable = True
    spec.specificationVersion = max(spec.specificationVersion, specs.SPEC_VERSION)


def _tail(layers: list[Any], probs: str, source: Any) -> list[Any]:
    """The layers from the first updatable one to the softmax, as Core ML can train them."""
    out: list[Any] = []
    renamed: dict[str, str] = {}  # a dropped layer's output -> the blob that replaces it
    for index, layer in enumerate(layers):
        kind = layer.WhichOneof("layer")
        inputs = [renamed.get(name, name) for name in layer.input]
        last = index == len(layers) - 1
        if kind in ("expandDims", "squeeze") and _around_batchnorm(layers, index):
            renamed[layer.output[0]] = inputs[0]  # the blob is rank 4 already
            continue
        if kind == "softmaxND" and last and layer.output[0] == probs:
            out.append(_softmax(layer, inputs[0]))
            continue
        allowed = kind in BACKPROP or (
            kind == "activation" and layer.activation.WhichOneof("NonlinearityType") in ACTIVATIONS
        )
        if not allowed:
            what = kind if kind != "activation" else layer.activation.WhichOneof("NonlinearityType")
            raise ConversionError(
                source,
                f"updatable: layer '{layer.name}' ({what}) sits between the updatable layers and "
                "the loss; Core ML trains only through Dense, BatchNormalization and "
                "ReLU/sigmoid/tanh up to a final softmax",
            )
        del layer.input[:]
        layer.input.extend(inputs)
        out.append(layer)
    if not out or out[-1].WhichOneof("layer") != "softmax":
        raise ConversionError(
            source, "updatable: the head does not end in a softmax over its classes"
        )
    if any(name in renamed for name in (probs,)):
        raise ConversionError(source, "updatable: the probabilities come from a dropped layer")
    return out


def _around_batchnorm(layers: list[Any], index: int) -> bool:
    """Whether an expandDims / squeeze is the move in or out of a batchnorm in Keras order."""
    kind = layers[index].WhichOneof("layer")
    other = index + 1 if kind == "expandDims" else index - 1
    return 0 <= other < len(layers) and layers[other].WhichOneof("layer") == "batchnorm"


def _reshape(layer: Any, source: Any) -> Any:
    """A reshapeStatic of ``layer``'s input to [1, C, 1, 1], its output the new input."""
    width = layer.innerProduct.inputChannels
    reshape = type(layer)()
    reshape.name = f"{layer.name}/to_rank4"
    reshape.input.append(layer.input[0])
    reshape.output.append(f"{layer.input[0]}/rank4")
    reshape.reshapeStatic.targetShape.extend([1, width, 1, 1])
    layer.input[0] = reshape.output[0]
    if not width:
        raise ConversionError(source, f"updatable: layer '{layer.name}' has no input width")
    return reshape


def _softmax(layer: Any, blob: str) -> Any:
    softmax = type(layer)()
    softmax.name = layer.name
    softmax.input.append(blob)
    softmax.output.extend(layer.output)
    softmax.softmax.SetInParent()
    return softmax


def _mark(layer: Any) -> None:
    p = layer.innerProduct
    if not len(p.weights.floatValue) or (p.hasBias and not len(p.bias.floatValue)):
        raise ValueError(f"layer '{layer.name}': updatable weights must be float32")
    layer.isUpdatable = True
    p.weights.isUpdatable = True
    if p.hasBias:
        p.bias.isUpdatable = True


def _update_params(spec: Any, nn: Any, training: Training, probs: str) -> None:
    """The loss, the optimizer and the training inputs (features and the true label)."""
    params = nn.updateParams
    params.Clear()
    loss = params.lossLayers.add()
    loss.name = LOSS
    loss.categoricalCrossEntropyLossLayer.input = probs
    loss.categoricalCrossEntropyLossLayer.target = f"{probs}_true"
    if training.optimizer == SGD:
        sgd = params.optimizer.sgdOptimizer
        _double(sgd.learningRate, training.learning_rate)
        _int(sgd.miniBatchSize, training.batch_size)
        _double(sgd.momentum, training.momentum)
    else:
        adam = params.optimizer.adamOptimizer
        _double(adam.learningRate, training.learning_rate)
        _int(adam.miniBatchSize, training.batch_size)
        _double(adam.beta1, training.beta1)
        _double(adam.beta2, training.beta2)
        _double(adam.eps, training.eps)
    _int(params.epochs, training.epochs)
    params.shuffle.defaultValue = training.shuffle
    if training.seed is not None:
        params.seed.defaultValue = training.seed
    desc = spec.description
    del desc.trainingInput[:]
    desc.trainingInput.extend(desc.input)
    label = next(f for f in desc.output if f.name == desc.predictedFeatureName)
    desc.trainingInput.add().CopyFrom(label)


def _double(param: Any, value: float) -> None:
    """A DoubleParameter: the value, and a range that lets an app change it in [0, max(1, v)]."""
    param.defaultValue = float(value)
    param.range.minValue = 0.0
    param.range.maxValue = max(1.0, float(value))


def _int(param: Any, value: int) -> None:
    """An Int64Parameter: the value, allowed as the one value of a set."""
    param.defaultValue = int(value)
    del param.set.values[:]
    param.set.values.append(int(value))


def mark_pipeline(pipeline: Any) -> None:
    """Mark a PipelineClassifier whose last model is an updatable head as updatable: training
    inputs are the pipeline's inputs and the true label."""
    inner = pipeline.pipelineClassifier.pipeline
    head = inner.models[-1]
    if not head.isUpdatable:
        raise ValueError("the pipeline's last model is not updatable")
    pipeline.isUpdatable = True
    desc = pipeline.description
    del desc.trainingInput[:]
    desc.trainingInput.extend(desc.input)
    label = next(f for f in desc.output if f.name == desc.predictedFeatureName)
    desc.trainingInput.add().CopyFrom(label)
    pipeline.specificationVersion = max(pipeline.specificationVersion, head.specificationVersion)
