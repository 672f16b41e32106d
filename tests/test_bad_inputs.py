"""Bad input: one clear line per file, the rest of the zoo converts, exit code 1, no debris."""

from __future__ import annotations

import shutil
from pathlib import Path

import factory
import pytest

from convert.cli import main
from convert.errors import WriteError
from convert.files import write_atomic


@pytest.fixture(scope="module")
def bad_zoo(tmp_path_factory: pytest.TempPathFactory, zoo: Path) -> Path:
    root = tmp_path_factory.mktemp("bad_zoo")
    for name in ("nested_k3", "nested_k2"):  # two good models that share a backbone
        shutil.copy(zoo / f"{name}.h5", root / f"{name}.h5")
        shutil.copy(zoo / f"{name}.labels.txt", root / f"{name}.labels.txt")
    factory.write_not_hdf5(root / "not_hdf5.h5")
    factory.write_truncated(root / "truncated.h5", zoo / "nested_k3.h5")
    factory.write_weights_only(root / "weights_only.h5", "k2")
    factory.write_no_image_input(root / "vector.h5")
    factory.write_lambda(root / "lambda.h5")
    factory.write_unconvertible(root / "unconvertible.h5")
    shutil.copy(zoo / "nested_k3.h5", root / "mismatch.h5")
    (root / "mismatch.labels.txt").write_text("a\nb\n")  # the model has 3 classes
    return root


EXPECTED = {
    "not_hdf5.h5": "not a readable HDF5 file",
    "truncated.h5": "not a readable HDF5 file",
    "weights_only.h5": "holds weights only",
    "vector.h5": "is not an image",
    "lambda.h5": "Lambda layer",
    "unconvertible.h5": "coremltools cannot convert the head: Conversion for TF op 'Bucketize'",
    "mismatch.labels.txt": "has 2 labels but mismatch.h5 outputs 3 classes",
}


def test_each_bad_file_gives_one_line_and_the_rest_converts(bad_zoo: Path, tmp_path, capsys):
    out = tmp_path / "build"
    rc = main(["convert", str(bad_zoo), "--out", str(out), "--quiet"])
    assert rc == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert all(line.startswith("error: ") for line in lines), lines
    assert len(lines) == len(EXPECTED), lines
    for file, reason in EXPECTED.items():
        matching = [line for line in lines if f"{bad_zoo / file}:" in line]
        assert len(matching) == 1, (file, lines)
        assert reason in matching[0], matching[0]
    # the good models still converted, sharing one backbone
    written = sorted(p.name for p in out.glob("*.mlmodel"))
    assert "nested_k2.mlmodel" in written and "nested_k3.mlmodel" in written
    assert sum(name.startswith("MobileNetV2-") for name in written) == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_plan_reports_the_same_files_without_converting(bad_zoo: Path, capsys) -> None:
    rc = main(["plan", str(bad_zoo), "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    for file in ("not_hdf5.h5", "truncated.h5", "weights_only.h5", "vector.h5", "lambda.h5"):
        assert f"{bad_zoo / file}:" in err


def test_an_empty_or_missing_folder_is_an_error(tmp_path: Path, capsys) -> None:
    assert main(["plan", str(tmp_path)]) == 1
    assert "no .h5 or .keras models found" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.mlmodel"
    target.write_bytes(b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("convert.files.os.fsync", disk_full)
    with pytest.raises(WriteError) as raised:
        write_atomic(target, b"new")
    assert str(raised.value) == f"{target}: cannot write the file (No space left on device)"
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.mlmodel"]


def test_a_backbone_coremltools_cannot_convert_fails_its_whole_group(tmp_path: Path, capsys):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    factory.save_tiny_lgamma_classifier(zoo / "a.h5", 1)
    factory.save_tiny_lgamma_classifier(zoo / "b.h5", 2)
    rc = main(
        ["convert", str(zoo), "--out", str(tmp_path / "build"), "--quiet", "--min-shared", "0"]
    )
    assert rc == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"error: {zoo / 'a.h5'}: coremltools cannot convert the backbone")
    assert "Lgamma" in lines[0]
    assert lines[1].startswith(f"error: {zoo / 'b.h5'}: not converted: its shared backbone")
    assert not list((tmp_path / "build").glob("*.mlmodel"))
