"""zoo.toml: defaults merged under per-model settings, labels inline or from a file, backbone
names by id or family, and one-line errors that name the manifest and the key path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from convert.read.manifest import (
    MANIFEST_NAME,
    PREPROCESSING_NAMES,
    BackboneSettings,
    Manifest,
    ManifestError,
    ModelSettings,
    load_manifest,
)

FULL = """
[defaults]
author = "Jane Doe"
license = "MIT"
version = "1.2.0"
preprocessing = "tf"
label_name = "breed"

[models.cats]
display_name = "Cat breeds"
description = "Tells cat breeds apart"
labels = ["tabby", "siamese"]
license = "CC-BY-4.0"
preprocessing = "raw"
input_name = "photo"
probabilities_name = "breedProbs"

[models.dogs]
labels = "labels/dogs.txt"

[models."v1.2"]
version = "2.0"

[backbones.MobileNetV2]
name = "SharedMobileNet"

[backbones.MobileNetV2-3fa9c2d1]
name = "CatDogBackbone"

[backbones.ResNet]
"""


def write(folder: Path, text: str) -> Path:
    path = folder / MANIFEST_NAME
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def fails(folder: Path, text: str) -> str:
    """The error message for a manifest, checked to be one line that starts with its path."""
    path = write(folder, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(folder)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    assert info.value.path == path
    return message


# -- a valid manifest -------------------------------------------------------------------------


def test_full_manifest_round_trip(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "dogs.txt").write_text("beagle\n\npug\n")
    path = write(tmp_path, FULL)
    manifest = load_manifest(tmp_path)

    assert manifest.path == path
    assert manifest.defaults == ModelSettings(
        author="Jane Doe", license="MIT", version="1.2.0", preprocessing="tf", label_name="breed"
    )
    assert manifest.for_model("cats") == ModelSettings(
        display_name="Cat breeds",
        description="Tells cat breeds apart",
        author="Jane Doe",
        license="CC-BY-4.0",
        version="1.2.0",
        preprocessing="raw",
        input_name="photo",
        label_name="breed",
        probabilities_name="breedProbs",
        labels=("tabby", "siamese"),
        labels_source=MANIFEST_NAME,
    )
    dogs = manifest.for_model("dogs")
    assert dogs.labels == ("beagle", "pug")
    assert dogs.labels_source == str(tmp_path / "labels" / "dogs.txt")
    assert (dogs.author, dogs.preprocessing, dogs.display_name) == ("Jane Doe", "tf", None)
    assert manifest.for_model("v1.2").version == "2.0"
    assert manifest.for_model("not-in-manifest") == manifest.defaults

    assert manifest.for_backbone("MobileNetV2-3fa9c2d1", "MobileNetV2").name == "CatDogBackbone"
    assert manifest.for_backbone("MobileNetV2-0000aaaa", "MobileNetV2").name == "SharedMobileNet"
    assert manifest.for_backbone("ResNet-12345678", "ResNet") == BackboneSettings()
    assert manifest.for_backbone("VGG-12345678", "VGG") == BackboneSettings()

    assert manifest.unused_models(["cats", "birds"]) == ["dogs", "v1.2"]


def test_teachable_machine_labels_file_loses_its_numbers(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("0 Class 1\n1 Big dog\n")
    write(tmp_path, '[models.tm]\nlabels = "labels.txt"\n')
    assert load_manifest(tmp_path).for_model("tm").labels == ("Class 1", "Big dog")


def test_missing_manifest_is_empty(tmp_path: Path) -> None:
    assert load_manifest(tmp_path) == Manifest()
    assert load_manifest(tmp_path / "no-such-folder").path is None
    assert load_manifest(tmp_path).for_model("any") == ModelSettings()


def test_single_model_file_looks_beside_it(tmp_path: Path) -> None:
    model = tmp_path / "cats.h5"
    model.write_bytes(b"")
    assert load_manifest(model).path is None
    path = write(tmp_path, '[defaults]\nauthor = "Jane"\n')
    manifest = load_manifest(model)
    assert manifest.path == path and manifest.for_model("cats").author == "Jane"


def test_empty_manifest_is_valid(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_manifest(tmp_path) == Manifest(path=path)


def test_preprocessing_names_match_families() -> None:
    from convert.read.families import PREPROCESSING

    assert set(PREPROCESSING_NAMES) == set(PREPROCESSING)


def test_imports_no_heavy_libraries() -> None:
    heavy = "{'tensorflow', 'coremltools', 'numpy'}"
    code = f"import sys, convert.read.manifest; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- errors -----------------------------------------------------------------------------------


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    message = fails(tmp_path, '[defaults]\nauthor = "Jane"\nlicense = \n')
    assert ": line 3: " in message


def test_unknown_top_level_table(tmp_path: Path) -> None:
    message = fails(tmp_path, '[zoo]\nauthor = "x"\n')
    assert message.endswith("zoo: unknown key (known: defaults, models, backbones, aliases)")


def test_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    message = fails(tmp_path, '[defaults]\nlicence = "MIT"\n')
    known = "defaults.licence: unknown key (known: author, batch_size, beta1, beta2, description, "
    assert known in message
    assert "did you mean 'license'?" in message


def test_unknown_model_key(tmp_path: Path) -> None:
    assert "models.cats.label: unknown key" in fails(tmp_path, '[models.cats]\nlabel = "x"\n')


def test_unknown_backbone_key(tmp_path: Path) -> None:
    message = fails(tmp_path, '[backbones.ResNet]\nfile = "x"\n')
    assert "backbones.ResNet.file: unknown key (known: name, weights)" in message


def test_labels_not_allowed_in_defaults(tmp_path: Path) -> None:
    assert "defaults.labels: " in fails(tmp_path, '[defaults]\nlabels = ["a", "b"]\n')


def test_labels_of_the_wrong_type(tmp_path: Path) -> None:
    message = fails(tmp_path, "[models.cats]\nlabels = 3\n")
    assert "models.cats.labels: expected a list of strings or a file path, got integer" in message
    message = fails(tmp_path, '[models.cats]\nlabels = ["a", 2]\n')
    assert "models.cats.labels: expected a list of strings or a file path, got array" in message


def test_labels_file_missing(tmp_path: Path) -> None:
    message = fails(tmp_path, '[models.cats]\nlabels = "cats.txt"\n')
    assert message.endswith("models.cats.labels: no such file: cats.txt")


def test_labels_file_empty_or_duplicated(tmp_path: Path) -> None:
    (tmp_path / "cats.txt").write_text("\n\n")
    message = fails(tmp_path, '[models.cats]\nlabels = "cats.txt"\n')
    assert "models.cats.labels: cats.txt: labels file is empty" in message
    (tmp_path / "cats.txt").write_text("tabby\ntabby\n")
    message = fails(tmp_path, '[models.cats]\nlabels = "cats.txt"\n')
    assert "models.cats.labels: cats.txt: duplicate labels: tabby" in message


def test_inline_labels_empty_blank_or_duplicated(tmp_path: Path) -> None:
    message = fails(tmp_path, "[models.cats]\nlabels = []\n")
    assert "models.cats.labels: empty list" in message
    message = fails(tmp_path, '[models.cats]\nlabels = ["a", " "]\n')
    assert "models.cats.labels: label 1 is empty" in message
    message = fails(tmp_path, '[models.cats]\nlabels = ["a", "b", "a"]\n')
    assert "models.cats.labels: duplicate labels: a" in message


def test_text_of_the_wrong_type(tmp_path: Path) -> None:
    message = fails(tmp_path, "[models.cats]\nversion = 1.2\n")
    assert 'models.cats.version: expected a string, got float (quote it: "1.2")' in message


def test_backbone_name_of_the_wrong_type(tmp_path: Path) -> None:
    message = fails(tmp_path, '[backbones.MobileNetV2]\nname = ["a"]\n')
    assert "backbones.MobileNetV2.name: expected a string, got array" in message


@pytest.mark.parametrize("name", ["", "my backbone", "../up", "a/b", ".."])
def test_backbone_name_must_be_file_system_safe(tmp_path: Path, name: str) -> None:
    message = fails(tmp_path, f'[backbones.MobileNetV2]\nname = "{name}"\n')
    assert "backbones.MobileNetV2.name: " in message and "not a safe file name" in message


def test_table_expected(tmp_path: Path) -> None:
    assert "models.cats: expected a table, got string" in fails(tmp_path, 'models.cats = "x"\n')
    assert "models: expected a table, got integer" in fails(tmp_path, "models = 1\n")


def test_unknown_preprocessing(tmp_path: Path) -> None:
    message = fails(tmp_path, '[models.cats]\npreprocessing = "foo"\n')
    assert message.endswith(
        "models.cats.preprocessing: unknown preprocessing 'foo' (tf, unit, raw, caffe, torch)"
    )


@pytest.mark.parametrize("name", ["", "my image", "1st", "class-label"])
def test_invalid_feature_name(tmp_path: Path, name: str) -> None:
    message = fails(tmp_path, f'[models.cats]\ninput_name = "{name}"\n')
    assert "models.cats.input_name: " in message and "not a valid feature name" in message


def test_feature_names_must_differ(tmp_path: Path) -> None:
    message = fails(tmp_path, '[models.cats]\ninput_name = "x"\nlabel_name = "x"\n')
    assert "models.cats: input_name and label_name are both 'x'" in message


def test_feature_names_must_differ_with_defaults(tmp_path: Path) -> None:
    text = '[defaults]\nlabel_name = "out"\n[models.cats]\nprobabilities_name = "out"\n'
    message = fails(tmp_path, text)
    assert "models.cats: label_name and probabilities_name are both 'out' (with [defaults])" in (
        message
    )


def test_quoted_model_key_in_path(tmp_path: Path) -> None:
    message = fails(tmp_path, '[models."v1.2"]\npreprocessing = 3\n')
    assert 'models."v1.2".preprocessing: expected a string, got integer' in message


def test_explicit_manifest_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such file"):
        load_manifest(tmp_path / "other.toml")
