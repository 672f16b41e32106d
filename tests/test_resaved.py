"""Files Keras cannot reload, and what verify says about them.

A Teachable Machine model re-saved by Keras 3.7 converts, but Keras 3.15 cannot load it (its
Functional writes a lone input/output as a list of one, which Keras >= 3.11 reads as a list):
coreml-split repairs the config and verifies it. A file that truly cannot be loaded leaves its
classifier *unverified*, an unforeseen failure stays with its classifier, and a damaged
report.json is one clear line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import factory_keras as fk
import numpy as np
import pytest

from convert import cli
from convert.check import keras_model, verify
from convert.check.keras_model import layer_objects, load_keras_model
from convert.cli import main
from convert.errors import RunError
from convert.read.h5 import load_weight, read_model

pytest.importorskip("convert.check.reference")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """models/tm/keras_model.h5 (+ labels.txt): a Teachable Machine-like model as Keras 3.7
    wrote it; models/tiny.h5: a tiny Keras 3.15 classifier. ``original``: the 3.15 file the
    first was rewritten from."""
    root = tmp_path_factory.mktemp("resaved")
    original = fk.save_tm_like_k3(root / "original")
    models = root / "models"
    (models / "tm").mkdir(parents=True)
    resaved = fk.as_keras_3_7(original, models / "tm" / "keras_model.h5")
    shutil.copy(original.parent / "labels.txt", models / "tm" / "labels.txt")
    tiny = fk.save_tiny_classifier(models / "tiny.h5", "k3", seed=4)
    return {"root": root, "models": models, "resaved": resaved, "original": original, "tiny": tiny}


@pytest.fixture(scope="module")
def built(zoo: dict[str, Path]) -> Path:
    out = zoo["root"] / "build"
    assert main(["convert", str(zoo["models"]), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture()
def build(built: Path, tmp_path: Path) -> Path:
    """A copy of the build, free to damage."""
    target = tmp_path / "build"
    shutil.copytree(built, target)
    return target


def test_keras_cannot_load_the_resaved_file_coreml_split_can_with_its_weights(zoo) -> None:
    import keras

    assert read_model(zoo["resaved"]).keras_version == "3.7.0"
    keras.models.load_model(zoo["original"], compile=False)  # the 3.15 original loads
    with pytest.raises(ValueError, match=r"expects 1 named input\(s\).*received 2 input tensors"):
        keras.models.load_model(zoo["resaved"], compile=False)  # the bug is real
    graph = read_model(zoo["resaved"], with_digests=False)
    model = load_keras_model(graph)
    objects = layer_objects(model, graph)
    checked = 0
    for layer in graph.layers():
        if layer.weights:
            loaded = objects[layer.path].get_weights()
            stored = [load_weight(graph.source, w) for w in layer.weights]
            assert len(loaded) == len(stored), layer.path
            for a, b in zip(loaded, stored):
                np.testing.assert_array_equal(a, b)
            checked += 1
    assert checked == 4  # Conv1, bn_Conv1, dense_Dense1, dense_Dense2
    # and it computes what the file it was re-saved from computes
    original = load_keras_model(read_model(zoo["original"], with_digests=False))
    x = np.random.default_rng(0).uniform(-1, 1, (3, fk.SIZE, fk.SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(original(x)), atol=1e-6)


def test_the_repair_leaves_newer_files_alone(zoo) -> None:
    config = fk.model_config(zoo["resaved"])
    assert keras_model._repair_single_tensor_io(json.loads(json.dumps(config)), "3.7.0")
    assert not keras_model._repair_single_tensor_io(config, "3.11.0")
    assert not keras_model._repair_single_tensor_io(fk.model_config(zoo["original"]), "3.7.0")


def test_convert_and_verify_pass_on_it(built: Path, capsys) -> None:
    work = built.parent / "verified"
    shutil.copytree(built, work)
    capsys.readouterr()
    assert main(["verify", str(work), "--count", "6"]) == 0
    text = capsys.readouterr().out
    results = {v["name"]: v for v in json.loads((work / "report.json").read_text())["verify"]}
    assert set(results) == {"tm", "tiny"}
    for v in results.values():
        assert v["passed"] and v["status"] == verify.PASSED, v
        assert v["top1_agreement"] == 1.0 and v["max_abs_diff"] <= 1e-4, v
    assert "verified 2 classifiers: 2 within tolerance, 0 beyond" in text


# -- unverified ------------------------------------------------------------------------------------


def test_a_file_keras_cannot_load_is_unverified_not_passed_nor_a_crash(build: Path) -> None:
    def break_for_keras(config):  # the reader ignores an unknown argument; Keras refuses it
        fk.layer_entry(config, "dense")["config"]["bogus_argument"] = 1

    tiny = Path(next(c for c in _report(build)["classifiers"] if c["name"] == "tiny")["source"])
    fk.edit_model_config(tiny, build / "tiny-broken.h5", break_for_keras)
    _set_source(build, "tiny", build / "tiny-broken.h5")
    run = verify.verify_build(build, count=2)
    assert [r.name for r in run.results] == ["tm"] and run.results[0].passed
    assert not run.errors
    [problem] = run.unverified
    assert (problem.name, problem.status) == ("tiny", verify.UNVERIFIED)
    assert problem.path == str(build / "tiny-broken.h5")
    assert problem.reason == (
        "keras 3 cannot load the model: Error when deserializing class 'Dense': "
        "Unrecognized keyword arguments passed to Dense: {'bogus_argument': 1}"
    )
    assert problem.line.startswith("[unverified] tiny: ")
    assert run.outcome == verify.UNVERIFIED
    assert run.summary == (
        "verified 2 classifiers: 1 within tolerance, 0 beyond, 1 unverified, 0 could not be run"
    )
    # the command line: not a pass, and not a failure either
    assert main(["verify", str(build), "--count", "2", "--quiet"]) == cli.EXIT_UNVERIFIED == 3
    verified = {v["name"]: v for v in _report(build)["verify"]}
    assert verified["tm"]["passed"] and "tiny" not in verified


def test_a_missing_source_is_unverified(build: Path) -> None:
    _set_source(build, "tm", build / "gone" / "keras_model.h5")
    run = verify.verify_build(build, count=2, only=["tm"])
    assert [(p.name, p.reason) for p in run.unverified] == [("tm", "no such file")]


def test_an_unforeseen_failure_stays_with_its_classifier(
    build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = verify.keras_probabilities

    def flaky(source, preprocessing, images, learned=None, aliases=None):
        if Path(source).name == "tiny.h5":
            raise KeyError("kernel")
        return real(source, preprocessing, images, learned, aliases)

    monkeypatch.setattr(verify, "keras_probabilities", flaky)
    run = verify.verify_build(build, count=2)
    assert [r.name for r in run.results] == ["tm"]
    [problem] = run.unverified
    assert problem.name == "tiny" and problem.status == verify.UNVERIFIED
    assert problem.reason == (
        "internal error: KeyError: 'kernel' (rerun with --debug for the traceback)"
    )
    assert "KeyError" in problem.trace


def test_a_core_ml_failure_is_an_error_not_unverified(build: Path) -> None:
    tm = next(c for c in _report(build)["classifiers"] if c["name"] == "tm")
    (build / tm["file"]).write_bytes(b"not a model")
    run = verify.verify_build(build, count=2)
    assert [p.name for p in run.errors] == ["tm"] and not run.unverified
    assert run.errors[0].status == verify.ERROR
    assert run.outcome == verify.BEYOND


# -- a damaged report.json -------------------------------------------------------------------------


def _report(build: Path) -> dict:
    return json.loads((build / "report.json").read_text())


def _set_source(build: Path, name: str, source: Path) -> None:
    report = _report(build)
    next(c for c in report["classifiers"] if c["name"] == name)["source"] = str(source)
    (build / "report.json").write_text(json.dumps(report))


def _damage(kind: str):
    def edit(report: dict) -> object:
        if kind == "a list":
            return [report]
        if kind == "no classifiers":
            del report["classifiers"]
        elif kind == "classifiers not a list":
            report["classifiers"] = {"tm": {}}
        elif kind == "entry without source":
            del report["classifiers"][0]["source"]
        elif kind == "labels not strings":
            report["classifiers"][0]["labels"] = [1, 2]
        elif kind == "file outside the build":
            report["classifiers"][0]["file"] = "../../etc/passwd"
        elif kind == "no totals":
            del report["totals"]
        return report

    return edit


DAMAGE = {
    "garbage": "not JSON: ",
    "a list": "a JSON list, not an object",
    "no classifiers": "no 'classifiers'",
    "classifiers not a list": "'classifiers' is not a list",
    "entry without source": "classifiers[0]: 'source' is missing or not a string",
    "labels not strings": "'labels' is missing or not a list of strings",
    "file outside the build": "is not a file in the build folder",
    "no totals": "'totals.lower_bound_bytes' is missing or not a number",
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_report_is_one_clear_line(build: Path, kind: str, capsys) -> None:
    path = build / "report.json"
    if kind == "garbage":
        path.write_bytes(b"\x00\xff{ not json")
    else:
        path.write_text(json.dumps(_damage(kind)(_report(build))))
    with pytest.raises(RunError) as caught:
        verify.verify_build(build, count=2)
    assert DAMAGE[kind] in caught.value.reason
    capsys.readouterr()
    assert main(["verify", str(build), "--count", "2"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}: is damaged (")
    assert lines[0].endswith("); run `coreml-split convert` again")
