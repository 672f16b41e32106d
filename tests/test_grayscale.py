"""Inputs of shape (None, H, W), without a channel axis (MNIST's 28 x 28), become grayscale
image inputs: converted from the weights, shared, and verified against Keras."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import factory
import numpy as np
import pytest
from coremltools.proto import Model_pb2

from convert.cli import main
from convert.errors import ModelFileError
from convert.plan.cuts import image_input_shape
from convert.read.h5 import read_model


def _mnist(path: Path, flavour: str, head_seed: int, conv: bool = True) -> Path:
    """Input(28, 28) -> [Reshape(28, 28, 1) -> Conv2D -> pooling ->] Flatten -> Dense(10); the
    trunk's weights fixed (seed 0), the last Dense seeded by ``head_seed``."""
    K = factory.keras_module(flavour)
    inp = K.Input((28, 28), name="digits")
    if conv:
        x = K.layers.Reshape((28, 28, 1), name="channel")(inp)
        x = K.layers.Conv2D(8, 3, activation="relu", name="conv")(x)
        x = K.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv2")(x)
        x = K.layers.Flatten(name="flat")(x)
    else:
        x = K.layers.Flatten(name="flat")(inp)
    x = K.layers.Dense(32, activation="relu", name="hidden")(x)
    out = K.layers.Dense(10, activation="softmax", name="digit")(x)
    model = K.Model(inp, out, name="mnist")
    for layer in model.layers:
        seed = head_seed if layer.name == "digit" else 0
        rng = np.random.default_rng(seed)
        layer.set_weights([rng.normal(0, 0.2, w.shape).astype("float32") for w in layer.weights])
    factory.zoo.save_h5(model, path)
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("grayscale") / "models"
    models.mkdir()
    _mnist(models / "digits_a.h5", "k3", head_seed=1)
    _mnist(models / "digits_b.h5", "k3", head_seed=2)
    _mnist(models / "flat_k2.h5", "k2", head_seed=3, conv=False)
    return models


def test_an_input_without_channels_is_a_grayscale_image(digits: Path) -> None:
    graph = read_model(digits / "digits_a.h5")
    assert graph.tensors[graph.inputs[0]].shape == (None, 28, 28)
    assert image_input_shape(graph) == [28, 28, 1]


def test_grayscale_models_convert_share_and_verify(digits: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    code = main(["convert", str(digits), "--out", str(out), "--verify", "--count", "8", "-q"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    [backbone] = report["backbones"]
    assert sorted(backbone["members"]) == ["digits_a", "digits_b"]
    verified = {v["name"]: v for v in report["verify"]}
    assert sorted(verified) == ["digits_a", "digits_b", "flat_k2"]
    assert all(v["passed"] for v in verified.values())
    for name in ("digits_a.mlmodel", "flat_k2.mlmodel", backbone["file"]):
        spec = Model_pb2.Model.FromString((out / name).read_bytes())
        image = spec.description.input[0].type.imageType
        assert (image.width, image.height, image.colorSpace) == (28, 28, image.GRAYSCALE)


def test_other_shapes_are_still_refused(tmp_path: Path) -> None:
    K = factory.keras_module("k3")
    inp = K.Input((28, 28, 2))
    model = K.Model(inp, K.layers.Dense(3, activation="softmax")(K.layers.Flatten()(inp)))
    path = tmp_path / "two_channels.h5"
    factory.zoo.save_h5(model, path)
    with pytest.raises(ModelFileError) as caught:
        image_input_shape(read_model(path))
    assert "(None, 28, 28, 2) is not an image" in caught.value.reason
    assert "(None, H, W) for grayscale" in caught.value.reason


def test_the_coremltools_road_takes_them_too(digits: Path, tmp_path: Path) -> None:
    """ct.convert traces the model on the (1, H, W, 1) image, reshaped to what it declares
    (the shared pair: their backbone through ct.convert, their heads from the weights)."""
    models = tmp_path / "models"
    models.mkdir()
    for name in ("digits_a.h5", "digits_b.h5"):
        shutil.copy(digits / name, models / name)
    out = tmp_path / "build"
    argv = ["convert", str(models), "--out", str(out), "--backbone-converter", "coremltools"]
    assert main([*argv, "--verify", "--count", "4", "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [b["builder"] for b in report["backbones"]] == ["coremltools"]
    assert all(v["passed"] for v in report["verify"]) and len(report["verify"]) == 2
