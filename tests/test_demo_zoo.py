"""The demo zoo that `make convert` builds: converted, then verified against Keras on its own
sample images, with every backbone resolved from disk through the stubs."""

from __future__ import annotations

import json
from pathlib import Path

import digests
import pytest
import test_factory

from convert.cli import main


@pytest.mark.slow
def test_demo_zoo_converts_and_verifies(demo_zoo, tmp_path: Path) -> None:
    models, out = demo_zoo[0], tmp_path / "build"
    images = models / "demo-images"
    rc = main(
        ["convert", str(models), "--out", str(out), "--quiet", "--verify", "--images", str(images)]
    )
    assert rc == 0
    digests.check("demo", models, out)
    report = json.loads((out / "report.json").read_text())
    assert len(report["backbones"]) == 1 and len(report["classifiers"]) >= 4
    backbone = report["backbones"][0]["file"]
    for result in report["verify"]:
        assert result["passed"] and result["top1_agreement"] == 1.0, result
        assert result["images"] == len(list(images.glob("*.png")))
        assert result["bound"] == [backbone]


@pytest.mark.slow
def test_demo_zoo_script(demo_zoo):
    out, printed = demo_zoo
    files = sorted(p.name for p in out.glob("*.h5"))
    assert len(files) >= 4
    versions = {str(test_factory.attrs(out / f)["keras_version"])[0] for f in files}
    assert versions == {"2", "3"}
    reference = test_factory.backbone_datasets(out / files[0])
    for f in files:
        labels = (out / f).with_suffix(".labels.txt").read_text().splitlines()
        assert len(labels) >= 2
        other = test_factory.backbone_datasets(out / f)
        assert other.keys() == reference.keys()
        assert all(other[k].tobytes() == reference[k].tobytes() for k in reference), f
    expected = json.loads((out / "demo-images" / "expected.json").read_text())
    assert len(list((out / "demo-images").glob("*.png"))) == len(expected) >= 8
    assert "train accuracy" in printed or "train acc" in printed
