"""Linked models: LinkedModelValidator.cpp."""

from __future__ import annotations

from collections.abc import Iterator

from convert.check.rules.common import Message


def _check_linked_model(spec: Message, where: str) -> Iterator[str]:
    if spec.isUpdatable:
        yield f"{where}: a LinkedModel cannot be marked updatable"
    linked = spec.linkedModel
    if linked.WhichOneof("LinkType") is None:
        yield f"{where}: LinkedModel link type is not set (linkedModelFile)"
        return
    file_name = linked.linkedModelFile.linkedModelFileName.defaultValue
    if not file_name:
        yield f"{where}: LinkedModel linkedModelFile.linkedModelFileName.defaultValue is empty"
    elif not file_name.rstrip("/").endswith(".mlmodelc"):
        # Project rule: LinkedModel.proto says the link names a compiled model.
        yield (
            f"{where}: LinkedModel file name '{file_name}' is not a compiled model "
            "(expected a name ending in .mlmodelc)"
        )
