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


def test_teachable_machine_form_is_recognised_by_content_whatever_the_name(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.labels.txt"
    path.write_text("0 Again\n1 Bathroom\n2  Big  dog \n")
    assert read_labels(path) == ["Again", "Bathroom", "Big  dog"]
    labels, source = resolve_labels(tmp_path / "m.h5", 3)
    assert labels == ["Again", "Bathroom", "Big  dog"] and source == str(path)


@pytest.mark.parametrize(
    "text",
    [
        "1 apples\n2 pears\n",  # numbered from 1: not Teachable Machine's form
        "0 apples\n2 pears\n",  # a gap
        "0\n1\n2\n",  # digits alone (MNIST): the labels themselves
        "0 apples\npears\n",  # not every line numbered
    ],
)
def test_other_numbered_lines_are_kept_as_written(tmp_path: Path, text: str) -> None:
    path = tmp_path / "m.labels.txt"
    path.write_text(text)
    assert read_labels(path) == text.split("\n")[:-1]


def test_digits_alone_are_labels_under_any_name(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("0\n1\n2\n")
    assert read_labels(tmp_path / "labels.txt") == ["0", "1", "2"]


def test_non_ascii_labels_are_kept_exactly(tmp_path: Path) -> None:
    names = ["Café", "Cafe\u0301", "日本の犬", "🐕 dog", "Ärger"]  # é composed and combined
    for form, text in (
        ("plain", "".join(f"{n}\n" for n in names)),
        ("tm", "".join(f"{i} {n}\n" for i, n in enumerate(names))),
    ):
        path = tmp_path / f"{form}.labels.txt"
        path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())  # BOM, CRLF
        assert read_labels(path) == names


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("0 a\n1\n2 c\n", "label 1 is empty"),
        ("0 a\n1 b\n2 a\n", "duplicate labels: a"),
        ("\n \n", "labels file is empty"),
    ],
)
def test_empty_and_duplicate_labels_are_errors(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "m.labels.txt"
    path.write_text(text)
    with pytest.raises(LabelsError) as caught:
        read_labels(path)
    assert caught.value.reason == said and caught.value.path == path


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


def test_labels_reach_the_model_file_exactly(tmp_path: Path) -> None:
    """A Teachable Machine-form file under the model's own name, non-ASCII labels: the Core ML
    classifier lists them byte for byte."""
    import json

    import factory_keras as fk
    from coremltools.proto import Model_pb2

    from convert.cli import main

    models = tmp_path / "models"
    models.mkdir()
    fk.save_tiny_classifier(models / "tiny.h5", n_classes=3)
    names = ["Café", "日本の犬", "🐕 big dog"]
    (models / "tiny.labels.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(names)))
    out = tmp_path / "build"
    assert main(["convert", str(models), "--out", str(out), "-q"]) == 0
    spec = Model_pb2.Model.FromString((out / "tiny.mlmodel").read_bytes())
    which = spec.WhichOneof("Type")
    classifier = getattr(spec, which)
    if which == "pipelineClassifier":
        classifier = classifier.pipeline.models[-1].neuralNetworkClassifier
    assert list(classifier.stringClassLabels.vector) == names
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["classifiers"][0]["labels"] == names
