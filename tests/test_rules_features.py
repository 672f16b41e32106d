"""Tests for convert.check.rules.features (InterfaceValidators.cpp)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("numpy")
pytest.importorskip("coremltools")

from coremltools.proto import Model_pb2  # noqa: E402
from rules_helpers import ArrayType, ImageType, has, make_head, make_stub, only  # noqa: E402

from convert.check.validate import validate_spec  # noqa: E402

# --------------------------------------------------------------------------------------------
# Feature descriptions (InterfaceValidators.cpp)


def test_linked_model_inputs_cannot_be_optional() -> None:
    stub = make_stub()
    stub.description.input[0].type.isOptional = True
    assert "is optional; this model type forbids it" in only(validate_spec(stub, "stub"))


def test_outputs_cannot_be_optional() -> None:
    stub = make_stub()
    stub.description.output[0].type.isOptional = True
    assert "outputs cannot be optional" in only(validate_spec(stub, "stub"))


def _broken_stub(change: Callable[[Model_pb2.Model], None]) -> list[str]:
    stub = make_stub()
    change(stub)
    return validate_spec(stub, "stub")


def test_feature_description_rules() -> None:
    def no_name(s: Model_pb2.Model) -> None:
        s.description.input[0].name = ""

    def no_type(s: Model_pb2.Model) -> None:
        s.description.output[0].ClearField("type")

    def no_dtype(s: Model_pb2.Model) -> None:
        s.description.output[0].type.multiArrayType.dataType = ArrayType.INVALID_ARRAY_DATA_TYPE

    def no_width(s: Model_pb2.Model) -> None:
        s.description.input[0].type.imageType.width = 0

    def no_color(s: Model_pb2.Model) -> None:
        s.description.input[0].type.imageType.colorSpace = ImageType.INVALID_COLOR_SPACE

    def float16_too_early(s: Model_pb2.Model) -> None:
        s.description.output[0].type.multiArrayType.dataType = ArrayType.FLOAT16

    def duplicate_output(s: Model_pb2.Model) -> None:
        s.description.output.add().CopyFrom(s.description.output[0])

    def no_outputs(s: Model_pb2.Model) -> None:
        del s.description.output[:]

    def dict_without_key(s: Model_pb2.Model) -> None:
        s.description.output[0].type.dictionaryType.SetInParent()

    def empty_enumerated_sizes(s: Model_pb2.Model) -> None:
        s.description.input[0].type.imageType.enumeratedSizes.SetInParent()

    def no_enumerated_shapes(s: Model_pb2.Model) -> None:
        s.description.output[0].type.multiArrayType.enumeratedShapes.SetInParent()

    def empty_shape_range(s: Model_pb2.Model) -> None:
        ranges = s.description.output[0].type.multiArrayType.shapeRange.sizeRanges
        ranges.add(lowerBound=5, upperBound=2)

    def default_outside_range(s: Model_pb2.Model) -> None:
        ranges = s.description.output[0].type.multiArrayType.shapeRange.sizeRanges
        ranges.add(lowerBound=5, upperBound=9)

    def wrong_default_value(s: Model_pb2.Model) -> None:
        s.description.output[0].type.multiArrayType.doubleDefaultValue = 0.5

    def empty_width_range(s: Model_pb2.Model) -> None:
        size_range = s.description.input[0].type.imageType.imageSizeRange
        size_range.widthRange.lowerBound = 10
        size_range.widthRange.upperBound = 5
        size_range.heightRange.lowerBound = 1

    def untyped_sequence(s: Model_pb2.Model) -> None:
        s.description.output[0].type.sequenceType.SetInParent()

    def state_output(s: Model_pb2.Model) -> None:
        s.description.output[0].type.stateType.arrayType.shape.append(2)

    def float32_state(s: Model_pb2.Model) -> None:
        state = s.description.state.add(name="memory")
        state.type.stateType.arrayType.shape.append(2)
        state.type.stateType.arrayType.dataType = ArrayType.FLOAT32

    cases = {
        float32_state: "state 'memory' is a State whose dataType is not FLOAT16",
        no_enumerated_shapes: "enumerates zero allowed shapes",
        empty_shape_range: "invalid range for dimension 0: size range 5..2 is empty",
        default_outside_range: "default shape [4] outside its shape range",
        wrong_default_value: "default value of a type that does not match its dataType",
        empty_width_range: "invalid flexible width range",
        untyped_sequence: "sequence without an element type",
        state_output: "is a State feature; states may only be declared as states",
        no_name: "an input has an empty name",
        no_type: "output 'features' has no type",
        no_dtype: "has no valid multiArray dataType",
        no_width: "missing or non-positive width 0",
        no_color: "missing or invalid colorSpace",
        float16_too_early: "is FLOAT16, which needs specificationVersion >= 7",
        duplicate_output: "output name 'features' is declared more than once",
        no_outputs: "the model has no outputs",
        dict_without_key: "dictionary without a key type",
        empty_enumerated_sizes: "enumerates zero allowed image sizes",
    }
    for change, expected in cases.items():
        violations = _broken_stub(change)
        assert has(violations, expected), (change.__name__, violations)


def test_updatable_needs_spec_version_4() -> None:
    head = make_head(version=3)
    head.isUpdatable = True
    violations = validate_spec(head, "head")
    assert has(violations, "an updatable model needs specificationVersion >= 4")


def test_only_some_model_types_can_be_updatable() -> None:
    spec = Model_pb2.Model(specificationVersion=4, isUpdatable=True)
    spec.description.CopyFrom(make_stub().description)
    spec.identity.SetInParent()
    assert "model type 'identity' cannot be marked updatable" in only(validate_spec(spec, "m"))
