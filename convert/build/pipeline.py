"""Linked-model stubs and pipelines, and the one-by-one size a classifier would have had."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convert.build.spec import FEATURES, SEARCH_PATH, SPEC_VERSION, network, protos, rename_blob


def make_stub(backbone: Any, backbone_file: str) -> Any:
    """A LinkedModel with the backbone's exact interface, pointing at its compiled form."""
    Model_pb2, _ = protos()
    stub = Model_pb2.Model()
    stub.specificationVersion = SPEC_VERSION
    stub.description.input.extend(backbone.description.input)
    stub.description.output.extend(backbone.description.output)
    link = stub.linkedModel.linkedModelFile
    link.linkedModelFileName.defaultValue = compiled_name(backbone_file)
    link.linkedModelSearchPath.defaultValue = SEARCH_PATH
    return stub


def compiled_name(mlmodel_file: str) -> str:
    """Xcode compiles ``X.mlmodel`` in an app target into ``X.mlmodelc`` in the bundle."""
    return Path(mlmodel_file).stem + ".mlmodelc"


def make_pipeline(stub: Any, head: Any) -> Any:
    """PipelineClassifier [stub, head]: input ``image``; outputs the head's two outputs."""
    Model_pb2, _ = protos()
    spec = Model_pb2.Model()
    spec.specificationVersion = max(
        SPEC_VERSION, stub.specificationVersion, head.specificationVersion
    )
    pipeline = spec.pipelineClassifier.pipeline
    pipeline.models.add().CopyFrom(stub)
    pipeline.models.add().CopyFrom(head)
    pipeline.names.extend(["backbone", "head"])
    spec.description.input.extend(stub.description.input)
    spec.description.output.extend(head.description.output)
    spec.description.predictedFeatureName = head.description.predictedFeatureName
    spec.description.predictedProbabilitiesName = head.description.predictedProbabilitiesName
    return spec


def merge_standalone(backbone: Any, head: Any, *, backbone_layers: bool = True) -> Any:
    """Backbone and head fused into one NeuralNetworkClassifier, as a one-by-one conversion
    would ship it. Used to measure that size without converting from TensorFlow again.

    With ``backbone_layers=False`` the backbone's layers are left out (everything else, the
    renaming of clashing head layers included, is as with them): :func:`standalone_size` then
    gives the full spec's size without copying megabytes of weights for every classifier."""
    Model_pb2, _ = protos()
    spec = Model_pb2.Model()
    spec.specificationVersion = max(backbone.specificationVersion, head.specificationVersion)
    spec.description.input.extend(backbone.description.input)
    spec.description.output.extend(head.description.output)
    spec.description.predictedFeatureName = head.description.predictedFeatureName
    spec.description.predictedProbabilitiesName = head.description.predictedProbabilitiesName
    head = _copy(head)
    bb_nn = backbone.neuralNetwork
    taken = {name for layer in bb_nn.layers for name in [layer.name, *layer.output]}
    for layer in head.neuralNetworkClassifier.layers:
        for name in [*layer.output]:
            if name in taken and name != FEATURES:
                rename_blob(head, name, f"head/{name}")
        if layer.name in taken:
            layer.name = f"head/{layer.name}"
    nn = spec.neuralNetworkClassifier
    if backbone_layers:
        nn.layers.extend(bb_nn.layers)
    nn.layers.extend(head.neuralNetworkClassifier.layers)
    nn.preprocessing.extend(bb_nn.preprocessing)
    nn.arrayInputShapeMapping = bb_nn.arrayInputShapeMapping
    nn.imageInputShapeMapping = bb_nn.imageInputShapeMapping
    nn.stringClassLabels.CopyFrom(head.neuralNetworkClassifier.stringClassLabels)
    nn.labelProbabilityLayerName = head.neuralNetworkClassifier.labelProbabilityLayerName
    return spec


def layers_size(spec: Any) -> int:
    """Bytes a NeuralNetwork's layers take inside it, each with its field tag and length."""
    sizes = [layer.ByteSize() for layer in network(spec).layers]
    return sum(_LAYERS_TAG + _varint_size(n) + n for n in sizes)


def standalone_size(merged: Any, backbone_layer_bytes: int) -> int:
    """The serialised size of ``merged`` (from ``merge_standalone(..., backbone_layers=False)``)
    had the backbone's layers, of :func:`layers_size` ``backbone_layer_bytes``, been put in.

    Protobuf sizes add up: the layers are a repeated field of the NeuralNetworkClassifier, which
    is one length-delimited field of the Model; only that field's length prefix changes."""
    inner = merged.neuralNetworkClassifier.ByteSize()
    total = inner + backbone_layer_bytes
    return merged.ByteSize() - _varint_size(inner) - inner + _varint_size(total) + total


_LAYERS_TAG = 1  # NeuralNetwork*.layers is field 1: one byte of tag


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _copy(spec: Any) -> Any:
    Model_pb2, _ = protos()
    out = Model_pb2.Model()
    out.CopyFrom(spec)
    return out
