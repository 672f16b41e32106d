"""Class labels: ``<model>.labels.txt`` beside the model, or Teachable Machine's ``labels.txt``."""

from __future__ import annotations

import re
from pathlib import Path

from convert.errors import LabelsError
from convert.read.limits import MAX_LABELS_BYTES, size_text

# Teachable Machine's form: "0 Name" per line, numbered 0, 1, 2, ... (the name may hold spaces).
_NUMBERED = re.compile(r"(\d{1,9})(?:\s+(.*))?")


def labels_file_for(model_path: Path) -> Path | None:
    """``foo.labels.txt`` for ``foo.h5``; else ``labels.txt`` in the same folder; else None."""
    own = model_path.with_name(model_path.stem + ".labels.txt")
    if own.is_file():
        return own
    shared = model_path.with_name("labels.txt")
    return shared if shared.is_file() else None


def read_labels(path: Path) -> list[str]:
    """One label per line, as UTF-8 text, exactly (only the whitespace around it is dropped).

    A file in Teachable Machine's form, every line ``<i> <name>`` with i = 0, 1, 2, ... in
    order, is recognised by its content, whatever its name, and its labels lose their numbers
    (a file of numbers alone, ``0`` to ``9``, is read as those labels).
    Blank lines are skipped; a numbered line without a name, or the same label twice, is an
    error.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LABELS_BYTES + 1)  # never more, whatever the file (or device) holds
        if len(data) > MAX_LABELS_BYTES:
            raise LabelsError(
                path,
                f"labels file is over {size_text(MAX_LABELS_BYTES)}; coreml-split reads at "
                f"most {size_text(MAX_LABELS_BYTES)}",
            )
        lines = [line.strip() for line in data.decode("utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(path, f"cannot read labels: {exc}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise LabelsError(path, "labels file is empty")
    numbered = [_NUMBERED.fullmatch(line) for line in lines]
    names = [(m.group(2) or "").strip() for m in numbered if m]
    in_order = [int(m.group(1)) for m in numbered if m] == list(range(len(lines)))
    if all(numbered) and in_order and any(names):  # not digits alone: MNIST's 0..9 are labels
        lines = names
    elif path.name == "labels.txt" and all(numbered) and not in_order:
        raise LabelsError(path, f"numbered labels are not 0..{len(lines) - 1} in order")
    empty = [i for i, label in enumerate(lines) if not label]
    if empty:  # "1" alone among "0 Name" lines: a class without a name
        raise LabelsError(path, f"label {empty[0]} is empty")
    if len(set(lines)) != len(lines):
        dupes = sorted({x for x in lines if lines.count(x) > 1})
        raise LabelsError(path, f"duplicate labels: {', '.join(dupes[:5])}")
    return lines


def resolve_labels(model_path: Path, num_classes: int | None) -> tuple[list[str], str | None]:
    """Labels for a model and where they came from. Checks the count against the output size.

    When the output size is unknown until Keras loads the model (a layer the static shape
    inference does not know), file labels are returned unchecked and defaults as an empty list;
    :func:`complete_labels` finishes the job at conversion time.
    """
    source = labels_file_for(model_path)
    labels = read_labels(source) if source else []
    if num_classes is None:
        return labels, None if source is None else str(source)
    return complete_labels(model_path, labels, source, num_classes), (
        None if source is None else str(source)
    )


def complete_labels(
    model_path: Path, labels: list[str], source: Path | str | None, num_classes: int
) -> list[str]:
    """Default labels when there is no file; otherwise the file's, if the count matches."""
    if source is None:
        return [f"class_{i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise LabelsError(
            source,
            f"has {len(labels)} labels but {model_path.name} outputs {num_classes} classes",
        )
    return labels
