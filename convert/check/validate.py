"""Static checks of Core ML ``.mlmodel`` specs, following Core ML's own validator.

Core ML cannot load a model on Linux, so nothing here runs the real validator
(libmlmodelspec, ``mlmodel/src/Validation`` in apple/coremltools). Instead the modules of
:mod:`convert.check.rules` re-state its rules for the model types coreml-split writes:
NeuralNetwork, NeuralNetworkClassifier, LinkedModel, Pipeline and PipelineClassifier, recursing
into pipeline sub-models. A few further checks (marked "project rule" in the messages' source
comments) catch mistakes that the open-source validator lets through but that break a
model at compile or run time, or that break this project's conventions.

This module is the public face and, like Model.cpp, the dispatcher: :func:`_check_model` runs
the generic checks and picks the rules for the spec's model type.

Where the C++ stops at the first problem, :func:`validate_spec` reports every problem it
finds, one line each, prefixed with where it is (``pipeline.models[1] (head): ...``).

Nothing in this module imports coremltools unless a file has to be parsed, so the checks
run on any ``Model_pb2.Model`` message without pulling in TensorFlow a second time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from convert.check.rules.common import (
    NEWEST_SPEC_VERSION,
    NN_TYPES,
    PIPELINE_TYPES,
    Message,
    describe_type,
)
from convert.check.rules.features import _check_description, _check_optional, _check_updatable
from convert.check.rules.linked_model import _check_linked_model
from convert.check.rules.neural_network import _check_neural_network
from convert.check.rules.pipeline import _check_pipeline
from convert.check.rules.versions import _check_spec_version

__all__ = [
    "NEWEST_SPEC_VERSION",
    "SpecInvalid",
    "check_file",
    "describe_type",
    "validate_file",
    "validate_spec",
]


class SpecInvalid(Exception):
    """A Core ML model file breaks Core ML's rules. ``str()`` is one line: file, first problem."""

    def __init__(self, path: str | Path, violations: Sequence[str]) -> None:
        self.path = Path(path)
        self.violations = list(violations)
        first = " ".join(self.violations[0].split()) if self.violations else "invalid model"
        if not first.startswith(str(self.path)):
            first = f"{self.path}: {first}"
        more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        super().__init__(first + more)


def validate_spec(spec: Message, where: str = "model", *, strict_types: bool = False) -> list[str]:
    """Return human-readable violations (empty list = valid).

    ``spec`` is a coremltools ``Model_pb2.Model``. ``where`` prefixes every message.
    With ``strict_types``, pipeline connections must have byte-identical FeatureType messages
    (isOptional, shape ranges and image size flexibility included); by default they are
    compared the way Core ML compares them (see
    :func:`convert.check.rules.pipeline._equivalent_types`).
    """
    return list(_check_model(spec, where, strict_types))


def validate_file(
    path: str | Path, *, where: str | None = None, strict_types: bool = False
) -> list[str]:
    """Load an ``.mlmodel`` file and return its violations.

    Each message starts with ``where``, by default the file's name.
    """
    path = Path(path)
    where = where or path.name or str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [f"{where}: cannot read the file ({exc.strerror or exc})"]
    from coremltools.proto import Model_pb2
    from google.protobuf.message import DecodeError

    try:
        spec = Model_pb2.Model.FromString(data)
    except DecodeError as exc:
        return [f"{where}: not a Core ML model file ({exc})"]
    return validate_spec(spec, where, strict_types=strict_types)


def check_file(path: str | Path, *, strict_types: bool = False) -> None:
    """Raise :class:`SpecInvalid` if the ``.mlmodel`` file at ``path`` has any violation."""
    violations = validate_file(path, where=str(path), strict_types=strict_types)
    if violations:
        raise SpecInvalid(path, violations)


# --------------------------------------------------------------------------------------------
# Model level: Model.cpp (validateGeneric, validate), dispatching to convert.check.rules


def _check_model(spec: Message, where: str, strict: bool) -> Iterator[str]:
    kind = spec.WhichOneof("Type")
    yield from _check_spec_version(spec, where)
    yield from _check_description(spec, where)
    yield from _check_updatable(spec, kind, where)
    yield from _check_optional(spec, kind, where)
    if kind is None:
        yield f"{where}: the model did not specify a model type (Model.Type is not set)"
    elif kind in PIPELINE_TYPES:
        yield from _check_pipeline(spec, kind, where, strict, _check_model)
    elif kind in NN_TYPES:
        yield from _check_neural_network(spec, kind, where)
    elif kind == "linkedModel":
        yield from _check_linked_model(spec, where)
    # Other model types only get the generic checks above.
