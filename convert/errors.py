"""Errors that reach the user as one line: the file, then the reason."""

from __future__ import annotations

from pathlib import Path


class SplitError(Exception):
    """A problem with one input file. ``str()`` is the whole one-line message."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else Path(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)


class ModelFileError(SplitError):
    """The .h5 file cannot be read, or is not a classifier we can split."""


class LabelsError(SplitError):
    """The labels file is missing lines, or their count does not match the model."""


class ConversionError(SplitError):
    """coremltools (or Keras) refused the model while converting it."""


class WriteError(SplitError):
    """An output file cannot be written (a full disk, a folder that became read-only)."""


class RunError(SplitError):
    """A problem with the whole run (arguments, ``--out``, ``zoo.toml``): one line, exit code 2."""


DEBUG_HINT = "rerun with --debug for the traceback"


def internal_reason(exc: BaseException) -> str:
    """The one-line reason for an exception the tool did not foresee."""
    said = " ".join(str(exc).split())[:300]
    return f"internal error: {type(exc).__name__}{': ' + said if said else ''} ({DEBUG_HINT})"


def traceback_text(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
