"""Whole zoos end to end: partial sharing (fine-tuned last blocks) and two backbone families,
converted (groups in parallel worker processes) and checked with `coreml-split verify`."""

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

SIZE = 32
TUNED = ("block_16", "Conv_1")  # MobileNetV2's last block and its last convolution


def _keras():
    from convert.heavy import keras

    return keras(3)


def _save(path: Path, base, n_classes: int, head_seed: int) -> None:
    K = _keras()
    inp = K.Input((SIZE, SIZE, 3))
    out = K.layers.Dense(n_classes, activation="softmax", name="head")(base(inp, training=False))
    model = K.Model(inp, out)
    rng = np.random.default_rng(head_seed)
    kernel = rng.normal(scale=0.5, size=model.layers[-1].get_weights()[0].shape)
    model.layers[-1].set_weights([kernel.astype("float32"), np.zeros(n_classes, "float32")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path))


def _mobilenet_v2():
    K = _keras()
    K.utils.set_random_seed(0)
    return K.applications.MobileNetV2(
        input_shape=(SIZE, SIZE, 3), alpha=0.35, include_top=False, weights=None, pooling="avg"
    )


def _fine_tune(base, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for layer in base.layers:
        if layer.name.startswith(TUNED):
            layer.set_weights(
                [
                    w + rng.normal(scale=0.05, size=w.shape).astype(w.dtype)
                    for w in layer.get_weights()
                ]
            )


def _convert_and_verify(zoo: Path, out: Path) -> None:
    assert main(["convert", str(zoo), "--out", str(out), "--quiet", "--jobs", "2"]) == 0
    for file in out.glob("*.mlmodel"):
        assert validate_file(file, strict_types=True) == [], file.name
    assert main(["verify", str(out), "--count", "6", "--quiet"]) == 0
    results = json.loads((out / "report.json").read_text())["verify"]
    assert len(results) == len(list(zoo.glob("*.h5")))
    assert all(r["passed"] and r["top1_agreement"] == 1.0 for r in results), results


def test_fine_tuned_last_blocks_still_share_the_frozen_prefix(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    base = _mobilenet_v2()
    frozen = [w.copy() for w in base.get_weights()]
    for i, (name, tuned) in enumerate(
        [("kept_a", 0), ("kept_b", 0), ("tuned_c", 1), ("tuned_d", 2)]
    ):
        base.set_weights(frozen)
        if tuned:
            _fine_tune(base, tuned)
        _save(zoo / f"{name}.h5", base, 3 + i, head_seed=i)
    _keras().backend.clear_session()

    plan, _ = make_plan(zoo)
    assert not plan.errors and all(m.group for m in plan.models), plan.to_json()["standalone"]
    for name in ("tuned_c", "tuned_d"):
        model = plan.model(name)
        assert not model.split_layer.split("/")[-1].startswith(TUNED), model.split_layer
        assert model.head_parameters > 100_000  # the fine-tuned block moved into the head
    groups = {g.id: g for g in plan.groups}
    kept = groups[plan.model("kept_a").group]
    assert plan.model("kept_b").group == kept.id
    assert kept.alternative and kept.alternative_saved_bytes < sum(
        g.saved_bytes for g in plan.groups
    )
    _convert_and_verify(zoo, tmp_path / "build")


def test_two_backbone_families_get_one_backbone_file_each(tmp_path: Path) -> None:
    K = _keras()
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    base = _mobilenet_v2()
    _save(zoo / "v2_a.h5", base, 3, head_seed=1)
    _save(zoo / "v2_b.h5", base, 4, head_seed=2)
    K.utils.set_random_seed(1)
    v1 = K.applications.MobileNet(
        input_shape=(SIZE, SIZE, 3), alpha=0.25, include_top=False, weights=None, pooling="avg"
    )
    _save(zoo / "v1_a.h5", v1, 2, head_seed=3)
    _save(zoo / "v1_b.h5", v1, 5, head_seed=4)
    K.backend.clear_session()

    plan, _ = make_plan(zoo)
    assert sorted(g.family for g in plan.groups) == ["MobileNet", "MobileNetV2"]
    assert sorted(sorted(g.members) for g in plan.groups) == [["v1_a", "v1_b"], ["v2_a", "v2_b"]]
    out = tmp_path / "build"
    _convert_and_verify(zoo, out)
    backbones = sorted(p.stem.split("-")[0] for p in out.glob("*-*.mlmodel"))
    assert backbones == ["MobileNet", "MobileNetV2"]
