"""Pipelines: PipelineValidator.cpp, with FeatureType comparison from Comparison.cpp. Like the
C++, which validates each sub-model with ``Model::validate``, :func:`_check_pipeline` is handed
the dispatcher's model check, so this module never imports the dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from convert.check.rules.classifier import _check_classifier_outputs
from convert.check.rules.common import Message, describe_type

# How a pipeline validates a sub-model: (spec, where, strict) -> violations.
ModelCheck = Callable[[Message, str, bool], Iterator[str]]


def _rank_of(arr: Message) -> int:
    """Comparison.cpp rankOf."""
    flex = arr.WhichOneof("ShapeFlexibility")
    if flex == "enumeratedShapes":
        shapes = arr.enumeratedShapes.shapes
        return len(shapes[0].shape) if shapes else 0
    if flex == "shapeRange":
        return len(arr.shapeRange.sizeRanges)
    return len(arr.shape)


def _equivalent_arrays(a: Message, b: Message, fixed_shapes_only: bool = True) -> bool:
    if a.dataType != b.dataType or _rank_of(a) != _rank_of(b):
        return False
    flexible = a.WhichOneof("ShapeFlexibility") or b.WhichOneof("ShapeFlexibility")
    if fixed_shapes_only and flexible:
        return True
    return list(a.shape) == list(b.shape)


def _equivalent_types(a: Message, b: Message) -> bool:
    """Comparison.cpp ``operator==(FeatureType)``, which PipelineValidator uses via isEquivalent.

    It ignores isOptional (commented out upstream so that T may feed optional<T>), compares
    multiArrays by dataType, rank and (only when neither is flexible) shape; images by width,
    height and colorSpace; dictionaries by key type; sequences by element type.
    """
    kind = a.WhichOneof("Type")
    if kind != b.WhichOneof("Type"):
        return False
    if kind == "multiArrayType":
        return _equivalent_arrays(a.multiArrayType, b.multiArrayType)
    if kind == "imageType":
        x, y = a.imageType, b.imageType
        return (x.width, x.height, x.colorSpace) == (y.width, y.height, y.colorSpace)
    if kind == "dictionaryType":
        return a.dictionaryType.WhichOneof("KeyType") == b.dictionaryType.WhichOneof("KeyType")
    if kind == "sequenceType":
        return a.sequenceType.WhichOneof("Type") == b.sequenceType.WhichOneof("Type")
    if kind == "stateType":
        x, y = a.stateType.arrayType, b.stateType.arrayType
        return _equivalent_arrays(x, y, fixed_shapes_only=False)
    return True


@dataclass
class _Source:
    """Where a feature name in a pipeline comes from."""

    ftype: Message
    producer: str


def _sub_label(index: int, names: Sequence[str]) -> str:
    """``models[1] (head)``: the index, and the pipeline's name for the model if it has one."""
    name = f" ({names[index]})" if index < len(names) and names[index] else ""
    return f"models[{index}]{name}"


def _check_pipeline(
    spec: Message, kind: str, where: str, strict: bool, check_model: ModelCheck
) -> Iterator[str]:
    """``check_model`` validates each sub-model (the dispatcher's ``_check_model``)."""
    pipeline = getattr(spec, kind) if kind == "pipeline" else getattr(spec, kind).pipeline
    models, names = list(pipeline.models), list(pipeline.names)
    if not models:
        yield f"{where}: a pipeline must contain one or more models"
    table = {f.name: _Source(f.type, "the pipeline input") for f in spec.description.input}
    for index, model in enumerate(models):
        label = _sub_label(index, names)
        sub = f"{where}.{label}"
        yield from _check_connections(model, table, sub, strict)
        yield from check_model(model, sub, strict)
        for output in model.description.output:
            table[output.name] = _Source(output.type, f"{label}'s output")
    yield from _check_sub_versions(spec, models, names, where)
    for output in spec.description.output:
        yield from _check_pipeline_output(output, table, where, strict)
    yield from _check_pipeline_updatable(spec, models, where)
    yield from _check_pipeline_names(names, len(models), where)
    if kind == "pipelineClassifier":
        # Project rule: PipelineValidator.cpp leaves "validate classifier interface" as a TODO,
        # but Model.proto requires predictedFeatureName for classifiers.
        yield from _check_classifier_outputs(spec.description, None, where)
    elif kind == "pipelineRegressor" and not spec.description.predictedFeatureName:
        yield f"{where}: regressor has no predictedFeatureName"


def _types_match(a: Message, b: Message, strict: bool) -> bool:
    return a == b if strict else _equivalent_types(a, b)


def _check_connections(
    model: Message, table: dict[str, _Source], sub: str, strict: bool
) -> Iterator[str]:
    for feature in model.description.input:
        source = table.get(feature.name)
        if source is None:
            yield (
                f"{sub}: input '{feature.name}' is neither a pipeline input nor an output of an "
                "earlier model"
            )
        elif not _types_match(feature.type, source.ftype, strict):
            yield (
                f"{sub}: input '{feature.name}' type differs from producer: expects "
                f"{describe_type(feature.type)}, {source.producer} is "
                f"{describe_type(source.ftype)}"
            )


def _check_pipeline_output(
    output: Message, table: dict[str, _Source], where: str, strict: bool
) -> Iterator[str]:
    source = table.get(output.name)
    if source is None:
        yield (
            f"{where}: pipeline output '{output.name}' is produced neither by a pipeline input nor "
            "by a contained model"
        )
    elif not _types_match(output.type, source.ftype, strict):
        yield (
            f"{where}: pipeline output '{output.name}' type differs from producer: declared "
            f"{describe_type(output.type)}, {source.producer} is {describe_type(source.ftype)}"
        )


def _check_sub_versions(
    spec: Message, models: list[Message], names: list[str], where: str
) -> Iterator[str]:
    """Project rule (Utils.cpp walks sub-models when choosing a pipeline's version)."""
    versions = [model.specificationVersion for model in models]
    if not versions or not 0 < spec.specificationVersion < max(versions):
        return
    highest = versions.index(max(versions))
    yield (
        f"{where}: specificationVersion {spec.specificationVersion} is lower than "
        f"{_sub_label(highest, names)}'s {versions[highest]}; a pipeline's version must be at "
        "least every sub-model's"
    )


def _check_pipeline_updatable(spec: Message, models: list[Message], where: str) -> Iterator[str]:
    if spec.isUpdatable:
        for index, model in enumerate(models[:-1]):
            if model.isUpdatable:
                yield (
                    f"{where}: only the last model of a pipeline may be updatable; models[{index}] "
                    "is marked updatable"
                )
        if models and not models[-1].isUpdatable:
            yield f"{where}: the last model of an updatable pipeline must be marked updatable"
        return
    for index, model in enumerate(models):
        if model.isUpdatable:
            yield f"{where}: models[{index}] is updatable inside a pipeline that is not"


def _check_pipeline_names(names: list[str], count: int, where: str) -> Iterator[str]:
    if not names:
        return
    if len(names) != count:
        yield f"{where}: the pipeline has {len(names)} model names for {count} models"
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            yield f"{where}: pipeline model name '{name}' at index {index} is already used"
        seen.add(name)
