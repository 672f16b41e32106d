"""End to end: a zoo of real Keras files in, backbones + linked pipelines + report out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import digests
import pytest

from convert.check.validate import validate_file
from convert.cli import main
from convert.plan.make import make_plan

ROOT = Path(__file__).resolve().parents[1]


def load(path: Path):
    from coremltools.proto import Model_pb2

    return Model_pb2.Model.FromString(path.read_bytes())


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_plan_groups_by_weights_across_keras_versions_and_layouts(zoo: Path) -> None:
    plan, _ = make_plan(zoo)
    assert not plan.errors
    groups = {tuple(g.members): g for g in plan.groups}
    assert set(groups) == {("flat_k2", "nested_k2", "nested_k3"), ("tm_cats", "tm_dogs")}
    keras_group = groups[("flat_k2", "nested_k2", "nested_k3")]
    assert keras_group.family == "MobileNetV2" and keras_group.preprocessing == "tf"
    assert keras_group.feature_shape == [None, 1280]
    # Teachable Machine: sub-models named model1 / model2, split after the pooling layer.
    tm = groups[("tm_cats", "tm_dogs")]
    assert tm.split_layer.endswith("GlobalAveragePooling2D1")
    assert plan.model("tm_cats").teachable_machine
    assert plan.model("tm_cats").labels == ["Class 1", "Class 2"]
    # One changed BatchNorm moving mean: the model shares nothing.
    perturbed = plan.model("perturbed")
    assert perturbed.group is None and "shares no backbone" in perturbed.standalone_reason


def test_plan_command_never_imports_tensorflow(zoo: Path) -> None:
    code = (
        "import sys, json, io, contextlib\n"
        "from convert.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        f"    rc = main(['plan', {str(zoo)!r}, '--json'])\n"
        "assert rc == 0, rc\n"
        "assert 'tensorflow' not in sys.modules and 'coremltools' not in sys.modules\n"
        "print(len(json.loads(buf.getvalue())['groups']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"


def test_build_holds_one_backbone_per_group_and_one_pipeline_per_classifier(built) -> None:
    out, rc = built
    assert rc == 0
    data = report(out)
    backbones = sorted(b["file"] for b in data["backbones"])
    assert len(backbones) == 2
    assert all(
        b.startswith("MobileNetV2-") and len(b.split("-")[1]) == len("12345678.mlmodel")
        for b in backbones
    )
    files = sorted(p.name for p in out.glob("*.mlmodel"))
    classifiers = ["flat_k2", "nested_k2", "nested_k3", "perturbed", "tm_cats", "tm_dogs"]
    assert files == sorted(backbones + [f"{c}.mlmodel" for c in classifiers])
    for c in classifiers:
        spec = load(out / f"{c}.mlmodel")
        if c == "perturbed":
            assert spec.WhichOneof("Type") == "neuralNetworkClassifier"
            continue
        assert spec.WhichOneof("Type") == "pipelineClassifier"
        models = spec.pipelineClassifier.pipeline.models
        assert [m.WhichOneof("Type") for m in models] == ["linkedModel", "neuralNetworkClassifier"]
        assert [f.name for f in spec.description.input] == ["image"]
        assert sorted(f.name for f in spec.description.output) == ["classLabel", "classLabelProbs"]
        assert spec.description.predictedFeatureName == "classLabel"
        assert spec.description.predictedProbabilitiesName == "classLabelProbs"


def test_stub_points_at_its_own_backbone_with_an_identical_interface(built) -> None:
    out, _ = built
    data = report(out)
    group_of = {c["name"]: c["group"] for c in data["classifiers"]}
    for name, group in group_of.items():
        if group is None:
            continue
        backbone = load(out / f"{group}.mlmodel")
        stub = load(out / f"{name}.mlmodel").pipelineClassifier.pipeline.models[0]
        link = stub.linkedModel.linkedModelFile
        assert link.linkedModelFileName.defaultValue == f"{group}.mlmodelc"
        assert link.linkedModelSearchPath.defaultValue == ".:$BUNDLE_MAIN"
        assert stub.description.input == backbone.description.input
        assert stub.description.output == backbone.description.output
        assert stub.specificationVersion == 4
        assert list(backbone.description.output[0].type.multiArrayType.shape) == [1, 1280]
        assert backbone.specificationVersion == 4
        assert backbone.WhichOneof("Type") == "neuralNetwork"


def test_every_file_obeys_core_ml_validation_rules(built) -> None:
    out, _ = built
    files = sorted(out.glob("*.mlmodel"))
    assert len(files) == 8
    problems = {f.name: validate_file(f, strict_types=True) for f in files}
    assert problems == {f.name: [] for f in files}


def test_labels_and_metadata_are_in_the_files(built, zoo: Path) -> None:
    out, _ = built
    head = load(out / "tm_dogs.mlmodel").pipelineClassifier.pipeline.models[1]
    assert list(head.neuralNetworkClassifier.stringClassLabels.vector) == [
        "Class 1",
        "Class 2",
        "Class 3",
    ]
    pipeline = load(out / "nested_k3.mlmodel")
    meta = pipeline.description.metadata
    assert meta.shortDescription.startswith("nested_k3: 3-class image classifier")
    assert meta.versionString and meta.userDefined["coreml-split.version"] == meta.versionString
    assert json.loads(meta.userDefined["coreml-split.labels"]) == (
        (zoo / "nested_k3.labels.txt").read_text().split()
    )
    assert "com.github.apple.coremltools.conversion_date" not in meta.userDefined
    scaler = pipeline.pipelineClassifier.pipeline.models[0]  # stub carries no preprocessing
    backbone = load(out / f"{pipeline.description.metadata.userDefined['coreml-split.backbone']}")
    pre = backbone.neuralNetwork.preprocessing[0].scaler
    assert abs(pre.channelScale - 1 / 127.5) < 1e-7 and pre.redBias == -1.0
    assert scaler.WhichOneof("Type") == "linkedModel"


def test_sizes_in_the_report_match_the_disk_and_the_overhead_is_small(built) -> None:
    out, _ = built
    data = report(out)
    for entry in data["backbones"] + data["classifiers"]:
        assert (out / entry["file"]).stat().st_size == entry["bytes"], entry["file"]
    totals = data["totals"]
    on_disk = sum(p.stat().st_size for p in out.glob("*.mlmodel"))
    assert totals["written_bytes"] == on_disk
    essential = totals["backbone_bytes"] + totals["heads_bytes"]
    assert on_disk <= 1.02 * essential
    # One by one, every pipeline classifier would carry its own copy of its backbone.
    backbone_bytes = {b["id"]: b["bytes"] for b in data["backbones"]}
    for c in data["classifiers"]:
        if c["group"]:
            assert c["standalone_bytes"] > backbone_bytes[c["group"]] + c["head_bytes"] * 0.9
    assert totals["one_by_one_bytes"] > totals["written_bytes"]
    assert (out / "report.md").read_text().count(".mlmodel") >= 8
    assert (out / "report.svg").read_text().startswith("<svg")


def test_converting_twice_gives_byte_identical_files(built, zoo: Path, tmp_path: Path) -> None:
    """Also after a failed conversion in the same process (coremltools' op-name counter)."""
    import factory

    out, _ = built
    failing = tmp_path / "failing"
    failing.mkdir()
    factory.save_tiny_lgamma_classifier(failing / "a.h5", 1)
    assert main(["convert", str(failing), "--out", str(tmp_path / "f"), "--quiet"]) == 1
    again = tmp_path / "again"
    assert main(["convert", str(zoo), "--out", str(again), "--quiet"]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    second = {p.name: p.read_bytes() for p in again.iterdir() if p.is_file()}
    assert first.keys() == second.keys()
    assert [n for n in first if first[n] != second[n]] == []


def test_the_session_build_is_byte_identical_to_the_recorded_one(built, zoo: Path) -> None:
    out, code = built
    assert code == 0
    digests.check("session", zoo, out)


@pytest.mark.parametrize("mode", ["caffe", "unit"])
def test_preprocessing_override_changes_the_image_scaler(zoo: Path, mode: str) -> None:
    plan, _ = make_plan(zoo, {"nested_k3": mode})
    assert plan.model("nested_k3").preprocessing == mode
    # a different preprocessing means a different backbone file: it cannot join the group
    assert plan.model("nested_k3").group is None
