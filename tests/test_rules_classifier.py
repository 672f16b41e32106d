"""Tests for convert.check.rules.classifier (Validators.hpp validateClassifierInterface)."""

from __future__ import annotations

import pytest

pytest.importorskip("numpy")
pytest.importorskip("coremltools")

from rules_helpers import has, make_head, only  # noqa: E402

from convert.check.validate import validate_spec  # noqa: E402

# --------------------------------------------------------------------------------------------
# Classifiers (Validators.hpp validateClassifierInterface)


def test_classifier_needs_class_labels() -> None:
    head = make_head()
    head.neuralNetworkClassifier.ClearField("stringClassLabels")
    violations = validate_spec(head, "head")
    assert has(violations, "classifier has no class labels")


def test_classifier_predicted_label_type_matches_labels() -> None:
    head = make_head()
    label = next(o for o in head.description.output if o.name == "classLabel")
    label.type.int64Type.SetInParent()
    message = only(validate_spec(head, "head"))
    assert message == "head: predicted label output 'classLabel' is Int64, expected String"


def test_classifier_predicted_feature_must_be_an_output() -> None:
    head = make_head()
    head.description.predictedFeatureName = "label"
    violations = validate_spec(head, "head")
    assert has(violations, "predictedFeatureName 'label' is not one of the model's outputs")
    # classLabel is no longer the predicted feature, so no layer accounts for it.
    assert has(violations, "output 'classLabel' is not produced by any layer")


def test_probabilities_key_type_matches_labels() -> None:
    head = make_head()
    probs = next(o for o in head.description.output if o.name == "probs")
    probs.type.dictionaryType.int64KeyType.SetInParent()
    message = only(validate_spec(head, "head"))
    assert "keyed by Int64 but the class labels are String" in message
