"""Updatable neural networks: NeuralNetwork/UpdatableNeuralNetworkValidator.cpp
(validateUpdatableNeuralNetwork and validateTrainingInputs), in its order: which layers may be
updatable and their weights, unique names, one loss layer and where its input comes from, the
optimizer and the other update parameters, that only trainable layers stand between an updatable
layer and the loss, and the training inputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from convert.check.rules.common import Message
from convert.check.rules.pipeline import _equivalent_types

UPDATABLE_LAYERS = ("convolution", "innerProduct", "uniDirectionalLSTM")
# NeuralNetworkValidatorGraph.hpp isLayerSupportedForBackprop
BACKPROP = ("convolution", "innerProduct", "uniDirectionalLSTM", "flatten", "pooling", "batchnorm")
BACKPROP_ACTIVATIONS = ("ReLU", "sigmoid", "tanh")


def _check_updatable_network(spec: Message, kind: str, where: str) -> Iterator[str]:
    network = getattr(spec, kind)
    layers = list(network.layers)
    yield from _check_updatable_layers(layers, where)
    yield from _check_names(layers, network.updateParams, where)
    yield from _check_losses(layers, network.updateParams, where)
    yield from _check_optimizer(network.updateParams, where)
    yield from _check_top_level(network.updateParams, where)
    yield from _check_backprop(layers, network.updateParams, where)
    yield from _check_training_inputs(spec, kind, network.updateParams, where)


def _check_updatable_layers(layers: list[Message], where: str) -> Iterator[str]:
    marked = [layer for layer in layers if layer.isUpdatable]
    if not marked:
        yield f"{where}: the model is marked updatable, but none of its layers is"
    for layer in marked:
        kind = layer.WhichOneof("layer")
        if kind not in UPDATABLE_LAYERS:
            yield f"{where}: layer '{layer.name}' ({kind}) cannot be updatable"
            continue
        if kind == "uniDirectionalLSTM":
            continue  # the C++ checks no weights for it
        p = getattr(layer, kind)
        params = [("weights", p.weights)] + ([("bias", p.bias)] if p.hasBias else [])
        for name, weight in params:
            if not weight.isUpdatable:
                yield f"{where}: updatable layer '{layer.name}': its {name} are not marked so"
            if weight.HasField("quantization"):  # on a frozen layer it is fine
                yield f"{where}: updatable layer '{layer.name}': its {name} are quantized"


def _check_names(layers: list[Message], params: Message, where: str) -> Iterator[str]:
    seen: set[str] = set()
    for name in [layer.name for layer in layers] + [loss.name for loss in params.lossLayers]:
        if name in seen:
            yield f"{where}: the updatable model has two layers or losses named '{name}'"
        seen.add(name)


def _producers(layers: list[Message]) -> dict[str, list[Message]]:
    out: dict[str, list[Message]] = {}
    for layer in layers:
        for blob in layer.output:
            out.setdefault(blob, []).append(layer)
    return out


def _check_losses(layers: list[Message], params: Message, where: str) -> Iterator[str]:
    losses = list(params.lossLayers)
    if len(losses) != 1:
        yield f"{where}: an updatable model needs exactly one loss layer, not {len(losses)}"
    producers = _producers(layers)
    for loss in losses:
        kind = loss.WhichOneof("LossLayerType")
        if kind not in ("categoricalCrossEntropyLossLayer", "meanSquaredErrorLossLayer"):
            yield f"{where}: loss '{loss.name}' is neither categorical cross-entropy nor MSE"
            continue
        p = getattr(loss, kind)
        if p.target in producers:
            yield f"{where}: loss '{loss.name}': its target '{p.target}' is made inside the graph"
        if kind == "categoricalCrossEntropyLossLayer":
            if not any(
                layer.WhichOneof("layer") == "softmax" for layer in producers.get(p.input, [])
            ):
                yield (
                    f"{where}: cross-entropy loss '{loss.name}': its input '{p.input}' is not "
                    "the output of a softmax layer"
                )
        elif p.input not in producers:
            yield f"{where}: loss '{loss.name}': its input '{p.input}' is made by no layer"


def _check_double(param: Message, what: str, where: str) -> Iterator[str]:
    """ParameterValidator.cpp validateDoubleParameter: the value within its range, if any."""
    if param.WhichOneof("AllowedValues") == "range":
        low, high = param.range.minValue, param.range.maxValue
        if not low <= param.defaultValue <= high:
            yield f"{where}: {what} {param.defaultValue} is outside its range [{low}, {high}]"


def _check_int(param: Message, what: str, where: str, positive: bool) -> Iterator[str]:
    """ParameterValidator.cpp validateInt64Parameter."""
    value = param.defaultValue
    if positive and value <= 0:
        yield f"{where}: {what} must be positive, not {value}"
    allowed = param.WhichOneof("AllowedValues")
    if allowed == "set" and value not in param.set.values:
        yield f"{where}: {what} {value} is not in its set {list(param.set.values)}"
    elif allowed == "set" and positive and any(v <= 0 for v in param.set.values):
        yield f"{where}: {what}: its set holds a value that is not positive"
    elif allowed == "range":
        low, high = param.range.minValue, param.range.maxValue
        if positive and (low <= 0 or high <= 0):
            yield f"{where}: {what}: its range must be positive"
        if not low <= value <= high:
            yield f"{where}: {what} {value} is outside its range [{low}, {high}]"


def _check_optimizer(params: Message, where: str) -> Iterator[str]:
    kind = params.optimizer.WhichOneof("OptimizerType")
    if kind is None:
        yield f"{where}: an updatable model needs an optimizer (SGD or Adam)"
        return
    p = getattr(params.optimizer, kind)
    name = "SGD" if kind == "sgdOptimizer" else "Adam"
    required = ["learningRate", "miniBatchSize"]
    if kind == "adamOptimizer":
        required += ["beta1", "beta2", "eps"]
    for field in required:
        if not p.HasField(field):
            yield f"{where}: the {name} optimizer needs {field}"
        elif field == "miniBatchSize":
            yield from _check_int(p.miniBatchSize, f"{name} miniBatchSize", where, True)
        else:
            yield from _check_double(getattr(p, field), f"{name} {field}", where)


def _check_top_level(params: Message, where: str) -> Iterator[str]:
    if not params.HasField("epochs"):
        yield f"{where}: an updatable model needs epochs in its update parameters"
    else:
        yield from _check_int(params.epochs, "epochs", where, True)
    if params.HasField("seed"):
        yield from _check_int(params.seed, "seed", where, False)


def _check_backprop(layers: list[Message], params: Message, where: str) -> Iterator[str]:
    """From each loss back to the inputs: once a layer Core ML cannot differentiate has been
    passed, no updatable layer may follow (one flag per loss, as in the C++)."""
    producers = _producers(layers)
    for loss in params.lossLayers:
        kind = loss.WhichOneof("LossLayerType")
        if kind is None:
            continue
        start = getattr(loss, kind).input
        queue = deque(producers.get(start, []))
        seen: set[str] = set()
        blocked = None
        while queue:
            layer = queue.popleft()
            if layer.name in seen:
                continue
            seen.add(layer.name)
            if layer.isUpdatable and blocked is not None:
                yield (
                    f"{where}: layer '{blocked}' cannot be differentiated and stands between "
                    f"updatable layer '{layer.name}' and loss '{loss.name}'"
                )
            final_softmax = layer.WhichOneof("layer") == "softmax" and start in layer.output
            if not final_softmax and not _backprop(layer) and blocked is None:
                blocked = layer.name
            for blob in layer.input:
                queue.extend(producers.get(blob, []))


def _backprop(layer: Message) -> bool:
    kind = layer.WhichOneof("layer")
    if kind == "activation":
        return layer.activation.WhichOneof("NonlinearityType") in BACKPROP_ACTIVATIONS
    return kind in BACKPROP


def _check_training_inputs(spec: Message, kind: str, params: Message, where: str) -> Iterator[str]:
    desc = spec.description
    training = list(desc.trainingInput)
    if len(training) < 2:
        yield f"{where}: an updatable model needs training inputs: an input and the target"
        return
    inputs = list(desc.input)

    def is_input(feature: Message) -> bool:
        return any(
            f.name == feature.name and _equivalent_types(f.type, feature.type) for f in inputs
        )

    if not any(is_input(f) for f in training):
        yield f"{where}: no training input is one of the model's inputs"
    exclusive = [f for f in training if not is_input(f)]
    if not exclusive:
        yield f"{where}: the training inputs hold no target beside the model's inputs"
        return
    target = None
    if params.lossLayers:
        loss = params.lossLayers[0]
        loss_kind = loss.WhichOneof("LossLayerType")
        target = getattr(loss, loss_kind).target if loss_kind else None
    for feature in exclusive:
        if feature.name == target:
            return
        if kind == "neuralNetworkClassifier" and feature.name == desc.predictedFeatureName:
            label = next((f for f in desc.output if f.name == feature.name), None)
            if label is not None and feature.type.WhichOneof("Type") != label.type.WhichOneof(
                "Type"
            ):
                yield f"{where}: training input '{feature.name}' has another type than the label"
            return
    wanted = desc.predictedFeatureName if kind == "neuralNetworkClassifier" else target
    yield f"{where}: the training inputs do not include the target '{wanted}'"
