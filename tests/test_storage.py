"""Weight storage (--weights, --head-weights, zoo.toml): the forms written, their validation,
names and lower bounds, and verify on the demo zoo in every storage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from convert.build.layers import weights
from convert.build.layers.weights import Precision
from convert.check.reference.weights import decode
from convert.check.validate import validate_spec
from convert.cli import main
from convert.read.manifest import PALETTES, load_manifest

STORED = ("float16", "int8", "palette8", "palette6", "palette4")


def _params():
    from convert.heavy import coremltools

    coremltools()
    from coremltools.proto import NeuralNetwork_pb2

    return NeuralNetwork_pb2.WeightParams()


# -- the forms -----------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ("float32", *STORED, "palette1", "palette3"))
def test_write_decodes_back_within_the_storage_error(storage: str) -> None:
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(16, 3, 3, 3)) * np.logspace(-2, 1, 16)[:, None, None, None]
    p = _params()
    weights.write(p, kernel, storage, kernel=True)
    back = decode(p, kernel.shape)
    error = np.sqrt(np.mean((back - kernel) ** 2)) / np.sqrt(np.mean(kernel**2))
    bound = {"float32": 1e-7, "float16": 1e-3, "int8": 1e-2, "palette8": 1e-2}.get(storage, 0.8)
    assert error < bound, (storage, error)
    if storage in PALETTES:
        bits = int(storage[7:])
        assert p.quantization.numberOfBits == bits
        assert len(p.quantization.lookupTableQuantization.floatValue) == 2**bits
        assert len(p.rawValue) == -(-kernel.size * bits // 8)
    if storage == "int8":
        assert len(p.quantization.linearQuantization.scale) == 16  # one per output channel
        assert len(p.quantization.linearQuantization.bias) == 16
        assert len(p.rawValue) == kernel.size


def test_per_channel_int8_keeps_small_channels() -> None:
    """A BatchNorm-folded kernel: channels three decades apart. One scale for all would round
    the small channels to nothing; a scale per channel keeps each within 1%."""
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(8, 4, 3, 3)) * np.logspace(-3, 0, 8)[:, None, None, None]
    p = _params()
    weights.write(p, kernel, "int8", kernel=True)
    back = decode(p, kernel.shape)
    for c in range(8):
        rel = np.abs(back[c] - kernel[c]).max() / np.abs(kernel[c]).max()
        assert rel < 0.01, (c, rel)


def test_non_kernels_are_float16_at_most() -> None:
    p = _params()
    weights.write(p, np.linspace(-1, 1, 10), "int8", kernel=False)
    assert len(p.float16Value) == 20 and not p.HasField("quantization")


def test_float16_overflow_is_a_clear_error() -> None:
    with pytest.raises(weights.StorageError, match="65504|float16"):
        weights.write(_params(), np.array([1e6, 1.0]), "float16")


def test_precision_per_layer() -> None:
    mixed = Precision("palette4", {"Conv1": "float16"})
    assert mixed.kernel("Conv1") == "float16" and mixed.kernel("block_1") == "palette4"
    assert mixed.other("Conv1") == "float16"
    assert Precision().other("x") == "float32" and Precision().float32
    assert not mixed.float32


# -- a whole build -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored_builds(demo_zoo, tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """The demo zoo converted in every storage: storage -> (build folder, exit code)."""
    models = demo_zoo[0]
    builds = {}
    for storage in ("float32", *STORED):
        out = tmp_path_factory.mktemp(f"build-{storage}")
        rc = main(["convert", str(models), "--out", str(out), "--quiet", "--weights", storage])
        builds[storage] = (out, rc)
    return builds


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _spec(path: Path):
    from convert.check.reference import load

    return load(path).spec


def test_every_storage_converts_and_validates(stored_builds) -> None:
    for storage, (out, rc) in stored_builds.items():
        assert rc == 0, storage
        report = _report(out)
        assert [b["weights"] for b in report["backbones"]] == [storage]
        assert {c["weights"] for c in report["classifiers"]} == {storage}
        for file in out.glob("*.mlmodel"):
            spec = _spec(file)
            assert validate_spec(spec, file.name, strict_types=True) == [], (storage, file.name)
            assert spec.specificationVersion == 4  # linked models need 4; no form needs more


def test_names_carry_the_storage(stored_builds) -> None:
    names = {s: _report(out)["backbones"][0]["file"] for s, (out, _) in stored_builds.items()}
    assert len(set(names.values())) == len(names)  # no two storages share a file name
    for storage, name in names.items():
        assert (storage in name) == (storage != "float32"), name


def test_bytes_shrink_with_the_bits(stored_builds) -> None:
    sizes = {s: _report(out)["totals"]["written_bytes"] for s, (out, _) in stored_builds.items()}
    assert sizes["float16"] < 0.52 * sizes["float32"]
    # per-channel scales and biases cost 8 bytes a channel: most of what an alpha 0.35
    # MobileNetV2's 3x3 depthwise kernels (9 weights a channel) save
    assert sizes["int8"] < 0.6 * sizes["float16"]
    assert sizes["palette4"] < sizes["palette6"] < sizes["palette8"]
    for storage, (out, _) in stored_builds.items():
        totals = _report(out)["totals"]
        assert totals["lower_bound_bytes"] == totals["lower_bounds"][storage]
        # the files hold little beyond the weights themselves (an alpha 0.35 network has many
        # small layers, each with its name and parameters: more framing than a wide one)
        assert totals["written_bytes"] <= 1.12 * totals["lower_bound_bytes"], storage


def test_verify_reports_each_storage(stored_builds, demo_zoo) -> None:
    """The demo zoo's backbone has random weights, and its heads were trained on features that
    say little: it moves far more under quantization than a trained model does, so only the
    order of the storages is checked here (the real model is held to the tolerances in
    tests/test_storage_real.py)."""
    images = demo_zoo[0] / "demo-images"
    worst = {}
    for storage in ("float32", "float16", "palette4"):
        out, _ = stored_builds[storage]
        rc = main(["verify", str(out), "--quiet", "--images", str(images), "--count", "8"])
        results = _report(out)["verify"]
        assert rc in (0, 1) and len(results) == 4
        assert {r["weights"] for r in results} == {
            {"float32": "float32", "float16": "float16", "palette4": "4-bit"}[storage]
        }
        worst[storage] = max(r["max_abs_diff"] for r in results)
    assert worst["float32"] < 1e-4 < worst["float16"] < worst["palette4"]


def test_a_wrong_scale_fails_verify(stored_builds, demo_zoo, tmp_path: Path) -> None:
    """One convolution's per-channel scales doubled in the int8 backbone: verify must see it."""
    import shutil

    out = tmp_path / "build"
    shutil.copytree(stored_builds["int8"][0], out)
    backbone = out / _report(out)["backbones"][0]["file"]
    spec = _spec(backbone)
    convs = [
        layer for layer in spec.neuralNetwork.layers if layer.WhichOneof("layer") == "convolution"
    ]
    scale = convs[len(convs) // 2].convolution.weights.quantization.linearQuantization.scale
    doubled = [2 * s for s in scale]
    del scale[:]
    scale.extend(doubled)
    backbone.write_bytes(spec.SerializeToString())
    images = demo_zoo[0] / "demo-images"
    assert main(["verify", str(out), "--quiet", "--images", str(images), "--count", "8"]) == 1


# -- settings ------------------------------------------------------------------------------------


def test_head_weights_follow_weights_unless_set(demo_zoo, tmp_path: Path, capsys) -> None:
    models = demo_zoo[0]
    assert main(["plan", str(models), "--json", "--weights", "int8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {m["weights"] for m in plan["models"]} == {"int8"}
    assert (
        main(["plan", str(models), "--json", "--weights", "int8", "--head-weights", "float16"]) == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert {m["weights"] for m in plan["models"]} == {"float16"}
    assert {g["weights"] for g in plan["groups"]} == {"int8"}


def test_zoo_toml_sets_storage(tmp_path: Path) -> None:
    (tmp_path / "zoo.toml").write_text(
        '[defaults]\nweights = "float16"\n[models.cats]\nhead_weights = "palette6"\n'
        '[backbones.MobileNetV2]\nweights = "int8"\n'
    )
    manifest = load_manifest(tmp_path)
    assert manifest.for_model("cats").head_weights == "palette6"
    assert manifest.for_model("dogs").weights == "float16"
    assert manifest.for_backbone("MobileNetV2-1234", "MobileNetV2").weights == "int8"


def test_bad_storage_names(tmp_path: Path, capsys) -> None:
    from convert.read.manifest import ManifestError

    (tmp_path / "zoo.toml").write_text('[defaults]\nweights = "int4"\n')
    with pytest.raises(ManifestError, match=r"defaults\.weights: unknown weight storage 'int4'"):
        load_manifest(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["plan", str(tmp_path), "--weights", "palette9"])
    assert stopped.value.code == 2
    said = capsys.readouterr().err
    assert "unknown weight storage 'palette9'" in said and said.count("\n") == 1


def test_auto_needs_images(demo_zoo, tmp_path: Path, capsys) -> None:
    out = tmp_path / "build"
    assert main(["convert", str(demo_zoo[0]), "--out", str(out), "--weights", "auto"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == ["error: --weights auto measures on images: give them with --images DIR"]
    assert not list(out.glob("*.mlmodel"))
