"""`coreml-split verify`: the emitted pipelines compute what Keras computes, through the linked
backbone resolved from disk; and broken builds fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from convert.cli import main

pytest.importorskip("convert.check.reference")


def load(path: Path):
    from coremltools.proto import Model_pb2

    return Model_pb2.Model.FromString(path.read_bytes())


def save(path: Path, spec) -> None:
    path.write_bytes(spec.SerializeToString())


@pytest.fixture()
def copy(built, tmp_path: Path) -> Path:
    out, _ = built
    target = tmp_path / "build"
    shutil.copytree(out, target)
    return target


def backbone_of(build: Path, name: str) -> str:
    report = json.loads((build / "report.json").read_text())
    return next(c["group"] for c in report["classifiers"] if c["name"] == name)


def verify(build: Path, *names: str) -> int:
    only = [arg for n in names for arg in ("--only", n)]
    return main(["verify", str(build), "--count", "8", "--quiet", *only])


def test_every_pipeline_matches_keras(built, capsys) -> None:
    out, _ = built
    work = out.parent / (out.name + "-verified")
    shutil.copytree(out, work)
    assert main(["verify", str(work), "--count", "12"]) == 0
    text = capsys.readouterr().out
    report = json.loads((work / "report.json").read_text())
    results = {v["name"]: v for v in report["verify"]}
    assert set(results) == {c["name"] for c in report["classifiers"]}
    for name, v in results.items():
        assert v["passed"] and v["images"] == 12, v
        assert v["top1_agreement"] == 1.0, v
        assert v["max_abs_diff"] <= 1e-4, v
        assert v["weights"] == "float32"
        if name != "perturbed":  # pipelines bind their backbone from disk
            assert v["bound"] == [f"{backbone_of(work, name)}.mlmodel"]
    assert "verified 6 classifiers: 6 within tolerance" in text
    assert "## Verification" in (work / "report.md").read_text()


def test_a_stub_pointed_at_another_groups_backbone_fails(copy: Path) -> None:
    other = backbone_of(copy, "tm_cats")
    assert other != backbone_of(copy, "nested_k3")
    spec = load(copy / "nested_k3.mlmodel")
    link = spec.pipelineClassifier.pipeline.models[0].linkedModel.linkedModelFile
    link.linkedModelFileName.defaultValue = f"{other}.mlmodelc"  # same interface, other weights
    save(copy / "nested_k3.mlmodel", spec)
    assert verify(copy, "nested_k3") == 1
    result = json.loads((copy / "report.json").read_text())["verify"][0]
    assert not result["passed"] and result["bound"] == [f"{other}.mlmodel"]


def test_a_head_with_permuted_labels_fails(copy: Path) -> None:
    spec = load(copy / "nested_k2.mlmodel")
    labels = spec.pipelineClassifier.pipeline.models[1].neuralNetworkClassifier.stringClassLabels
    permuted = list(labels.vector)[1:] + list(labels.vector)[:1]
    del labels.vector[:]
    labels.vector.extend(permuted)
    save(copy / "nested_k2.mlmodel", spec)
    assert verify(copy, "nested_k2") == 1


def test_a_backbone_with_one_perturbed_convolution_fails(copy: Path) -> None:
    name = backbone_of(copy, "flat_k2")
    spec = load(copy / f"{name}.mlmodel")
    conv = next(
        layer.convolution
        for layer in spec.neuralNetwork.layers
        if layer.WhichOneof("layer") == "convolution"
    )
    weights = list(conv.weights.floatValue)
    conv.weights.floatValue[:] = [w * 1.5 + 0.05 for w in weights]
    save(copy / f"{name}.mlmodel", spec)
    assert verify(copy, "flat_k2") == 1


def test_a_missing_backbone_is_a_clear_error_listing_the_searched_paths(copy: Path, capsys):
    name = backbone_of(copy, "tm_dogs")
    (copy / f"{name}.mlmodel").unlink()
    assert verify(copy, "tm_dogs") == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "tm_dogs.mlmodel" in lines[0] and f"{name}.mlmodelc" in lines[0]
    assert str(copy) in lines[0]  # the folder that was searched


def test_a_changed_top1_says_how_near_a_tie_it_was_for_keras() -> None:
    from convert.check.verify import _compare

    keras = np.array([[0.50, 0.49, 0.01], [0.90, 0.05, 0.05], [0.40, 0.10, 0.50]])
    core_ml = np.array([[0.49, 0.50, 0.01], [0.90, 0.05, 0.05], [0.46, 0.10, 0.44]])
    entry = {"name": "m", "file": "m.mlmodel"}
    tolerances = {"float32": 0.1}
    result = _compare(entry, keras, core_ml, "float32", "float32", tolerances, [])
    assert result.top1_agreement == pytest.approx(1 / 3)
    assert result.top1_gap == pytest.approx(0.10)  # the larger of 0.01 and 0.10
    assert "where it differs, Keras had the two within 1.0e-01" in result.line
    agreed = _compare(entry, keras, keras, "float32", "float32", tolerances, [])
    assert agreed.top1_gap is None and "differs" not in agreed.line


def test_a_long_message_is_printed_whole_into_a_pipe() -> None:
    import io

    from rich.console import Console

    from convert.cli import _say

    buffer = io.StringIO()
    message = "word " * 60
    _say(Console(file=buffer, width=140), message)
    assert buffer.getvalue().strip() == message.strip()
