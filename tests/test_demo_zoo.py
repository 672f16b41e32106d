"""The demo zoo that `make convert` builds: converted, then verified against Keras on its own
sample images, with every backbone resolved from disk through the stubs."""

from __future__ import annotations

import json
from pathlib import Path

import digests
import pytest

from convert.cli import main

ROOT = Path(__file__).resolve().parents[1]


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
