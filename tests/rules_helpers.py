"""Builders and assertions shared by the tests of convert.check.validate and its rules.

The baseline pipeline classifier [LinkedModel stub, NeuralNetworkClassifier head] must pass
with no violation; each negative test breaks one rule of it and looks for that rule's message.
Import this module only after ``pytest.importorskip("coremltools")``.
"""

from __future__ import annotations

import numpy as np
from coremltools.models import datatypes
from coremltools.models.neural_network import NeuralNetworkBuilder
from coremltools.proto import FeatureTypes_pb2, Model_pb2

ArrayType = FeatureTypes_pb2.ArrayFeatureType
ImageType = FeatureTypes_pb2.ImageFeatureType
N_FEATURES = 4
LABELS = ["cat", "dog", "fox"]


def make_stub(version: int = 4) -> Model_pb2.Model:
    """A LinkedModel stub: image in, FLOAT32 [N_FEATURES] features out."""
    spec = Model_pb2.Model(specificationVersion=version)
    image = spec.description.input.add(name="image")
    image.type.imageType.width = 8
    image.type.imageType.height = 8
    image.type.imageType.colorSpace = ImageType.RGB
    features = spec.description.output.add(name="features")
    features.type.multiArrayType.dataType = ArrayType.FLOAT32
    features.type.multiArrayType.shape.append(N_FEATURES)
    link = spec.linkedModel.linkedModelFile
    link.linkedModelFileName.defaultValue = "Backbone.mlmodelc"
    link.linkedModelSearchPath.defaultValue = ".:$BUNDLE_MAIN"
    return spec


def make_head(version: int = 4) -> Model_pb2.Model:
    """A NeuralNetworkClassifier: features -> dense -> softmax, string labels."""
    builder = NeuralNetworkBuilder(
        [("features", datatypes.Array(N_FEATURES))], [("probs", None)], mode="classifier"
    )
    builder.add_inner_product(
        "dense",
        W=np.ones((len(LABELS), N_FEATURES)),
        b=np.zeros(len(LABELS)),
        input_channels=N_FEATURES,
        output_channels=len(LABELS),
        has_bias=True,
        input_name="features",
        output_name="logits",
    )
    builder.add_softmax("softmax", "logits", "probs")
    builder.set_class_labels(LABELS, predicted_feature_name="classLabel", prediction_blob="probs")
    spec = builder.spec
    spec.specificationVersion = version
    # NeuralNetworkBuilder declares arrays as DOUBLE; the stub gives FLOAT32.
    spec.description.input[0].type.multiArrayType.dataType = ArrayType.FLOAT32
    return spec


def make_backbone() -> Model_pb2.Model:
    """A plain NeuralNetwork with an image input, preprocessing and a convolution."""
    builder = NeuralNetworkBuilder([("image", datatypes.Array(3, 8, 8))], [("features", None)])
    builder.add_convolution(
        "conv",
        kernel_channels=3,
        output_channels=N_FEATURES,
        height=3,
        width=3,
        stride_height=1,
        stride_width=1,
        border_mode="valid",
        groups=1,
        W=np.ones((3, 3, 3, N_FEATURES)),
        b=np.zeros(N_FEATURES),
        has_bias=True,
        input_name="image",
        output_name="conv_out",
    )
    builder.add_pooling(
        "pool",
        height=1,
        width=1,
        stride_height=1,
        stride_width=1,
        layer_type="AVERAGE",
        padding_type="VALID",
        input_name="conv_out",
        output_name="features",
        is_global=True,
    )
    builder.set_pre_processing_parameters(image_input_names=["image"], image_scale=1 / 127.5)
    return builder.spec


def make_pipeline(
    stub: Model_pb2.Model | None = None,
    head: Model_pb2.Model | None = None,
    version: int = 4,
) -> Model_pb2.Model:
    """A PipelineClassifier [stub, head] exposing the head's outputs."""
    stub = stub or make_stub()
    head = head or make_head()
    spec = Model_pb2.Model(specificationVersion=version)
    spec.description.input.add().CopyFrom(stub.description.input[0])
    for output in head.description.output:
        spec.description.output.add().CopyFrom(output)
    spec.description.predictedFeatureName = head.description.predictedFeatureName
    spec.description.predictedProbabilitiesName = head.description.predictedProbabilitiesName
    pipeline = spec.pipelineClassifier.pipeline
    pipeline.models.add().CopyFrom(stub)
    pipeline.models.add().CopyFrom(head)
    pipeline.names.extend(["stub", "head"])
    return spec


def stub_of(spec: Model_pb2.Model) -> Model_pb2.Model:
    return spec.pipelineClassifier.pipeline.models[0]


def head_of(spec: Model_pb2.Model) -> Model_pb2.Model:
    return spec.pipelineClassifier.pipeline.models[1]


def only(violations: list[str]) -> str:
    """The single violation; fails if there are none or several."""
    assert len(violations) == 1, violations
    return violations[0]


def has(violations: list[str], *fragments: str) -> bool:
    return any(all(f in v for f in fragments) for v in violations)
