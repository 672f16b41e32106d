"""Backbones built straight from the .h5 weights (convert/build/network.py, NCHW layout).

Each construct below is a small Keras model, saved in both flavours, whose whole output is
treated as the backbone's split tensor. The direct build must be valid under Core ML's rules
(strict types) and, run by the numpy evaluator, give the loaded Keras model's output. Between
them the constructs cover every layer kind the NCHW walk writes: convolutions of each kind with
and without a folded BatchNormalization, padding, cropping, pooling, squeeze-and-excitation,
concatenation on each axis, rescaling and normalisation, merge layers and arithmetic written as
keras.ops / TFOpLambda calls, and the flat tail (Flatten in NHWC order, Dense, BatchNorm).

The end-to-end tests check that a zoo whose backbones and heads are all covered converts
without importing TensorFlow, standalone models included, and that the choice of builder is
part of the cache key and of the report.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import digests
import numpy as np
import pytest
import zoos

from convert.build import network
from convert.check.validate import validate_spec
from convert.cli import main
from convert.read.families import PREPROCESSING
from convert.read.h5 import read_model

reference = pytest.importorskip("convert.check.reference")

SIZE = 12  # even: a stride-2 "same" convolution pads one pixel more at the bottom and right
ROOT = Path(__file__).resolve().parents[1]


def _keras(flavour: str) -> Any:
    from convert.heavy import keras

    return keras(3 if flavour == "k3" else 2)


# -- the constructs: K (a Keras module) and the input tensor -> the output tensor ------------


def _conv_bn(K, x):
    x = K.layers.Conv2D(8, 3, strides=2, padding="same", name="conv")(x)
    x = K.layers.BatchNormalization(name="bn")(x)
    return K.layers.ReLU(6.0, name="relu6")(x)


def _conv_dilated(K, x):
    x = K.layers.Conv2D(6, 3, dilation_rate=2, use_bias=False, activation="swish")(x)
    x = K.layers.Conv2D(8, (3, 1), padding="same", groups=2, name="grouped")(x)
    return K.layers.BatchNormalization(center=False, scale=False, name="bn")(x)


def _depthwise(K, x):
    x = K.layers.Conv2D(4, 1, name="expand")(x)
    x = K.layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2, padding="same")(x)
    x = K.layers.BatchNormalization(name="bn")(x)
    return K.layers.Activation("relu")(x)


def _separable(K, x):
    x = K.layers.ZeroPadding2D(((1, 2), (0, 1)))(x)
    x = K.layers.SeparableConv2D(6, 3, strides=2, depth_multiplier=2, name="sep")(x)
    x = K.layers.BatchNormalization(epsilon=1e-5, name="bn")(x)
    return K.layers.SeparableConv2D(5, 3, padding="same", activation="elu", name="sep2")(x)


def _unfoldable_bn(K, x):
    y = K.layers.Conv2D(6, 3, padding="same", name="conv")(x)
    z = K.layers.BatchNormalization(name="bn_reads_conv")(y)
    s = K.layers.Add()([y, z])  # the convolution's output has two readers: no folding
    s = K.layers.BatchNormalization(name="bn_after_add")(s)
    return K.layers.LeakyReLU(name="leaky")(s)


def _pooling(K, x):
    x = K.layers.Conv2D(6, 1, name="conv")(x)
    a = K.layers.MaxPooling2D(3, strides=2, padding="same")(x)
    b = K.layers.AveragePooling2D(2, padding="same")(x)
    b = K.layers.AveragePooling2D(2, strides=1)(b)
    b = K.layers.ZeroPadding2D(((1, 0), (0, 1)))(b)
    b = K.layers.Cropping2D(((0, 1), (1, 0)))(b)
    a = K.layers.Cropping2D(((0, 1), (1, 0)))(a)
    x = K.layers.Concatenate()([a, b])
    return K.layers.GlobalMaxPooling2D(keepdims=True)(x)


def _squeeze_excite(K, x):
    x = K.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(x)
    s = K.layers.GlobalAveragePooling2D()(x)
    s = K.layers.Reshape((1, 1, 8))(s)
    s = K.layers.Conv2D(2, 1, activation="relu", name="squeeze")(s)
    s = K.layers.Conv2D(8, 1, activation="sigmoid", name="excite")(s)
    return K.layers.Multiply()([x, s])


def _concat_axes(K, x):
    x = K.layers.Conv2D(4, 3, padding="same", name="conv")(x)
    rows = K.layers.Concatenate(axis=1)([x, x])  # along H
    cols = K.layers.Concatenate(axis=2)([x, x])  # along W
    rows = K.layers.Cropping2D(((0, SIZE), (0, 0)))(rows)
    cols = K.layers.Cropping2D(((0, 0), (SIZE, 0)))(cols)
    return K.layers.Concatenate(axis=-1)([rows, cols, x])


def _rescale_normalise(K, x):
    x = K.layers.Rescaling([0.5, 1.0, 2.0], offset=-0.25)(x)
    norm = K.layers.Normalization(axis=-1)
    x = norm(x)
    norm.set_weights([np.array([0.1, -0.2, 0.3]), np.array([0.5, 2.0, 0.01]), np.array(9)])
    norm.finalize_state()
    x = K.layers.Normalization(axis=-1, mean=[0.2, 0.1, 0.0], variance=[4.0, 1.0, 0.25])(x)
    x = K.layers.Rescaling(0.5)(x)
    return K.layers.Conv2D(4, 3, name="conv")(x)


def _arithmetic(K, x):
    x = K.layers.Conv2D(4, 3, padding="same", name="conv")(x)
    y = K.layers.Conv2D(4, 1, name="conv2")(x)
    x = x + 3.0
    x = 3.0 - x
    x = x * 0.5
    x = x / 4.0
    x = x + y
    x = x - y * 2.0
    x = K.layers.Subtract()([x, y])
    x = K.layers.Maximum()([x, y])
    x = K.layers.Minimum()([x, y * 3.0])
    return K.layers.Average()([x, y, y])


def _arithmetic_calls(K, x):
    """The arithmetic functions that operators do not write: tf.math.add / divide in tf_keras,
    keras.ops.add / divide / true_divide in Keras 3."""
    x = K.layers.Conv2D(4, 3, padding="same", name="conv")(x)
    y = K.layers.Conv2D(4, 1, name="conv2")(x)
    if K.__name__.startswith("tf_keras"):
        from convert.heavy import tensorflow

        tf = tensorflow()
        return tf.math.divide(tf.math.add(x, y), 2.0)
    ops = K.ops
    return ops.true_divide(ops.divide(ops.add(x, y), 2.0), 4.0)


def _flat_tail(K, x):
    x = K.layers.Conv2D(3, 3, strides=2, name="conv")(x)  # 6x6x3: Flatten order shows
    x = K.layers.Flatten()(x)
    x = K.layers.Dense(12, activation="tanh", name="dense")(x)
    x = K.layers.BatchNormalization(name="bn_flat")(x)
    x = K.layers.Reshape((2, 2, 3))(x)  # back to an image, NHWC order
    x = K.layers.Conv2D(5, 1, name="conv2")(x)
    return K.layers.Flatten()(x)


CONSTRUCTS: dict[str, Callable[[Any, Any], Any]] = {
    "conv_bn": _conv_bn,
    "conv_dilated": _conv_dilated,
    "depthwise": _depthwise,
    "separable": _separable,
    "unfoldable_bn": _unfoldable_bn,
    "pooling": _pooling,
    "squeeze_excite": _squeeze_excite,
    "concat_axes": _concat_axes,
    "rescale_normalise": _rescale_normalise,
    "arithmetic": _arithmetic,
    "arithmetic_calls": _arithmetic_calls,
    "flat_tail": _flat_tail,
}


def _randomise(model: Any, seed: int) -> None:
    """Weights far from Keras' defaults, so that every one matters: BatchNorm statistics and
    affine terms included."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.__class__.__name__ == "Normalization":
            continue
        values = []
        for w in layer.get_weights():
            if "variance" in str(w.dtype) or w.ndim == 1:
                values.append(rng.uniform(0.5, 1.5, w.shape).astype(w.dtype))
            else:
                values.append(rng.normal(0.0, 0.5, w.shape).astype(w.dtype))
        if values:
            layer.set_weights(values)


def _save(path: Path, flavour: str, construct: str) -> Path:
    K = _keras(flavour)
    K.utils.set_random_seed(0)
    inp = K.Input((SIZE, SIZE, 3), name="image")
    model = K.Model(inp, CONSTRUCTS[construct](K, inp), name=construct)
    _randomise(model, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path), include_optimizer=False)
    K.backend.clear_session()
    return path


def saved_construct(saved, construct: str, flavour: str) -> Path:
    """The construct's file, saved once per session (the ``saved`` fixture)."""
    return saved.get(f"construct-{construct}-{flavour}", lambda p: _save(p, flavour, construct))


def _images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.mark.parametrize("flavour", ["k3", "k2"])
@pytest.mark.parametrize("construct", sorted(CONSTRUCTS))
def test_direct_build_matches_keras(saved, tmp_path: Path, construct: str, flavour: str) -> None:
    from convert.check.keras_model import load_keras_model

    graph = read_model(saved_construct(saved, construct, flavour))
    output = graph.outputs[0]
    assert network.supported(graph, output) is None
    pre = PREPROCESSING["unit"]
    spec = network.build_backbone(graph, output, pre, [SIZE, SIZE, 3])
    assert validate_spec(spec, "backbone.mlmodel", strict_types=True) == []
    pixels = _images()
    got, _ = reference.evaluate_spec(spec, {"image": pixels}, model_dir=tmp_path)
    model = load_keras_model(graph)
    expected = np.asarray(model(pre.apply(pixels), training=False))
    got = got["features"].reshape(expected.shape)
    scale = float(np.max(np.abs(expected)))
    assert scale > 1e-3, "a construct whose output is ~0 tests nothing"
    worst = float(np.max(np.abs(got - expected))) / scale
    assert worst <= 1e-5, f"max |d| / max |y| = {worst:.2e}"


def test_bn_is_folded_only_where_it_may_be(saved) -> None:
    """A BatchNorm that alone reads a convolution disappears into it; one that does not stays
    as a layer (a scale layer)."""
    folded = read_model(saved_construct(saved, "conv_bn", "k3"))
    kept = read_model(saved_construct(saved, "unfoldable_bn", "k3"))
    pre = PREPROCESSING["unit"]
    kinds = {}
    for name, graph in (("folded", folded), ("kept", kept)):
        spec = network.build_backbone(graph, graph.outputs[0], pre, [SIZE, SIZE, 3])
        kinds[name] = [layer.WhichOneof("layer") for layer in spec.neuralNetwork.layers]
    assert "scale" not in kinds["folded"] and "batchnorm" not in kinds["folded"]
    assert kinds["kept"].count("scale") == 2


def test_uncovered_layer_is_named(tmp_path: Path) -> None:
    K = _keras("k3")
    inp = K.Input((SIZE, SIZE, 3), name="image")
    x = K.layers.Conv2D(4, 3, name="conv")(inp)
    x = K.layers.UpSampling2D(name="upsample")(x)
    K.Model(inp, x).save(str(tmp_path / "up.h5"))
    K.backend.clear_session()
    graph = read_model(tmp_path / "up.h5")
    reason = network.supported(graph, graph.outputs[0])
    assert reason is not None and "'upsample' (UpSampling2D)" in reason


# -- end to end -------------------------------------------------------------------------------


def _convert_in_subprocess(zoo: Path, out: Path, *extra: str) -> dict[str, Any]:
    """Run the CLI in a fresh interpreter; returns its exit code and whether TensorFlow or
    Keras got imported."""
    argv = ["convert", str(zoo), "--out", str(out), "--quiet", *extra]
    code = (
        "import json, sys\n"
        "from convert.cli import main\n"
        f"rc = main({argv!r})\n"
        "print(json.dumps({'rc': rc, 'tensorflow': 'tensorflow' in sys.modules,"
        " 'keras': 'keras' in sys.modules or 'tf_keras' in sys.modules}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_covered_zoo_converts_without_tensorflow(zoo: Path, built, tmp_path: Path) -> None:
    """The session zoo (MobileNetV2 backbones, Dense heads): every backbone built from the
    weights, no TensorFlow imported, and the files are byte for byte those of the session build,
    whose pipelines test_verify.py verifies against Keras."""
    out = tmp_path / "out"
    ran = _convert_in_subprocess(zoo, out)
    assert ran == {"rc": 0, "tensorflow": False, "keras": False}
    report = json.loads((out / "report.json").read_text())
    assert report["backbones"] and {b["builder"] for b in report["backbones"]} == {"direct"}
    session, code = built
    assert code == 0
    files = sorted(p.name for p in out.glob("*.mlmodel"))
    assert files == sorted(p.name for p in session.glob("*.mlmodel"))
    assert [f for f in files if (out / f).read_bytes() != (session / f).read_bytes()] == []


def test_standalone_model_built_directly(tmp_path: Path) -> None:
    """A zoo of one model shares nothing: the whole classifier is built from the weights,
    without TensorFlow, and matches Keras."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    zoos.standalone(zoo)
    out = tmp_path / "out"
    ran = _convert_in_subprocess(zoo, out)
    assert ran == {"rc": 0, "tensorflow": False, "keras": False}
    digests.check("standalone", zoo, out)
    report = json.loads((out / "report.json").read_text())
    assert [c["group"] for c in report["classifiers"]] == [None]
    spec = reference.load(out / "only.mlmodel").spec
    assert spec.WhichOneof("Type") == "neuralNetworkClassifier"
    assert main(["verify", str(out), "--quiet"]) == 0


def test_builder_is_part_of_the_recipe(zoo: Path, built, tmp_path: Path) -> None:
    """Switching --backbone-converter rewrites the backbones (and says so in the report);
    switching back rewrites them again, byte-identical to the first build (the session build,
    copied with its cache: the first "auto" finds nothing stale)."""
    out = tmp_path / "out"
    shutil.copytree(built[0], out)
    backbone_bytes = {}
    for converter in ("auto", "coremltools", "auto"):
        assert (
            main(["convert", str(zoo), "--out", str(out), "-q", "--backbone-converter", converter])
            == 0
        )
        report = json.loads((out / "report.json").read_text())
        builders = {b["builder"] for b in report["backbones"]}
        assert builders == {"direct" if converter == "auto" else "coremltools"}
        files = sorted(b["file"] for b in report["backbones"])
        backbone_bytes.setdefault(converter, []).append([(out / f).read_bytes() for f in files])
        digests.check("session" if converter == "auto" else "session-coremltools", zoo, out)
    assert backbone_bytes["auto"][0] == backbone_bytes["auto"][1]
    assert backbone_bytes["auto"][0] != backbone_bytes["coremltools"][0]


def test_one_by_one_size_is_exact_without_copying_the_backbone(
    built: tuple[Path, int],
) -> None:
    """The report's one-by-one size is worked out from the backbone's layer sizes instead of a
    merged copy per classifier; it must equal the merged spec's serialised size."""
    from convert.build import pipeline, spec

    out, code = built
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for row in report["backbones"]:
        backbone = reference.load(out / row["file"]).spec
        layer_bytes = pipeline.layers_size(backbone)
        for name in row["members"]:
            head = reference.load(out / f"{name}.mlmodel").spec.pipelineClassifier.pipeline
            head = head.models[1]
            whole = pipeline.merge_standalone(backbone, head)
            without = pipeline.merge_standalone(backbone, head, backbone_layers=False)
            assert pipeline.standalone_size(without, layer_bytes) == whole.ByteSize()
            assert len(spec.serialise(whole)) == whole.ByteSize()


def test_packed_graphs_round_trip(zoo: Path) -> None:
    from convert.plan.make import make_plan

    plan, graphs = make_plan(zoo)
    for model in plan.models:
        a, b = graphs[model.name], graphs[model.name]
        assert a is not b  # a fresh copy each time
        assert [n.layer.config for n in a.nodes] == [n.layer.config for n in b.nodes]
        assert a.tensors[a.outputs[0]].shape == b.tensors[b.outputs[0]].shape
