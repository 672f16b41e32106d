"""Digests of what the suite converts, held against ``tests/data/output_digests.json``.

The file was first written from the code before the package was laid out in stages (the
refactor promised byte-identical output), and is rewritten by ``tests/record_digests.py`` only
when a change to the bytes is meant. :func:`check` compares a fixture's outputs with it.

The outputs can only be compared where the fixture's Keras files are the ones recorded: they are
built with TensorFlow, whose float arithmetic may differ on another kind of CPU. Where they
differ, the comparison is skipped and says so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

RECORDED = Path(__file__).resolve().parent / "data" / "output_digests.json"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inputs(zoo: Path) -> dict[str, str]:
    return {
        str(p.relative_to(zoo)): _sha(p)
        for p in sorted(zoo.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(zoo).parts)
    }


def outputs(out: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(out.glob("*.mlmodel"))}


def entry(zoo: Path, out: Path) -> dict[str, dict[str, str]]:
    return {"inputs": inputs(zoo), "outputs": outputs(out)}


def check(key: str, zoo: Path, out: Path) -> None:
    """Every .mlmodel in ``out`` is byte-for-byte the one recorded for ``key``."""
    recorded = json.loads(RECORDED.read_text())
    assert key in recorded, f"no digests recorded for {key}: run tests/record_digests.py"
    want = recorded[key]
    if inputs(zoo) != want["inputs"]:
        pytest.skip(f"{key}: the Keras files differ from the recorded ones (another CPU?)")
    got = outputs(out)
    changed = sorted(
        n for n in set(got) | set(want["outputs"]) if got.get(n) != want["outputs"].get(n)
    )
    assert not changed, f"{key}: bytes differ from the recorded output in {changed}"
