"""Tests for convert.check.rules.nn_layers (NeuralNetworkLayerValidator.cpp and weights)."""

from __future__ import annotations

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("coremltools")

from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402
from coremltools.proto import Model_pb2, NeuralNetwork_pb2  # noqa: E402
from rules_helpers import N_FEATURES, ArrayType, has, make_backbone, make_head, only  # noqa: E402

from convert.check.validate import validate_spec  # noqa: E402

# --------------------------------------------------------------------------------------------
# Layers and weights (NeuralNetworkLayerValidator.cpp)


def test_layer_type_not_set() -> None:
    backbone = make_backbone()
    backbone.neuralNetwork.layers.add(name="empty", input=["features"], output=["more"])
    assert "layer 'empty' (no type): the layer type is not set" in only(
        validate_spec(backbone, "backbone")
    )


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
