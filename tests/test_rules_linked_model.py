"""Tests for convert.check.rules.linked_model (LinkedModelValidator.cpp)."""

from __future__ import annotations

import pytest

pytest.importorskip("numpy")
pytest.importorskip("coremltools")

from rules_helpers import make_pipeline, make_stub, only  # noqa: E402

from convert.check.validate import validate_spec  # noqa: E402

# --------------------------------------------------------------------------------------------
# Linked models (LinkedModelValidator.cpp)


def test_empty_linked_model_file_name() -> None:
    stub = make_stub()
    stub.linkedModel.linkedModelFile.linkedModelFileName.defaultValue = ""
    message = only(validate_spec(make_pipeline(stub=stub), "pipeline"))
    assert message.startswith("pipeline.models[0] (stub): LinkedModel")
    assert "linkedModelFileName.defaultValue is empty" in message


def test_linked_model_names_a_compiled_model() -> None:
    stub = make_stub()
    stub.linkedModel.linkedModelFile.linkedModelFileName.defaultValue = "Backbone.mlmodel"
    assert "expected a name ending in .mlmodelc" in only(validate_spec(stub, "stub"))


def test_linked_model_link_type_not_set() -> None:
    stub = make_stub()
    stub.linkedModel.Clear()
    assert "link type is not set" in only(validate_spec(stub, "stub"))


def test_linked_model_cannot_be_updatable() -> None:
    stub = make_stub()
    stub.isUpdatable = True
    assert "a LinkedModel cannot be marked updatable" in only(validate_spec(stub, "stub"))
