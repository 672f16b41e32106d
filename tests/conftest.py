"""Shared fixtures: a small zoo of real Keras files, converted once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before any test imports TensorFlow


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five classifiers in two families of files, plus one with a single changed BN statistic.

    - nested_k3, nested_k2, flat_k2: one frozen MobileNetV2 (seed 0), written by Keras 3 and by
      tf_keras, nested as one layer or with its layers inline;
    - tm_cats, tm_dogs: Teachable Machine layout (sub-models named model1 / model2) on another
      backbone (seed 7);
    - perturbed: nested_k3 with one BatchNorm moving mean changed (block_3).
    """
    import factory

    root = tmp_path_factory.mktemp("zoo")
    factory.save_transfer_classifier(root / "nested_k3.h5", "k3", 3, head_seed=1, dropout=True)
    factory.save_transfer_classifier(root / "nested_k2.h5", "k2", 4, head_seed=2)
    factory.save_transfer_classifier(
        root / "flat_k2.h5", "k2", 2, head_seed=3, layout="flat", hidden=16
    )
    factory.save_teachable_machine(root / "tm_cats", 2, "model1", head_seed=4, backbone_seed=7)
    factory.save_teachable_machine(root / "tm_dogs", 3, "model2", head_seed=5, backbone_seed=7)
    factory.perturb_bn_moving_mean(root / "nested_k3.h5", root / "perturbed.h5")
    (root / "perturbed.labels.txt").write_text((root / "nested_k3.labels.txt").read_text())
    return root


@pytest.fixture(scope="session")
def built(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """``coreml-split convert zoo --out build`` run once: (build folder, exit code)."""
    from convert.cli import main

    out = tmp_path_factory.mktemp("build")
    return out, main(["convert", str(zoo), "--out", str(out), "--quiet"])
