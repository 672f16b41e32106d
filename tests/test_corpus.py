"""The bad-input corpus (tests/corpus.py) through ``coreml-split convert``, in one run.

Each damaged file gives exactly its one ``error: <file>: <reason>`` line, never a traceback and
never an internal error; the run exits with 1; and the two good models beside the corpus come
out valid and compute what Keras computes.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import corpus
import pytest

from convert.check.validate import validate_file
from convert.cli import main


@dataclass
class Run:
    folder: Path
    out: Path
    code: int
    lines: list[str]


def _convert(folder: Path, out: Path) -> tuple[int, list[str]]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["convert", str(folder), "--out", str(out), "--quiet"])
    return code, [line for line in stderr.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "models"
    corpus.write_corpus(folder)
    code, lines = _convert(folder, root / "build")
    return Run(folder, root / "build", code, lines)


def test_the_corpus_is_large_enough() -> None:
    assert len(corpus.CASES) >= 25


def test_the_run_prints_one_error_line_per_case_and_nothing_else(run: Run) -> None:
    assert run.code == 1
    assert all(line.startswith("error: ") for line in run.lines), run.lines
    assert len(run.lines) == len(corpus.CASES), "\n".join(run.lines)


@pytest.mark.parametrize("name", list(corpus.CASES))
def test_each_case_gives_its_line(run: Run, name: str) -> None:
    case = corpus.CASES[name]
    file = run.folder / (case.file or f"{name}.h5")
    mine = [line for line in run.lines if line.startswith(f"error: {file}: ")]
    assert len(mine) == 1, (name, run.lines)
    line = mine[0]
    assert case.expected in line, line
    assert "internal error" not in line and "Traceback" not in line, line
    assert not (run.out / f"{name}.mlmodel").exists()


def test_the_good_models_convert_and_match_keras(run: Run) -> None:
    """Beside the corpus, the good models convert to valid files that compute what Keras does.

    (Not necessarily the bytes they give alone: a case that reads well but fails later, such as
    an unknown layer or bad labels, still takes part in choosing the shared backbone.)"""
    goods = [Path(good).stem for good in corpus.GOOD.values()]
    for name in goods:
        assert validate_file(run.out / f"{name}.mlmodel", strict_types=True) == [], name
    only = [arg for name in goods for arg in ("--only", name)]
    assert main(["verify", str(run.out), "--count", "4", "--quiet", *only]) == 0


def test_a_file_name_that_is_not_utf8_converts(run: Run, tmp_path: Path) -> None:
    """Linux file names are bytes; one that is not UTF-8 still converts (found by hand: the
    source cache's key and the model's metadata could not encode it)."""
    models = tmp_path / "models"
    models.mkdir()
    name = os.fsdecode(b"caf\xe9.h5")
    shutil.copy(run.folder / corpus.GOOD["k3"], models / name)
    code, lines = _convert(models, tmp_path / "build")
    assert (code, lines) == (0, [])
    assert validate_file(tmp_path / "build" / "caf_.mlmodel", strict_types=True) == []
