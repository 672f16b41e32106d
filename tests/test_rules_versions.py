"""Tests for convert.check.rules.versions (Model.cpp validateGeneric, Utils.cpp)."""

from __future__ import annotations

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("coremltools")

from rules_helpers import make_head, make_stub, only  # noqa: E402

from convert.check.validate import validate_spec  # noqa: E402

# --------------------------------------------------------------------------------------------
# Spec versions (Model.cpp validateGeneric, Utils.cpp)


def test_linked_model_needs_spec_version_4() -> None:
    message = only(validate_spec(make_stub(version=3), "stub"))
    assert "specificationVersion 3 is too low" in message and ">= 4" in message


def test_missing_and_too_new_spec_version() -> None:
    assert "missing or not positive" in only(validate_spec(make_stub(version=0), "stub"))
    assert "is newer than any Core ML release" in only(validate_spec(make_stub(11), "stub"))


def test_float16_weights_need_spec_version_2() -> None:
    head = make_head(version=1)
    dense = head.neuralNetworkClassifier.layers[0].innerProduct
    for weights, count in ((dense.weights, 12), (dense.bias, 3)):
        del weights.floatValue[:]
        weights.float16Value = np.ones(count, dtype=np.float16).tobytes()
    message = only(validate_spec(head, "head"))
    assert message == (
        "head: specificationVersion 1 is too low: float16 weights in layer 'dense' "
        "(innerProduct) needs specificationVersion >= 2"
    )
