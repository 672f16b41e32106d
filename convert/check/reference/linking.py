"""Finding the file a LinkedModel points at, the way Core ML's search path reads, on Linux.

``linkedModelFileName`` names a compiled model (``X.mlmodelc``). ``linkedModelSearchPath`` is a
``:``-separated list of folders: relative ones (``.`` included) are relative to the folder of the
file holding the link, ``$BUNDLE_MAIN`` is the app's main bundle (here: ``bundle_main``) and
``$BUNDLE_IDENTIFIER(id)`` a bundle found by identifier, which only exists on Apple platforms and
is skipped. An empty search path means ``.``.

Nothing on Linux compiles models, so in each folder the evaluator accepts, in this order:
``X.mlmodelc`` if it is a model *file*, ``X.mlmodelc/model.mlmodel``, and the uncompiled
``X.mlmodel`` that Xcode would have compiled into ``X.mlmodelc``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convert.check.reference.errors import LinkedModelNotFound, ReferenceError


def link_of(path: Path | None, spec: Any) -> tuple[str, str]:
    """(file name, search path) of a linkedModel spec."""
    link = spec.linkedModel
    if link.WhichOneof("LinkType") != "linkedModelFile":
        raise ReferenceError(path, "linked model without a linkedModelFile")
    name = link.linkedModelFile.linkedModelFileName.defaultValue
    if not name:
        raise ReferenceError(path, "linked model with an empty linkedModelFileName")
    return name, link.linkedModelFile.linkedModelSearchPath.defaultValue


def resolve(
    path: Path | None, name: str, search_path: str, model_dir: Path, bundle_main: Path
) -> Path:
    """The model file the link binds to; LinkedModelNotFound lists every path tried."""
    searched: list[str] = []
    notes: list[str] = []
    for entry in (search_path or ".").split(":"):
        folder = _folder(entry or ".", model_dir, bundle_main, notes)
        if folder is None:
            continue
        for candidate in candidates(folder, name):
            searched.append(str(candidate))
            if candidate.is_file():
                return candidate
        if (folder / name).is_dir() and not (folder / name / "model.mlmodel").is_file():
            notes.append(f"{folder / name} is a compiled model, which cannot be read here")
    raise LinkedModelNotFound(path, name, searched, notes)


def _folder(entry: str, model_dir: Path, bundle_main: Path, notes: list[str]) -> Path | None:
    if entry == "$BUNDLE_MAIN":
        return bundle_main
    if entry.startswith("$BUNDLE_IDENTIFIER"):
        notes.append(f"{entry} skipped (bundles by identifier exist only on Apple platforms)")
        return None
    if entry.startswith("$"):
        notes.append(f"{entry} skipped (unknown special folder)")
        return None
    folder = Path(entry)
    return folder if folder.is_absolute() else model_dir / folder


def candidates(folder: Path, name: str) -> list[Path]:
    compiled = folder / name
    if compiled.suffix == ".mlmodelc":
        return [compiled, compiled / "model.mlmodel", compiled.with_suffix(".mlmodel")]
    return [compiled]
