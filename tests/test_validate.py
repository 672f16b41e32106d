"""Tests for convert.check.validate: Core ML's validation rules, checked on Linux.

This file covers the dispatcher and the public face (valid models, files, messages); the
rules themselves are tested beside their modules in tests/test_rules_*.py. Every spec is
built by hand (NeuralNetworkBuilder or raw Model_pb2, see tests/rules_helpers.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("numpy")
pytest.importorskip("coremltools")

from rules_helpers import (  # noqa: E402
    LABELS,
    ArrayType,
    make_backbone,
    make_head,
    make_pipeline,
    make_stub,
    only,
)

from convert.check.validate import (  # noqa: E402
    SpecInvalid,
    check_file,
    describe_type,
    validate_file,
    validate_spec,
)

# --------------------------------------------------------------------------------------------
# Valid models


def test_valid_pipeline_classifier_has_no_violations() -> None:
    assert validate_spec(make_pipeline(), "pipeline") == []


def test_valid_parts_have_no_violations() -> None:
    assert validate_spec(make_stub(), "stub") == []
    assert validate_spec(make_head(), "head") == []
    assert validate_spec(make_backbone(), "backbone") == []


def test_valid_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "Cats.mlmodel"
    path.write_bytes(make_pipeline().SerializeToString())
    assert validate_file(path) == []
    check_file(path)  # does not raise


def test_real_converter_output_is_valid() -> None:
    """No false positives on what ct.convert writes for a backbone and a classifier head."""
    ct = pytest.importorskip("coremltools")
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")

    def convert(model: object, shape: tuple[int, ...], name: str, **kwargs: object) -> object:
        fn = tf.function(lambda x: model(x, training=False))
        concrete = fn.get_concrete_function(tf.TensorSpec(shape, tf.float32, name=name))
        return ct.convert(
            [concrete],
            source="tensorflow",
            convert_to="neuralnetwork",
            minimum_deployment_target=ct.target.iOS13,
            **kwargs,
        ).get_spec()

    image = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(image)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    backbone = convert(
        keras.Model(image, x),
        (1, 16, 16, 3),
        "image",
        inputs=[ct.ImageType(name="image", shape=(1, 16, 16, 3), scale=1 / 127.5, bias=[-1] * 3)],
    )
    features = keras.Input((8,))
    y = keras.layers.Dense(5, activation="relu")(features)
    y = keras.layers.Dense(len(LABELS), activation="softmax")(y)
    head = convert(
        keras.Model(features, y),
        (1, 8),
        "features",
        inputs=[ct.TensorType(name="features", shape=(1, 8))],
        classifier_config=ct.ClassifierConfig(LABELS),
    )
    assert validate_spec(backbone, "backbone") == []
    assert validate_spec(head, "head") == []


# --------------------------------------------------------------------------------------------
# Files and messages


def test_validate_file_on_garbage_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "junk.mlmodel"
    garbage.write_bytes(b"\xff\xff\xff\xff not a protobuf")
    assert only(validate_file(garbage)).startswith("junk.mlmodel: not a Core ML model file")
    assert "cannot read the file" in only(validate_file(tmp_path / "absent.mlmodel"))


def test_violations_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "Broken.mlmodel"
    path.write_bytes(make_pipeline(version=3).SerializeToString())
    assert only(validate_file(path)).startswith("Broken.mlmodel: ")


def test_spec_invalid_is_one_line(tmp_path: Path) -> None:
    head = make_head()
    head.description.input[0].type.multiArrayType.dataType = ArrayType.DOUBLE
    spec = make_pipeline(head=head, version=3)
    path = tmp_path / "Cats.mlmodel"
    path.write_bytes(spec.SerializeToString())
    with pytest.raises(SpecInvalid) as caught:
        check_file(path)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}.models[1] (head): input 'features' type differs")
    assert text.endswith(" (and 1 more)")
    assert len(caught.value.violations) == 2
    assert str(SpecInvalid("x.mlmodel", ["broken"])) == "x.mlmodel: broken"


def test_every_violation_is_one_line() -> None:
    spec = make_pipeline(stub=make_stub(version=0), head=make_head(version=0), version=0)
    spec.description.input[0].name = ""
    violations = validate_spec(spec, "pipeline")
    assert len(violations) >= 4
    assert all("\n" not in v and v.startswith("pipeline") for v in violations)


def test_describe_type() -> None:
    stub = make_stub()
    assert describe_type(stub.description.input[0].type) == "Image<RGB> 8x8"
    assert describe_type(stub.description.output[0].type) == "MultiArray<FLOAT32>[4]"
