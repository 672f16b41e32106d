"""Tests for convert.check.validate: Core ML's validation rules, checked on Linux.

Every spec here is built by hand (NeuralNetworkBuilder or raw Model_pb2). The baseline
pipeline classifier [LinkedModel stub, NeuralNetworkClassifier head] must pass with no
violation; each negative test breaks one rule of it and looks for that rule's message.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("coremltools")

from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402
from coremltools.proto import FeatureTypes_pb2, Model_pb2, NeuralNetwork_pb2  # noqa: E402

from convert.check.validate import (  # noqa: E402
    SpecInvalid,
    check_file,
    describe_type,
    validate_file,
    validate_spec,
)

ArrayType = FeatureTypes_pb2.ArrayFeatureType
ImageType = FeatureTypes_pb2.ImageFeatureType
N_FEATURES = 4
LABELS = ["cat", "dog", "fox"]


# --------------------------------------------------------------------------------------------
# Builders


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


# --------------------------------------------------------------------------------------------
# Valid models


def test_valid_pipeline_classifier_has_no_violations() -> None:
    assert validate_spec(make_pipeline(), "pipeline") == []


def test_valid_parts_have_no_violations() -> None:
    assert validate_spec(make_stub(), "stub") == []
    assert validate_spec(make_head(), "head") == []
    assert validate_spec(make_backbone(), "backbone") == []


def test_valid_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "Cats.mlmodel"
    path.write_bytes(make_pipeline().SerializeToString())
    assert validate_file(path) == []
    check_file(path)  # does not raise


def test_real_converter_output_is_valid() -> None:
    """No false positives on what ct.convert writes for a backbone and a classifier head."""
    ct = pytest.importorskip("coremltools")
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")

    def convert(model: object, shape: tuple[int, ...], name: str, **kwargs: object) -> object:
        fn = tf.function(lambda x: model(x, training=False))
        concrete = fn.get_concrete_function(tf.TensorSpec(shape, tf.float32, name=name))
        return ct.convert(
            [concrete],
            source="tensorflow",
            convert_to="neuralnetwork",
            minimum_deployment_target=ct.target.iOS13,
            **kwargs,
        ).get_spec()

    image = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(image)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    backbone = convert(
        keras.Model(image, x),
        (1, 16, 16, 3),
        "image",
        inputs=[ct.ImageType(name="image", shape=(1, 16, 16, 3), scale=1 / 127.5, bias=[-1] * 3)],
    )
    features = keras.Input((8,))
    y = keras.layers.Dense(5, activation="relu")(features)
    y = keras.layers.Dense(len(LABELS), activation="softmax")(y)
    head = convert(
        keras.Model(features, y),
        (1, 8),
        "features",
        inputs=[ct.TensorType(name="features", shape=(1, 8))],
        classifier_config=ct.ClassifierConfig(LABELS),
    )
    assert validate_spec(backbone, "backbone") == []
    assert validate_spec(head, "head") == []


# --------------------------------------------------------------------------------------------
# Pipelines (PipelineValidator.cpp)


def test_float32_vs_double_between_stub_and_head() -> None:
    head = make_head()
    head.description.input[0].type.multiArrayType.dataType = ArrayType.DOUBLE
    message = only(validate_spec(make_pipeline(head=head), "pipeline"))
    assert message.startswith("pipeline.models[1] (head): input 'features' type differs")
    assert "MultiArray<DOUBLE>[4]" in message and "MultiArray<FLOAT32>[4]" in message


def test_shape_mismatch_between_stub_and_head() -> None:
    stub = make_stub()
    stub.description.output[0].type.multiArrayType.shape[0] = N_FEATURES + 1
    message = only(validate_spec(make_pipeline(stub=stub), "pipeline"))
    assert "input 'features' type differs from producer" in message


def test_stub_output_without_shape_does_not_match_head() -> None:
    stub = make_stub()
    del stub.description.output[0].type.multiArrayType.shape[:]
    message = only(validate_spec(make_pipeline(stub=stub), "pipeline"))
    assert "type differs" in message and "(no shape)" in message


def test_head_input_without_shape() -> None:
    head = make_head()
    del head.description.input[0].type.multiArrayType.shape[:]
    violations = validate_spec(make_pipeline(head=head), "pipeline")
    assert has(violations, "models[1] (head): input 'features'", "without shape constraints")
    assert has(violations, "type differs")


def test_optional_and_flexible_follow_core_ml_comparison() -> None:
    """Core ML ignores isOptional, and compares only the rank once a shape is flexible."""
    head = make_head()
    head.description.input[0].type.isOptional = True
    head.description.input.add().CopyFrom(make_head().description.input[0])  # keep one required
    head.description.input[1].name = "spare"
    stub = make_stub()
    stub.description.output.add().CopyFrom(stub.description.output[0])
    stub.description.output[1].name = "spare"
    ranges = stub.description.output[0].type.multiArrayType.shapeRange.sizeRanges
    ranges.add(lowerBound=1, upperBound=-1)
    spec = make_pipeline(stub=stub, head=head)
    assert validate_spec(spec, "pipeline") == []
    strict = validate_spec(spec, "pipeline", strict_types=True)
    assert has(strict, "input 'features' type differs", "range[1..inf]")


def test_undeclared_input() -> None:
    head = make_head()
    extra = head.description.input.add()
    extra.CopyFrom(head.description.input[0])
    extra.name = "mask"
    message = only(validate_spec(make_pipeline(head=head), "pipeline"))
    assert message == (
        "pipeline.models[1] (head): input 'mask' is neither a pipeline input nor an output "
        "of an earlier model"
    )


def test_pipeline_output_not_produced() -> None:
    spec = make_pipeline()
    spec.description.output.add().CopyFrom(spec.description.output[0])
    spec.description.output[-1].name = "extra"
    assert "pipeline output 'extra' is produced neither" in only(validate_spec(spec, "pipeline"))


def test_pipeline_output_type_differs() -> None:
    spec = make_pipeline()
    probs = next(o for o in spec.description.output if o.name == "probs")
    probs.type.multiArrayType.dataType = ArrayType.DOUBLE
    message = only(validate_spec(spec, "pipeline"))
    assert message.startswith("pipeline: pipeline output 'probs' type differs")


def test_pipeline_spec_version_lower_than_sub_model() -> None:
    message = only(validate_spec(make_pipeline(version=3), "pipeline"))
    assert "specificationVersion 3 is lower than models[0] (stub)'s 4" in message


def test_duplicate_pipeline_names() -> None:
    spec = make_pipeline()
    spec.pipelineClassifier.pipeline.names[1] = "stub"
    message = only(validate_spec(spec, "pipeline"))
    assert "pipeline model name 'stub' at index 1 is already used" in message


def test_pipeline_names_count() -> None:
    spec = make_pipeline()
    spec.pipelineClassifier.pipeline.names.append("extra")
    assert "3 model names for 2 models" in only(validate_spec(spec, "pipeline"))


def test_empty_pipeline() -> None:
    spec = make_pipeline()
    del spec.pipelineClassifier.pipeline.models[:]
    del spec.pipelineClassifier.pipeline.names[:]
    violations = validate_spec(spec, "pipeline")
    assert has(violations, "must contain one or more models")


def test_updatable_model_in_non_updatable_pipeline() -> None:
    spec = make_pipeline()
    head_of(spec).isUpdatable = True
    violations = validate_spec(spec, "pipeline")
    assert has(violations, "models[1] is updatable inside a pipeline that is not")


def test_updatable_pipeline_needs_updatable_last_model() -> None:
    spec = make_pipeline()
    spec.isUpdatable = True
    violations = validate_spec(spec, "pipeline")
    assert has(violations, "last model of an updatable pipeline must be marked updatable")


def test_pipeline_classifier_needs_predicted_feature_name() -> None:
    spec = make_pipeline()
    spec.description.predictedFeatureName = ""
    assert "classifier has no predictedFeatureName" in only(validate_spec(spec, "pipeline"))


def test_pipeline_classifier_predicted_feature_type() -> None:
    spec = make_pipeline()
    spec.description.predictedFeatureName = "probs"
    message = only(validate_spec(spec, "pipeline"))
    assert "predicted label output 'probs' is Dictionary<String, ...>" in message


# --------------------------------------------------------------------------------------------
# Linked models (LinkedModelValidator.cpp) and spec versions


def test_empty_linked_model_file_name() -> None:
    stub = make_stub()
    stub.linkedModel.linkedModelFile.linkedModelFileName.defaultValue = ""
    message = only(validate_spec(make_pipeline(stub=stub), "pipeline"))
    assert message.startswith("pipeline.models[0] (stub): LinkedModel")
    assert "linkedModelFileName.defaultValue is empty" in message


def test_linked_model_names_a_compiled_model() -> None:
    stub = make_stub()
    stub.linkedModel.linkedModelFile.linkedModelFileName.defaultValue = "Backbone.mlmodel"
    assert "expected a name ending in .mlmodelc" in only(validate_spec(stub, "stub"))


def test_linked_model_link_type_not_set() -> None:
    stub = make_stub()
    stub.linkedModel.Clear()
    assert "link type is not set" in only(validate_spec(stub, "stub"))


def test_linked_model_cannot_be_updatable() -> None:
    stub = make_stub()
    stub.isUpdatable = True
    assert "a LinkedModel cannot be marked updatable" in only(validate_spec(stub, "stub"))


def test_linked_model_needs_spec_version_4() -> None:
    message = only(validate_spec(make_stub(version=3), "stub"))
    assert "specificationVersion 3 is too low" in message and ">= 4" in message


def test_missing_and_too_new_spec_version() -> None:
    assert "missing or not positive" in only(validate_spec(make_stub(version=0), "stub"))
    assert "is newer than any Core ML release" in only(validate_spec(make_stub(11), "stub"))


def test_linked_model_inputs_cannot_be_optional() -> None:
    stub = make_stub()
    stub.description.input[0].type.isOptional = True
    assert "is optional; this model type forbids it" in only(validate_spec(stub, "stub"))


def test_outputs_cannot_be_optional() -> None:
    stub = make_stub()
    stub.description.output[0].type.isOptional = True
    assert "outputs cannot be optional" in only(validate_spec(stub, "stub"))


# --------------------------------------------------------------------------------------------
# Feature descriptions (InterfaceValidators.cpp)


def _broken_stub(change: Callable[[Model_pb2.Model], None]) -> list[str]:
    stub = make_stub()
    change(stub)
    return validate_spec(stub, "stub")


def test_feature_description_rules() -> None:
    def no_name(s: Model_pb2.Model) -> None:
        s.description.input[0].name = ""

    def no_type(s: Model_pb2.Model) -> None:
        s.description.output[0].ClearField("type")

    def no_dtype(s: Model_pb2.Model) -> None:
        s.description.output[0].type.multiArrayType.dataType = ArrayType.INVALID_ARRAY_DATA_TYPE

    def no_width(s: Model_pb2.Model) -> None:
        s.description.input[0].type.imageType.width = 0

    def no_color(s: Model_pb2.Model) -> None:
        s.description.input[0].type.imageType.colorSpace = ImageType.INVALID_COLOR_SPACE

    def float16_too_early(s: Model_pb2.Model) -> None:
        s.description.output[0].type.multiArrayType.dataType = ArrayType.FLOAT16

    def duplicate_output(s: Model_pb2.Model) -> None:
        s.description.output.add().CopyFrom(s.description.output[0])

    def no_outputs(s: Model_pb2.Model) -> None:
        del s.description.output[:]

    def dict_without_key(s: Model_pb2.Model) -> None:
        s.description.output[0].type.dictionaryType.SetInParent()

    def empty_enumerated_sizes(s: Model_pb2.Model) -> None:
        s.description.input[0].type.imageType.enumeratedSizes.SetInParent()

    def no_enumerated_shapes(s: Model_pb2.Model) -> None:
        s.description.output[0].type.multiArrayType.enumeratedShapes.SetInParent()

    def empty_shape_range(s: Model_pb2.Model) -> None:
        ranges = s.description.output[0].type.multiArrayType.shapeRange.sizeRanges
        ranges.add(lowerBound=5, upperBound=2)

    def default_outside_range(s: Model_pb2.Model) -> None:
        ranges = s.description.output[0].type.multiArrayType.shapeRange.sizeRanges
        ranges.add(lowerBound=5, upperBound=9)

    def wrong_default_value(s: Model_pb2.Model) -> None:
        s.description.output[0].type.multiArrayType.doubleDefaultValue = 0.5

    def empty_width_range(s: Model_pb2.Model) -> None:
        size_range = s.description.input[0].type.imageType.imageSizeRange
        size_range.widthRange.lowerBound = 10
        size_range.widthRange.upperBound = 5
        size_range.heightRange.lowerBound = 1

    def untyped_sequence(s: Model_pb2.Model) -> None:
        s.description.output[0].type.sequenceType.SetInParent()

    def state_output(s: Model_pb2.Model) -> None:
        s.description.output[0].type.stateType.arrayType.shape.append(2)

    def float32_state(s: Model_pb2.Model) -> None:
        state = s.description.state.add(name="memory")
        state.type.stateType.arrayType.shape.append(2)
        state.type.stateType.arrayType.dataType = ArrayType.FLOAT32

    cases = {
        float32_state: "state 'memory' is a State whose dataType is not FLOAT16",
        no_enumerated_shapes: "enumerates zero allowed shapes",
        empty_shape_range: "invalid range for dimension 0: size range 5..2 is empty",
        default_outside_range: "default shape [4] outside its shape range",
        wrong_default_value: "default value of a type that does not match its dataType",
        empty_width_range: "invalid flexible width range",
        untyped_sequence: "sequence without an element type",
        state_output: "is a State feature; states may only be declared as states",
        no_name: "an input has an empty name",
        no_type: "output 'features' has no type",
        no_dtype: "has no valid multiArray dataType",
        no_width: "missing or non-positive width 0",
        no_color: "missing or invalid colorSpace",
        float16_too_early: "is FLOAT16, which needs specificationVersion >= 7",
        duplicate_output: "output name 'features' is declared more than once",
        no_outputs: "the model has no outputs",
        dict_without_key: "dictionary without a key type",
        empty_enumerated_sizes: "enumerates zero allowed image sizes",
    }
    for change, expected in cases.items():
        violations = _broken_stub(change)
        assert has(violations, expected), (change.__name__, violations)


def test_updatable_needs_spec_version_4() -> None:
    head = make_head(version=3)
    head.isUpdatable = True
    violations = validate_spec(head, "head")
    assert has(violations, "an updatable model needs specificationVersion >= 4")


def test_only_some_model_types_can_be_updatable() -> None:
    spec = Model_pb2.Model(specificationVersion=4, isUpdatable=True)
    spec.description.CopyFrom(make_stub().description)
    spec.identity.SetInParent()
    assert "model type 'identity' cannot be marked updatable" in only(validate_spec(spec, "m"))


# --------------------------------------------------------------------------------------------
# Neural networks (NeuralNetworkValidator.cpp, NeuralNetworkLayerValidator.cpp)


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


def test_layer_type_not_set() -> None:
    backbone = make_backbone()
    backbone.neuralNetwork.layers.add(name="empty", input=["features"], output=["more"])
    assert "layer 'empty' (no type): the layer type is not set" in only(
        validate_spec(backbone, "backbone")
    )


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


def test_inner_product_weight_count() -> None:
    head = make_head()
    head.neuralNetworkClassifier.layers[0].innerProduct.weights.floatValue.append(0.5)
    message = only(validate_spec(head, "head"))
    assert "layer 'dense' (innerProduct): weights (3 x 4) has 13 float32 values, expected 12" in (
        message
    )


def test_inner_product_float16_weight_count() -> None:
    head = make_head()
    weights = head.neuralNetworkClassifier.layers[0].innerProduct.weights
    del weights.floatValue[:]
    weights.float16Value = np.ones(11, dtype=np.float16).tobytes()
    head.neuralNetworkClassifier.layers[0].innerProduct.bias.float16Value = np.zeros(
        3, dtype=np.float16
    ).tobytes()
    del head.neuralNetworkClassifier.layers[0].innerProduct.bias.floatValue[:]
    assert "has 11 float16 values, expected 12" in only(validate_spec(head, "head"))


def test_float16_weights_need_spec_version_2() -> None:
    head = make_head(version=1)
    dense = head.neuralNetworkClassifier.layers[0].innerProduct
    for weights, count in ((dense.weights, 12), (dense.bias, 3)):
        del weights.floatValue[:]
        weights.float16Value = np.ones(count, dtype=np.float16).tobytes()
    message = only(validate_spec(head, "head"))
    assert message == (
        "head: specificationVersion 1 is too low: float16 weights in layer 'dense' "
        "(innerProduct) needs specificationVersion >= 2"
    )


def test_inner_product_quantized_weight_bytes() -> None:
    head = make_head()
    weights = head.neuralNetworkClassifier.layers[0].innerProduct.weights
    del weights.floatValue[:]
    weights.rawValue = bytes(11)
    weights.quantization.numberOfBits = 8
    weights.quantization.linearQuantization.scale.append(1.0)
    assert "quantized weights (3 x 4) has 11 bytes, needs 12" in only(validate_spec(head, "head"))
    weights.rawValue = bytes(12)
    weights.quantization.linearQuantization.scale.extend([1.0, 1.0, 1.0])
    assert "4 linear quantization scales (expected 1 or 3)" in only(validate_spec(head, "head"))


def test_inner_product_mixed_precision_and_bias() -> None:
    head = make_head()
    dense = head.neuralNetworkClassifier.layers[0].innerProduct
    dense.weights.float16Value = bytes(24)
    assert "fill more than one storage field" in only(validate_spec(head, "head"))
    head = make_head()
    dense = head.neuralNetworkClassifier.layers[0].innerProduct
    dense.bias.floatValue.pop()
    assert "bias has 2 float32 values, expected 3" in only(validate_spec(head, "head"))
    dense.hasBias = False
    assert "has bias values but hasBias is false" in only(validate_spec(head, "head"))


def test_convolution_weight_count_and_padding() -> None:
    backbone = make_backbone()
    conv = backbone.neuralNetwork.layers[0].convolution
    conv.weights.floatValue.pop()
    message = only(validate_spec(backbone, "backbone"))
    assert "layer 'conv' (convolution): weights (4 x 3 x 3 x 3) has 107 float32 values" in message
    backbone = make_backbone()
    backbone.neuralNetwork.layers[0].convolution.ClearField("valid")
    assert "padding type (valid or same) is not set" in only(validate_spec(backbone, "backbone"))


def test_batchnorm_parameter_count() -> None:
    backbone = make_backbone()
    builder = NeuralNetworkBuilder(spec=backbone)
    builder.add_batchnorm(
        "bn",
        channels=N_FEATURES,
        gamma=np.ones(N_FEATURES),
        beta=np.zeros(N_FEATURES),
        mean=np.zeros(N_FEATURES),
        variance=np.ones(N_FEATURES),
        input_name="features",
        output_name="normed",
    )
    assert validate_spec(backbone, "backbone") == []
    backbone.neuralNetwork.layers[-1].batchnorm.variance.floatValue.pop()
    assert "layer 'bn' (batchnorm): variance has 3 float32 values, expected 4" in only(
        validate_spec(backbone, "backbone")
    )


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


Layer = NeuralNetwork_pb2.NeuralNetworkLayer


def layer(name: str, inputs: list[str], outputs: list[str], **params: object) -> Layer:
    """A NeuralNetworkLayer; ``params`` are set with ``Layer(**params)`` (messages as dicts)."""
    return Layer(name=name, input=inputs, output=outputs, **params)


def network(*layers: Layer) -> Model_pb2.Model:
    """A spec-4 NeuralNetwork with EXACT array mapping: FLOAT32 [3] 'x' in, 'y' out."""
    spec = Model_pb2.Model(specificationVersion=4)
    x = spec.description.input.add(name="x")
    x.type.multiArrayType.dataType = ArrayType.FLOAT32
    x.type.multiArrayType.shape.append(3)
    y = spec.description.output.add(name="y")
    y.type.multiArrayType.dataType = ArrayType.FLOAT32
    spec.neuralNetwork.arrayInputShapeMapping = NeuralNetwork_pb2.EXACT_ARRAY_MAPPING
    spec.neuralNetwork.layers.extend(layers)
    return spec


def floats(count: int) -> dict[str, list[float]]:
    return {"floatValue": [1.0] * count}


LINEAR = {"linear": {}}
RANK6 = [NeuralNetwork_pb2.Tensor(rank=6)]

LAYER_CASES: dict[str, tuple[list[Layer], str]] = {
    "valid baseline": ([layer("act", ["x"], ["y"], activation=LINEAR)], ""),
    "input count": (
        [layer("sm", ["x", "x"], ["y"], softmax={})],
        "layer 'sm' (softmax): has 2 inputs but expects exactly 1",
    ),
    "activation unset": (
        [layer("act", ["x"], ["y"], activation={})],
        "layer 'act' (activation): the nonlinearity type is not set",
    ),
    "pooling padding": (
        [layer("pool", ["x"], ["y"], pooling={})],
        "layer 'pool' (pooling): padding type is not set",
    ),
    "padding amounts": (
        [
            layer(
                "pad",
                ["x"],
                ["y"],
                padding={"constant": {}, "paddingAmounts": {"borderAmounts": [{}]}},
            )
        ],
        "has 1 padding amounts",
    ),
    "scale count": (
        [layer("sc", ["x"], ["y"], scale={"shapeScale": [3], "scale": floats(2)})],
        "layer 'sc' (scale): scale [3] has 2 float32 values, expected 3",
    ),
    "bias count": (
        [layer("b", ["x"], ["y"], bias={"shape": [3], "bias": floats(4)})],
        "layer 'b' (bias): bias [3] has 4 float32 values, expected 3",
    ),
    "load constant rank": (
        [layer("c", [], ["y"], loadConstant={"shape": [1, 3], "data": floats(3)})],
        "the constant must be 3-d",
    ),
    "load constant nd count": (
        [layer("c", [], ["y"], loadConstantND={"shape": [2, 3], "data": floats(5)})],
        "layer 'c' (loadConstantND): data [2, 3] has 5 float32 values, expected 6",
    ),
    "batched matmul count": (
        [
            layer(
                "mm",
                ["x"],
                ["y"],
                batchedMatmul={
                    "weightMatrixFirstDimension": 3,
                    "weightMatrixSecondDimension": 2,
                    "weights": floats(5),
                },
            )
        ],
        "layer 'mm' (batchedMatmul): weights (2 x 3) has 5 float32 values, expected 6",
    ),
    "int8 dynamic quantize": (
        [
            layer(
                "fc",
                ["x"],
                ["y"],
                innerProduct={
                    "inputChannels": 3,
                    "outputChannels": 1,
                    "weights": floats(3),
                    "int8DynamicQuantize": True,
                },
            )
        ],
        "int8DynamicQuantize needs weights stored as int8RawValue",
    ),
    "transpose axes": (
        [layer("t", ["x"], ["y"], transpose={})],
        "layer 't' (transpose): required parameter 'axes' is empty",
    ),
    "copy onto itself": (
        [layer("c", ["x"], ["x"], copy={}), layer("act", ["x"], ["y"], activation=LINEAR)],
        "layer 'c' (copy): input and output have the same name",
    ),
    "custom class name": (
        [layer("cu", ["x"], ["y"], custom={})],
        "custom layer has an empty className",
    ),
    "reshape target": (
        [layer("r", ["x"], ["y"], reshape={"targetShape": [1, 3]})],
        "target shape must be 3-d or 4-d",
    ),
    "permute axes": (
        [layer("p", ["x"], ["y"], permute={"axis": [0, 1, 2]})],
        "permute needs 4 axes",
    ),
    "tensor count": (
        [layer("act", ["x"], ["y"], activation=LINEAR, inputTensor=RANK6 * 2)],
        "layer 'act' (activation): has 1 inputs but 2 inputTensor entries",
    ),
    "tensor rank vs description": (
        [layer("act", ["x"], ["y"], activation=LINEAR, inputTensor=RANK6)],
        "inputTensor gives 'x' rank 6 but the model description implies rank 1",
    ),
    "layer rank limit": (
        [
            layer("act", ["x"], ["a"], activation=LINEAR),
            layer(
                "fc",
                ["a"],
                ["y"],
                innerProduct={"inputChannels": 3, "outputChannels": 1, "weights": floats(3)},
                inputTensor=RANK6,
                outputTensor=RANK6,
            ),
        ],
        "layer 'fc' (innerProduct): input rank 6 is above the maximum 5",
    ),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_rules(case: str) -> None:
    layers, expected = LAYER_CASES[case]
    violations = validate_spec(network(*layers), "net")
    if not expected:
        assert violations == []
    else:
        assert has(violations, f"net: {expected}" if "layer '" in expected else expected), (
            violations
        )


def test_mean_image_size() -> None:
    backbone = make_backbone()
    entry = backbone.neuralNetwork.preprocessing[0]
    entry.meanImage.meanImage.extend([0.0] * 5)
    message = only(validate_spec(backbone, "backbone"))
    assert "preprocessing[0] has a mean image of 5 values; expected 3x8x8 = 192" in message


# --------------------------------------------------------------------------------------------
# Classifiers (Validators.hpp validateClassifierInterface and NeuralNetworkValidator.cpp)


def test_classifier_needs_class_labels() -> None:
    head = make_head()
    head.neuralNetworkClassifier.ClearField("stringClassLabels")
    violations = validate_spec(head, "head")
    assert has(violations, "classifier has no class labels")


def test_classifier_predicted_label_type_matches_labels() -> None:
    head = make_head()
    label = next(o for o in head.description.output if o.name == "classLabel")
    label.type.int64Type.SetInParent()
    message = only(validate_spec(head, "head"))
    assert message == "head: predicted label output 'classLabel' is Int64, expected String"


def test_classifier_predicted_feature_must_be_an_output() -> None:
    head = make_head()
    head.description.predictedFeatureName = "label"
    violations = validate_spec(head, "head")
    assert has(violations, "predictedFeatureName 'label' is not one of the model's outputs")
    # classLabel is no longer the predicted feature, so no layer accounts for it.
    assert has(violations, "output 'classLabel' is not produced by any layer")


def test_label_probability_layer_must_exist() -> None:
    head = make_head()
    head.neuralNetworkClassifier.labelProbabilityLayerName = "scores"
    message = only(validate_spec(head, "head"))
    assert "labelProbabilityLayerName 'scores' is not an output of any layer" in message


def test_probabilities_key_type_matches_labels() -> None:
    head = make_head()
    probs = next(o for o in head.description.output if o.name == "probs")
    probs.type.dictionaryType.int64KeyType.SetInParent()
    message = only(validate_spec(head, "head"))
    assert "keyed by Int64 but the class labels are String" in message


def test_class_count_matches_dense_layer() -> None:
    head = make_head()
    head.neuralNetworkClassifier.stringClassLabels.vector.append("owl")
    message = only(validate_spec(head, "head"))
    assert "4 class labels but layer 'dense' produces 3 values for 'probs'" in message


# --------------------------------------------------------------------------------------------
# Files and messages


def test_validate_file_on_garbage_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "junk.mlmodel"
    garbage.write_bytes(b"\xff\xff\xff\xff not a protobuf")
    assert only(validate_file(garbage)).startswith("junk.mlmodel: not a Core ML model file")
    assert "cannot read the file" in only(validate_file(tmp_path / "absent.mlmodel"))


def test_violations_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "Broken.mlmodel"
    path.write_bytes(make_pipeline(version=3).SerializeToString())
    assert only(validate_file(path)).startswith("Broken.mlmodel: ")


def test_spec_invalid_is_one_line(tmp_path: Path) -> None:
    head = make_head()
    head.description.input[0].type.multiArrayType.dataType = ArrayType.DOUBLE
    spec = make_pipeline(head=head, version=3)
    path = tmp_path / "Cats.mlmodel"
    path.write_bytes(spec.SerializeToString())
    with pytest.raises(SpecInvalid) as caught:
        check_file(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}.models[1] (head): input 'features' type differs")
    assert text.endswith(" (and 1 more)")
    assert len(caught.value.violations) == 2
    assert str(SpecInvalid("x.mlmodel", ["broken"])) == "x.mlmodel: broken"


def test_every_violation_is_one_line() -> None:
    spec = make_pipeline(stub=make_stub(version=0), head=make_head(version=0), version=0)
    spec.description.input[0].name = ""
    violations = validate_spec(spec, "pipeline")
    assert len(violations) >= 4
    assert all("\n" not in v and v.startswith("pipeline") for v in violations)


def test_describe_type() -> None:
    stub = make_stub()
    assert describe_type(stub.description.input[0].type) == "Image<RGB> 8x8"
    assert describe_type(stub.description.output[0].type) == "MultiArray<FLOAT32>[4]"
