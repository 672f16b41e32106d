"""Shared fixtures: a small zoo of real Keras files, converted once per test session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before any test imports TensorFlow


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session zoo (:func:`zoos.session`): five classifiers in two families of files, plus one
    with a single changed BN statistic."""
    import zoos

    root = tmp_path_factory.mktemp("zoo")
    zoos.session(root)
    return root


@pytest.fixture(scope="session")
def built(zoo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """``coreml-split convert zoo --out build`` run once: (build folder, exit code)."""
    from convert.cli import main

    out = tmp_path_factory.mktemp("build")
    return out, main(["convert", str(zoo), "--out", str(out), "--quiet"])


UPDATABLE_MANIFEST = """
[models.tm]
updatable_layers = 2
optimizer = "adam"
learning_rate = 0.001

[models.bn_head]
updatable_layers = 2
momentum = 0.9
"""


@pytest.fixture(scope="session")
def updatable_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The updatable zoo (tests/zoos.py) converted with --updatable --epochs 3 and a zoo.toml
    that sets two heads apart: (build folder, exit code). Shared by tests/test_updatable.py and
    tests/test_train.py; a test that writes files writes them elsewhere."""
    import zoos

    from convert.cli import main

    models = tmp_path_factory.mktemp("updatable") / "models"
    models.mkdir()
    zoos.updatable(models)
    (models / "zoo.toml").write_text(UPDATABLE_MANIFEST)
    out = models.parent / "build"
    code = main(["convert", str(models), "--out", str(out), "--updatable", "--epochs", "3", "-q"])
    return out, code


@pytest.fixture(scope="session")
def demo_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The demo zoo ``make convert`` builds (scripts/make_demo_zoo.py), built once: (folder,
    what the script printed)."""
    import zoos

    models = tmp_path_factory.mktemp("demo") / "models"
    models.mkdir()
    return models, zoos.demo(models)


class SavedModels:
    """Small Keras files saved once per session and shared by the tests that read them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[str, Path] = {}

    def get(self, key: str, save: Callable[[Path], Path]) -> Path:
        """The file for ``key``, written by ``save(path)`` on first use."""
        if key not in self.paths:
            self.paths[key] = save(self.root / f"{key}.h5")
        return self.paths[key]


@pytest.fixture(scope="session")
def saved(tmp_path_factory: pytest.TempPathFactory) -> SavedModels:
    return SavedModels(tmp_path_factory.mktemp("saved"))
