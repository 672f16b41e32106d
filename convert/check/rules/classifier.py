"""Classifier interfaces: Validators.hpp validateClassifierInterface (class labels) and
InterfaceValidators.cpp validateClassifierFeatureDescriptions (the predicted label and
probability outputs), shared by NeuralNetworkClassifier and PipelineClassifier.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from convert.check.rules.common import Message, _key_name, describe_type


def _check_classifier_outputs(desc: Message, label_kind: str | None, where: str) -> Iterator[str]:
    """Check predictedFeatureName / predictedProbabilitiesName against the outputs.

    ``label_kind`` is "int64Type" or "stringType" when the class labels fix it, else None
    (a PipelineClassifier, whose labels live in its last model).
    """
    outputs = {o.name: o.type for o in desc.output}
    predicted = desc.predictedFeatureName
    predicted_kind: str | None = None
    if not predicted:
        yield f"{where}: classifier has no predictedFeatureName"
    elif predicted not in outputs:
        yield f"{where}: predictedFeatureName '{predicted}' is not one of the model's outputs"
    else:
        predicted_kind = outputs[predicted].WhichOneof("Type")
        allowed = (label_kind,) if label_kind else ("int64Type", "stringType")
        if predicted_kind not in allowed:
            wanted = " or ".join(_key_name(k) for k in allowed)
            yield (
                f"{where}: predicted label output '{predicted}' is "
                f"{describe_type(outputs[predicted])}, expected {wanted}"
            )
    probs = desc.predictedProbabilitiesName
    if not probs:
        return
    if probs not in outputs:
        yield f"{where}: predictedProbabilitiesName '{probs}' is not one of the model's outputs"
        return
    yield from _check_probability_output(probs, outputs[probs], label_kind or predicted_kind, where)


def _check_probability_output(
    name: str, ftype: Message, label_kind: str | None, where: str
) -> Iterator[str]:
    kind = ftype.WhichOneof("Type")
    if kind not in ("dictionaryType", "multiArrayType"):
        yield f"{where}: probabilities output '{name}' is {describe_type(ftype)}, not a Dictionary"
        return
    if kind != "dictionaryType" or label_kind not in ("int64Type", "stringType"):
        return
    # Project rule: the dictionary is keyed by class label, so its key type must match.
    key = ftype.dictionaryType.WhichOneof("KeyType")
    expected = "int64KeyType" if label_kind == "int64Type" else "stringKeyType"
    if key is not None and key != expected:
        yield (
            f"{where}: probabilities output '{name}' is keyed by {_key_name(key)} but the class "
            f"labels are {_key_name(label_kind)}"
        )


def _class_labels(classifier: Message) -> tuple[str | None, list[Any]]:
    case = classifier.WhichOneof("ClassLabels")
    if case == "stringClassLabels":
        return "stringType", list(classifier.stringClassLabels.vector)
    if case == "int64ClassLabels":
        return "int64Type", list(classifier.int64ClassLabels.vector)
    return None, []


def _check_class_labels(classifier: Message, where: str) -> Iterator[str]:
    label_kind, labels = _class_labels(classifier)
    if label_kind is None:
        yield f"{where}: classifier has no class labels (stringClassLabels or int64ClassLabels)"
    elif not labels:
        yield f"{where}: classifier declares {_key_name(label_kind)} class labels but lists none"
