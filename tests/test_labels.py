"""Labels: per-model files, Teachable Machine's numbered labels.txt, defaults and mismatches."""

from pathlib import Path

import pytest

from convert.errors import LabelsError
from convert.read.labels import read_labels, resolve_labels


def test_own_labels_file_wins_over_folder_labels(tmp_path: Path) -> None:
    (tmp_path / "a.labels.txt").write_text("cat\ndog\n")
    (tmp_path / "labels.txt").write_text("0 x\n1 y\n")
    labels, source = resolve_labels(tmp_path / "a.h5", 2)
    assert labels == ["cat", "dog"]
    assert source.endswith("a.labels.txt")


def test_teachable_machine_numbers_are_stripped(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("0 Class 1\n1 Big dog\n")
    labels, _ = resolve_labels(tmp_path / "keras_model.h5", 2)
    assert labels == ["Class 1", "Big dog"]


def test_numbers_kept_in_a_plain_labels_file(tmp_path: Path) -> None:
    path = tmp_path / "m.labels.txt"
    path.write_text("0 apples\n1 pears\n")
    assert read_labels(path) == ["0 apples", "1 pears"]


def test_default_labels_when_no_file(tmp_path: Path) -> None:
    labels, source = resolve_labels(tmp_path / "m.h5", 3)
    assert labels == ["class_0", "class_1", "class_2"] and source is None


def test_count_mismatch_names_the_file_and_both_counts(tmp_path: Path) -> None:
    (tmp_path / "m.labels.txt").write_text("a\nb\nc\n")
    with pytest.raises(LabelsError) as info:
        resolve_labels(tmp_path / "m.h5", 2)
    message = str(info.value)
    assert "m.labels.txt" in message and "3 labels" in message and "2 classes" in message
    assert "\n" not in message


def test_duplicate_and_empty_labels_are_errors(tmp_path: Path) -> None:
    (tmp_path / "d.labels.txt").write_text("a\na\n")
    with pytest.raises(LabelsError, match="duplicate"):
        resolve_labels(tmp_path / "d.h5", 2)
    (tmp_path / "e.labels.txt").write_text("\n\n")
    with pytest.raises(LabelsError, match="empty"):
        resolve_labels(tmp_path / "e.h5", 2)
