"""Fuzzing: mutated copies of small good .h5 files, each converted beside a good model.

Hypothesis draws one mutation per example, of one of the two good models of tests/corpus.py
(Keras 3 and tf_keras): bit flips in the file's metadata (anything outside the weights' bytes),
bit flips in the weights' bytes, a truncation, or an edit of the JSON ``model_config`` (a value
replaced by another JSON value, a key or list item deleted, a list item repeated). The mutated
file and a good model go into one folder, which ``coreml-split convert --jobs 1`` converts in
this process. Whatever the mutation, the run must end with exit code 0 or 1, print nothing but
``error:`` lines that name the mutated file (or its labels), never a traceback or an internal
error, and the good model must still convert.

The examples come from a fixed seed (the same ones on every machine and every run) and their
number is bounded: ``FUZZ_EXAMPLES`` (default 60). Set it higher, and ``FUZZ_SEED`` to another
number, to search further by hand.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from typing import Any

import corpus
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from convert.cli import main

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))


class Goods(dict):
    """Per flavour: the good file's bytes, labels, config and which bytes hold weights."""

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Goods({sorted(self)})"


@pytest.fixture(scope="module")
def goods(tmp_path_factory: pytest.TempPathFactory) -> Goods:
    import h5py

    folder = tmp_path_factory.mktemp("fuzz_goods")
    out = Goods()
    for flavour in corpus.GOOD:
        path = corpus.write_good(folder, flavour)
        data_ranges: list[tuple[int, int]] = []
        with h5py.File(path, "r") as f:
            for name in corpus.datasets(f):
                dataset = f[name]
                start = dataset.id.get_offset()
                if start is not None:
                    data_ranges.append((start, start + dataset.id.get_storage_size()))
            config = json.loads(f.attrs["model_config"])
        data = path.read_bytes()
        covered = set()
        for start, end in data_ranges:
            covered.update(range(start, end))
        out[flavour] = {
            "bytes": data,
            "labels": path.with_name(path.stem + ".labels.txt").read_text(),
            "config": config,
            "data": sorted(covered),
            "meta": [i for i in range(len(data)) if i not in covered],
        }
    return out


# -- mutations -----------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value, as a tuple of keys and indices."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out.extend(_paths(item, prefix + (key,)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.extend(_paths(item, prefix + (i,)))
    return out


def _edit(config: Any, path: tuple, op: str, new: Any) -> Any:
    if not path:
        return new
    parent = config
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "replace":
        parent[last] = new
    elif op == "delete":
        del parent[last]
    elif op == "repeat" and isinstance(parent, list):
        parent.insert(last, json.loads(json.dumps(parent[last])))
    else:
        parent[last] = new
    return config


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str, Any]:
    """(flavour, kind, what the mutation needs)."""
    flavour = draw(st.sampled_from(sorted(corpus.GOOD)))
    kind = draw(st.sampled_from(["flip_meta", "flip_data", "truncate", "json"]))
    if kind in ("flip_meta", "flip_data"):
        flips = draw(
            st.lists(
                st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                min_size=1,
                max_size=8,
            )
        )
        return flavour, kind, flips
    if kind == "truncate":
        return flavour, kind, draw(st.floats(0, 1, exclude_max=True))
    return (
        flavour,
        kind,
        (
            draw(st.floats(0, 1, exclude_max=True)),
            draw(st.sampled_from(["replace", "delete", "repeat"])),
            draw(JSON_VALUES),
        ),
    )


def _mutated(good: dict[str, Any], kind: str, how: Any) -> bytes:
    import h5py

    data = bytearray(good["bytes"])
    if kind in ("flip_meta", "flip_data"):
        where = good["meta"] if kind == "flip_meta" else good["data"]
        for fraction, bit in how:
            data[where[int(fraction * len(where))]] ^= 1 << bit
        return bytes(data)
    if kind == "truncate":
        return bytes(data[: int(how * len(data))])
    fraction, op, new = how
    config = json.loads(json.dumps(good["config"]))
    paths = _paths(config)
    config = _edit(config, paths[int(fraction * len(paths))], op, new)
    buffer = io.BytesIO(bytes(data))
    with h5py.File(buffer, "r+") as f:
        f.attrs["model_config"] = json.dumps(config)
    return buffer.getvalue()


@settings(
    max_examples=EXAMPLES,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@seed(SEED)
@given(mutation=mutations())
def test_a_mutated_file_gives_error_lines_and_the_good_model_converts(
    goods: Goods, tmp_path_factory: pytest.TempPathFactory, mutation
) -> None:
    flavour, kind, how = mutation
    root = tmp_path_factory.mktemp("fuzz")
    folder = root / "models"
    folder.mkdir()
    good = goods[flavour]
    (folder / "good.h5").write_bytes(good["bytes"])
    (folder / "good.labels.txt").write_text(good["labels"])
    bad = folder / "mutated.h5"
    bad.write_bytes(_mutated(good, kind, how))
    (folder / "mutated.labels.txt").write_text(good["labels"])
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(
            ["convert", str(folder), "--out", str(root / "build"), "--quiet", "--jobs", "1"]
        )
    lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
    assert code in (0, 1), (kind, lines)
    for line in lines:
        assert line.startswith((f"error: {bad}: ", f"error: {folder / 'mutated.labels.txt'}: ")), (
            kind,
            line,
        )
        assert "internal error" not in line, (kind, line)
    assert (code == 0) == (not lines), (kind, lines)
    assert (root / "build" / "good.mlmodel").is_file(), (kind, lines)
    shutil.rmtree(root, ignore_errors=True)
