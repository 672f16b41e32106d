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
import warnings
from pathlib import Path

import numpy as np
import pytest

from convert.check.validate import validate_file
from convert.cli import main
from convert.plan.make import make_plan

pytest.importorskip("convert.check.reference")

SIZE = 16


def _keras(flavour: str):
    from convert.heavy import keras

    return keras(3 if flavour == "k3" else 2)


def _save_classifier(path: Path, flavour: str, n_classes: int, head_seed: int) -> None:
    K = _keras(flavour)
    K.utils.set_random_seed(0)
    inp = K.Input((SIZE, SIZE, 3), name="image")
    x = K.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    y = K.layers.Conv2D(8, 3, padding="same", groups=8, name="depthwise")(x)
    y = K.layers.LayerNormalization(epsilon=1e-6, name="norm")(y)
    y = K.layers.Dense(16, name="expand")(y)
    y = K.layers.Activation("gelu", name="gelu")(y)
    y = K.layers.Conv2D(8, 1, groups=2, name="grouped")(y)
    x = x + y  # residual: tf_keras stores y as a keyword tensor
    x = 3.0 + x  # a constant first operand
    x = x * 0.5
    x = K.layers.GlobalAveragePooling2D(name="pool")(x)
    backbone = K.Model(inp, x, name="backbone")
    backbone.trainable = False

    K.utils.set_random_seed(head_seed)
    out = K.layers.Dense(n_classes, activation="softmax", name="head")(backbone.output)
    model = K.Model(backbone.input, out, name="classifier")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path), include_optimizer=False)
    K.backend.clear_session()


@pytest.fixture(scope="module", params=["k2", "k3"])
def build(request, tmp_path_factory) -> tuple[str, Path, Path, int]:
    flavour = request.param
    root = tmp_path_factory.mktemp(f"constructs_{flavour}")
    zoo, out = root / "zoo", root / "out"
    zoo.mkdir()
    _save_classifier(zoo / "first.h5", flavour, 3, head_seed=1)
    _save_classifier(zoo / "second.h5", flavour, 5, head_seed=2)
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
