"""Neural networks: NeuralNetwork/NeuralNetworkValidator.cpp (validateNeuralNetworkTopLevel,
the validate<MLModelType_neuralNetwork*> specialisations and the layer walk of
NeuralNetworkSpecValidator::validateNeuralNetwork): input and output types, shape mapping,
blob topology, classifier outputs and preprocessing. Each layer's own rules are in
:mod:`convert.check.rules.nn_layers`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from convert.check.rules.classifier import (
    _check_class_labels,
    _check_classifier_outputs,
    _class_labels,
)
from convert.check.rules.common import GRAYSCALE, GRAYSCALE_FLOAT16, Message, describe_type
from convert.check.rules.nn_layers import _check_layer, _Net
from convert.check.rules.updatable import _check_updatable_network
from convert.check.rules.versions import _is_ios12_layer


def _check_neural_network(spec: Message, kind: str, where: str) -> Iterator[str]:
    network = getattr(spec, kind)
    desc = spec.description
    if kind == "neuralNetwork":
        yield from _check_io_types(desc.output, "output", where)
    elif kind == "neuralNetworkClassifier":
        yield from _check_class_labels(network, where)
        yield from _check_classifier_outputs(desc, _class_labels(network)[0], where)
    elif not desc.predictedFeatureName:
        yield f"{where}: regressor has no predictedFeatureName"
    nd_arrays = yield from _check_shape_mapping(desc, network, where)
    if not network.layers:
        yield f"{where}: a neural network needs at least one layer"
    yield from _check_io_types(desc.input, "input", where)
    yield from _check_array_input_ranks(desc, nd_arrays, where)
    net = _Net(where, nd_arrays, _io_ranks(desc, network) if nd_arrays else {})
    inputs = {f.name for f in desc.input}
    for name in inputs:
        net.blobs[name] = ["__input"]
    yield from _walk_layers(network.layers, net)
    produced = {b for b, by in net.blobs.items() if b not in inputs or len(by) > 1}
    yield from _check_network_outputs(spec, kind, produced, where)
    yield from _check_preprocessing(desc, network, where)
    if kind == "neuralNetworkClassifier":
        yield from _check_probability_layer(network, produced, net, where)
    if spec.isUpdatable:
        yield from _check_updatable_network(spec, kind, where)


def _check_io_types(features: Iterable[Message], role: str, where: str) -> Iterator[str]:
    """NeuralNetworkValidatorUtils.hpp validateInputOutputTypes."""
    for feature in features:
        kind = feature.type.WhichOneof("Type")
        if kind not in ("imageType", "multiArrayType", "stateType"):
            yield (
                f"{where}: {role} '{feature.name}' is {describe_type(feature.type)}; neural "
                f"network {role}s must be images, multiArrays or states"
            )


def _check_shape_mapping(desc: Message, network: Message, where: str) -> Iterator[str]:
    """Decide whether tensors are N-d (ndArrayInterpretation); returns that flag."""
    has_array_input = any(f.type.WhichOneof("Type") == "multiArrayType" for f in desc.input)
    new_array_mapping = network.arrayInputShapeMapping != 0
    new_image_mapping = network.imageInputShapeMapping != 0
    late_layers = [
        layer.name
        for layer in network.layers
        if not _is_ios12_layer(layer, layer.WhichOneof("layer"))
    ]
    if late_layers and not new_array_mapping and has_array_input:
        yield (
            f"{where}: arrayInputShapeMapping is RANK5_ARRAY_MAPPING but layer '{late_layers[0]}' "
            "needs specification 4 or later; use EXACT_ARRAY_MAPPING"
        )
    if not new_array_mapping and new_image_mapping and has_array_input:
        yield (
            f"{where}: arrayInputShapeMapping cannot be RANK5_ARRAY_MAPPING when "
            "imageInputShapeMapping is not RANK5_IMAGE_MAPPING"
        )
    return bool(late_layers) or new_array_mapping or new_image_mapping


def _check_array_input_ranks(desc: Message, nd_arrays: bool, where: str) -> Iterator[str]:
    for feature in desc.input:
        if feature.type.WhichOneof("Type") != "multiArrayType":
            continue
        arr = feature.type.multiArrayType
        label = f"{where}: input '{feature.name}'"
        if nd_arrays:
            if not arr.shape:
                yield f"{label} needs at least one dimension in its shape"
            elif arr.WhichOneof("ShapeFlexibility") == "shapeRange" and len(
                arr.shapeRange.sizeRanges
            ) != len(arr.shape):
                yield f"{label} has a shape range whose rank differs from its default shape"
        elif not _rank5_input_ok(arr):
            yield (
                f"{label} must have 1 (vector) or 3 (image-like) dimensions under "
                "RANK5_ARRAY_MAPPING"
            )


def _rank5_input_ok(arr: Message) -> bool:
    rank = len(arr.shape)
    if rank and rank not in (1, 3):
        return False
    flex = arr.WhichOneof("ShapeFlexibility")
    if flex == "enumeratedShapes":
        flex_ok = all(len(s.shape) in (1, 3) for s in arr.enumeratedShapes.shapes)
    elif flex == "shapeRange":
        flex_ok = len(arr.shapeRange.sizeRanges) in (1, 3)
    else:
        flex_ok = False
    return bool(rank) or flex_ok


def _io_ranks(desc: Message, network: Message) -> dict[str, int]:
    ranks: dict[str, int] = {}
    for feature in desc.input:
        kind = feature.type.WhichOneof("Type")
        if kind == "multiArrayType":
            rank5 = network.arrayInputShapeMapping == 0
            ranks[feature.name] = 5 if rank5 else len(feature.type.multiArrayType.shape)
        elif kind == "imageType":
            ranks[feature.name] = 5 if network.imageInputShapeMapping == 0 else 4
    for feature in desc.output:
        shape = feature.type.multiArrayType.shape
        if feature.type.WhichOneof("Type") == "multiArrayType" and shape:
            ranks[feature.name] = len(shape)
    return ranks


def _check_network_outputs(
    spec: Message, kind: str, produced: set[str], where: str
) -> Iterator[str]:
    desc = spec.description
    extra = {desc.predictedFeatureName, desc.predictedProbabilitiesName} - {""}
    for output in desc.output:
        if output.name in produced:
            continue
        if kind == "neuralNetworkClassifier" and output.name in extra:
            continue
        yield f"{where}: output '{output.name}' is not produced by any layer of the network"


def _check_probability_layer(
    network: Message, produced: set[str], net: _Net, where: str
) -> Iterator[str]:
    blob = network.labelProbabilityLayerName
    if blob and blob not in produced:
        yield (
            f"{where}: labelProbabilityLayerName '{blob}' is not an output of any layer of the "
            "network"
        )
        return
    # Project rule: one probability per class. Follow the blob back through element-wise
    # layers to a dense layer and compare its width with the number of labels.
    labels = _class_labels(network)[1]
    width = _dense_width(blob, net) if blob and labels else None
    if width is not None and width[0] != len(labels):
        yield (
            f"{where}: the classifier has {len(labels)} class labels but layer '{width[1]}' "
            f"produces {width[0]} values for '{blob}'"
        )


_SHAPE_KEEPING = frozenset(["softmax", "softmaxND", "activation", "copy", "unary", "clip"])


def _dense_width(blob: str, net: _Net) -> tuple[int, str] | None:
    seen: set[str] = set()
    while blob in net.producers and blob not in seen:
        seen.add(blob)
        layer = net.producers[blob]
        kind = layer.WhichOneof("layer")
        if kind == "innerProduct":
            return layer.innerProduct.outputChannels, layer.name
        if kind == "batchedMatmul" and len(layer.input) == 1:
            return layer.batchedMatmul.weightMatrixSecondDimension, layer.name
        if kind not in _SHAPE_KEEPING or not layer.input:
            return None
        blob = layer.input[0]
    return None


def _check_preprocessing(desc: Message, network: Message, where: str) -> Iterator[str]:
    """Project rule: each preprocessing entry applies to one declared image input."""
    images = {
        f.name: f.type.imageType for f in desc.input if f.type.WhichOneof("Type") == "imageType"
    }
    inputs = {f.name for f in desc.input}
    seen: set[str] = set()
    for index, entry in enumerate(network.preprocessing):
        label = f"{where}: preprocessing[{index}]"
        name = entry.featureName
        if not name:
            yield f"{label} has an empty featureName"
        elif name not in inputs:
            yield f"{label} refers to '{name}', which is not an input of the model"
        elif name not in images:
            yield f"{label} refers to '{name}', which is not an image input"
        elif name in seen:
            yield f"{label} is a second preprocessing entry for input '{name}'"
        else:
            yield from _check_mean_image(entry, images[name], label)
        seen.add(name)


def _check_mean_image(entry: Message, img: Message, label: str) -> Iterator[str]:
    if entry.WhichOneof("preprocessor") != "meanImage" or img.WhichOneof("SizeFlexibility"):
        return
    channels = 1 if img.colorSpace in (GRAYSCALE, GRAYSCALE_FLOAT16) else 3
    expected = channels * img.width * img.height
    actual = len(entry.meanImage.meanImage)
    if actual != expected:
        shape = f"{channels}x{img.height}x{img.width}"
        yield f"{label} has a mean image of {actual} values; expected {shape} = {expected}"


# ---- the layer walk: NeuralNetworkSpecValidator::validateNeuralNetwork


def _walk_layers(layers: Iterable[Message], net: _Net) -> Iterator[str]:
    names: set[str] = set()
    for layer in layers:
        kind = layer.WhichOneof("layer")
        label = f"{net.where}: layer '{layer.name}' ({kind or 'no type'})"
        if not layer.name:
            yield f"{net.where}: a layer of type {kind or 'none'} has an empty name"
        elif layer.name in names:
            yield f"{net.where}: layer name '{layer.name}' is used by more than one layer"
        names.add(layer.name)
        if net.nd_arrays:
            yield from _check_tensors(layer, "input", net, label)
            yield from _check_tensors(layer, "output", net, label)
        yield from _check_layer(layer, kind, net, label)
        yield from _check_layer_topology(layer, kind, net, label)


def _check_layer_topology(layer: Message, kind: str | None, net: _Net, label: str) -> Iterator[str]:
    for blob in layer.input:
        if blob not in net.blobs:
            yield f"{label}: input '{blob}' is not a model input or an earlier layer's output"
    for blob in layer.output:
        earlier = net.blobs.get(blob)
        if earlier and kind != "copy":
            by = "the model input" if earlier[0] == "__input" else f"layer '{earlier[0]}'"
            yield f"{label}: output '{blob}' is already produced by {by}"
        net.blobs.setdefault(blob, []).append(layer.name)
        net.producers.setdefault(blob, layer)
    for nested in _nested_outputs(layer, kind):
        net.blobs.setdefault(nested, []).append(layer.name)


def _nested_outputs(layer: Message, kind: str | None) -> Iterator[str]:
    """Blobs made inside branch/loop bodies join the outer scope (not validated further)."""
    bodies: list[Message] = []
    if kind == "branch":
        bodies = [layer.branch.ifBranch, layer.branch.elseBranch]
    elif kind == "loop":
        bodies = [layer.loop.conditionNetwork, layer.loop.bodyNetwork]
    for body in bodies:
        for inner in body.layers:
            yield from inner.output
            yield from _nested_outputs(inner, inner.WhichOneof("layer"))


def _check_tensors(layer: Message, role: str, net: _Net, label: str) -> Iterator[str]:
    blobs = layer.input if role == "input" else layer.output
    tensors = layer.inputTensor if role == "input" else layer.outputTensor
    if not tensors:
        return
    if len(tensors) != len(blobs):
        yield f"{label}: has {len(blobs)} {role}s but {len(tensors)} {role}Tensor entries"
        return
    for blob, tensor in zip(blobs, tensors, strict=True):
        rank = tensor.rank
        dims = len(tensor.dimValue)
        if dims and rank != dims:
            yield f"{label}: {role}Tensor for '{blob}' has rank {rank} but {dims} dims"
        if tensor.dimValue and rank < 1:
            yield f"{label}: {role}Tensor for '{blob}' must have a positive rank"
        if blob in net.io_ranks and net.io_ranks[blob] != rank:
            yield (
                f"{label}: {role}Tensor gives '{blob}' rank {rank} but the model description "
                f"implies rank {net.io_ranks[blob]}"
            )
        if net.ranks.setdefault(blob, rank) != rank:
            yield f"{label}: inconsistent rank for blob '{blob}'"
