"""Progress while a command works: on a terminal, a bar with counts for each long stage (files
read, jobs built, classifiers verified); off a terminal, lines; nothing with --quiet, and only
JSON on stdout with --json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import factory_keras as fk
import pytest

from convert.cli import main

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("progress") / "models"
    models.mkdir()
    for i in range(3):
        fk.save_tiny_classifier(models / f"tiny{i}.h5", seed=i)
    return models


def _terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rich console the command makes behaves as a terminal's."""
    import rich.console

    real = rich.console.Console
    monkeypatch.setattr(
        rich.console, "Console", lambda *a, **k: real(*a, **(k | {"force_terminal": True}))
    )


def test_a_terminal_shows_counts_for_each_stage(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _terminal(monkeypatch)
    out = tmp_path / "build"
    assert main(["convert", str(tiny), "--out", str(out), "--verify", "--count", "2"]) == 0
    err = ANSI.sub("", capsys.readouterr().err)
    assert "reading the zoo" in err and "3/3" in err
    assert re.search(r"building .*\b3/3\b", err)  # three standalone jobs
    assert re.search(r"verifying .*\b3/3\b", err)
    assert re.search(r"verifying .*\b1/3\b", err)  # counted as it goes, not only at the end


def test_off_a_terminal_lines_only_and_quiet_json_stay_clean(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "build"
    assert main(["convert", str(tiny), "--out", str(out), "--verify", "--count", "2"]) == 0
    captured = capsys.readouterr()
    assert "reading the zoo" not in captured.err and "3/3" not in captured.err
    assert "[ok] tiny0" in captured.out
    assert main(["convert", str(tiny), "--out", str(out), "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["plan", str(tiny), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["models"] and captured.err == ""


def test_verify_results_stay_on_stdout_when_it_is_not_a_terminal(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``verify build > results.txt`` from a terminal: stderr is one, stdout is not."""
    import rich.console

    out = tmp_path / "build"
    assert main(["convert", str(tiny), "--out", str(out), "-q"]) == 0
    real = rich.console.Console
    monkeypatch.setattr(
        rich.console,
        "Console",
        lambda *a, **k: real(*a, **(k | {"force_terminal": bool(k.get("stderr"))})),
    )
    assert main(["verify", str(out), "--count", "2"]) == 0
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.splitlines()[:3]] == [
        "[ok] tiny0",
        "[ok] tiny1",
        "[ok] tiny2",
    ]
    assert "verifying" not in ANSI.sub("", captured.err)
