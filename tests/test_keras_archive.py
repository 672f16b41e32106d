"""Keras 3's native ``.keras`` archives: read without TensorFlow into the same graph as the same
model's legacy .h5, shared, converted and verified like it; the zip itself is guarded."""

from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from pathlib import Path

import factory
import pytest

from convert.cli import main
from convert.errors import ModelFileError
from convert.read import archive as archive_module
from convert.read.h5 import load_weight, read_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model saved twice by Keras 3 (``twin.h5``, ``twin.keras``), and a second classifier
    on the same backbone saved as ``.keras`` only."""
    folder = tmp_path_factory.mktemp("archives") / "models"
    folder.mkdir()
    factory.save_transfer_classifier(folder / "twin.h5", head_seed=1)
    factory.save_transfer_classifier(folder / "twin.keras", head_seed=1)
    factory.save_transfer_classifier(folder / "other.keras", head_seed=2, hidden=16)
    return folder


def _layers(path: Path) -> list[tuple]:
    graph = read_model(path)
    return [
        (n.layer.path, n.layer.class_name, [(w.name, w.shape, w.digest) for w in n.layer.weights])
        for n in graph.nodes
        if n.layer.class_name != "InputLayer"
    ]


def test_an_archive_reads_as_the_same_graph_as_its_h5(saved: Path) -> None:
    archive = _layers(saved / "twin.keras")
    assert archive == _layers(saved / "twin.h5")
    assert sum(len(weights) for *_, weights in archive) > 200  # a whole MobileNetV2
    graph = read_model(saved / "twin.keras")
    assert graph.keras_major == 3
    kernel = next(w for n in graph.nodes for w in n.layer.weights if w.name == "kernel")
    assert kernel.dataset.startswith("/layers/") and "/vars/" in kernel.dataset
    assert load_weight(saved / "twin.keras", kernel).shape == kernel.shape


def test_archives_and_h5_share_one_backbone_convert_and_verify(saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    assert main(["convert", str(saved), "--out", str(out), "--verify", "--count", "4", "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    [backbone] = report["backbones"]
    assert sorted(backbone["members"]) == ["other", "twin-h5", "twin-keras"]
    assert {c["name"]: c["group"] for c in report["classifiers"]} == {
        "other": backbone["id"],
        "twin-h5": backbone["id"],
        "twin-keras": backbone["id"],
    }
    results = {v["name"]: v for v in report["verify"]}
    assert all(v["passed"] for v in results.values()) and len(results) == 3
    # one model saved twice: the same stub and the same head layers (the metadata names the file)
    stubs, heads = zip(*(_spec(out / f"twin-{kind}.mlmodel").models for kind in KINDS))
    assert stubs[0] == stubs[1]
    assert _layers_of(heads[0]) == _layers_of(heads[1]) and len(_layers_of(heads[0])) >= 2


KINDS = ("h5", "keras")


def _spec(path: Path):
    from coremltools.proto import Model_pb2

    return Model_pb2.Model.FromString(path.read_bytes()).pipelineClassifier.pipeline


def _layers_of(model) -> list[bytes]:
    network = getattr(model, model.WhichOneof("Type"))
    return [layer.SerializeToString() for layer in network.layers]


# -- the zip, guarded ----------------------------------------------------------------------------


def _rezip(src: Path, dst: Path, *, extra: dict[str, bytes] | None = None, drop=(), deflate=False):
    """``src``'s members written again into ``dst``, some dropped, some added."""
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    dst.parent.mkdir(parents=True, exist_ok=True)
    with (
        warnings.catch_warnings(),
        zipfile.ZipFile(src) as zin,
        zipfile.ZipFile(dst, "w", method) as zout,
    ):
        warnings.simplefilter("ignore")  # a duplicate name, on purpose
        for info in zin.infolist():
            if info.filename not in drop:
                zout.writestr(info.filename, zin.read(info))
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def _reason(path: Path) -> str:
    with pytest.raises(ModelFileError) as caught:
        read_model(path)
    assert caught.value.path == path
    return caught.value.reason


def test_a_compressed_weights_member_reads_the_same(saved: Path, tmp_path: Path) -> None:
    squeezed = _rezip(saved / "twin.keras", tmp_path / "squeezed.keras", deflate=True)
    assert _layers(squeezed) == _layers(saved / "twin.keras")


def test_members_are_read_by_name_only_and_nothing_is_extracted(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = {"../../escaped.txt": b"x", "/etc/absolute.txt": b"y", "assets/a": b"z"}
    odd = _rezip(saved / "twin.keras", tmp_path / "inner" / "odd.keras", extra=planted)

    def refuse(*_args, **_kwargs):
        raise AssertionError("something was extracted")

    monkeypatch.setattr(zipfile.ZipFile, "extract", refuse)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", refuse)
    before = sorted(tmp_path.rglob("*"))
    assert _layers(odd) == _layers(saved / "twin.keras")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("no-weights", "has no model.weights.h5"),
        ("no-config", "has no config.json"),
        ("twice", "two members named config.json"),
        ("truncated", "not a readable .keras archive"),
        ("crc", "CRC does not match"),
        ("bad-json", "config.json is not valid JSON"),
    ],
)
def test_a_damaged_archive_is_one_line(saved: Path, tmp_path: Path, damage: str, said: str) -> None:
    src, dst = saved / "twin.keras", tmp_path / f"{damage}.keras"
    if damage == "no-weights":
        _rezip(src, dst, drop={"model.weights.h5"})
    elif damage == "no-config":
        _rezip(src, dst, drop={"config.json"})
    elif damage == "twice":
        with zipfile.ZipFile(src) as z:
            config = z.read("config.json")
        _rezip(src, dst, extra={"config.json": config})
    elif damage == "truncated":
        dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif damage == "crc":
        data = bytearray(src.read_bytes())
        with zipfile.ZipFile(src) as z:
            info = z.getinfo("model.weights.h5")
        data[info.header_offset + 30 + len(info.filename) + info.file_size // 2] ^= 0x01
        dst.write_bytes(bytes(data))
    else:
        _rezip(src, dst, drop={"config.json"}, extra={"config.json": b"{not json"})
    assert said in _reason(dst)


def test_size_and_count_bounds(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(archive_module, "MAX_CONFIG_BYTES", 1000)
    assert "config.json is" in _reason(saved / "twin.keras")
    assert "coreml-split reads at most 1000 bytes" in _reason(saved / "twin.keras")
    monkeypatch.undo()
    many = {f"assets/{i}": b"" for i in range(archive_module.MAX_ARCHIVE_MEMBERS + 1)}
    crowded = _rezip(saved / "twin.keras", tmp_path / "crowded.keras", extra=many)
    assert f"coreml-split reads archives of at most {archive_module.MAX_ARCHIVE_MEMBERS}" in (
        _reason(crowded)
    )


def test_a_bad_archive_in_a_zoo_is_its_own_error_line(
    saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    shutil.copytree(saved, models)
    (models / "broken.keras").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["plan", str(models), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {models / 'broken.keras'}: not a readable .keras archive: no zip "
        "directory at its end (truncated?)"
    ]


def test_an_archive_without_recorded_layer_names_reads_by_keras_keys(
    saved: Path, tmp_path: Path
) -> None:
    """Keras 3 releases before the ``vars`` groups recorded their layer's name: the weights are
    found by the keys Keras gives them (snake_case class names, numbered in the model's order)."""
    import h5py

    src = saved / "twin.keras"
    with zipfile.ZipFile(src) as z:
        (tmp_path / "w.h5").write_bytes(z.read("model.weights.h5"))
    with h5py.File(tmp_path / "w.h5", "a") as f:
        named = []
        f.visititems(lambda key, obj: named.append(key) if "name" in obj.attrs else None)
        for key in named:
            del f[key].attrs["name"]
    assert len(named) > 100
    unnamed = _rezip(
        src,
        tmp_path / "unnamed.keras",
        drop={"model.weights.h5"},
        extra={"model.weights.h5": (tmp_path / "w.h5").read_bytes()},
    )
    assert _layers(unnamed) == _layers(saved / "twin.h5")


def test_a_directory_that_lies_about_its_count_is_still_bounded(
    saved: Path, tmp_path: Path
) -> None:
    """zipfile walks the whole directory whatever count the end record gives: the directory's
    size is bounded too, so a planted count of 3 does not let 5000 entries through."""
    many = {f"assets/{i}": b"" for i in range(5000)}
    crowded = _rezip(saved / "twin.keras", tmp_path / "lying.keras", extra=many)
    data = bytearray(crowded.read_bytes())
    at = data.rfind(b"PK\x05\x06")
    data[at + 8 : at + 12] = (3).to_bytes(2, "little") * 2  # entries here, entries in all
    crowded.write_bytes(bytes(data))
    assert "coreml-split reads archives of at most" in _reason(crowded)


def test_a_damaged_directory_is_one_line_not_an_internal_error(saved: Path, tmp_path: Path) -> None:
    data = bytearray((saved / "twin.keras").read_bytes())
    at = data.rfind(b"PK\x01\x02")  # the last directory entry's signature
    data[at : at + 4] = b"XXXX"
    damaged = tmp_path / "damaged.keras"
    damaged.write_bytes(bytes(data))
    assert _reason(damaged).startswith("not a readable .keras archive: ")


def test_a_compressed_weights_member_is_inflated_once(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    squeezed = _rezip(saved / "twin.keras", tmp_path / "squeezed.keras", deflate=True)
    graph = read_model(squeezed)
    inflated = []
    real = archive_module.Archive._read

    def counted(self, info, limit):
        inflated.append(info.filename)
        return real(self, info, limit)

    monkeypatch.setattr(archive_module.Archive, "_read", counted)
    weights = [w for n in graph.nodes for w in n.layer.weights][:20]
    values = [load_weight(squeezed, w) for w in weights]
    assert [v.shape for v in values] == [w.shape for w in weights]
    assert inflated.count("model.weights.h5") <= 1


def test_a_file_named_for_the_other_format_converts_and_verifies(
    saved: Path, tmp_path: Path
) -> None:
    """Keras tells the formats by the file's name, coreml-split by its content: an archive
    named .h5 and an .h5 named .keras both read, convert and verify."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(saved / "twin.keras", models / "archive_named.h5")
    shutil.copy(saved / "twin.h5", models / "hdf5_named.keras")
    for stem in ("archive_named", "hdf5_named"):
        shutil.copy(saved / "twin.labels.txt", models / f"{stem}.labels.txt")
    out = tmp_path / "build"
    assert main(["convert", str(models), "--out", str(out), "--verify", "--count", "2", "-q"]) == 0
    verified = json.loads((out / "report.json").read_text())["verify"]
    assert sorted(v["name"] for v in verified if v["passed"]) == ["archive_named", "hdf5_named"]
