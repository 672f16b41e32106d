"""Tests for convert.check.rules.pipeline (PipelineValidator.cpp, Comparison.cpp)."""

from __future__ import annotations

import pytest

pytest.importorskip("numpy")
pytest.importorskip("coremltools")

from rules_helpers import (  # noqa: E402
    N_FEATURES,
    ArrayType,
    has,
    head_of,
    make_head,
    make_pipeline,
    make_stub,
    only,
)

from convert.check.validate import validate_spec  # noqa: E402

# --------------------------------------------------------------------------------------------
# Pipelines (PipelineValidator.cpp)


def test_float32_vs_double_between_stub_and_head() -> None:
    head = make_head()
    head.description.input[0].type.multiArrayType.dataType = ArrayType.DOUBLE
    message = only(validate_spec(make_pipeline(head=head), "pipeline"))
    assert message.startswith("pipeline.models[1] (head): input 'features' type differs")
    assert "MultiArray<DOUBLE>[4]" in message and "MultiArray<FLOAT32>[4]" in message


def test_shape_mismatch_between_stub_and_head() -> None:
    stub = make_stub()
    stub.description.output[0].type.multiArrayType.shape[0] = N_FEATURES + 1
    message = only(validate_spec(make_pipeline(stub=stub), "pipeline"))
    assert "input 'features' type differs from producer" in message


def test_stub_output_without_shape_does_not_match_head() -> None:
    stub = make_stub()
    del stub.description.output[0].type.multiArrayType.shape[:]
    message = only(validate_spec(make_pipeline(stub=stub), "pipeline"))
    assert "type differs" in message and "(no shape)" in message


def test_head_input_without_shape() -> None:
    head = make_head()
    del head.description.input[0].type.multiArrayType.shape[:]
    violations = validate_spec(make_pipeline(head=head), "pipeline")
    assert has(violations, "models[1] (head): input 'features'", "without shape constraints")
    assert has(violations, "type differs")


def test_optional_and_flexible_follow_core_ml_comparison() -> None:
    """Core ML ignores isOptional, and compares only the rank once a shape is flexible."""
    head = make_head()
    head.description.input[0].type.isOptional = True
    head.description.input.add().CopyFrom(make_head().description.input[0])  # keep one required
    head.description.input[1].name = "spare"
    stub = make_stub()
    stub.description.output.add().CopyFrom(stub.description.output[0])
    stub.description.output[1].name = "spare"
    ranges = stub.description.output[0].type.multiArrayType.shapeRange.sizeRanges
    ranges.add(lowerBound=1, upperBound=-1)
    spec = make_pipeline(stub=stub, head=head)
    assert validate_spec(spec, "pipeline") == []
    strict = validate_spec(spec, "pipeline", strict_types=True)
    assert has(strict, "input 'features' type differs", "range[1..inf]")


def test_undeclared_input() -> None:
    head = make_head()
    extra = head.description.input.add()
    extra.CopyFrom(head.description.input[0])
    extra.name = "mask"
    message = only(validate_spec(make_pipeline(head=head), "pipeline"))
    assert message == (
        "pipeline.models[1] (head): input 'mask' is neither a pipeline input nor an output "
        "of an earlier model"
    )


def test_pipeline_output_not_produced() -> None:
    spec = make_pipeline()
    spec.description.output.add().CopyFrom(spec.description.output[0])
    spec.description.output[-1].name = "extra"
    assert "pipeline output 'extra' is produced neither" in only(validate_spec(spec, "pipeline"))


def test_pipeline_output_type_differs() -> None:
    spec = make_pipeline()
    probs = next(o for o in spec.description.output if o.name == "probs")
    probs.type.multiArrayType.dataType = ArrayType.DOUBLE
    message = only(validate_spec(spec, "pipeline"))
    assert message.startswith("pipeline: pipeline output 'probs' type differs")


def test_pipeline_spec_version_lower_than_sub_model() -> None:
    message = only(validate_spec(make_pipeline(version=3), "pipeline"))
    assert "specificationVersion 3 is lower than models[0] (stub)'s 4" in message


def test_duplicate_pipeline_names() -> None:
    spec = make_pipeline()
    spec.pipelineClassifier.pipeline.names[1] = "stub"
    message = only(validate_spec(spec, "pipeline"))
    assert "pipeline model name 'stub' at index 1 is already used" in message


def test_pipeline_names_count() -> None:
    spec = make_pipeline()
    spec.pipelineClassifier.pipeline.names.append("extra")
    assert "3 model names for 2 models" in only(validate_spec(spec, "pipeline"))


def test_empty_pipeline() -> None:
    spec = make_pipeline()
    del spec.pipelineClassifier.pipeline.models[:]
    del spec.pipelineClassifier.pipeline.names[:]
    violations = validate_spec(spec, "pipeline")
    assert has(violations, "must contain one or more models")


def test_updatable_model_in_non_updatable_pipeline() -> None:
    spec = make_pipeline()
    head_of(spec).isUpdatable = True
    violations = validate_spec(spec, "pipeline")
    assert has(violations, "models[1] is updatable inside a pipeline that is not")


def test_updatable_pipeline_needs_updatable_last_model() -> None:
    spec = make_pipeline()
    spec.isUpdatable = True
    violations = validate_spec(spec, "pipeline")
    assert has(violations, "last model of an updatable pipeline must be marked updatable")


def test_pipeline_classifier_needs_predicted_feature_name() -> None:
    spec = make_pipeline()
    spec.description.predictedFeatureName = ""
    assert "classifier has no predictedFeatureName" in only(validate_spec(spec, "pipeline"))


def test_pipeline_classifier_predicted_feature_type() -> None:
    spec = make_pipeline()
    spec.description.predictedFeatureName = "probs"
    message = only(validate_spec(spec, "pipeline"))
    assert "predicted label output 'probs' is Dictionary<String, ...>" in message
