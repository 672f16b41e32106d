"""zoo.toml end to end: its settings reach the Core ML files, renamed features still verify, and
its mistakes are one clear line that stops the run before anything is written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import digests
import pytest
import zoos

from convert.cli import main


def load(path: Path):
    from coremltools.proto import Model_pb2

    return Model_pb2.Model.FromString(path.read_bytes())


@pytest.fixture(scope="module")
def converted(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    root = tmp_path_factory.mktemp("manifest")
    (root / "zoo").mkdir()
    zoos.manifest(root / "zoo", zoo)
    out = root / "build"
    return root / "zoo", out, main(["convert", str(root / "zoo"), "--out", str(out), "-q"])


def test_the_outputs_are_byte_identical_to_the_recorded_ones(converted) -> None:
    zoo, out, code = converted
    assert code == 0
    digests.check("manifest", zoo, out)


def test_settings_reach_the_metadata_and_features(converted) -> None:
    zoo, out, code = converted
    assert code == 0
    spec = load(out / "nested_k3.mlmodel")
    assert spec.description.metadata.userDefined["coreml-split.backbone"] == (
        "SharedMobileNet.mlmodel"
    )
    stub = spec.pipelineClassifier.pipeline.models[0].linkedModel.linkedModelFile
    assert stub.linkedModelFileName.defaultValue == "SharedMobileNet.mlmodelc"
    meta = spec.description.metadata
    assert meta.author == "Zoo Keeper" and meta.license == "CC-BY-4.0"
    assert meta.versionString == "2.1.0"
    assert meta.shortDescription == "Tells three shapes apart"
    assert meta.userDefined["coreml-split.display_name"] == "Shapes"
    source = (zoo / "nested_k3.h5").read_bytes()
    assert meta.userDefined["coreml-split.source_sha256"] == hashlib.sha256(source).hexdigest()
    backbone_file = out / meta.userDefined["coreml-split.backbone"]
    backbone_sha = hashlib.sha256(backbone_file.read_bytes()).hexdigest()
    assert meta.userDefined["coreml-split.backbone_sha256"] == backbone_sha
    assert json.loads(meta.userDefined["coreml-split.labels"]) == ["circle", "square", "triangle"]
    assert [f.name for f in spec.description.input] == ["photo"]
    assert sorted(f.name for f in spec.description.output) == ["shape", "shapeProbs"]
    assert spec.description.predictedFeatureName == "shape"
    assert load(out / "perturbed.mlmodel").description.metadata.versionString == "0.1"


def test_renamed_features_still_verify(converted) -> None:
    _, out, code = converted
    assert code == 0
    assert main(["verify", str(out), "--count", "4", "--quiet", "--only", "nested_k3"]) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[models.nested_k3]\nauthr = 'x'\n", "models.nested_k3.authr: unknown key"),
        ("[models.nosuch]\nauthor = 'x'\n", "models.nosuch: no model of that name"),
        ("[models.nested_k3]\nlabels = ['a', 'b']\n", "has 2 labels but nested_k3.h5 outputs 3"),
        (
            "[models.nested_k3]\ninput_name = 'other'\n",
            "input_name: the members of backbone",
        ),
        ("[backbones.MobileNetV2]\nname = 'one'\n", "is given to 2 backbones"),
        ("[defaults]\nlabel_name = 'image'\n", "names must differ"),
    ],
)
def test_manifest_mistakes_are_one_clear_line(
    zoo: Path, tmp_path: Path, capsys, text: str, expected: str
) -> None:
    shutil.copytree(zoo, tmp_path / "zoo")
    (tmp_path / "zoo" / "zoo.toml").write_text(text)
    code = main(["plan", str(tmp_path / "zoo"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    # one line per mistake: a bad default is a mistake in every model it reaches
    assert len(lines) == (len(list(zoo.rglob("*.h5"))) if "[defaults]" in text else 1), err
    assert all(line.startswith("error: ") and expected in line for line in lines), err
