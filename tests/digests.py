"""Digests of what the suite converts, held against ``tests/data/output_digests.json``.

The file was first written from the code before the package was laid out in stages (the
refactor promised byte-identical output), and is rewritten by ``tests/record_digests.py`` only
when a change to the bytes is meant. :func:`check` compares a fixture's outputs with it.

The outputs can only be compared where the fixture's Keras files are the ones recorded: they are
built with TensorFlow, whose float arithmetic may differ on another kind of CPU (and, measured
for the EfficientNet zoos' BatchNorm calibration, between two processes that run at once). Where
they differ, the comparison is skipped and says so. So that it runs on more than one kind of
machine, each key may hold several recordings (a list), one per set of input files, each made by
the same code from the zoo that machine's TensorFlow built. Files that ``ct.convert`` wrote may
differ in the names coremltools gives its layers (see :func:`canonical`); those are compared
without them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

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
    return {"inputs": inputs(zoo), "outputs": outputs(out), "canonical": canonical_outputs(out)}


def recordings(recorded: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The recordings of ``key``: one per set of input files seen."""
    value = recorded.get(key, [])
    return value if isinstance(value, list) else [value]


def check(key: str, zoo: Path, out: Path) -> None:
    """Every .mlmodel in ``out`` is byte-for-byte the one recorded for ``key``."""
    recorded = json.loads(RECORDED.read_text())
    assert key in recorded, f"no digests recorded for {key}: run tests/record_digests.py"
    have = inputs(zoo)
    want = next((r for r in recordings(recorded, key) if r["inputs"] == have), None)
    if want is None:
        pytest.skip(
            f"{key}: the Keras files differ from the recorded ones (TensorFlow built them with"
            " other float sums: another CPU, or for EfficientNet another load on this one)"
        )
    got = outputs(out)
    if got == want["outputs"]:
        return
    assert sorted(got) == sorted(want["outputs"]), f"{key}: other files than recorded"
    differ = sorted(n for n in got if got[n] != want["outputs"][n])
    same = canonical_outputs(out)
    changed = [n for n in differ if same[n] != want["canonical"][n]]
    assert not changed, f"{key}: bytes differ from the recorded output in {changed}"
    # the rest differ only in coremltools' generated names (and the backbone hash that follows)


# ct.convert names the layers it makes (``const_35``, ``reshape_162``) from counters whose values,
# for a few networks (ResNet50V2, NASNetMobile), differ from one process to the next: the same
# network comes out with other layer names, and its pipelines then carry another backbone
# SHA-256. Those outputs are compared in a canonical form: every layer and internal blob renamed
# in order of first appearance, that hash left out. Everything else, weights included, must be
# the same; and every output whose bytes match is compared byte for byte.
_BACKBONE_SHA = "coreml-split.backbone_sha256"


def _networks(spec: Any) -> list[tuple[Any, set[str]]]:
    """Each NeuralNetwork in ``spec`` (pipeline members included) with the feature names of the
    model that holds it, which renaming must keep."""
    kind = spec.WhichOneof("Type")
    if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        return [n for m in getattr(spec, kind).pipeline.models for n in _networks(m)]
    if kind in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"):
        d = spec.description
        return [(getattr(spec, kind), {f.name for f in [*d.input, *d.output]})]
    return []


def canonical(path: Path) -> str:
    """The SHA-256 of ``path``'s spec with its layers and internal blobs renamed in order of
    appearance and the backbone hash of a pipeline left out."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model.FromString(path.read_bytes())
    for network, keep in _networks(spec):
        _rename_in_order(network, keep)
    spec.description.metadata.userDefined.pop(_BACKBONE_SHA, None)
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).hexdigest()


def _rename_in_order(network: Any, keep: set[str]) -> None:
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        return name if name in keep else names.setdefault(name, f"#{len(names)}")

    for layer in network.layers:
        layer.name = rename(layer.name)
        for field in (layer.input, layer.output):
            field[:] = [rename(n) for n in field]


def canonical_outputs(out: Path) -> dict[str, str]:
    return {p.name: canonical(p) for p in sorted(out.glob("*.mlmodel"))}
