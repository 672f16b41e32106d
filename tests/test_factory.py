"""Smoke tests of the fixture builders in tests/factory.py and of scripts/make_demo_zoo.py."""

from __future__ import annotations

import json
from pathlib import Path

import factory
import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset under model_weights (or the root), by path."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]

        root.visititems(visit)
    return out


def backbone_datasets(path: Path) -> dict[tuple[str, str], np.ndarray]:
    """Backbone weights keyed by (layer, weight), with Keras 2 / Keras 3 naming normalised."""
    out = {}
    for name, value in datasets(path).items():
        layer, weight = name.split("/")[-2:]
        if layer in ("predictions", "dense_hidden"):
            continue
        weight = weight.removesuffix(":0").replace("depthwise_kernel", "kernel")
        out[(layer, weight)] = value
    return out


def attrs(path: Path) -> dict[str, object]:
    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def model_config(path: Path) -> dict:
    return json.loads(attrs(path)["model_config"])


def load(path: Path, flavour: str):
    module = factory.keras_module(flavour)
    return module.models.load_model(str(path), compile=False)


def test_backbone_weights_match_across_flavours_and_depend_on_seed():
    k2 = factory.mobilenet_backbone("k2", seed=0)
    k3 = factory.mobilenet_backbone("k3", seed=0)
    other = factory.mobilenet_backbone("k3", seed=1)
    checked = 0
    for layer in k3.layers:
        if not layer.weights:
            continue
        ours = layer.get_weights()
        theirs = k2.get_layer(layer.name).get_weights()
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert a.tobytes() == b.tobytes(), layer.name
        checked += 1
    assert checked > 100
    assert not np.array_equal(
        k3.get_layer("Conv1").get_weights()[0], other.get_layer("Conv1").get_weights()[0]
    )
    # Calibrated BatchNorm statistics, not the 0/1 defaults.
    _, _, mean, var = k3.get_layer("block_3_expand_BN").get_weights()
    assert np.abs(mean).max() > 0.01 and np.abs(var - 1).max() > 0.01
    features = np.asarray(k3(factory.zoo.synthetic_batch(64, seed=9, n=4), training=False))
    assert features.shape == (4, 1280) and np.isfinite(features).all() and features.std() > 0.01


@pytest.mark.parametrize("layout", ["nested", "flat", "sequential"])
@pytest.mark.parametrize("flavour", ["k2", "k3"])
def test_transfer_classifier(tmp_path, flavour, layout):
    path = factory.save_transfer_classifier(
        tmp_path / "clf.h5", flavour=flavour, layout=layout, n_classes=4, hidden=8, dropout=True
    )
    assert path.exists()
    assert str(attrs(path)["keras_version"]).startswith(flavour[1])
    assert (tmp_path / "clf.labels.txt").read_text().splitlines() == [
        "class_a",
        "class_b",
        "class_c",
        "class_d",
    ]
    config = model_config(path)
    assert config["class_name"] == ("Sequential" if layout == "sequential" else "Functional")
    top = [layer["class_name"] for layer in config["config"]["layers"]]
    if layout == "flat":
        assert "DepthwiseConv2D" in top and "Functional" not in top
    else:
        assert "Functional" in top and "DepthwiseConv2D" not in top
    assert top.count("Dense") == 2 and "Dropout" in top
    model = load(path, flavour)
    assert len(model.trainable_weights) == 4  # the head's two Dense layers; the backbone is frozen
    probs = np.asarray(model(factory.zoo.synthetic_batch(64, seed=3, n=2), training=False))
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)


def test_backbone_bit_identical_in_k2_and_k3_files(tmp_path):
    k2 = factory.save_transfer_classifier(tmp_path / "a.h5", flavour="k2", labels=False)
    k3 = factory.save_transfer_classifier(tmp_path / "b.h5", flavour="k3", labels=["x", "y", "z"])
    assert not (tmp_path / "a.labels.txt").exists()
    assert (tmp_path / "b.labels.txt").read_text() == "x\ny\nz\n"
    a, b = backbone_datasets(k2), backbone_datasets(k3)
    assert len(a) == 260 and a.keys() == b.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    x = factory.zoo.synthetic_batch(64, seed=4, n=2)
    np.testing.assert_allclose(load(k2, "k2")(x), load(k3, "k3")(x), atol=1e-5)


def test_teachable_machine_submodel_names_differ_weights_do_not(tmp_path):
    one = factory.save_teachable_machine(tmp_path / "tm1", submodel_name="model1", n_classes=3)
    two = factory.save_teachable_machine(tmp_path / "tm2", submodel_name="model2", n_classes=3)
    assert (tmp_path / "tm1" / "labels.txt").read_text() == "0 Class 1\n1 Class 2\n2 Class 3\n"
    assert str(attrs(one)["keras_version"]).startswith("2")

    def submodel(path):
        outer = model_config(path)
        assert outer["class_name"] == "Sequential"
        inner = [e for e in outer["config"]["layers"] if e["class_name"] == "Sequential"]
        assert [e["config"]["name"] for e in inner] == ["sequential_1", "sequential_3"]
        sub = inner[0]["config"]["layers"]
        sub = [e for e in sub if e["class_name"] in ("Functional", "Model")][0]
        names = [layer["name"] for layer in sub["config"]["layers"]]
        assert names[1:3] == ["Conv1_pad", "Conv1"] and names[-1] == "out_relu"
        head = [e["config"] for e in inner[1]["config"]["layers"] if e["class_name"] == "Dense"]
        assert [(h["units"], h["use_bias"]) for h in head] == [(100, True), (3, False)]
        return sub["config"]["name"]

    assert (submodel(one), submodel(two)) == ("model1", "model2")
    a, b = datasets(one), datasets(two)
    backbone = [k for k in a if k.startswith("sequential_1/")]
    assert len(backbone) == 260 and a.keys() == b.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    # Same backbone weights as the keras.applications fixtures with the same seed.
    k3 = backbone_datasets(factory.save_transfer_classifier(tmp_path / "k3.h5", labels=False))
    tm = backbone_datasets(one)
    assert all(tm[key].tobytes() == k3[key].tobytes() for key in k3)
    probs = np.asarray(load(one, "k2")(factory.zoo.synthetic_batch(64, seed=2, n=1)))
    assert probs.shape == (1, 3)


@pytest.mark.parametrize("flavour", ["k2", "k3"])
def test_perturbed_bn_differs_in_exactly_one_element(tmp_path, flavour):
    src = factory.save_transfer_classifier(tmp_path / "src.h5", flavour=flavour, labels=False)
    dst = factory.perturb_bn_moving_mean(src, tmp_path / "dst.h5", delta=0.5)
    a, b = datasets(src), datasets(dst)
    assert a.keys() == b.keys()
    changed = [(k, int((a[k] != b[k]).sum())) for k in a if not np.array_equal(a[k], b[k])]
    assert len(changed) == 1 and changed[0][1] == 1
    key = changed[0][0]
    assert "block_3" in key and "moving_mean" in key
    np.testing.assert_allclose((b[key] - a[key]).max(), 0.5, rtol=1e-6)
    x = factory.zoo.synthetic_batch(64, seed=1, n=2)
    before = np.asarray(load(src, flavour)(x, training=False))
    after = np.asarray(load(dst, flavour)(x, training=False))
    assert np.abs(before - after).max() > 1e-5


def test_bad_inputs(tmp_path):
    real = factory.save_transfer_classifier(tmp_path / "real.h5", labels=False)
    for path in (
        factory.write_not_hdf5(tmp_path / "text.h5"),
        factory.write_truncated(tmp_path / "half.h5", real),
    ):
        with pytest.raises(OSError):
            h5py.File(path, "r")
    assert (tmp_path / "half.h5").stat().st_size == real.stat().st_size // 2

    k2 = factory.write_weights_only(tmp_path / "k2_weights.h5", "k2")
    assert "model_config" not in attrs(k2)
    assert str(attrs(k2)["keras_version"]).startswith("2") and "layer_names" in attrs(k2)
    k3 = factory.write_weights_only(tmp_path / "k3_weights.h5", "k3")
    assert attrs(k3) == {}
    with h5py.File(k3, "r") as f:
        assert {"layers", "vars"} <= set(f.keys())

    for flavour in ("k2", "k3"):
        path = factory.write_no_image_input(tmp_path / f"vec_{flavour}.h5", flavour)
        assert str(attrs(path)["keras_version"]).startswith(flavour[1])
        first = model_config(path)["config"]["layers"][0]["config"]
        assert (first.get("batch_input_shape") or first.get("batch_shape"))[1:] == [16]

    path = factory.write_lambda(tmp_path / "lambda.h5")
    classes = [layer["class_name"] for layer in model_config(path)["config"]["layers"]]
    assert "Lambda" in classes and str(attrs(path)["keras_version"]).startswith("2")


@pytest.mark.parametrize(("flavour", "culprit"), [("k3", "Discretization"), ("k2", "TFOpLambda")])
def test_unconvertible_loads_in_its_keras(tmp_path, flavour, culprit):
    path = factory.write_unconvertible(tmp_path / "odd.h5", flavour)
    assert str(attrs(path)["keras_version"]).startswith(flavour[1])
    classes = [layer["class_name"] for layer in model_config(path)["config"]["layers"]]
    assert culprit in classes and "Lambda" not in classes and "Functional" in classes
    probs = np.asarray(load(path, flavour)(factory.zoo.synthetic_batch(64, n=1), training=False))
    assert probs.shape == (1, 3) and np.isfinite(probs).all()


@pytest.mark.parametrize("flavour", ["k3", "k2"])
def test_unconvertible_fails_in_coremltools(tmp_path, flavour):
    ct = pytest.importorskip("coremltools")
    import tensorflow as tf

    model = load(factory.write_unconvertible(tmp_path / "odd.h5", flavour), flavour)
    cf = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, 64, 64, 3), tf.float32, name="image")
    )
    with pytest.raises(NotImplementedError) as info:
        ct.convert(
            [cf],
            source="tensorflow",
            inputs=[ct.ImageType(name="image", shape=(1, 64, 64, 3))],
            convert_to="neuralnetwork",
            minimum_deployment_target=ct.target.iOS13,
        )
    assert str(info.value).startswith(factory.UNCONVERTIBLE_ERRORS[flavour])


def test_demo_zoo_refuses_a_folder_with_h5(tmp_path, capsys):
    (tmp_path / "mine.h5").write_bytes(b"")
    assert factory.zoo.main([str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
