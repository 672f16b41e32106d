"""The reference evaluator against Keras, against coremltools' own dequantisation, and against
naive numpy loops written from NeuralNetwork.proto.

Small Keras models are converted with ct.convert exactly as the project does (a concrete
function, NeuralNetwork backend, iOS 13), evaluated here, and compared with Keras on the same
preprocessed pixels.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.check import reference
from convert.check.reference import LinkedModelNotFound, ReferenceError, UnsupportedLayer

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FLOAT_TOLERANCE = 1e-4  # float32 weights: max abs difference against Keras
RNG_SEED = 0


# -- helpers ---------------------------------------------------------------------------------


def ct() -> Any:
    from convert.heavy import coremltools

    return coremltools()


def keras() -> Any:
    from convert.heavy import keras as flavour

    return flavour(3)


def model_pb2() -> Any:
    ct()
    from coremltools.proto import Model_pb2

    return Model_pb2


def convert(fn: Any, shape: tuple[int, ...], inputs: list[Any], **kwargs: Any) -> Any:
    """``fn`` (a Keras model or any TF callable) -> NeuralNetwork spec, with coremltools'
    default passes. Not convert.build.ct_convert's conversion on purpose: it skips the pass
    that makes ``batchnorm`` layers, and the evaluator must still meet them (other tools write
    them)."""
    tf = __import__("convert.heavy", fromlist=["tensorflow"]).tensorflow()
    name = inputs[0].name
    cf = tf.function(lambda x: fn(x)).get_concrete_function(
        tf.TensorSpec(shape, tf.float32, name=name)
    )
    coremltools = ct()
    with contextlib.redirect_stderr(io.StringIO()):
        mlmodel = coremltools.convert(
            [cf],
            source="tensorflow",
            inputs=inputs,
            convert_to="neuralnetwork",
            minimum_deployment_target=coremltools.target.iOS13,
            **kwargs,
        )
    return mlmodel.get_spec()


def image_input(shape: tuple[int, ...], **kwargs: Any) -> Any:
    return ct().ImageType(name="image", shape=shape, **kwargs)


def only_output(spec: Any) -> str:
    (output,) = spec.description.output
    return output.name


def kinds(spec: Any) -> set[str]:
    nn = getattr(spec, spec.WhichOneof("Type"))
    return {layer.WhichOneof("layer") for layer in nn.layers}


def randomise_batchnorm(model: Any, rng: np.random.Generator) -> None:
    """Non-trivial BatchNorm statistics, so that a wrong BN formula shows."""
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                    rng.normal(0, 0.2, beta.shape).astype("float32"),
                    rng.normal(0, 0.2, mean.shape).astype("float32"),
                    rng.uniform(0.5, 2.0, var.shape).astype("float32"),
                ]
            )


def pixels(rng: np.random.Generator, n: int, h: int, w: int, c: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def quantize(spec: Any, nbits: int, mode: str) -> Any:
    """coremltools' quantize_weights on a spec (it wants an MLModel and prints its progress)."""
    from coremltools.models.neural_network import quantization_utils

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model = ct().models.MLModel(spec)
        return quantization_utils.quantize_weights(model, nbits, quantization_mode=mode).get_spec()


def stub_for(backbone: Any, file_name: str, search_path: str) -> Any:
    """A LinkedModel with the backbone's interface, as convert.build.pipeline.make_stub writes
    it."""
    stub = model_pb2().Model()
    stub.specificationVersion = 4
    stub.description.input.extend(backbone.description.input)
    stub.description.output.extend(backbone.description.output)
    link = stub.linkedModel.linkedModelFile
    link.linkedModelFileName.defaultValue = file_name
    link.linkedModelSearchPath.defaultValue = search_path
    return stub


def pipeline_of(models: list[Any], classifier: bool) -> Any:
    spec = model_pb2().Model()
    spec.specificationVersion = max(4, *(m.specificationVersion for m in models))
    pipeline = spec.pipelineClassifier.pipeline if classifier else spec.pipeline
    for model in models:
        pipeline.models.add().CopyFrom(model)
    spec.description.input.extend(models[0].description.input)
    spec.description.output.extend(models[-1].description.output)
    spec.description.predictedFeatureName = models[-1].description.predictedFeatureName
    spec.description.predictedProbabilitiesName = models[-1].description.predictedProbabilitiesName
    return spec


def save(spec: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(spec.SerializeToString())
    return path


def builder_network(
    input_shape: tuple[int, ...], add: Any, output: str = "y", rank5: bool = False
) -> Any:
    """A NeuralNetwork built with coremltools' NeuralNetworkBuilder: input ``x``, one output."""
    ct()
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder(
        [("x", datatypes.Array(*input_shape))],
        [(output, None)],
        disable_rank5_shape_mapping=not rank5,
    )
    add(builder)
    return builder.spec


def run(spec: Any, x: np.ndarray, output: str = "y") -> np.ndarray:
    out, _ = reference.evaluate_spec(spec, {"x": x}, model_dir=Path("."))
    return out[output]


# -- a small CNN with the layer kinds coremltools emits --------------------------------------


@pytest.fixture(scope="module")
def cnn() -> dict[str, Any]:
    """24x24 RGB -> 10 features: strided / dilated / grouped / depthwise convolutions, same and
    valid padding, BatchNorm, ReLU6, ELU, leaky ReLU, sigmoid, tanh, softplus, swish, residual
    add, concatenations, zero padding, max and average pooling, global pooling, Dense + SELU."""
    K = keras()
    L = K.layers
    tf = __import__("convert.heavy", fromlist=["tensorflow"]).tensorflow()
    K.utils.set_random_seed(RNG_SEED)  # the layers' initial weights: the same in every run
    rng = np.random.default_rng(RNG_SEED)
    grouped = tf.constant(rng.normal(0, 0.3, (3, 3, 4, 8)).astype("float32"))  # 4 groups

    inp = K.Input((12, 12, 16))
    a = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(inp)
    a = L.Activation("elu")(a)
    b = L.Conv2D(32, 3, dilation_rate=2, padding="same")(inp)
    b = L.LeakyReLU(negative_slope=0.2)(b)
    x = L.Add()([a, b])
    g = L.Input((10, 10, 8))
    gp = L.Activation("sigmoid")(g)
    gp = L.ZeroPadding2D(((1, 1), (0, 2)))(gp)
    x = L.Concatenate()([x, gp])
    x = L.BatchNormalization()(x)
    x = L.Activation("tanh")(x)
    m = L.MaxPooling2D(2)(x)
    v = L.AveragePooling2D(3, strides=2, padding="same")(x)
    x = L.Concatenate()([m, v])
    x = L.Conv2D(12, (3, 1), strides=(1, 2), padding="same")(x)
    x = L.Activation("softplus")(x)
    x = L.Activation("swish")(x)
    x = L.Concatenate()([L.GlobalAveragePooling2D()(x), L.GlobalMaxPooling2D()(x)])
    x = L.Dense(10, activation="selu")(x)
    body = K.Model([inp, g], x)

    stem_in = K.Input((24, 24, 3))
    s = L.Conv2D(16, 3, strides=2, padding="same")(stem_in)
    s = L.BatchNormalization()(s)
    s = L.ReLU(6.0)(s)
    stem = K.Model(stem_in, s)
    randomise_batchnorm(body, rng)
    randomise_batchnorm(stem, rng)

    def fn(pixels01):
        h = stem(pixels01, training=False)
        grouped_out = tf.nn.conv2d(h, grouped, strides=1, padding="VALID")
        return body([h, grouped_out], training=False)

    spec = convert(fn, (1, 24, 24, 3), [image_input((1, 24, 24, 3), scale=1 / 255, bias=[0] * 3)])
    return {"fn": fn, "spec": spec, "rng": rng}


def keras_features(cnn: dict[str, Any], images: np.ndarray) -> np.ndarray:
    return np.asarray(cnn["fn"](images.astype("float32") / 255))


def test_small_cnn_matches_keras(cnn: dict[str, Any]) -> None:
    spec = cnn["spec"]
    convs = [
        layer.convolution
        for layer in spec.neuralNetwork.layers
        if layer.WhichOneof("layer") == "convolution"
    ]
    # the conversion really holds what this test claims to cover
    assert any(c.nGroups > 1 and c.kernelChannels > 1 for c in convs), "grouped"
    assert any(c.kernelChannels == 1 and c.outputChannels == 2 * c.nGroups for c in convs)
    assert any(list(c.dilationFactor) == [2, 2] for c in convs)
    assert any(
        list(c.stride) == [2, 2] and c.WhichOneof("ConvolutionPaddingType") == "same" for c in convs
    )
    assert {"batchnorm", "pooling", "add", "concat", "activation", "padding"} <= kinds(spec)

    images = pixels(cnn["rng"], 5, 24, 24)
    out = reference.evaluate_spec(spec, {"image": images}, model_dir=Path("."))[0]
    got = out[only_output(spec)]
    want = keras_features(cnn, images)
    assert got.shape == want.shape == (5, 10)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < FLOAT_TOLERANCE * max(1.0, np.abs(want).max())
    assert np.abs(want).max() > 0.1  # not a degenerate, all-zero network


def test_a_batch_gives_the_predictions_of_its_items(cnn: dict[str, Any]) -> None:
    from PIL import Image

    spec = cnn["spec"]
    images = pixels(cnn["rng"], 4, 24, 24)
    name = only_output(spec)
    batch = reference.evaluate_spec(spec, {"image": images}, model_dir=Path("."))[0][name]
    singles = [
        reference.evaluate_spec(spec, {"image": image}, model_dir=Path("."))[0][name][0]
        for image in images
    ]
    pil = [Image.fromarray(image) for image in images]
    from_pil = reference.evaluate_spec(spec, {"image": pil}, model_dir=Path("."))[0][name]
    np.testing.assert_allclose(batch, np.stack(singles), atol=1e-6)
    np.testing.assert_array_equal(batch, from_pil)


def test_an_image_of_another_size_is_refused(cnn: dict[str, Any]) -> None:
    with pytest.raises(ReferenceError, match=r"24x24 images.*got 32x24"):
        reference.evaluate_spec(
            cnn["spec"], {"image": pixels(cnn["rng"], 1, 24, 32)}, model_dir=Path(".")
        )
    with pytest.raises(ReferenceError, match="missing input 'image'"):
        reference.evaluate_spec(cnn["spec"], {}, model_dir=Path("."))


# -- weights: float16, 8-bit linear, lookup tables -------------------------------------------


def features_of(spec: Any, images: np.ndarray) -> np.ndarray:
    return reference.evaluate_spec(spec, {"image": images}, model_dir=Path("."))[0][
        only_output(spec)
    ]


def weight_fields(spec: Any) -> set[str]:
    fields = set()
    for layer in spec.neuralNetwork.layers:
        if layer.WhichOneof("layer") == "convolution":
            wp = layer.convolution.weights
            fields |= {f for f in ("floatValue", "float16Value", "rawValue") if len(getattr(wp, f))}
            if len(wp.rawValue):
                fields.add(wp.quantization.WhichOneof("QuantizationType"))
    return fields


def test_float16_weights_decode_to_the_rounded_float32_weights(cnn: dict[str, Any]) -> None:
    spec = cnn["spec"]
    half = quantize(spec, 16, "linear")
    assert weight_fields(half) == {"float16Value"}
    rounded = model_pb2().Model()
    rounded.CopyFrom(spec)
    for layer in rounded.neuralNetwork.layers:
        params = getattr(layer, layer.WhichOneof("layer"))
        for field in ("weights", "bias", "gamma", "beta", "mean", "variance"):
            wp = getattr(params, field, None)
            if wp is not None and len(wp.floatValue):
                values = np.asarray(wp.floatValue, np.float32).astype(np.float16)
                wp.floatValue[:] = values.astype(np.float32).tolist()
    images = pixels(cnn["rng"], 3, 24, 24)
    np.testing.assert_allclose(features_of(half, images), features_of(rounded, images), atol=1e-5)
    want = keras_features(cnn, images)
    assert np.abs(features_of(half, images) - want).max() < 2e-3 * np.abs(want).max()


@pytest.mark.parametrize(
    ("nbits", "mode", "kind", "tolerance"),
    [
        (8, "linear", "linearQuantization", 0.02),
        (4, "linear_lut", "lookupTableQuantization", 0.25),
        (6, "linear_lut", "lookupTableQuantization", 0.06),
    ],
)
def test_quantized_weights_match_coremltools_dequantization(
    cnn: dict[str, Any], nbits: int, mode: str, kind: str, tolerance: float
) -> None:
    quantized = quantize(cnn["spec"], nbits, mode)
    assert weight_fields(quantized) == {"rawValue", kind}
    dequantized = quantize(quantized, nbits, "dequantization")
    assert weight_fields(dequantized) == {"floatValue"}
    images = pixels(cnn["rng"], 3, 24, 24)
    got = features_of(quantized, images)
    np.testing.assert_allclose(got, features_of(dequantized, images), atol=1e-5)
    # How far quantizing moves the features depends on the weights' outliers, so it is bounded
    # loosely, as a relative RMS error; measured over twelve Keras seeds: at most 0.007 (8 bits),
    # 0.16 (4 bits), 0.029 (6 bits). A spiky per-value maximum failed on another machine.
    want = keras_features(cnn, images)
    assert np.linalg.norm(got - want) < tolerance * np.linalg.norm(want)


def test_a_hand_packed_two_bit_lookup_table() -> None:
    """Indices packed four to a byte, most significant bits first; per-channel linear scales."""
    table = np.array([-1.5, -0.25, 0.5, 2.0], dtype=np.float32)
    indices = np.array([[0, 1, 2, 3, 3], [2, 2, 1, 0, 3]], dtype=np.uint8)  # [C_out, C_in]
    bits = np.unpackbits(indices.reshape(-1, 1), axis=1)[:, -2:].reshape(-1)
    packed = np.packbits(bits).tobytes()

    def add(builder: Any) -> None:
        builder.add_inner_product("dense", np.zeros((2, 5)), None, 5, 2, False, "x", "y")
        wp = builder.spec.neuralNetwork.layers[0].innerProduct.weights
        del wp.floatValue[:]
        wp.rawValue = packed
        wp.quantization.numberOfBits = 2
        wp.quantization.lookupTableQuantization.floatValue.extend(table.tolist())

    spec = builder_network((5,), add)
    x = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.5, -1.0, 0.0, 2.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(run(spec, x), x @ table[indices].T, rtol=1e-6)

    layer = spec.neuralNetwork.layers[0].innerProduct.weights
    layer.quantization.ClearField("lookupTableQuantization")
    layer.quantization.linearQuantization.scale.extend([0.5, -2.0])
    layer.quantization.linearQuantization.bias.extend([1.0, 0.25])
    linear = indices * np.array([[0.5], [-2.0]]) + np.array([[1.0], [0.25]])
    np.testing.assert_allclose(run(spec, x), x @ linear.T, rtol=1e-6)


# -- MobileNetV2 backbone + Dense head through a linked pipeline -----------------------------

LABELS = ["circle", "square", "triangle", "star", "moon"]
BACKBONE = "MobileNetV2-test.mlmodel"


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Backbone (image -> features (1, 1280)) and a classifier head, written next to each other
    with a pipeline [stub -> head] whose stub searches ``.:$BUNDLE_MAIN``."""
    import factory

    K = keras()
    coremltools = ct()
    rng = np.random.default_rng(RNG_SEED + 1)
    base = factory.mobilenet_backbone("k3", size=48, alpha=0.35, seed=3)
    head = K.Sequential([K.Input((1280,)), K.layers.Dense(len(LABELS), activation="softmax")])
    head.set_weights([rng.normal(0, 0.05, (1280, 5)).astype("float32"), np.zeros(5, "float32")])

    tf_input = image_input((1, 48, 48, 3), scale=1 / 127.5, bias=[-1.0, -1.0, -1.0])
    backbone = convert(lambda x: base(x, training=False), (1, 48, 48, 3), [tf_input])
    coremltools.utils.rename_feature(backbone, only_output(backbone), "features")
    backbone.description.output[0].type.multiArrayType.shape.extend([1, 1280])
    head_in = coremltools.TensorType(name="features", shape=(1, 1280))
    classifier = convert(
        lambda x: head(x, training=False),
        (1, 1280),
        [head_in],
        classifier_config=coremltools.ClassifierConfig(LABELS),
    )
    coremltools.utils.rename_feature(
        classifier, classifier.description.predictedProbabilitiesName, "classLabelProbs"
    )
    for spec in (backbone, classifier):
        spec.specificationVersion = max(spec.specificationVersion, 4)
    stub = stub_for(backbone, "MobileNetV2-test.mlmodelc", ".:$BUNDLE_MAIN")
    folder = tmp_path_factory.mktemp("mobilenet")
    return {
        "folder": folder,
        "backbone": save(backbone, folder / BACKBONE),
        "pipeline": save(
            pipeline_of([stub, classifier], classifier=True), folder / "shapes.mlmodel"
        ),
        "keras": (base, head),
        "rng": rng,
        "specs": (backbone, classifier, stub),
    }


def keras_classify(mobilenet: dict[str, Any], images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    base, head = mobilenet["keras"]
    features = np.asarray(base(images.astype("float32") / 127.5 - 1, training=False))
    return features, np.asarray(head(features, training=False))


def test_mobilenet_backbone_features_match_keras(mobilenet: dict[str, Any]) -> None:
    backbone = reference.load(mobilenet["backbone"])
    assert {"convolution", "activation", "unary", "add", "padding", "reduceMean"} <= kinds(
        backbone.spec
    )
    images = pixels(mobilenet["rng"], 6, 48, 48)
    got = backbone.predict({"image": images})["features"]
    want, _ = keras_classify(mobilenet, images)
    assert got.shape == (6, 1280) and got.dtype == np.float32
    assert np.abs(got - want).max() < FLOAT_TOLERANCE
    assert want.std() > 1e-2
    assert backbone.bound == []


def test_pipeline_classifier_through_a_linked_backbone_matches_keras(
    mobilenet: dict[str, Any],
) -> None:
    model = reference.load(mobilenet["pipeline"])
    images = pixels(mobilenet["rng"], 6, 48, 48)
    out = model.predict({"image": images})
    _, want = keras_classify(mobilenet, images)
    probs = out["__probabilities__"]
    assert probs.shape == (6, 5) and probs.dtype == np.float32
    assert np.abs(probs - want).max() < FLOAT_TOLERANCE
    assert out["classLabel"] == [LABELS[i] for i in want.argmax(axis=1)]
    assert [list(d) for d in out["classLabelProbs"]] == [LABELS] * 6
    np.testing.assert_allclose(
        [[d[label] for label in LABELS] for d in out["classLabelProbs"]], want, atol=1e-4
    )
    assert set(out) == {"classLabel", "classLabelProbs", "__probabilities__"}
    assert model.bound == [("models[0]", mobilenet["backbone"].resolve())]


def test_bundle_main_is_searched_when_the_backbone_is_elsewhere(
    mobilenet: dict[str, Any], tmp_path: Path
) -> None:
    app, bundle = tmp_path / "models", tmp_path / "bundle"
    app.mkdir()
    bundle.mkdir()
    pipeline = app / "shapes.mlmodel"
    pipeline.write_bytes(mobilenet["pipeline"].read_bytes())
    (bundle / BACKBONE).write_bytes(mobilenet["backbone"].read_bytes())
    model = reference.load(pipeline)
    images = pixels(mobilenet["rng"], 2, 48, 48)
    out = model.predict({"image": images}, bundle_main=bundle)
    assert model.bound == [("models[0]", bundle / BACKBONE)]
    np.testing.assert_allclose(
        out["__probabilities__"], keras_classify(mobilenet, images)[1], atol=FLOAT_TOLERANCE
    )

    with pytest.raises(LinkedModelNotFound) as caught:
        model.predict({"image": images})  # $BUNDLE_MAIN defaults to the model's own folder
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{pipeline}: linked model 'MobileNetV2-test.mlmodelc' not found")
    for path in (app.resolve() / "MobileNetV2-test.mlmodelc", app.resolve() / BACKBONE):
        assert str(path) in message
    assert caught.value.searched.count(str(app.resolve() / BACKBONE)) == 2  # "." and $BUNDLE_MAIN


# -- linked-model resolution on a tiny network -----------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Any:
    """x (4,) -> y (2,) by a dense layer; cheap to link, and checkable by hand."""

    def add(builder: Any) -> None:
        w = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
        builder.add_inner_product("dense", w, np.array([1.0, -1.0]), 4, 2, True, "x", "y")

    spec = builder_network((4,), add)
    spec.specificationVersion = max(spec.specificationVersion, 4)
    return spec


def linked_pipeline(tiny: Any, folder: Path, name: str, search_path: str) -> Path:
    stub = stub_for(tiny, name, search_path)
    return save(pipeline_of([stub], classifier=False), folder / "linked.mlmodel")


@pytest.mark.parametrize(
    ("search_path", "where"),
    [
        ("", "."),
        (".", "."),
        ("sub/dir", "sub/dir"),
        ("$BUNDLE_IDENTIFIER(com.example.app):nowhere:.", "."),
        ("ABSOLUTE", "abs"),
    ],
)
def test_search_path_entries(tiny: Any, tmp_path: Path, search_path: str, where: str) -> None:
    target = (tmp_path / "abs") if where == "abs" else (tmp_path / "app" / where)
    save(tiny, target / "Tiny.mlmodel")
    search_path = search_path.replace("ABSOLUTE", str(tmp_path / "abs"))
    model = reference.load(linked_pipeline(tiny, tmp_path / "app", "Tiny.mlmodelc", search_path))
    out = model.predict({"x": np.ones(4)})
    np.testing.assert_allclose(out["y"], [[0.75 + 1.0, 2.75 - 1.0]], rtol=1e-6)
    assert [(w, p.resolve()) for w, p in model.bound] == [
        ("models[0]", (target / "Tiny.mlmodel").resolve())
    ]


def test_a_compiled_folder_holding_the_spec_is_accepted(tiny: Any, tmp_path: Path) -> None:
    save(tiny, tmp_path / "Tiny.mlmodelc" / "model.mlmodel")
    model = reference.load(linked_pipeline(tiny, tmp_path, "Tiny.mlmodelc", ".:$BUNDLE_MAIN"))
    model.predict({"x": np.zeros((3, 4))})
    assert model.bound == [("models[0]", tmp_path.resolve() / "Tiny.mlmodelc" / "model.mlmodel")]


def test_not_found_names_every_folder_and_the_skipped_bundle_identifier(
    tiny: Any, tmp_path: Path
) -> None:
    pipeline = linked_pipeline(
        tiny, tmp_path, "Tiny.mlmodelc", "$BUNDLE_IDENTIFIER(com.x):lib:/opt/models"
    )
    with pytest.raises(LinkedModelNotFound) as caught:
        reference.load(pipeline).predict({"x": np.zeros(4)})
    message = str(caught.value)
    assert isinstance(caught.value, ReferenceError)
    assert str(tmp_path.resolve() / "lib" / "Tiny.mlmodelc") in message
    assert str(tmp_path.resolve() / "lib" / "Tiny.mlmodel") in message
    assert "/opt/models/Tiny.mlmodelc" in message and "/opt/models/Tiny.mlmodel" in message
    assert "$BUNDLE_IDENTIFIER(com.x) skipped" in message
    assert "\n" not in message


# -- preprocessing: BGR and grayscale --------------------------------------------------------


@pytest.fixture(scope="module")
def small_conv() -> Any:
    K = keras()
    rng = np.random.default_rng(RNG_SEED + 2)
    models = {}
    for channels in (1, 3):
        model = K.Sequential([K.Input((10, 10, channels)), K.layers.Conv2D(4, 3, padding="same")])
        model.set_weights(
            [rng.normal(0, 0.5, (3, 3, channels, 4)).astype("float32"), np.zeros(4, "float32")]
        )
        models[channels] = model
    return models


def test_bgr_preprocessing_matches_keras_on_caffe_style_input(small_conv: Any) -> None:
    model = small_conv[3]
    mean_bgr = [103.939, 116.779, 123.68]
    spec = convert(
        lambda x: model(x),
        (1, 10, 10, 3),
        [
            image_input(
                (1, 10, 10, 3),
                scale=1.0,
                bias=[-m for m in mean_bgr],
                color_layout=ct().colorlayout.BGR,
            )
        ],
    )
    scaler = spec.neuralNetwork.preprocessing[0].scaler
    assert (scaler.blueBias, scaler.redBias) == pytest.approx((-103.939, -123.68))
    images = pixels(np.random.default_rng(5), 3, 10, 10)
    want = np.asarray(model(images[..., ::-1].astype("float32") - np.float32(mean_bgr)))
    got = features_of(spec, images)
    assert np.abs(got - want).max() < FLOAT_TOLERANCE * np.abs(want).max()
    wrong = np.asarray(model(images.astype("float32") - np.float32(mean_bgr)))
    assert np.abs(got - wrong).max() > 1.0  # the channel order really matters here


def test_grayscale_preprocessing_matches_keras(small_conv: Any) -> None:
    from PIL import Image

    model = small_conv[1]
    spec = convert(
        lambda x: model(x),
        (1, 10, 10, 1),
        [
            image_input(
                (1, 10, 10, 1), scale=1 / 255, bias=-0.5, color_layout=ct().colorlayout.GRAYSCALE
            )
        ],
    )
    gray = pixels(np.random.default_rng(6), 2, 10, 10, 1)[..., 0]
    want = np.asarray(model(gray[..., None].astype("float32") / 255 - 0.5))
    got = features_of(spec, gray)
    assert np.abs(got - want).max() < FLOAT_TOLERANCE
    as_pil = features_of(spec, [Image.fromarray(g, mode="L") for g in gray])
    np.testing.assert_array_equal(got, as_pil)
    with pytest.raises(ReferenceError, match="expected an image array"):
        features_of(spec, np.zeros((2, 10, 10, 3), np.uint8))


# -- unsupported layers and parameter values -------------------------------------------------


def test_an_unsupported_layer_is_named_with_its_type(tmp_path: Path) -> None:
    def add(builder: Any) -> None:
        builder.add_reorganize_data("to_depth", "x", "y", mode="SPACE_TO_DEPTH", block_size=2)

    path = save(builder_network((1, 4, 4, 4), add), tmp_path / "s2d.mlmodel")
    with pytest.raises(UnsupportedLayer) as caught:
        reference.load(path).predict({"x": np.zeros((1, 4, 4, 4))})
    assert str(caught.value) == (
        f"{path}: layer 'to_depth' of type 'reorganizeData' is not supported by the reference "
        "evaluator"
    )
    assert (caught.value.layer, caught.value.kind) == ("to_depth", "reorganizeData")


def test_an_unsupported_parameter_value_is_not_guessed() -> None:
    def add(builder: Any) -> None:
        builder.add_pooling("l2pool", 2, 2, 2, 2, "L2", "VALID", "x", "y")

    with pytest.raises(UnsupportedLayer, match=r"'l2pool' of type 'pooling'.*\(L2 pooling\)"):
        run(builder_network((1, 2, 4, 4), add), np.zeros((1, 2, 4, 4)))


# -- layers against naive loops written from NeuralNetwork.proto -----------------------------


def naive_convolution(x: np.ndarray, w: np.ndarray, stride, dilation, groups, pads) -> np.ndarray:
    """x (C, H, W), w (C_out, C_in / groups, kh, kw); pads (top, bottom, left, right)."""
    x = np.pad(x, ((0, 0), pads[:2], pads[2:]))
    c_out, c_group, kh, kw = w.shape
    span = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    ho = (x.shape[1] - span[0]) // stride[0] + 1
    wo = (x.shape[2] - span[1]) // stride[1] + 1
    y = np.zeros((c_out, ho, wo))
    for o in range(c_out):
        g = o // (c_out // groups)
        for i in range(ho):
            for j in range(wo):
                top, left = i * stride[0], j * stride[1]
                patch = x[
                    g * c_group : (g + 1) * c_group,
                    top : top + span[0] : dilation[0],
                    left : left + span[1] : dilation[1],
                ]
                y[o, i, j] = (patch * w[o]).sum()
    return y


def same_pads(size: int, kernel: int, stride: int, top_left_heavy: bool) -> tuple[int, int]:
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + kernel - size)
    light = total // 2
    return (total - light, light) if top_left_heavy else (light, total - light)


@pytest.mark.parametrize(
    ("groups", "kernel_channels", "stride", "dilation", "mode"),
    [
        (1, 6, (1, 1), (1, 1), "valid"),
        (2, 3, (2, 1), (1, 2), "same"),
        (3, 2, (2, 2), (2, 1), "same-top-left"),
        (6, 1, (2, 2), (1, 1), "same"),  # depthwise, multiplier 2
    ],
)
def test_convolution_matches_naive_loops(groups, kernel_channels, stride, dilation, mode) -> None:
    rng = np.random.default_rng(7)
    c_out, kh, kw = 12, 3, 2
    weights = rng.normal(size=(kh, kw, kernel_channels, c_out)).astype(np.float32)
    heavy = "TOP_LEFT_HEAVY" if mode == "same-top-left" else "BOTTOM_RIGHT_HEAVY"

    def add(builder: Any) -> None:
        builder.add_convolution(
            "conv", kernel_channels, c_out, kh, kw, stride[0], stride[1],
            mode.split("-")[0], groups, weights, None, False, input_name="x", output_name="y",
            dilation_factors=list(dilation), same_padding_asymmetry_mode=heavy,
        )  # fmt: skip

    h, w_in = 8, 9  # odd total padding in both directions, so the asymmetry mode matters
    spec = builder_network((1, 6, h, w_in), add)
    w = np.asarray(spec.neuralNetwork.layers[0].convolution.weights.floatValue)
    w = w.reshape(c_out, kernel_channels, kh, kw)
    x = rng.normal(size=(2, 1, 6, h, w_in)).astype(np.float32)
    spans = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    pads = (0, 0, 0, 0)
    if mode != "valid":
        top_left = mode == "same-top-left"
        pads = same_pads(h, spans[0], stride[0], top_left) + same_pads(
            w_in, spans[1], stride[1], top_left
        )
        assert (pads[0] + pads[1]) % 2 or (pads[2] + pads[3]) % 2
    want = np.stack([naive_convolution(item[0], w, stride, dilation, groups, pads) for item in x])
    got = run(spec, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)


def naive_pool(x: np.ndarray, kind: str, kernel, stride, pads, exclude: bool) -> np.ndarray:
    """x (C, H, W); padded cells never win a max and count in an average unless excluded."""
    c, h, w = x.shape
    ho = (h + pads[0] + pads[1] - kernel[0]) // stride[0] + 1
    wo = (w + pads[2] + pads[3] - kernel[1]) // stride[1] + 1
    y = np.zeros((c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            top, left = i * stride[0] - pads[0], j * stride[1] - pads[2]
            rows = range(max(top, 0), min(top + kernel[0], h))
            cols = range(max(left, 0), min(left + kernel[1], w))
            window = x[:, rows.start : rows.stop, cols.start : cols.stop]
            if kind == "MAX":
                y[:, i, j] = window.max(axis=(1, 2))
            else:
                count = len(rows) * len(cols) if exclude else kernel[0] * kernel[1]
                y[:, i, j] = window.sum(axis=(1, 2)) / count
    return y


@pytest.mark.parametrize("kind", ["MAX", "AVERAGE"])
@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_pooling_matches_naive_loops(kind: str, exclude: bool, padding: str) -> None:
    def add(builder: Any) -> None:
        builder.add_pooling(
            "pool", 3, 2, 2, 2, kind, padding, "x", "y", exclude_pad_area=exclude,
            padding_top=1, padding_bottom=0, padding_left=1, padding_right=1,
        )  # fmt: skip

    x = np.random.default_rng(8).normal(size=(3, 1, 2, 7, 6)).astype(np.float32)
    pads = (
        same_pads(7, 3, 2, False) + same_pads(6, 2, 2, False) if padding == "SAME" else (1, 0, 1, 1)
    )
    want = np.stack([naive_pool(item[0], kind, (3, 2), (2, 2), pads, exclude) for item in x])
    np.testing.assert_allclose(run(builder_network((1, 2, 7, 6), add), x), want, atol=1e-5)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (
            "constant",
            [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 2, 3, 4], [0, 0, 5, 6, 7, 8]],
        ),
        ("reflection", [[11, 10, 9, 10, 11, 12], [7, 6, 5, 6, 7, 8], [3, 2, 1, 2, 3, 4]]),
        ("replication", [[1, 1, 1, 2, 3, 4], [1, 1, 1, 2, 3, 4], [1, 1, 1, 2, 3, 4]]),
    ],
)
def test_padding_layer_follows_the_examples_in_the_spec(mode: str, expected: list) -> None:
    def add(builder: Any) -> None:
        builder.add_padding("pad", 2, 0, 2, 0, 0.0, "x", "y", padding_type=mode)

    x = np.arange(1, 13, dtype=np.float32).reshape(1, 1, 3, 4)
    got = run(builder_network((1, 3, 4), add), x)[0]  # (N, 5, 6): the leading 1 dropped
    assert got.shape == (5, 6)
    np.testing.assert_array_equal(got[: len(expected)], expected)


@pytest.mark.parametrize("mode", ["stored", "instance", "batch"])
def test_batchnorm_formula(mode: str) -> None:
    """gamma * (x - mean) / sqrt(var + eps) + beta per channel; with computeMeanVar the mean and
    (biased) variance come from each instance's H, W, or from all but the channel axis."""
    rng = np.random.default_rng(12)
    c, eps = 3, 0.05
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(0.01, 0.1, c)  # small: epsilon matters

    def add(builder: Any) -> None:
        builder.add_batchnorm("bn", c, gamma, beta, mean, var, "x", "y", epsilon=eps)
        params = builder.spec.neuralNetwork.layers[0].batchnorm
        params.computeMeanVar = mode != "stored"  # the builder refuses batch statistics
        params.instanceNormalization = mode == "instance"

    x = rng.normal(size=(2, 2, c, 4, 5)).astype(np.float32)
    if mode == "stored":
        mu, sigma2 = mean[:, None, None], var[:, None, None]
    else:
        over = (-2, -1) if mode == "instance" else (1, 3, 4)
        mu, sigma2 = x.mean(axis=over, keepdims=True), x.var(axis=over, keepdims=True)
    want = gamma[:, None, None] * (x - mu) / np.sqrt(sigma2 + eps) + beta[:, None, None]
    np.testing.assert_allclose(
        run(builder_network((2, c, 4, 5), add), x), want, rtol=1e-4, atol=1e-5
    )


UNARY = {
    "sqrt": lambda v, a, e: np.sqrt(v),
    "rsqrt": lambda v, a, e: 1 / np.sqrt(v + e),
    "inverse": lambda v, a, e: 1 / (v + e),
    "power": lambda v, a, e: v**a,
    "exp": lambda v, a, e: np.exp(v),
    "log": lambda v, a, e: np.log(v),
    "abs": lambda v, a, e: np.abs(v),
    "threshold": lambda v, a, e: np.maximum(v, a),
}


@pytest.mark.parametrize("mode", sorted(UNARY))
def test_unary_functions_shift_and_scale_first(mode: str) -> None:
    alpha, shift, scale, eps = 1.5, 0.25, 2.0, 1e-3

    def add(builder: Any) -> None:
        builder.add_unary("f", "x", "y", mode, alpha=alpha, shift=shift, scale=scale, epsilon=eps)

    x = np.random.default_rng(9).uniform(0.1, 2.0, (2, 3, 4)).astype(np.float32)
    want = UNARY[mode](scale * x.astype(np.float64) + shift, alpha, eps)
    np.testing.assert_allclose(run(builder_network((3, 4), add), x), want, rtol=1e-5)


ACTIVATIONS = {
    "LINEAR": ([0.5, -0.25], lambda x: 0.5 * x - 0.25),
    "RELU": (None, lambda x: np.maximum(x, 0)),
    "LEAKYRELU": ([0.1], lambda x: np.where(x >= 0, x, 0.1 * x)),
    "THRESHOLDEDRELU": (0.3, lambda x: np.where(x >= 0.3, x, 0)),
    "PRELU": (
        np.array([0.1, 0.2, 0.3]),
        lambda x: np.where(x >= 0, x, x * np.array([0.1, 0.2, 0.3])[:, None, None]),
    ),
    "TANH": (None, np.tanh),
    "SCALED_TANH": ([1.5, 0.5], lambda x: 1.5 * np.tanh(0.5 * x)),
    "SIGMOID": (None, lambda x: 1 / (1 + np.exp(-x))),
    "SIGMOID_HARD": ([0.2, 0.5], lambda x: np.clip(0.2 * x + 0.5, 0, 1)),
    "ELU": (0.7, lambda x: np.where(x >= 0, x, 0.7 * (np.exp(x) - 1))),
    "SOFTSIGN": (None, lambda x: x / (1 + np.abs(x))),
    "SOFTPLUS": (None, lambda x: np.log1p(np.exp(x))),
    "PARAMETRICSOFTPLUS": (
        [np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, 2.0])],
        lambda x: np.array([1.0, 2.0, 0.5])[:, None, None]
        * np.log1p(np.exp(np.array([0.5, 1.0, 2.0])[:, None, None] * x)),
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(ACTIVATIONS))
def test_activation_functions(kind: str) -> None:
    params, formula = ACTIVATIONS[kind]

    def add(builder: Any) -> None:
        builder.add_activation("act", kind, "x", "y", params=params)

    x = np.random.default_rng(10).normal(0, 2, (2, 3, 4, 5)).astype(np.float32)
    want = np.stack([formula(item.astype(np.float64)) for item in x])
    np.testing.assert_allclose(run(builder_network((3, 4, 5), add), x), want, rtol=1e-5, atol=1e-6)


def test_nd_shape_layers() -> None:
    """reshapeStatic, transpose, sliceStatic with masks, expandDims / squeeze, reduce with and
    without keepDims, concatND, softmaxND: against numpy on a (2, 3, 4) blob."""

    def add(builder: Any) -> None:
        builder.add_transpose("t", [2, 0, 1], "x", "t")  # (4, 2, 3)
        builder.add_slice_static(
            "s",
            "t",
            "s",
            begin_ids=[1, 3, 0],
            end_ids=[1, 2, -1],
            strides=[2, 1, 1],
            begin_masks=[False, True, False],
            end_masks=[True, False, False],
        )  # (2, 2, 2)  fmt: skip
        builder.add_expand_dims("e", "s", "e", axes=[0])  # (1, 2, 2, 2)
        builder.add_reduce_mean("m", "e", "m", axes=[-1], keepdims=True)  # (1, 2, 2, 1)
        builder.add_reduce_sum("r", "x", "r", axes=[0], keepdims=False)  # (3, 4)
        builder.add_squeeze("q", "m", "q", axes=[0, -1])  # (2, 2)
        builder.add_reshape_static("rs", "r", "rs", (2, 6))
        builder.add_concat_nd("c", ["rs", "rs"], "c", axis=0)  # (4, 6)
        builder.add_softmax_nd("y", "c", "y", axis=-1)
        builder.add_concat_nd("z", ["q", "q"], "z", axis=1)  # (2, 4)

    ct()
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder(
        [("x", datatypes.Array(2, 3, 4))], [("y", None), ("z", None)],
        disable_rank5_shape_mapping=True,
    )  # fmt: skip
    add(builder)
    x = np.random.default_rng(11).normal(size=(2, 3, 4)).astype(np.float32)
    out, _ = reference.evaluate_spec(builder.spec, {"x": x}, model_dir=Path("."))
    t = x.transpose(2, 0, 1)[1::2, :2, :-1]
    q = t.mean(axis=-1)
    np.testing.assert_allclose(out["z"][0], np.concatenate([q, q], axis=1), rtol=1e-6)
    c = np.concatenate([x.sum(axis=0).reshape(2, 6)] * 2, axis=0)
    e = np.exp(c - c.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(out["y"][0], e / e.sum(axis=-1, keepdims=True), rtol=1e-5)


def naive_lrn(x: np.ndarray, alpha: float, beta: float, size: int, k: float) -> np.ndarray:
    c = x.shape[0]
    out = np.empty_like(x)
    for i in range(c):
        lo, hi = max(0, i - (size - 1) // 2), min(c, i - (size - 1) // 2 + size)
        out[i] = x[i] / (k + alpha / size * (x[lo:hi] ** 2).sum(axis=0)) ** beta
    return out


def _split_and_swap(b: Any) -> None:
    b.add_split("s", "x", ["s0", "s1", "s2"])
    b.add_elementwise("y", ["s2", "s0"], "y", "CONCAT")


def _rank4_dense(b: Any) -> None:
    w = np.arange(60, dtype=np.float32).reshape(5, 12) / 60
    b.add_inner_product("y", w, np.ones(5), 12, 5, True, "x", "y")


LAYN_GAMMA = np.linspace(0.5, 1.5, 20).reshape(4, 5)
# (input shape, rank-5 mapping, how to add the layer, expected output for one input item)
LAYERS: dict[str, tuple[tuple[int, ...], bool, Any, Any]] = {
    "lrn": ((6, 3, 3), False, lambda b: b.add_lrn("y", "x", "y", 0.5, 0.75, 4, k=2.0),
            lambda x: naive_lrn(x, 0.5, 0.75, 4, 2.0)),
    "layerNormalization": (
        (3, 4, 5), False,
        lambda b: b.add_layer_normalization("y", "x", "y", [4, 5], LAYN_GAMMA, -LAYN_GAMMA, 1e-3),
        lambda x: (x - x.mean(axis=(1, 2), keepdims=True))
        / np.sqrt(x.var(axis=(1, 2), keepdims=True) + 1e-3) * LAYN_GAMMA - LAYN_GAMMA,
    ),
    "mvn within channels": (
        (3, 4, 5), False,
        lambda b: b.add_mvn("y", "x", "y", across_channels=False, normalize_variance=True,
                            epsilon=1e-3),
        lambda x: (x - x.mean(axis=(1, 2), keepdims=True))
        / np.sqrt(x.var(axis=(1, 2), keepdims=True) + 1e-3),
    ),
    "mvn across channels, mean only": (
        (3, 4, 5), False,
        lambda b: b.add_mvn("y", "x", "y", across_channels=True, normalize_variance=False),
        lambda x: x - x.mean(),
    ),
    "flatten CHANNEL_LAST": ((2, 3, 4), False, lambda b: b.add_flatten("y", 1, "x", "y"),
                             lambda x: x.transpose(1, 2, 0).reshape(24, 1, 1)),
    "reshape CHANNEL_FIRST": ((2, 3, 4), True,
                              lambda b: b.add_reshape("y", "x", "y", (4, 3, 2), 0),
                              lambda x: x.reshape(1, 1, 4, 3, 2)),
    "reshape CHANNEL_LAST": (
        (2, 3, 4), True, lambda b: b.add_reshape("y", "x", "y", (4, 3, 2), 1),
        lambda x: x.transpose(1, 2, 0).reshape(3, 2, 4).transpose(2, 0, 1)[None, None],
    ),
    "permute": ((2, 3, 4), True, lambda b: b.add_permute("y", (0, 3, 1, 2), "x", "y"),
                lambda x: x.transpose(2, 0, 1)[None, None]),
    "split": ((6, 2, 2), False, _split_and_swap, lambda x: np.concatenate([x[4:], x[:2]])),
    "tile": ((2, 3), False, lambda b: b.add_tile("y", "x", "y", reps=[2, 1]),
             lambda x: np.tile(x, (2, 1))),
    "reverse": ((2, 3, 4), False,
                lambda b: b.add_reverse("y", "x", "y", reverse_dim=[True, False, True]),
                lambda x: x[::-1, :, ::-1]),
    "argMax": ((3, 4), False, lambda b: b.add_argmax("y", "x", "y", axis=-1, keepdims=True),
               lambda x: x.argmax(axis=-1)[:, None]),
    "greaterThan": ((3, 4), False,
                    lambda b: b.add_greater_than("y", ["x"], "y", alpha=0.2),
                    lambda x: (x > 0.2).astype(np.float64)),
    "l2normalize": ((2, 3, 4), False, lambda b: b.add_l2_normalize("y", "x", "y", 1e-5),
                    lambda x: x / np.sqrt((x**2).sum() + 1e-5)),
    "scale": ((3, 2, 2), False,
              lambda b: b.add_scale("y", np.array([1.0, -2.0, 0.5]), np.array([0.1, 0.2, 0.3]),
                                    True, "x", "y", shape_scale=[3], shape_bias=[3]),
              lambda x: x * np.array([1.0, -2.0, 0.5])[:, None, None]
              + np.array([0.1, 0.2, 0.3])[:, None, None]),
    "bias [1, H, W]": ((3, 2, 2), False,
                       lambda b: b.add_bias("y", np.arange(4.0), "x", "y", shape_bias=[1, 2, 2]),
                       lambda x: x + np.arange(4.0).reshape(1, 2, 2)),
    "upsample": ((2, 2, 3), False, lambda b: b.add_upsample("y", 2, 3, "x", "y"),
                 lambda x: x.repeat(2, axis=1).repeat(3, axis=2)),
    "constantPad": ((2, 3), False,
                    lambda b: b.add_constant_pad("y", ["x"], "y", 1.5, pad_amounts=[0, 1, 2, 0]),
                    lambda x: np.pad(x, ((0, 1), (2, 0)), constant_values=1.5)),
    "slice width": ((2, 3, 6), False,
                    lambda b: b.add_slice("y", "x", "y", "width", 1, -1, 2),
                    lambda x: x[:, :, 1:-1:2]),
    "reduce CHW L2": ((2, 3, 4), False, lambda b: b.add_reduce("y", "x", "y", "CHW", "L2"),
                      lambda x: np.sqrt((x**2).sum(keepdims=True))),
    "reduce C argmax": ((3, 2, 2), False,
                        lambda b: b.add_reduce("y", "x", "y", "C", "argmax"),
                        lambda x: x.argmax(axis=0)[None]),
    "innerProduct rank 4": (
        (1, 3, 2, 2), False, _rank4_dense,
        lambda x: (np.arange(60).reshape(5, 12) / 60 @ x.reshape(12) + 1).reshape(1, 5, 1, 1),
    ),
    "flattenTo2D": ((2, 3, 4), False, lambda b: b.add_flatten_to_2d("y", "x", "y", axis=2),
                    lambda x: x.reshape(6, 4)),
    "multiply by alpha": ((2, 3), False,
                          lambda b: b.add_elementwise("y", ["x"], "y", "MULTIPLY", alpha=2.5),
                          lambda x: 2.5 * x),
    "softmax": ((3, 2, 2), False, lambda b: b.add_softmax("y", "x", "y"),
                lambda x: np.exp(x) / np.exp(x).sum(axis=0)),
    "clip": ((2, 3), False, lambda b: b.add_clip("y", "x", "y", -0.5, 0.25),
             lambda x: np.clip(x, -0.5, 0.25)),
    "stack": ((2, 3), False, lambda b: b.add_stack("y", ["x", "x"], "y", axis=1),
              lambda x: np.stack([x, x], axis=1)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_more_layers_against_numpy(name: str) -> None:
    shape, rank5, add, formula = LAYERS[name]
    x = np.random.default_rng(13).normal(size=(2, *shape)).astype(np.float32)
    want = np.stack([formula(item.astype(np.float64)) for item in x])
    if want.ndim >= 3 and want.shape[1] == 1:  # a leading 1 of the Core ML shape is dropped
        want = want[:, 0]
    got = run(builder_network(shape, add, rank5=rank5), x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_every_layer_kind_coremltools_emits_for_the_supported_backbones_is_registered() -> None:
    emitted = {
        "activation", "add", "addBroadcastable", "batchnorm", "concat", "convolution",
        "loadConstantND", "multiply", "multiplyBroadcastable", "padding", "pooling",
        "reduceMean", "reshapeStatic", "sliceStatic", "transpose", "unary",
        "innerProduct", "batchedMatmul", "softmax", "softmaxND",
    }  # fmt: skip
    assert emitted <= set(reference.REGISTRY)


# -- end to end: the project's own build -----------------------------------------------------


@pytest.mark.slow
def test_every_pipeline_the_cli_writes_matches_its_keras_model(built) -> None:
    """``coreml-split convert`` on the test zoo: each pipeline, linked to its backbone on disk,
    gives Keras' probabilities."""
    import json

    from convert.check.keras_model import load_keras_model
    from convert.read.h5 import read_model

    out, _code = built
    report = json.loads((out / "report.json").read_text())
    preprocessing = {b["id"]: b["preprocessing"] for b in report["backbones"]}
    rng = np.random.default_rng(12)
    checked = 0
    for entry in report["classifiers"]:
        if entry["group"] is None or preprocessing[entry["group"]] != "tf":
            continue
        model = reference.load(out / entry["file"])
        width = model.spec.description.input[0].type.imageType.width
        images = pixels(rng, 3, width, width)
        got = model.predict({"image": images})
        keras_model = load_keras_model(read_model(entry["source"], with_digests=False))
        want = np.asarray(keras_model(images.astype("float32") / 127.5 - 1, training=False))
        assert np.abs(got["__probabilities__"] - want).max() < FLOAT_TOLERANCE, entry["name"]
        assert [b[1].name for b in model.bound] == [f"{entry['group']}.mlmodel"]
        checked += 1
    assert checked >= 2


def test_where_broadcastable_picks_by_condition_and_broadcasts() -> None:
    """ELU(alpha != 1) from ct.convert: where(x > 0, x, alpha * (exp(x) - 1))."""
    ct()
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder(
        [("x", datatypes.Array(3, 4))], [("y", None)], disable_rank5_shape_mapping=True
    )
    builder.add_greater_than("positive", ["x"], "positive", alpha=0.0)
    builder.add_load_constant_nd("zero", "zero", np.zeros((1, 4), np.float32), (1, 4))
    builder.add_where_broadcastable("y", ["positive", "x", "zero"], "y")
    x = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    out, _ = reference.evaluate_spec(builder.spec, {"x": x}, model_dir=Path("."))
    np.testing.assert_array_equal(out["y"][0], np.maximum(x, 0))
