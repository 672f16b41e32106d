"""Whole zoos end to end: partial sharing (fine-tuned last blocks) and two backbone families,
converted (groups in parallel worker processes) and checked with `coreml-split verify`."""

from __future__ import annotations

import json
from pathlib import Path

import digests
import pytest
import zoos

from convert.check.validate import validate_file
from convert.cli import main
from convert.plan.make import make_plan

pytest.importorskip("convert.check.reference")


def _convert_and_verify(zoo: Path, out: Path, key: str) -> None:
    assert main(["convert", str(zoo), "--out", str(out), "--quiet", "--jobs", "2"]) == 0
    digests.check(key, zoo, out)
    for file in out.glob("*.mlmodel"):
        assert validate_file(file, strict_types=True) == [], file.name
    assert main(["verify", str(out), "--count", "6", "--quiet"]) == 0
    results = json.loads((out / "report.json").read_text())["verify"]
    assert len(results) == len(list(zoo.glob("*.h5")))
    assert all(r["passed"] and r["top1_agreement"] == 1.0 for r in results), results


def test_fine_tuned_last_blocks_still_share_the_frozen_prefix(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    zoos.fine_tuned(zoo)

    plan, _ = make_plan(zoo)
    assert not plan.errors and all(m.group for m in plan.models), plan.to_json()["standalone"]
    for name in ("tuned_c", "tuned_d"):
        model = plan.model(name)
        assert not model.split_layer.split("/")[-1].startswith(zoos.TUNED), model.split_layer
        assert model.head_parameters > 100_000  # the fine-tuned block moved into the head
    groups = {g.id: g for g in plan.groups}
    kept = groups[plan.model("kept_a").group]
    assert plan.model("kept_b").group == kept.id
    assert kept.alternative and kept.alternative_saved_bytes < sum(
        g.saved_bytes for g in plan.groups
    )
    _convert_and_verify(zoo, tmp_path / "build", "fine-tuned")


def test_two_backbone_families_get_one_backbone_file_each(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    zoos.two_families(zoo)

    plan, _ = make_plan(zoo)
    assert sorted(g.family for g in plan.groups) == ["MobileNet", "MobileNetV2"]
    assert sorted(sorted(g.members) for g in plan.groups) == [["v1_a", "v1_b"], ["v2_a", "v2_b"]]
    out = tmp_path / "build"
    _convert_and_verify(zoo, out, "two-families")
    backbones = sorted(p.stem.split("-")[0] for p in out.glob("*-*.mlmodel"))
    assert backbones == ["MobileNet", "MobileNetV2"]
