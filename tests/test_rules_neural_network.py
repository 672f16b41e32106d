"""Tests for convert.check.rules.neural_network (NeuralNetworkValidator.cpp)."""

from __future__ import annotations

import pytest

pytest.importorskip("numpy")
pytest.importorskip("coremltools")

from rules_helpers import has, make_backbone, make_head, only  # noqa: E402

from convert.check.validate import validate_spec  # noqa: E402

# --------------------------------------------------------------------------------------------
# Neural networks (NeuralNetworkValidator.cpp)


def test_blob_never_produced() -> None:
    head = make_head()
    head.neuralNetworkClassifier.layers[1].input[0] = "logitz"
    message = only(validate_spec(head, "head"))
    assert message == (
        "head: layer 'softmax' (softmax): input 'logitz' is not a model input or an earlier "
        "layer's output"
    )


def test_layer_order_matters() -> None:
    head = make_head()
    layers = head.neuralNetworkClassifier.layers
    first, second = layers[0].__deepcopy__(), layers[1].__deepcopy__()
    layers[0].CopyFrom(second)
    layers[1].CopyFrom(first)
    assert "input 'logits' is not a model input" in only(validate_spec(head, "head"))


def test_blob_produced_twice() -> None:
    head = make_head()
    head.neuralNetworkClassifier.layers[1].output[0] = "logits"
    violations = validate_spec(head, "head")
    assert has(violations, "output 'logits' is already produced by layer 'dense'")


def test_duplicate_layer_names() -> None:
    head = make_head()
    head.neuralNetworkClassifier.layers[1].name = "dense"
    assert "layer name 'dense' is used by more than one layer" in only(validate_spec(head, "head"))


def test_model_output_not_produced() -> None:
    backbone = make_backbone()
    backbone.description.output[0].name = "embedding"
    message = only(validate_spec(backbone, "backbone"))
    assert message == "backbone: output 'embedding' is not produced by any layer of the network"


def test_network_without_layers() -> None:
    backbone = make_backbone()
    del backbone.neuralNetwork.layers[:]
    violations = validate_spec(backbone, "backbone")
    assert has(violations, "needs at least one layer")


def test_plain_network_outputs_must_be_arrays_or_images() -> None:
    backbone = make_backbone()
    backbone.description.output[0].type.stringType.SetInParent()
    violations = validate_spec(backbone, "backbone")
    assert has(violations, "output 'features' is String; neural network outputs must be")


def test_preprocessing_refers_to_image_input() -> None:
    backbone = make_backbone()
    backbone.neuralNetwork.preprocessing[0].featureName = "photo"
    message = only(validate_spec(backbone, "backbone"))
    assert message == (
        "backbone: preprocessing[0] refers to 'photo', which is not an input of the model"
    )


def test_rank5_mapping_with_new_layers() -> None:
    head = make_head()
    layer = head.neuralNetworkClassifier.layers[1]
    layer.softmaxND.axis = -1  # an iOS 13 layer type, with a multiArray input
    message = only(validate_spec(head, "head"))
    assert "RANK5_ARRAY_MAPPING but layer 'softmax' needs specification 4 or later" in message
    head.neuralNetworkClassifier.arrayInputShapeMapping = 1  # EXACT_ARRAY_MAPPING
    assert validate_spec(head, "head") == []


def test_rank5_mapping_input_rank() -> None:
    head = make_head()
    head.description.input[0].type.multiArrayType.shape.insert(0, 1)
    message = only(validate_spec(head, "head"))
    assert "must have 1 (vector) or 3 (image-like) dimensions" in message


def test_mean_image_size() -> None:
    backbone = make_backbone()
    entry = backbone.neuralNetwork.preprocessing[0]
    entry.meanImage.meanImage.extend([0.0] * 5)
    message = only(validate_spec(backbone, "backbone"))
    assert "preprocessing[0] has a mean image of 5 values; expected 3x8x8 = 192" in message


# --------------------------------------------------------------------------------------------
# Classifier networks (NeuralNetworkValidator.cpp)


def test_label_probability_layer_must_exist() -> None:
    head = make_head()
    head.neuralNetworkClassifier.labelProbabilityLayerName = "scores"
    message = only(validate_spec(head, "head"))
    assert "labelProbabilityLayerName 'scores' is not an output of any layer" in message


def test_class_count_matches_dense_layer() -> None:
    head = make_head()
    head.neuralNetworkClassifier.stringClassLabels.vector.append("owl")
    message = only(validate_spec(head, "head"))
    assert "4 class labels but layer 'dense' produces 3 values for 'probs'" in message
