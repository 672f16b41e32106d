"""Errors of the reference evaluator, each a one-line :class:`~convert.errors.SplitError`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from convert.errors import SplitError


class ReferenceError(SplitError):
    """The model cannot be evaluated: a bad input, a malformed spec, a layer that failed."""


class UnsupportedLayer(ReferenceError):
    """A layer kind, or a parameter value of a layer, that the evaluator does not implement."""

    def __init__(
        self, path: str | Path | None, layer: str, kind: str, detail: str | None = None
    ) -> None:
        self.layer = layer
        self.kind = kind
        self.detail = detail
        reason = f"layer {layer!r} of type {kind!r} is not supported by the reference evaluator"
        super().__init__(path, f"{reason} ({detail})" if detail else reason)


class LinkedModelNotFound(ReferenceError):
    """No folder of a LinkedModel's search path holds the model it names."""

    def __init__(
        self, path: str | Path | None, name: str, searched: Sequence[str], notes: Sequence[str] = ()
    ) -> None:
        self.name = name
        self.searched = list(searched)
        reason = f"linked model {name!r} not found; searched: " + (
            ", ".join(self.searched) or "(no folders)"
        )
        if notes:
            reason += "; " + "; ".join(notes)
        super().__init__(path, reason)


class Unsupported(Exception):
    """Raised inside a layer function; the network turns it into :class:`UnsupportedLayer`."""
