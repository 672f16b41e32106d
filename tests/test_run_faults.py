"""Faults around a run rather than in one file: the output folder, the lock, interruptions,
unforeseen exceptions, and a damaged cache. Each ends in whole files, one line per problem, and
a rerun that gives the bytes of a clean build."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert.cli import main
from convert.files import CACHE_DIR, LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("nested_k3", "nested_k2")  # two classifiers on one backbone, built from the weights


@pytest.fixture(scope="module")
def small_zoo(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small_zoo")
    for name in MODELS:
        shutil.copy(zoo / f"{name}.h5", root / f"{name}.h5")
        shutil.copy(zoo / f"{name}.labels.txt", root / f"{name}.labels.txt")
    shutil.copytree(zoo / "tm_cats", root / "tm_cats")  # another backbone: a second group
    return root


@pytest.fixture(scope="module")
def clean(small_zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """SHA-256 of every file a clean build of the small zoo writes (the cache aside)."""
    out = tmp_path_factory.mktemp("clean")
    assert main(["convert", str(small_zoo), "--out", str(out), "--quiet"]) == 0
    return _digests(out)


@pytest.fixture(scope="module")
def converted(small_zoo: Path, clean: dict[str, str], tmp_path_factory) -> Path:
    """A build of the small zoo, with its cache; tests work on copies (:func:`_copy_of`)."""
    out = tmp_path_factory.mktemp("converted") / "build"
    assert main(["convert", str(small_zoo), "--out", str(out), "--quiet"]) == 0
    return out


def _copy_of(build: Path, tmp_path: Path) -> Path:
    """A copy whose files keep their times, so that the cache finds them untouched."""
    out = tmp_path / "build"
    shutil.copytree(build, out)
    return out


def _digests(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.is_file() and p.suffix == ".mlmodel"
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "convert.cli", *args]


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}


def _exit_code(argv: list[str]) -> int:
    """main's exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- the output folder ----------------------------------------------------------------------


def test_out_naming_a_file_is_one_line_and_exit_2(small_zoo: Path, tmp_path: Path, capsys):
    target = tmp_path / "build"
    target.write_bytes(b"not a folder")
    assert main(["convert", str(small_zoo), "--out", str(target)]) == 2
    lines = _lines(capsys.readouterr().err)
    assert lines == [f"error: {target}: the output folder is a file, not a folder"]
    assert target.read_bytes() == b"not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]  # nothing written elsewhere


def test_out_that_cannot_be_created_is_one_line_and_exit_2(small_zoo: Path, capsys) -> None:
    target = Path("/proc/coreml-split-test/build")  # not writable, even for root
    assert main(["convert", str(small_zoo), "--out", str(target)]) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {target}: cannot create"), lines


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_out_not_writable_is_one_line_and_exit_2(small_zoo: Path, tmp_path: Path, capsys):
    target = tmp_path / "build"
    target.mkdir()
    target.chmod(0o555)
    try:
        assert main(["convert", str(small_zoo), "--out", str(target)]) == 2
    finally:
        target.chmod(0o755)
    lines = _lines(capsys.readouterr().err)
    assert lines == [f"error: {target}: the output folder is not writable"]
    assert list(target.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--jobs", "0"], "argument --jobs: 0 is not 1 or more"),
        (["--min-shared", "1.5"], "argument --min-shared: 1.5 is not a fraction between 0 and 1"),
        (["--count", "many"], "argument --count: 'many' is not a number"),
        (["--atol-float32", "-1"], "argument --atol-float32: -1 is not 0 or more"),
        (["--preprocess", "sepia"], "--preprocess sepia: unknown mode 'sepia'"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["--verify", "--count", "0"], "--count 0 means every image in --images"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    small_zoo: Path, tmp_path: Path, capsys, args: list[str], said: str
) -> None:
    assert _exit_code(["convert", str(small_zoo), "--out", str(tmp_path / "build"), *args]) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], lines
    assert not (tmp_path / "build").exists()


def test_a_broken_zoo_toml_is_one_line_and_exit_2(small_zoo: Path, tmp_path: Path, capsys):
    zoo = tmp_path / "zoo"
    shutil.copytree(small_zoo, zoo)
    (zoo / "zoo.toml").write_text("[models.nested_k3\nlabels = 3\n")
    assert main(["convert", str(zoo), "--out", str(tmp_path / "build")]) == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {zoo / 'zoo.toml'}: "), lines


# -- unforeseen exceptions -------------------------------------------------------------------


def test_an_unforeseen_exception_while_reading_costs_one_file(
    small_zoo: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convert.plan.make as make

    real = make.analyse

    def analyse(path, *args, **kwargs):
        if path.name == "nested_k2.h5":
            raise KeyError("a key nobody expected")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(make, "analyse", analyse)
    out = tmp_path / "build"
    assert main(["convert", str(small_zoo), "--out", str(out), "--quiet"]) == 1
    lines = _lines(capsys.readouterr().err)
    assert lines == [
        f"error: {small_zoo / 'nested_k2.h5'}: internal error: KeyError: 'a key nobody expected' "
        "(rerun with --debug for the traceback)"
    ]
    assert {"nested_k3.mlmodel", "tm_cats.mlmodel"} <= set(_digests(out))

    assert main(["convert", str(small_zoo), "--out", str(out), "--quiet", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in analyse" in err


def test_an_unforeseen_exception_while_building_costs_one_classifier(
    small_zoo: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convert.build.work as work

    real = work._emit_pipeline

    def emit(model, *args, **kwargs):
        if model.name == "nested_k3":
            raise ZeroDivisionError("division by zero")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(work, "_emit_pipeline", emit)
    out = tmp_path / "build"
    rc = main(["convert", str(small_zoo), "--out", str(out), "--quiet", "--jobs", "1"])
    assert rc == 1
    lines = _lines(capsys.readouterr().err)
    assert lines == [
        f"error: {small_zoo / 'nested_k3.h5'}: internal error: ZeroDivisionError: division by "
        "zero (rerun with --debug for the traceback)"
    ]
    assert {"nested_k2.mlmodel", "tm_cats.mlmodel"} <= set(_digests(out))
    assert "nested_k3.mlmodel" not in _digests(out)


def test_a_full_disk_costs_the_files_it_stops(
    small_zoo: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convert.files as files

    real = files.tempfile.mkstemp

    def mkstemp(prefix: str = "", **kwargs):
        if prefix.startswith(".nested_k2.mlmodel"):
            raise OSError(28, "No space left on device")
        return real(prefix=prefix, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    out = tmp_path / "build"
    assert main(["convert", str(small_zoo), "--out", str(out), "--quiet", "--jobs", "1"]) == 1
    lines = _lines(capsys.readouterr().err)
    assert lines == [
        f"error: {out / 'nested_k2.mlmodel'}: cannot write the file (No space left on device)"
    ]
    assert {"nested_k3.mlmodel", "tm_cats.mlmodel"} <= set(_digests(out))
    assert not list(out.rglob(".*.tmp"))


# -- a damaged cache -------------------------------------------------------------------------


def _damage(out: Path, what: str) -> None:
    cache = out / CACHE_DIR
    if what == "state: garbage":
        (cache / "state.json").write_bytes(b"\x00\xff garbage {")
    elif what == "state: wrong types":
        (cache / "state.json").write_text('{"version": 2, "outputs": {"a.mlmodel": [1, 2]}}')
    elif what == "state: one entry edited":
        text = (cache / "state.json").read_text()
        (cache / "state.json").write_text(text.replace('"classes": 3', '"classes": 4', 1))
    elif what == "objects: garbage":
        for p in (cache / "objects").rglob("*.pb"):
            p.write_bytes(b"garbage" * 10)
    elif what == "objects: one bit":
        for p in (cache / "objects").rglob("*.pb"):
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0x10
            p.write_bytes(bytes(data))
    elif what == "sources: garbage":
        for p in (cache / "sources").iterdir():
            p.write_bytes(b"garbage")
    else:
        raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    [
        "state: garbage",
        "state: wrong types",
        "state: one entry edited",
        "objects: garbage",
        "objects: one bit",
        "sources: garbage",
    ],
)
def test_a_damaged_cache_warns_and_rebuilds_the_same_bytes(
    small_zoo: Path, clean: dict[str, str], converted: Path, tmp_path: Path, capsys, what: str
) -> None:
    out = _copy_of(converted, tmp_path)
    _damage(out, what)
    if what.startswith("objects"):  # make the builds read the objects: outputs are stale
        for p in out.glob("*.mlmodel"):
            p.unlink()
    assert main(["convert", str(small_zoo), "--out", str(out), "--quiet"]) == 0
    lines = _lines(capsys.readouterr().err)
    assert lines and all(line.startswith("warning: ") for line in lines), lines
    assert all("damaged" in line or "dropped" in line for line in lines), lines
    assert _digests(out) == clean
    # what was dropped is whole again: the next run warns no more
    assert main(["convert", str(small_zoo), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_an_edited_state_entry_is_not_believed(
    small_zoo: Path, converted: Path, tmp_path: Path, capsys
) -> None:
    """The report rows come from state.json: an entry whose hash fails is not reported as is."""
    import json

    out = _copy_of(converted, tmp_path)
    _damage(out, "state: one entry edited")
    assert main(["convert", str(small_zoo), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {c["name"]: c["classes"] for c in report["classifiers"]}["nested_k3"] == 3


def test_a_planted_source_cache_entry_runs_no_code(
    small_zoo: Path, converted: Path, tmp_path: Path, capsys
) -> None:
    """A cache entry with a valid hash whose pickle would call os.system is refused."""
    out = _copy_of(converted, tmp_path)
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for p in (out / CACHE_DIR / "sources").iterdir():
        body = pickle.dumps(Planted())
        p.write_bytes(hashlib.sha256(body).hexdigest().encode() + body)
    assert main(["convert", str(small_zoo), "--out", str(out), "--quiet"]) == 0
    lines = _lines(capsys.readouterr().err)
    assert lines and all("refused to make posix.system" in line for line in lines), lines
    assert not marker.exists()


# -- the lock, concurrent runs and interruptions --------------------------------------------

_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, b"%d" % os.getpid(), 0)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_second_run_waits_for_the_lock_and_says_so(
    small_zoo: Path, clean: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "build"
    (out / CACHE_DIR).mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out / CACHE_DIR / LOCK_FILE), "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    run = subprocess.run(
        _cli("convert", str(small_zoo), "--out", str(out)),
        env=_env(),
        capture_output=True,
        text=True,
    )
    holder.wait()
    assert run.returncode == 0, run.stderr
    assert f"waiting: another coreml-split run (pid {holder.pid}) is writing {out}" in run.stderr
    assert time.monotonic() - started >= 2.0  # it did wait
    assert _digests(out) == clean


def test_a_lock_left_by_a_killed_run_is_taken_over(
    small_zoo: Path, clean: dict[str, str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "build"
    (out / CACHE_DIR).mkdir(parents=True)
    (out / CACHE_DIR / LOCK_FILE).write_text("999999\n")  # its holder is gone
    (out / ".nested_k3.mlmodel.abcd1234.tmp").write_bytes(b"half a file")
    assert main(["convert", str(small_zoo), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "taking over from an interrupted run (pid 999999); removed 1 temporary file(s)" in err
    assert not list(out.glob(".*.tmp"))
    assert _digests(out) == clean


def test_three_concurrent_runs_on_one_out_give_a_clean_build(
    small_zoo: Path, clean: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "build"
    runs = [
        subprocess.Popen(
            _cli("convert", str(small_zoo), "--out", str(out), "--jobs", "1"),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    errs = [run.communicate()[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], errs
    assert sum("waiting: another coreml-split run" in e for e in errs) >= 1, errs
    assert _digests(out) == clean
    assert not list(out.rglob(".*.tmp"))


def _first(out: Path, pattern: str) -> bool:
    return any(out.glob(pattern))


# Where to kill a run: the moment the predicate first holds (polled every few milliseconds).
INTERRUPTIONS = {
    "while starting": lambda out: True,
    "while reading the zoo": lambda out: _first(out, f"{CACHE_DIR}/sources/*.graph"),
    "after the first backbone": lambda out: _first(out, "*-*.mlmodel"),
    "after the first pipeline": lambda out: (
        _first(out, "nested_k*.mlmodel") or _first(out, "tm_cats.mlmodel")
    ),
    "while writing state": lambda out: (
        _first(out, f"{CACHE_DIR}/state.json") or _first(out, f"{CACHE_DIR}/.state.json.*")
    ),
}


@pytest.mark.parametrize("point", list(INTERRUPTIONS))
def test_a_killed_run_leaves_whole_files_and_the_rerun_matches_a_clean_build(
    small_zoo: Path, clean: dict[str, str], tmp_path: Path, point: str
) -> None:
    out = tmp_path / "build"
    out.mkdir()
    run = subprocess.Popen(
        _cli("convert", str(small_zoo), "--out", str(out), "--quiet", "--jobs", "1"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while run.poll() is None and not INTERRUPTIONS[point](out) and time.monotonic() < deadline:
        time.sleep(0.002)
    if run.poll() is None:
        run.send_signal(signal.SIGKILL)
    run.wait()
    # whatever was left is whole: every model file parses and validates
    from convert.check.validate import validate_file

    for model in out.glob("*.mlmodel"):
        assert validate_file(model) == [], model
    rerun = subprocess.run(
        _cli("convert", str(small_zoo), "--out", str(out), "--quiet"),
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert _digests(out) == clean
    assert not list(out.rglob(".*.tmp"))


def test_ctrl_c_says_the_files_are_whole_and_exits_130(small_zoo: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    run = subprocess.Popen(
        _cli("convert", str(small_zoo), "--out", str(out), "--jobs", "1"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not _first(out, f"{CACHE_DIR}/sources/*.graph") and time.monotonic() < deadline:
        time.sleep(0.002)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate()
    assert run.returncode == 130, err
    assert "interrupted: the files written so far are whole; run again to finish" in err
    assert "Traceback" not in err
