"""``coreml-split update``: train an updatable pipeline on a folder of labelled photos, as an app
does with ``MLUpdateTask``, and write the updated model, as ``MLUpdateContext.model.write(to:)``
would.

The folder holds one sub-folder per label, as Create ML takes them (``photos/tabby/1.jpg``).
The pipeline's stub binds its linked backbone from disk, exactly as verify does; the backbone
gives the features once; the head learns on them (:mod:`convert.check.reference.train`, the
optimizer and settings its ``updateParams`` hold). Only the head's updatable weights change:
the stub, and so the link to the same backbone file, are written back as they were.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import SplitError

BATCH = 16


@dataclass
class UpdateResult:
    images: int
    labels: list[str]  # the sub-folders trained on, in the classifier's order
    losses: list[float] = field(default_factory=list)  # the mean loss of each epoch
    accuracy_before: float = 0.0  # on the training images
    accuracy_after: float = 0.0
    bytes: int = 0  # of the model written
    seconds: float = 0.0


def update_pipeline(
    path: Path,
    images: Path,
    out: Path,
    epochs: int | None = None,
    bundle_main: Path | None = None,
    say: Callable[[str], None] | None = None,
) -> UpdateResult:
    """Train the updatable pipeline at ``path`` on the labelled ``images`` and write it to
    ``out``; ``epochs`` overrides the model's own. Bad input is a SplitError naming the file or
    the folder, and nothing is written then."""
    from convert.check.reference import evaluate_spec
    from convert.check.reference.evaluate import read_spec
    from convert.check.reference.train import train, training_of, write_back
    from convert.check.verify import UPDATED, image_shape
    from convert.files import write_atomic

    say = say or (lambda _msg: None)
    started = time.perf_counter()
    spec = read_spec(path)
    stub, head = _parts(spec, path)
    labels = _class_labels(head, path)
    hwc = image_shape(spec, path)
    x, y, folders = _labelled_images(images, labels, hwc)
    image = spec.description.input[0].name
    features = []
    for i in range(0, len(x), BATCH):
        got, _ = evaluate_spec(
            stub, {image: x[i : i + BATCH]}, model_dir=path.parent, bundle_main=bundle_main
        )
        features.append(np.asarray(got[stub.description.output[0].name], dtype=np.float32))
    feats = np.concatenate(features)
    result = UpdateResult(images=len(x), labels=folders)
    result.accuracy_before = _accuracy(head, feats, y)
    training = training_of(head, path)
    if epochs is not None:
        if epochs < 1:
            raise SplitError(None, f"--epochs must be at least 1, not {epochs}")
        training = replace(training, epochs=epochs)
    say(
        f"{path.name}: training on {len(x)} images of {len(folders)} labels, "
        f"{training.optimizer}, learning rate {training.learning_rate:g}, "
        f"mini-batches of {training.batch_size}, {training.epochs} epochs"
    )
    trained = train(
        head,
        feats,
        y,
        training,
        path,
        lambda epoch, loss: say(f"epoch {epoch}/{training.epochs}: loss {loss:.4f}"),
    )
    write_back(head, trained)
    spec.description.metadata.userDefined[UPDATED] = (
        f"trained on {len(x)} images of {len(folders)} labels, {training.epochs} epochs"
    )
    result.losses = list(trained.losses)
    result.accuracy_after = _accuracy(head, feats, y)
    result.bytes = write_atomic(out, spec.SerializeToString())
    result.seconds = time.perf_counter() - started
    return result


def classifier_name(build: Path, pipeline: Path) -> str:
    """The name report.json gives the classifier whose pipeline ``pipeline`` is."""
    from convert.check.verify import read_report

    for entry in read_report(build / "report.json"):
        if entry["file"] == pipeline.name:
            return entry["name"]
    raise SplitError(build / "report.json", f"lists no classifier in {pipeline.name}")


def _parts(spec: Any, path: Path) -> tuple[Any, Any]:
    """The stub and the updatable head of an updatable PipelineClassifier."""
    if spec.WhichOneof("Type") != "pipelineClassifier":
        raise SplitError(
            path, "is not a pipeline classifier; update takes the pipelines convert writes"
        )
    models = spec.pipelineClassifier.pipeline.models
    if not spec.isUpdatable or len(models) != 2 or not models[-1].isUpdatable:
        raise SplitError(path, "is not updatable; convert it with --updatable")
    return models[0], models[1]


def _class_labels(head: Any, path: Path) -> list[str]:
    network = head.neuralNetworkClassifier
    if network.WhichOneof("ClassLabels") != "stringClassLabels":
        raise SplitError(path, "update needs a classifier with string labels")
    return list(network.stringClassLabels.vector)


def _labelled_images(
    folder: Path, labels: list[str], hwc: list[int]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images and class indices from one sub-folder per label."""
    from convert.check.verify import load_images

    if not folder.is_dir():
        raise SplitError(folder, "no such folder")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    if not subfolders:
        raise SplitError(folder, "holds no sub-folders: give one per label, named as the label")
    unknown = [p.name for p in subfolders if p.name not in labels]
    if unknown:
        raise SplitError(
            folder / unknown[0],
            f"is not a label of this classifier ({', '.join(labels[:8])}"
            f"{', ...' if len(labels) > 8 else ''})",
        )
    ordered = sorted(subfolders, key=lambda p: labels.index(p.name))
    xs = [load_images(sub, hwc) for sub in ordered]
    ys = [np.full(len(x), labels.index(sub.name)) for x, sub in zip(xs, ordered, strict=True)]
    return np.concatenate(xs), np.concatenate(ys), [p.name for p in ordered]


def _accuracy(head: Any, features: np.ndarray, labels: np.ndarray) -> float:
    from convert.check.reference import evaluate_spec

    got, _ = evaluate_spec(head, {head.description.input[0].name: features}, model_dir=Path("."))
    predicted = got[head.description.predictedFeatureName]
    names = list(head.neuralNetworkClassifier.stringClassLabels.vector)
    return float(np.mean([names.index(p) == t for p, t in zip(predicted, labels, strict=True)]))
