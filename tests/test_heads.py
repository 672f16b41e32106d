"""Heads built from the .h5 weights in the vector layout (one chain of layers in Keras order,
convert.build.network), checked against the ct.convert head (convert.build.ct_convert) and
against Keras on the same random features, with the reference evaluator; and against Core ML's
rules, alone and inside the pipeline that wraps a head."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import factory
import numpy as np
import pytest

from convert.build import ct_convert, network, pipeline
from convert.build import spec as specs
from convert.build.walker import VECTOR
from convert.check import reference
from convert.check.validate import validate_spec
from convert.errors import ConversionError
from convert.heavy import coremltools
from convert.plan.cuts import cut_tensors
from convert.plan.make import make_plan
from convert.plan.types import ModelPlan
from convert.read.graph import Graph
from convert.read.h5 import load_weight, read_model

# max |difference| of the probabilities, head from the weights vs ct.convert and Keras
TOLERANCE = 1e-5
BATCH = 6
FLAVOURS = ["k2", "k3"]


# -- tiny classifiers: a 1x1 convolution "backbone", then the head under test ------------------

Head = Callable[[Any, str, int], list[Any]]  # (keras module, flavour, classes) -> layers


def _mlp(K: Any, flavour: str, n: int) -> list[Any]:
    return [
        K.layers.Dropout(0.3, name="drop"),
        K.layers.Dense(16, activation="relu", name="hidden"),
        K.layers.BatchNormalization(epsilon=0.01, name="bn"),
        K.layers.GaussianNoise(0.1, name="noise"),
        K.layers.Dense(n, activation="softmax", name="predictions"),
    ]


def _pooling(K: Any, flavour: str, n: int) -> list[Any]:
    return [
        K.layers.BatchNormalization(name="bn_nhwc"),
        K.layers.SpatialDropout2D(0.2, name="spatial_drop"),
        K.layers.GlobalAveragePooling2D(name="gap"),
        K.layers.Dense(n, activation="softmax", name="predictions"),
    ]


def _shapes(K: Any, flavour: str, n: int) -> list[Any]:
    return [
        K.layers.Dense(5, activation="tanh", name="dense_nhwc"),  # on [1, 4, 4, 8]
        K.layers.GlobalMaxPooling2D(keepdims=True, name="gmp"),
        K.layers.Reshape((5,), name="to_vector"),
        K.layers.Dense(12, name="widen"),
        K.layers.Reshape((3, 4), name="to_matrix"),
        K.layers.Flatten(name="flatten"),
        K.layers.Dense(n, name="logits"),
        K.layers.Softmax(name="softmax"),
    ]


def _activations(K: Any, flavour: str, n: int) -> list[Any]:
    act = K.layers.Activation
    return [
        K.layers.Dense(12, activation="elu", name="d1"),
        act("selu", name="selu"),
        act("softplus", name="softplus"),
        K.layers.Dense(12, activation="tanh", name="d2"),
        act("softsign", name="softsign"),
        act("silu" if flavour == "k3" else "swish", name="swish"),
        K.layers.Dense(12, activation="gelu", name="d3"),
        K.layers.ReLU(max_value=6.0, name="relu6"),
        K.layers.LeakyReLU(name="leaky"),
        K.layers.ELU(name="elu"),
        act("hard_sigmoid", name="hard_sigmoid"),
        K.layers.Dense(12, activation="sigmoid", name="d4"),
        act("mish", name="mish"),
        act("exponential", name="exp"),
        K.layers.ReLU(negative_slope=0.1, max_value=3.0, name="leaky_capped"),
        act("relu", name="relu"),
        *(
            [act("relu6", name="relu6_fn"), act("leaky_relu", name="leaky_fn")]
            if flavour == "k3"
            else []
        ),
        *([act("hard_silu", name="hard_silu")] if flavour == "k3" else []),
        K.layers.Dense(n, activation="softmax", name="predictions"),
    ]


def _logits(K: Any, flavour: str, n: int) -> list[Any]:
    """No softmax: the "probabilities" are the last Dense's values, as ct.convert gives them."""
    return [
        K.layers.AlphaDropout(0.1, name="alpha_drop"),
        K.layers.GaussianDropout(0.1, name="gauss_drop"),
        K.layers.ActivityRegularization(l1=0.01, name="reg"),
        K.layers.Dense(n, use_bias=False, name="logits"),
    ]


def _identities(K: Any, flavour: str, n: int) -> list[Any]:
    """Every layer that is the identity at inference, each at a rank it takes."""
    return [
        K.layers.RandomFlip(name="flip"),
        K.layers.RandomRotation(0.1, name="rotation"),
        K.layers.RandomZoom(0.1, name="zoom"),
        K.layers.RandomTranslation(0.1, 0.1, name="translation"),
        K.layers.RandomContrast(0.2, name="contrast"),
        # Keras 3.15 cannot write RandomBrightness to HDF5 ("cannot pickle 'module' object")
        *([K.layers.RandomBrightness(0.2, name="brightness")] if flavour == "k2" else []),
        K.layers.Identity(name="identity"),
        K.layers.Reshape((16, 8), name="to_sequence"),
        K.layers.SpatialDropout1D(0.2, name="spatial_drop_1d"),
        K.layers.Reshape((4, 2, 2, 8), name="to_volume"),
        K.layers.SpatialDropout3D(0.2, name="spatial_drop_3d"),
        K.layers.GlobalAveragePooling3D(name="gap_3d"),
        K.layers.Dense(n, activation="softmax", name="predictions"),
    ]


def _pool_ranks(K: Any, flavour: str, n: int) -> list[Any]:
    """Global pooling over one and three axes, with and without keepdims."""
    return [
        K.layers.Reshape((16, 8), name="to_sequence"),
        K.layers.GlobalMaxPooling1D(keepdims=True, name="gmp_1d"),
        K.layers.Reshape((1, 1, 1, 8), name="to_volume"),
        K.layers.GlobalMaxPooling3D(keepdims=True, name="gmp_3d"),
        K.layers.Reshape((2, 4), name="to_pairs"),
        K.layers.GlobalAveragePooling1D(name="gap_1d"),
        K.layers.Dense(n, activation="softmax", name="predictions"),
    ]


HEADS: dict[str, tuple[bool, Head]] = {  # name -> (split after pooling?, head)
    "mlp": (True, _mlp),
    "pooling": (False, _pooling),
    "shapes": (False, _shapes),
    "activations": (True, _activations),
    "logits": (True, _logits),
    "identities": (False, _identities),
    "pool_ranks": (False, _pool_ranks),
}


def _randomise(model: Any, rng: np.random.Generator) -> None:
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, var = weights
            weights = [
                rng.uniform(0.5, 1.5, gamma.shape),
                rng.normal(0, 0.3, beta.shape),
                rng.normal(0, 0.3, mean.shape),
                rng.uniform(0.2, 2.0, var.shape),
            ]
        else:
            weights = [rng.normal(0, 0.4, w.shape) for w in weights]
        layer.set_weights([w.astype(np.float32) for w in weights])


def save_tiny(path: Path, flavour: str, head: list[Any], pooled: bool, seed: int = 0) -> Path:
    """pixels (4, 4, 6) -> Conv2D 1x1 "stem" (8) [-> GlobalAveragePooling2D "pool"] -> head."""
    K = factory.keras_module(flavour)
    inp = K.Input((4, 4, 6), name="pixels")
    x = K.layers.Conv2D(8, 1, name="stem")(inp)
    if pooled:
        x = K.layers.GlobalAveragePooling2D(name="pool")(x)
    for layer in head:
        x = layer(x)
    model = K.Model(inp, x, name="tiny")
    _randomise(model, np.random.default_rng(seed))
    factory.zoo.save_h5(model, path)
    return path


HEAD_CLASSES = 3


def saved_head(saved, name: str, flavour: str) -> Path:
    """The tiny classifier with head ``name`` (3 classes), saved once per session."""
    pooled, head = HEADS[name]

    def save(path: Path) -> Path:
        K = factory.keras_module(flavour)
        return save_tiny(path, flavour, head(K, flavour, HEAD_CLASSES), pooled)

    return saved.get(f"head-{name}-{flavour}", save)


def split_after(graph: Graph, layer_name: str) -> int:
    """The cut tensor the named layer produces (a valid split point)."""
    return next(t for t in cut_tensors(graph) if graph.producer(t).layer.name == layer_name)


def model_plan(graph: Graph, split: int, n: int) -> ModelPlan:
    """What convert_head reads from a plan: the split tensor and the labels."""
    return ModelPlan(
        name=graph.source.stem,
        source=str(graph.source),
        keras_version=graph.keras_version,
        family=None,
        teachable_machine=False,
        input_shape=[4, 4, 6],
        preprocessing="none",
        labels=factory.default_labels(n),
        labels_source=None,
        output_size_known=True,
        parameters=graph.parameter_count(),
        split_tensor=split,
    )


# -- comparing ---------------------------------------------------------------------------------


def probabilities(spec: Any, x: np.ndarray) -> np.ndarray:
    out, _ = reference.evaluate_spec(spec, {specs.FEATURES: x}, model_dir=Path("."))
    return out[reference.PROBABILITIES]


def without_metadata(spec: Any) -> Any:
    desc = type(spec.description)()
    desc.CopyFrom(spec.description)
    desc.ClearField("metadata")
    return desc


def check_head(graph: Graph, plan: ModelPlan, seed: int = 0) -> dict[str, float]:
    """Head built from the weights vs ct.convert head vs Keras on the same features; returns
    the differences."""
    from convert.check.keras_model import layer_objects, load_keras_model, subgraph_function

    split, output = plan.split_tensor, graph.outputs[0]
    assert network.head_supported(graph, split, output, VECTOR) is None
    shape = specs.feature_shape(graph, split)
    fast = network.build_head(graph, split, plan.labels, shape, VECTOR)
    assert validate_spec(fast, "head from the weights", strict_types=True) == []
    assert specs.serialise(fast) == specs.serialise(
        network.build_head(graph, split, plan.labels, shape, VECTOR)
    )

    assert fast.specificationVersion >= specs.SPEC_VERSION
    assert pipeline_problems(fast) == []

    x = np.random.default_rng(seed).normal(0, 1, (BATCH, *shape[1:])).astype(np.float32)
    p_fast = probabilities(fast, x)
    objects = layer_objects(load_keras_model(graph), graph)
    p_keras = np.asarray(subgraph_function(graph, objects, split, output)(x))
    scale = max(1.0, float(np.abs(p_keras).max()))  # logits need not lie in [0, 1]
    diffs = {"keras": float(np.abs(p_fast - p_keras).max()) / scale}
    assert (p_fast.argmax(1) == p_keras.argmax(1)).all()
    slow = ct_convert.convert_head(graph, objects, plan)
    assert without_metadata(fast) == without_metadata(slow)  # the same interface, exactly
    assert fast.neuralNetworkClassifier.arrayInputShapeMapping == (
        slow.neuralNetworkClassifier.arrayInputShapeMapping
    )
    p_slow = probabilities(slow, x)
    diffs["ct"] = float(np.abs(p_fast - p_slow).max()) / scale
    assert (p_fast.argmax(1) == p_slow.argmax(1)).all()
    assert max(diffs.values()) <= TOLERANCE, diffs
    return diffs


def pipeline_problems(head: Any) -> list[str]:
    """The head behind a LinkedModel stub whose output is the head's input, as build.py does."""
    coremltools()
    from coremltools.proto import Model_pb2

    backbone = Model_pb2.Model()
    backbone.specificationVersion = specs.SPEC_VERSION
    image = backbone.description.input.add()
    image.name = specs.IMAGE
    image.type.imageType.width = image.type.imageType.height = 4
    image.type.imageType.colorSpace = image.type.imageType.RGB
    backbone.description.output.add().CopyFrom(head.description.input[0])
    wrapped = pipeline.make_pipeline(pipeline.make_stub(backbone, "Backbone.mlmodel"), head)
    return validate_spec(wrapped, "pipeline", strict_types=True)


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("name", list(HEADS))
def test_tiny_heads_match_ct_convert_and_keras(saved, flavour: str, name: str) -> None:
    pooled = HEADS[name][0]
    graph = read_model(saved_head(saved, name, flavour))
    split = split_after(graph, "pool" if pooled else "stem")
    check_head(graph, model_plan(graph, split, HEAD_CLASSES))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_elu_alpha_matches_ct_convert_and_keras(tmp_path: Path, flavour: str) -> None:
    """ELU(alpha != 1): ct.convert lowers it to a select (whereBroadcastable), the head built
    from the weights to Core ML's ELU layer."""
    K = factory.keras_module(flavour)
    head = [
        K.layers.Dense(6, name="hidden"),
        K.layers.ELU(alpha=0.5, name="elu"),
        K.layers.Dense(3, activation="softmax", name="predictions"),
    ]
    graph = read_model(save_tiny(tmp_path / f"elu_{flavour}.h5", flavour, head, True))
    check_head(graph, model_plan(graph, split_after(graph, "pool"), 3))


def test_zoo_heads_match_ct_convert(zoo: Path) -> None:
    """The session zoo: Dropout / Dense relu / Dense softmax heads, Teachable Machine's no-bias
    Dense, Keras 3 and tf_keras, nested and flat."""
    plan, graphs = make_plan(zoo)
    checked = 0
    for model in plan.models:
        if model.split_tensor is None:
            continue
        check_head(graphs[model.name], model)
        checked += 1
    assert checked >= 5


def test_4d_head_input_and_pipeline(tmp_path: Path) -> None:
    path = save_tiny(
        tmp_path / "pooling.h5", "k3", _pooling(factory.keras_module("k3"), "k3", 2), False
    )
    graph = read_model(path)
    split = split_after(graph, "stem")
    spec = network.build_head(graph, split, ["a", "b"], [1, 4, 4, 8], VECTOR)
    features = spec.description.input[0]
    assert features.name == specs.FEATURES
    assert list(features.type.multiArrayType.shape) == [1, 4, 4, 8]
    assert pipeline_problems(spec) == []
    kinds = [layer.WhichOneof("layer") for layer in spec.neuralNetworkClassifier.layers]
    assert kinds == [
        "transpose",
        "batchnorm",
        "transpose",
        "reduceMean",
        "innerProduct",
        "softmaxND",
    ]
    assert spec.neuralNetworkClassifier.layers[-1].output[0] == specs.CLASS_PROBS
    assert list(spec.neuralNetworkClassifier.stringClassLabels.vector) == ["a", "b"]


def test_epsilon_and_weights_come_from_the_file(tmp_path: Path) -> None:
    K = factory.keras_module("k2")
    path = save_tiny(tmp_path / "mlp.h5", "k2", _mlp(K, "k2", 3), True)
    graph = read_model(path)
    spec = network.build_head(graph, split_after(graph, "pool"), ["x", "y", "z"], [1, 8], VECTOR)
    layers = {layer.name: layer for layer in spec.neuralNetworkClassifier.layers}
    assert layers["bn"].batchnorm.epsilon == pytest.approx(0.01)
    hidden = layers["hidden"].innerProduct
    assert (hidden.inputChannels, hidden.outputChannels, hidden.hasBias) == (8, 16, True)
    layer = next(layer for layer in graph.layers() if layer.name == "hidden")
    kernel = next(w for w in layer.weights if w.name == "kernel")
    values = load_weight(graph.source, kernel).astype(np.float32)  # Keras [in, out]
    np.testing.assert_array_equal(np.asarray(hidden.weights.floatValue).reshape(16, 8), values.T)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_unsupported_heads_name_the_layer(tmp_path: Path, flavour: str) -> None:
    K = factory.keras_module(flavour)
    conv = [
        K.layers.Conv2D(4, 3, name="head_conv"),
        K.layers.GlobalAveragePooling2D(name="gap"),
        K.layers.Dense(3, activation="softmax", name="predictions"),
    ]
    graph = read_model(save_tiny(tmp_path / "conv.h5", flavour, conv, False))
    split = split_after(graph, "stem")
    reason = network.head_supported(graph, split, graph.outputs[0], VECTOR)
    assert reason is not None and "head_conv" in reason and "Conv2D" in reason
    with pytest.raises(ConversionError, match="head_conv"):
        network.build_head(graph, split, ["a", "b", "c"], [1, 4, 4, 8], VECTOR)

    # two branches joined again: not a single chain
    inp = K.Input((4, 4, 6), name="pixels")
    x = K.layers.GlobalAveragePooling2D(name="pool")(K.layers.Conv2D(8, 1, name="stem")(inp))
    a = K.layers.Dense(3, name="branch_a")(x)
    b = K.layers.Dense(3, name="branch_b")(x)
    out = K.layers.Softmax(name="softmax")(K.layers.Add(name="join")([a, b]))
    path = tmp_path / "branches.h5"
    factory.zoo.save_h5(K.Model(inp, out), path)
    graph = read_model(path)
    reason = network.head_supported(graph, split_after(graph, "pool"), graph.outputs[0], VECTOR)
    assert reason is not None and "branch_b" in reason


def test_unsupported_configurations(tmp_path: Path) -> None:
    K = factory.keras_module("k3")
    head = [
        K.layers.Dense(8, name="hidden"),
        K.layers.ReLU(threshold=0.5, name="thresholded"),
        K.layers.Dense(3, activation="softmax", name="predictions"),
    ]
    graph = read_model(save_tiny(tmp_path / "threshold.h5", "k3", head, True))
    reason = network.head_supported(graph, split_after(graph, "pool"), graph.outputs[0], VECTOR)
    assert reason is not None and "thresholded" in reason and "ReLU" in reason

    head = [K.layers.Dense(3, activation="log_softmax", name="predictions")]
    graph = read_model(save_tiny(tmp_path / "log_softmax.h5", "k3", head, True))
    reason = network.head_supported(graph, split_after(graph, "pool"), graph.outputs[0], VECTOR)
    assert reason is not None and "predictions" in reason and "log_softmax" in reason

    # keras.ops.softmax is stored as an operation named "Softmax", like the layer: not a layer
    inp = K.Input((4, 4, 6), name="pixels")
    x = K.layers.GlobalAveragePooling2D(name="pool")(K.layers.Conv2D(8, 1, name="stem")(inp))
    out = factory.keras_module("k3").ops.softmax(K.layers.Dense(3, name="logits")(x))
    path = tmp_path / "ops_softmax.h5"
    factory.zoo.save_h5(K.Model(inp, out), path)
    graph = read_model(path)
    assert graph.producer(graph.outputs[0]).layer.class_name == "Softmax"
    reason = network.head_supported(graph, split_after(graph, "pool"), graph.outputs[0], VECTOR)
    assert reason is not None and "keras.ops" in reason


def test_label_count_must_match(tmp_path: Path) -> None:
    K = factory.keras_module("k3")
    graph = read_model(save_tiny(tmp_path / "logits.h5", "k3", _logits(K, "k3", 3), True))
    with pytest.raises(ConversionError, match="2 labels"):
        network.build_head(graph, split_after(graph, "pool"), ["a", "b"], [1, 8], VECTOR)
