"""zoo.toml's [aliases]: a file that names a Keras layer by a subclass' name (the
CustomDepthwiseConv2D patch people apply to Teachable Machine files) reads, shares, converts and
verifies like the stock file once the alias is given, and its error line suggests the alias
when it is not. An alias renames a class; it never imports code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import factory
import factory_keras as fk
import pytest

from convert.cli import main
from convert.plan.fingerprint import tensor_fingerprints
from convert.read.h5 import read_model
from convert.read.manifest import ManifestError, load_manifest

ALIAS = '[aliases]\nCustomDepthwiseConv2D = "DepthwiseConv2D"\n'


@pytest.fixture(scope="module")
def patched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stock.h5 (a frozen MobileNetV2 classifier, Keras 3) and the same model re-saved through
    the CustomDepthwiseConv2D patch, as patched.h5 and patched.keras; no zoo.toml."""
    models = tmp_path_factory.mktemp("aliases") / "models"
    models.mkdir()
    stock = factory.save_transfer_classifier(models / "stock.h5", head_seed=3)
    for name in ("patched.h5", "patched.keras"):
        fk.resave_with_custom_depthwise(stock, models / name)
        shutil.copy(models / "stock.labels.txt", (models / name).with_suffix(".labels.txt"))
    return models


def _classes(path: Path, aliases: dict[str, str] | None = None) -> set[str]:
    return {n.layer.class_name for n in read_model(path, aliases=aliases).nodes}


def test_the_patch_changes_the_class_name_only(patched: Path) -> None:
    stock = read_model(patched / "stock.h5")
    for name in ("patched.h5", "patched.keras"):
        assert "CustomDepthwiseConv2D" in _classes(patched / name)
        aliased = read_model(patched / name, aliases={"CustomDepthwiseConv2D": "DepthwiseConv2D"})
        assert aliased.aliases == {"CustomDepthwiseConv2D": "DepthwiseConv2D"}
        assert "CustomDepthwiseConv2D" not in {n.layer.class_name for n in aliased.nodes}
        digests = [[w.digest for w in n.layer.weights] for n in aliased.nodes]
        assert digests == [[w.digest for w in n.layer.weights] for n in stock.nodes]
        assert tensor_fingerprints(aliased) == tensor_fingerprints(stock)
    # an alias the file does not use changes nothing, and is not recorded
    assert read_model(patched / "stock.h5", aliases={"Foo": "Dense"}).aliases == {}


def test_without_the_alias_the_error_line_suggests_it(
    patched: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for name in ("stock.h5", "stock.labels.txt", "patched.h5", "patched.keras"):
        shutil.copy(patched / name, models / name)
    shutil.copy(patched / "stock.labels.txt", models / "patched.labels.txt")  # for both
    out = tmp_path / "build"
    assert main(["convert", str(models), "--out", str(out), "-q"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    # the .h5 names no module: Keras says it does not know the class; the .keras names the
    # module the patch was defined in, which is never imported; both lines say what to do
    assert [": ".join(line.split(": ")[:2]) for line in lines] == [
        f"error: {models / 'patched.h5'}",
        f"error: {models / 'patched.keras'}",
    ]
    assert "names Python module" in lines[1]
    for line in lines:
        assert line.endswith('zoo.toml: [aliases] CustomDepthwiseConv2D = "DepthwiseConv2D"')
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["classifiers"]] == ["stock"]


def test_with_the_alias_all_three_share_convert_and_verify(patched: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(patched, models)
    (models / "zoo.toml").write_text(ALIAS)
    out = tmp_path / "build"
    code = main(["convert", str(models), "--out", str(out), "--verify", "--count", "4", "-q"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    [backbone] = report["backbones"]
    assert sorted(backbone["members"]) == ["patched-h5", "patched-keras", "stock"]
    assert report["aliases"] == {"CustomDepthwiseConv2D": "DepthwiseConv2D"}
    verified = {v["name"]: v for v in report["verify"]}
    assert sorted(verified) == ["patched-h5", "patched-keras", "stock"]
    assert all(v["passed"] and v["top1_agreement"] == 1.0 for v in verified.values())
    # verify really compared against Keras: a second verify run, without the alias recorded,
    # cannot load the patched files
    data = json.loads((out / "report.json").read_text())
    data.pop("aliases")
    (out / "report.json").write_text(json.dumps(data))
    assert main(["verify", str(out), "--count", "2", "-q"]) == 3


def test_an_alias_never_imports_code(
    patched: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The patched file names an importable module for the aliased class: without the alias
    that is refused, with it the module is never imported."""
    marker = tmp_path / "imported"
    module = fk.write_canary_module(tmp_path / "code", marker)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    models = tmp_path / "models"
    models.mkdir()
    target = models / "canary.keras"
    shutil.copy(patched / "patched.keras", target)
    _set_module(target, "CustomDepthwiseConv2D", module)
    shutil.copy(patched / "stock.labels.txt", models / "canary.labels.txt")
    out = tmp_path / "build"
    assert main(["convert", str(models), "--out", str(out), "-q"]) == 1
    assert not marker.exists()
    (models / "zoo.toml").write_text(ALIAS)
    code = main(["convert", str(models), "--out", str(out), "--verify", "--count", "2", "-q"])
    assert code == 0 and not marker.exists()


def _set_module(path: Path, class_name: str, module: str) -> None:
    """Rewrite a .keras archive's config.json so that every ``class_name`` entry names
    ``module``."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {info.filename: z.read(info) for info in z.infolist()}
    config = json.loads(members["config.json"])

    def visit(value):
        if isinstance(value, dict):
            if value.get("class_name") == class_name:
                value["module"] = module
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)

    visit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


@pytest.mark.parametrize(
    ("table", "said"),
    [
        ('Custom = "Lambda"', "Lambda cannot be aliased"),
        ('Lambda = "Dense"', "Lambda cannot be aliased"),
        ('"my.Layer" = "Dense"', "'my.Layer' is not a class name"),
        ('Custom = "keras.layers.Dense"', "'keras.layers.Dense' is not a class name"),
        ("Custom = 3", "expected a string, got integer"),
        ('A = "B"\nB = "Dense"', "B is itself aliased"),
    ],
)
def test_a_bad_alias_is_a_manifest_error(tmp_path: Path, table: str, said: str) -> None:
    (tmp_path / "zoo.toml").write_text(f"[aliases]\n{table}\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path)
    assert said in caught.value.reason and caught.value.reason.startswith("aliases.")


def test_changing_an_alias_rebuilds_what_it_reads(tmp_path: Path) -> None:
    """A standalone model whose pooling is saved as a subclass: the alias picks which Keras
    pooling it is, and changing it rebuilds the file (the cache does not call it current)."""
    models = tmp_path / "models"
    models.mkdir()
    tiny = fk.save_tiny_classifier(tmp_path / "tiny.h5")
    fk.resave_as_subclass(tiny, models / "pooled.h5", "GlobalAveragePooling2D", "MyPool")
    shutil.copy(tmp_path / "tiny.labels.txt", models / "pooled.labels.txt")
    out = tmp_path / "build"
    written = {}
    for target in ("GlobalAveragePooling2D", "GlobalMaxPooling2D", "GlobalAveragePooling2D"):
        (models / "zoo.toml").write_text(f'[aliases]\nMyPool = "{target}"\n')
        argv = ["convert", str(models), "--out", str(out), "--verify", "--count", "4", "-q"]
        assert main(argv) == 0, target
        written.setdefault(target, (out / "pooled.mlmodel").read_bytes())
        assert (out / "pooled.mlmodel").read_bytes() == written[target]
    assert written["GlobalAveragePooling2D"] != written["GlobalMaxPooling2D"]
