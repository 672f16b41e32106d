"""Updatable heads (convert/build/updatable.py) and Core ML's rules for them
(convert/check/rules/updatable.py): the heads of a real build made updatable pass validation and
compute what they did; each rule of UpdatableNeuralNetworkValidator.cpp that a broken spec
breaks is reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.build.updatable import make_updatable, mark_pipeline, updatable_names
from convert.check.validate import validate_spec
from convert.errors import ConversionError
from convert.read.training import Training, training_from


def _load(path: Path) -> Any:
    from coremltools.proto import Model_pb2

    return Model_pb2.Model.FromString(path.read_bytes())


@pytest.fixture(scope="module")
def pipelines(built: tuple[Path, int]) -> list[Any]:
    out, _ = built
    specs = [_load(p) for p in sorted(out.glob("*.mlmodel"))]
    found = [s for s in specs if s.WhichOneof("Type") == "pipelineClassifier"]
    assert found
    return found


def _copy(spec: Any) -> Any:
    out = type(spec)()
    out.CopyFrom(spec)
    return out


def _head(pipeline: Any) -> Any:
    return _copy(pipeline.pipelineClassifier.pipeline.models[-1])


def _probabilities(head: Any, x: np.ndarray) -> np.ndarray:
    from convert.check.reference import evaluate_spec

    feed = head.description.input[0].name
    got, _ = evaluate_spec(head, {feed: x}, model_dir=Path("."))
    probs = got[head.description.predictedProbabilitiesName]
    labels = sorted(probs[0])
    return np.array([[row[k] for k in labels] for row in probs])


def _features(head: Any, count: int = 6) -> np.ndarray:
    shape = list(head.description.input[0].type.multiArrayType.shape)
    return np.random.default_rng(0).normal(size=(count, *shape)).astype(np.float32)


def test_every_head_of_a_build_becomes_updatable_and_computes_the_same(pipelines) -> None:
    for pipeline in pipelines:
        head = _head(pipeline)
        before = _copy(head)
        make_updatable(head, Training())
        assert validate_spec(head) == []
        assert head.isUpdatable
        marked = [layer.name for layer in head.neuralNetworkClassifier.layers if layer.isUpdatable]
        assert marked == updatable_names(before, Training())  # the last Dense layer
        kinds = [layer.WhichOneof("layer") for layer in head.neuralNetworkClassifier.layers]
        assert kinds[-1] == "softmax" and "softmaxND" not in kinds
        x = _features(head)
        np.testing.assert_allclose(_probabilities(head, x), _probabilities(before, x), atol=1e-6)
        whole = _copy(pipeline)
        whole.pipelineClassifier.pipeline.models[-1].CopyFrom(head)
        mark_pipeline(whole)
        assert validate_spec(whole) == []
        names = [f.name for f in whole.description.trainingInput]
        assert names == [whole.description.input[0].name, whole.description.predictedFeatureName]


def test_the_update_parameters_say_what_was_asked(pipelines) -> None:
    head = _head(pipelines[0])
    training = Training(optimizer="adam", learning_rate=0.002, batch_size=4, epochs=3, seed=7)
    make_updatable(head, training)
    params = head.neuralNetworkClassifier.updateParams
    adam = params.optimizer.adamOptimizer
    assert adam.learningRate.defaultValue == 0.002 and adam.miniBatchSize.defaultValue == 4
    assert (adam.beta1.defaultValue, adam.beta2.defaultValue, adam.eps.defaultValue) == (
        0.9,
        0.999,
        1e-8,
    )
    assert params.epochs.defaultValue == 3 and params.seed.defaultValue == 7
    assert params.shuffle.defaultValue is True
    loss = params.lossLayers[0].categoricalCrossEntropyLossLayer
    assert loss.input == head.description.predictedProbabilitiesName
    label = head.description.trainingInput[-1]
    assert label.name == head.description.predictedFeatureName
    assert label.type.WhichOneof("Type") == "stringType"


def _updatable(pipelines) -> Any:
    head = _head(pipelines[0])
    make_updatable(head, Training())
    return head


def _layer(head: Any, name: str) -> Any:
    return next(layer for layer in head.neuralNetworkClassifier.layers if layer.name == name)


def _broken(pipelines, change) -> list[str]:
    head = _updatable(pipelines)
    change(head)
    return validate_spec(head)


def _dense(head: Any) -> Any:
    return next(layer for layer in head.neuralNetworkClassifier.layers if layer.isUpdatable)


def _quantize(head: Any) -> None:
    from convert.build.layers.weights import write

    p = _dense(head).innerProduct
    values = np.asarray(p.weights.floatValue, np.float32).reshape(p.outputChannels, -1)
    p.weights.ClearField("floatValue")
    write(p.weights, values, "int8", kernel=True)


def _softmax_nd(head: Any) -> None:
    last = head.neuralNetworkClassifier.layers[-1]
    last.softmaxND.axis = -3


def _two_losses(head: Any) -> None:
    params = head.neuralNetworkClassifier.updateParams
    params.lossLayers.add().CopyFrom(params.lossLayers[0])
    params.lossLayers[1].name = "loss2"


def _between(head: Any) -> None:
    """A LINEAR activation (not one Core ML differentiates) before the softmax."""
    nn = head.neuralNetworkClassifier
    softmax = nn.layers[-1]
    extra = nn.layers.add()
    extra.CopyFrom(softmax)
    extra.ClearField("softmax")
    extra.name = "scale_down"
    extra.activation.linear.alpha = 0.5
    extra.output[0] = "scaled"
    layers = list(nn.layers)
    del nn.layers[:]
    softmax_copy = _copy(layers[-2])
    softmax_copy.input[0] = "scaled"
    extra.input[0] = layers[-2].input[0]
    nn.layers.extend([*layers[:-2], extra, softmax_copy])


BROKEN = {
    "weights not marked": (
        lambda h: setattr(_dense(h).innerProduct.weights, "isUpdatable", False),
        "its weights are not marked so",
    ),
    "quantized weights": (_quantize, "its weights are quantized"),
    "no updatable layer": (lambda h: setattr(_dense(h), "isUpdatable", False), "none of its"),
    "a softmaxND before the loss": (_softmax_nd, "is not the output of a softmax layer"),
    "two losses": (_two_losses, "exactly one loss layer, not 2"),
    "no optimizer": (
        lambda h: h.neuralNetworkClassifier.updateParams.ClearField("optimizer"),
        "needs an optimizer",
    ),
    "no epochs": (
        lambda h: h.neuralNetworkClassifier.updateParams.ClearField("epochs"),
        "needs epochs",
    ),
    "zero mini-batch": (
        lambda h: setattr(
            h.neuralNetworkClassifier.updateParams.optimizer.sgdOptimizer.miniBatchSize,
            "defaultValue",
            0,
        ),
        "miniBatchSize must be positive",
    ),
    "learning rate out of range": (
        lambda h: setattr(
            h.neuralNetworkClassifier.updateParams.optimizer.sgdOptimizer.learningRate,
            "defaultValue",
            2.0,
        ),
        "outside its range",
    ),
    "a layer that cannot be differentiated": (_between, "'scale_down' cannot be differentiated"),
    "no label to train on": (lambda h: h.description.trainingInput.pop(), "training inputs"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_updatable_head_is_reported(pipelines, case: str) -> None:
    change, expected = BROKEN[case]
    problems = _broken(pipelines, change)
    assert any(expected in p for p in problems), problems


def test_a_layer_core_ml_cannot_train_through_is_named(pipelines) -> None:
    head = _head(pipelines[0])
    _between(head)  # before making it updatable: the builder refuses it
    with pytest.raises(ConversionError, match="layer 'scale_down' \\(linear\\)"):
        make_updatable(head, Training())


def test_more_updatable_layers_than_dense_ones_is_an_error(pipelines) -> None:
    head = _head(pipelines[0])
    with pytest.raises(ConversionError, match="updatable layers asked for"):
        make_updatable(head, Training(updatable_layers=9))


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_bad_training_settings_are_refused(values: dict[str, Any], reason: str) -> None:
    assert reason in (training_from(values).problem() or "")


def test_unknown_training_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown training setting 'lr'"):
        training_from({"lr": 0.1})
    assert training_from({"epochs": 3, "seed": None}) == Training(epochs=3)


# -- built with --updatable ------------------------------------------------------------------------


def _params(out: Path, name: str) -> tuple[Any, Any]:
    pipeline = _load(out / f"{name}.mlmodel")
    head = pipeline.pipelineClassifier.pipeline.models[-1]
    return pipeline, head


def test_every_file_of_an_updatable_build_passes_validation(updatable_build) -> None:
    out, code = updatable_build
    assert code == 0
    files = sorted(out.glob("*.mlmodel"))
    assert len(files) == 6  # two backbones, four pipelines
    for path in files:
        assert validate_spec(_load(path)) == [], path.name
    report = json.loads((out / "report.json").read_text())
    updatable = {c["name"]: c["updatable"] for c in report["classifiers"]}
    assert sorted(updatable) == ["bn_head", "plain", "tm", "tm2"]
    assert updatable["bn_head"] == ["hidden", "predictions"]  # updatable_layers = 2
    assert len(updatable["tm"]) == 2 and len(updatable["tm2"]) == 1 == len(updatable["plain"])


def test_the_command_line_and_zoo_toml_set_the_training(updatable_build) -> None:
    out, _ = updatable_build
    pipeline, tm = _params(out, "tm")
    assert pipeline.isUpdatable and not pipeline.pipelineClassifier.pipeline.models[0].isUpdatable
    params = tm.neuralNetworkClassifier.updateParams
    assert params.optimizer.adamOptimizer.learningRate.defaultValue == 0.001
    assert params.epochs.defaultValue == 3  # the command line, over the default 10
    _, bn = _params(out, "bn_head")
    sgd = bn.neuralNetworkClassifier.updateParams.optimizer.sgdOptimizer
    assert sgd.momentum.defaultValue == 0.9 and sgd.learningRate.defaultValue == 0.01
    kinds = [layer.WhichOneof("layer") for layer in bn.neuralNetworkClassifier.layers]
    assert "batchnorm" in kinds and "expandDims" not in kinds  # the BN trains through, rank 4
    _, plain = _params(out, "plain")
    assert plain.neuralNetworkClassifier.updateParams.epochs.defaultValue == 3


def test_an_updatable_build_verifies_against_keras(updatable_build) -> None:
    from convert.cli import main

    out, _ = updatable_build
    assert main(["verify", str(out), "--count", "4", "-q"]) == 0


def test_a_model_that_shares_nothing_cannot_be_updatable(tmp_path: Path, capsys) -> None:
    import zoos

    from convert.cli import main

    zoos.standalone(tmp_path / "models")
    code = main(
        ["convert", str(tmp_path / "models"), "--out", str(tmp_path / "out"), "-q", "--updatable"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "only a classifier on a shared backbone gets an updatable head" in err
    assert not list((tmp_path / "out").glob("*.mlmodel"))


def test_bad_training_settings_on_the_command_line_are_one_line(tmp_path: Path, capsys) -> None:
    from convert.cli import main

    code = main(["plan", str(tmp_path), "--updatable", "--learning-rate", "0"])
    assert code == 2
    assert "learning_rate must be above 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("toml", "reason"),
    [
        ("updatable = 1", "models.m.updatable: expected true or false, got integer"),
        ('epochs = "3"', "models.m.epochs: expected an integer, got string"),
        ("learning_rate = true", "models.m.learning_rate: expected a number, got boolean"),
        ('optimizer = "rmsprop"', "models.m: optimizer 'rmsprop' is not one of sgd, adam"),
        ("updatable_layers = 0", "models.m: updatable_layers must be at least 1, not 0"),
        ("beta1 = 1.5", "models.m: beta1 must be in [0, 1), not 1.5"),
    ],
)
def test_bad_training_settings_in_zoo_toml_are_one_line(tmp_path: Path, toml: str, reason: str):
    from convert.read.manifest import ManifestError, load_manifest

    (tmp_path / "zoo.toml").write_text(f"[models.m]\n{toml}\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path)
    assert reason in str(caught.value)


def test_training_settings_merge_key_by_key_over_the_defaults(tmp_path: Path) -> None:
    from convert.read.manifest import load_manifest

    (tmp_path / "zoo.toml").write_text(
        "[defaults]\nupdatable = true\nepochs = 4\nbatch_size = 2\n\n[models.m]\nepochs = 6\n"
    )
    settings = load_manifest(tmp_path).for_model("m")
    assert settings.updatable is True
    assert dict(settings.training or ()) == {"epochs": 6, "batch_size": 2}
    assert training_from(dict(settings.training or ())) == Training(epochs=6, batch_size=2)


# -- coreml-split update ---------------------------------------------------------------------------


def _labelled(folder: Path, labels: str, per_label: int = 6) -> Path:
    """One sub-folder of synthetic images per label, as Create ML takes them."""
    from PIL import Image

    from convert.check.verify import synthetic_images

    for index, label in enumerate(labels):
        (folder / label).mkdir(parents=True)
        for i, image in enumerate(synthetic_images([224, 224, 3], per_label, seed=20 + index)):
            Image.fromarray(image).save(folder / label / f"{i}.png")
    return folder


def test_update_trains_the_head_and_keeps_the_link(updatable_build, tmp_path: Path, capsys):
    from convert.check.reference import evaluate_spec
    from convert.check.verify import image_shape, synthetic_images
    from convert.cli import main

    out, _ = updatable_build
    images = _labelled(tmp_path / "photos", "abc")
    updated = tmp_path / "app-support" / "bn_head.mlmodel"  # outside the build folder
    updated.parent.mkdir()
    before = _load(out / "bn_head.mlmodel")
    args = ["update", str(out / "bn_head.mlmodel"), "--images", str(images), "--out"]
    assert main([*args, str(updated), "--epochs", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 18 and result["labels"] == ["a", "b", "c"]
    assert len(result["losses"]) == 10 and result["losses"][-1] < result["losses"][0]
    assert result["accuracy_after"] > result["accuracy_before"]  # 33% -> 56% when written
    after = _load(updated)
    assert validate_spec(after) == []
    stub_before, head_before = before.pipelineClassifier.pipeline.models
    stub_after, head_after = after.pipelineClassifier.pipeline.models
    assert stub_after.SerializeToString() == stub_before.SerializeToString()
    changed = {
        layer.name
        for old, layer in zip(
            head_before.neuralNetworkClassifier.layers,
            head_after.neuralNetworkClassifier.layers,
            strict=True,
        )
        if old.SerializeToString() != layer.SerializeToString()
    }
    assert changed == {"hidden", "predictions"}  # the updatable layers, and only they
    # from its new folder, the updated pipeline binds the build's backbone through $BUNDLE_MAIN
    hwc = image_shape(after, updated)
    feed = {after.description.input[0].name: synthetic_images(hwc, 2, seed=5)}
    _, bound = evaluate_spec(after, feed, model_dir=updated.parent, bundle_main=out)
    backbone = stub_before.linkedModel.linkedModelFile.linkedModelFileName.defaultValue
    assert backbone.endswith(".mlmodelc")  # the compiled name; the evaluator reads the source
    assert [p.resolve() for _, p in bound] == [(out / backbone).with_suffix(".mlmodel").resolve()]


def test_update_refuses_what_it_cannot_train(updatable_build, tmp_path: Path, capsys) -> None:
    from convert.cli import main

    out, _ = updatable_build
    images = _labelled(tmp_path / "photos", "ax", per_label=1)
    target = tmp_path / "updated.mlmodel"
    cases = [
        (out / "bn_head.mlmodel", images, "x: is not a label of this classifier (a, b, c)"),
        (out / "bn_head.mlmodel", tmp_path / "none", "none: no such folder"),
        (out / next(p.name for p in out.glob("MobileNetV2-*.mlmodel")), images, "pipeline"),
    ]
    for model, folder, reason in cases:
        code = main(["update", str(model), "--images", str(folder), "--out", str(target)])
        err = capsys.readouterr().err
        assert code != 0 and reason in err, err
        assert len(err.strip().splitlines()) == 1
        assert not target.exists()


def test_the_demo_zoo_learns_on_its_photos(demo_zoo, tmp_path: Path, capsys) -> None:
    """Issue 12's acceptance on the demo zoo: converted with --updatable (SGD with momentum 0.9),
    every file validates; 50 epochs of update on each classifier's demo photos raise the
    accuracy on them; the updated pipelines, written outside the build, verify against Keras
    with the learned weights. Measured when written: shapes 50% -> 100%, colours 84% -> 91%,
    count 38% -> 62%, stripes 75% -> 94%."""
    from convert.cli import main

    models, _ = demo_zoo
    out = tmp_path / "build"
    convert = ["convert", str(models), "--out", str(out), "-q", "--updatable", "--momentum", "0.9"]
    assert main(convert) == 0
    for path in sorted(out.glob("*.mlmodel")):
        assert validate_spec(_load(path)) == [], path.name
    photos = models / "demo-photos"
    names = sorted(p.name for p in photos.iterdir())
    assert names == ["colours", "count", "shapes", "stripes"]
    for name in names:
        updated = tmp_path / "updated" / f"{name}.mlmodel"
        args = ["update", str(out / f"{name}.mlmodel"), "--images", str(photos / name)]
        code = main([*args, "--out", str(updated), "--epochs", "50", "--verify", "--json"])
        result = json.loads(capsys.readouterr().out)
        assert code == 0 and result["verify_problems"] == [], result
        assert result["accuracy_after"] > result["accuracy_before"], name
        assert result["losses"][-1] < result["losses"][0], name
        assert [v["passed"] for v in result["verify"]] == [True]
        assert validate_spec(_load(updated)) == []


def test_verify_holds_an_updated_model_to_its_learned_weights(updatable_build, tmp_path: Path):
    """verify compares an updated pipeline with Keras given the weights it learned; the same
    file without the metadata that says it was updated is compared with the Keras weights as
    converted, and is beyond tolerance."""
    from convert.check.verify import PASSED, UPDATED, verify_build
    from convert.cli import main

    out, _ = updatable_build
    images = _labelled(tmp_path / "photos", "abc", per_label=3)
    updated = tmp_path / "bn_head.mlmodel"
    args = ["update", str(out / "bn_head.mlmodel"), "--images", str(images), "--out"]
    assert main([*args, str(updated), "--epochs", "5", "-q"]) == 0
    spec = _load(updated)
    assert UPDATED in spec.description.metadata.userDefined
    run = verify_build(out, count=4, only=["bn_head"], files={"bn_head": updated}, bundle_main=out)
    assert run.outcome == PASSED, run.summary
    del spec.description.metadata.userDefined[UPDATED]
    unmarked = tmp_path / "unmarked.mlmodel"
    unmarked.write_bytes(spec.SerializeToString())
    run = verify_build(out, count=4, only=["bn_head"], files={"bn_head": unmarked}, bundle_main=out)
    assert len(run.beyond) == 1, run.summary


def test_the_lower_bound_counts_updatable_layers_at_float32(updatable_build) -> None:
    """With float16 heads, each updatable weight costs 2 bytes more in the lower bound than it
    would frozen: 4 bytes, not 2. Those weights are the updatable layers' of the build."""
    from convert.plan.make import make_plan
    from convert.read.manifest import load_manifest

    out, _ = updatable_build
    models = out.parent / "models"
    manifest = load_manifest(models)  # the build's: two heads learn two layers
    frozen, _ = make_plan(models, manifest=manifest, head_weights="float16")
    learning, _ = make_plan(models, manifest=manifest, head_weights="float16", updatable=True)
    updatable = 0
    for path in out.glob("*.mlmodel"):
        spec = _load(path)
        if spec.WhichOneof("Type") != "pipelineClassifier":
            continue
        head = spec.pipelineClassifier.pipeline.models[-1].neuralNetworkClassifier
        for layer in head.layers:
            if layer.isUpdatable:
                p = layer.innerProduct
                updatable += p.inputChannels * p.outputChannels + p.outputChannels * p.hasBias
    assert updatable and learning.lower_bound_bytes - frozen.lower_bound_bytes == 2 * updatable
