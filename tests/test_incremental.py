"""Incremental builds: an unchanged zoo is not rebuilt, an edited head rewrites only its own
pipeline, and an incremental result is byte-identical to a clean build of the same zoo."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from convert.cli import main


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix == ".mlmodel"}


@pytest.fixture()
def work(zoo: Path, built, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the session zoo and of its build (cache included, times kept)."""
    out, code = built
    assert code == 0
    shutil.copytree(zoo, tmp_path / "zoo")
    shutil.copytree(out, tmp_path / "build")
    return tmp_path / "zoo", tmp_path / "build"


def test_an_unchanged_zoo_rebuilds_nothing_and_imports_no_tensorflow(work) -> None:
    zoo, build = work
    before, times = _files(build), _mtimes(build)
    script = (
        "import sys\n"
        "from convert.cli import main\n"
        f"code = main(['convert', {str(zoo)!r}, '--out', {str(build)!r}, '--quiet'])\n"
        "heavy = [m for m in ('tensorflow', 'coremltools', 'keras') if m in sys.modules]\n"
        "print(code, heavy)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert run.stdout.strip() == "0 []", run.stdout + run.stderr
    assert _mtimes(build) == times
    after = _files(build)
    assert {n: b for n, b in after.items() if n.endswith(".mlmodel")} == {
        n: b for n, b in before.items() if n.endswith(".mlmodel")
    }
    rows = [json.loads(f["report.json"])["classifiers"] for f in (before, after)]
    for row in rows[0] + rows[1]:
        row.pop("source")  # the zoo was copied elsewhere
    assert rows[0] == rows[1]


def test_an_edited_head_rewrites_only_its_pipeline(work, tmp_path: Path) -> None:
    import factory

    zoo, build = work
    before, times = _files(build), _mtimes(build)
    factory.save_transfer_classifier(zoo / "nested_k2.h5", "k2", 4, head_seed=22)  # new head
    assert main(["convert", str(zoo), "--out", str(build), "--quiet"]) == 0
    after = _mtimes(build)
    changed = sorted(n for n in after if after[n] != times[n])
    assert changed == ["nested_k2.mlmodel"]
    assert _files(build)["nested_k2.mlmodel"] != before["nested_k2.mlmodel"]
    clean = tmp_path / "clean"
    assert main(["convert", str(zoo), "--out", str(clean), "--quiet"]) == 0
    assert _files(build) == _files(clean)


def test_a_changed_backbone_reconverts_its_group_only(work) -> None:
    import factory

    zoo, build = work
    times = _mtimes(build)
    for name in ("tm_cats", "tm_dogs"):  # both members move to another backbone
        shutil.rmtree(zoo / name)
    factory.save_teachable_machine(zoo / "tm_cats", 2, "model1", head_seed=4, backbone_seed=8)
    factory.save_teachable_machine(zoo / "tm_dogs", 3, "model2", head_seed=5, backbone_seed=8)
    assert main(["convert", str(zoo), "--out", str(build), "--quiet"]) == 0
    after = _mtimes(build)
    new = sorted(set(after) - set(times))
    assert len(new) == 1 and new[0].startswith("MobileNetV2-"), new  # the new backbone
    changed = sorted(n for n in times if n in after and after[n] != times[n])
    assert changed == ["tm_cats.mlmodel", "tm_dogs.mlmodel"]


def test_outputs_of_removed_models_are_removed_unless_a_file_failed(work) -> None:
    zoo, build = work
    (zoo / "flat_k2.h5").rename(zoo / "flat_k2.h5.bak")  # removed from the zoo
    (zoo / "tm_cats" / "keras_model.h5").write_bytes(b"not hdf5")  # unreadable this time
    assert main(["convert", str(zoo), "--out", str(build), "--quiet"]) == 1
    assert (build / "flat_k2.mlmodel").exists() and (build / "tm_cats.mlmodel").exists()
    shutil.rmtree(zoo / "tm_cats")  # now the zoo reads cleanly, without two models
    assert main(["convert", str(zoo), "--out", str(build), "--quiet"]) == 0
    assert not (build / "flat_k2.mlmodel").exists() and not (build / "tm_cats.mlmodel").exists()
    assert (build / "tm_dogs.mlmodel").exists()  # tm_dogs alone: converted standalone
    report = json.loads((build / "report.json").read_text())
    assert "flat_k2" not in {c["name"] for c in report["classifiers"]}


def test_read_models_are_reused_only_while_their_file_is_untouched(zoo: Path, tmp_path: Path):
    import os

    from convert.read.h5 import read_model
    from convert.read.sources import SourceCache

    path = tmp_path / "m.h5"
    shutil.copy2(zoo / "nested_k3.h5", path)
    cache = SourceCache(tmp_path / "build")
    assert cache.graph(path) is None
    graph = read_model(path)
    cache.remember(path, graph)
    again = SourceCache(tmp_path / "build")
    cached = again.graph(path)
    assert cached is not None and [n.layer.qualified_name for n in cached.nodes] == [
        n.layer.qualified_name for n in graph.nodes
    ]
    assert again.sha256(path) == cache.sha256(path)
    # same size and modification time, other bytes: the change time still tells
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert SourceCache(tmp_path / "build").graph(path) is None
