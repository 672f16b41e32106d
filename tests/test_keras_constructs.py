"""Keras constructs that each Keras writes or traces in its own way, end to end in both flavours.

ConvNeXt-style blocks hold all of them: grouped and depthwise ``Conv2D(groups=...)`` (both
Kerases trace it as a nested XLA function that coremltools cannot convert), the exact GELU
(Keras 3 traces ``erfc``, which coremltools lacks), LayerNormalization, a residual ``x + y``
(tf_keras stores ``y`` as a keyword tensor of a TFOpLambda), ``3.0 + x`` (a constant first
operand) and ``x * 0.5``. Two classifiers share one such backbone per flavour; the zoo must split,
validate, and give Keras' probabilities through the numpy evaluator.
"""

from __future__ import annotations

import json
from pathlib import Path

import digests
import numpy as np
import pytest
import zoos

from convert.check.validate import validate_file
from convert.cli import main
from convert.plan.make import make_plan

pytest.importorskip("convert.check.reference")


@pytest.fixture(scope="module", params=["k2", "k3"])
def build(request, tmp_path_factory) -> tuple[str, Path, Path, int]:
    flavour = request.param
    root = tmp_path_factory.mktemp(f"constructs_{flavour}")
    zoo, out = root / "zoo", root / "out"
    zoo.mkdir()
    zoos.constructs(zoo, flavour)
    code = main(["convert", str(zoo), "--out", str(out), "--quiet"])
    return flavour, zoo, out, code


def test_the_backbone_is_shared_and_every_file_is_valid(build) -> None:
    _, zoo, out, code = build
    assert code == 0
    plan, _ = make_plan(zoo)
    assert (
        not plan.errors and len(plan.groups) == 1 and plan.groups[0].members == ["first", "second"]
    )
    files = sorted(p.name for p in out.glob("*.mlmodel"))
    assert len(files) == 3 and {"first.mlmodel", "second.mlmodel"} <= set(files), files
    for name in files:
        assert validate_file(out / name, strict_types=True) == [], name


def test_the_pipelines_give_keras_probabilities(build) -> None:
    _, _, out, code = build
    assert code == 0
    assert main(["verify", str(out), "--count", "8", "--quiet"]) == 0
    results = json.loads((out / "report.json").read_text())["verify"]
    assert len(results) == 2
    for result in results:
        assert result["passed"] and result["top1_agreement"] == 1.0, result
        assert result["max_abs_diff"] <= 1e-4, result
        assert np.isfinite(result["mean_abs_diff"]), result


def test_the_outputs_are_byte_identical_to_the_recorded_ones(build) -> None:
    flavour, zoo, out, code = build
    assert code == 0
    digests.check(f"constructs-{flavour}", zoo, out)
