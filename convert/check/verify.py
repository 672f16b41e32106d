"""Checking: does each emitted pipeline compute what its Keras model computes?

For every classifier in a build, the same images go through the Keras model (loaded by the Keras
that wrote it) and through the Core ML pipeline, executed by the numpy reference evaluator with
the linked backbone resolved from disk exactly as the stub names it. The probabilities are
compared; beyond tolerance the check fails.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import SplitError
from convert.read.families import PREPROCESSING

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}

# Default |Δprob| tolerances by the weakest weight storage found in the Core ML files.
# float32 is exact up to summation order; float16 keeps ~3 significant digits, so a deep
# backbone drifts by ~1e-3; 8-bit weights move probabilities by a few percent.
TOLERANCES = {"float32": 1e-4, "float16": 1e-2, "8-bit": 5e-2}
BATCH = 8


@dataclass
class VerifyResult:
    name: str
    file: str
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    weights: str  # float32, float16 or 8-bit: the weakest storage in the pipeline and backbone
    tolerance: float
    passed: bool
    bound: list[str]  # linked models the evaluator bound, as file names

    @property
    def line(self) -> str:
        mark = "ok" if self.passed else "FAILED"
        return (
            f"[{mark}] {self.name}: max |dprob| {self.max_abs_diff:.2e} "
            f"(tolerance {self.tolerance:.0e}, {self.weights}), mean {self.mean_abs_diff:.2e}, "
            f"top-1 agreement {self.top1_agreement:.0%} on {self.images} images"
        )


# -- images ----------------------------------------------------------------------------------


def load_images(folder: Path, hwc: list[int], limit: int | None = None) -> np.ndarray:
    """Every image in ``folder`` (sorted), resized to the model's input, as uint8 (N, H, W, C)."""
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SplitError(folder, "no images (.png, .jpg, ...) in this folder")
    h, w, c = hwc
    out = []
    for path in files[:limit] if limit else files:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                out.append(np.asarray(image, dtype=np.uint8).reshape(h, w, c))
        except OSError as exc:
            raise SplitError(path, f"cannot read image: {exc}") from None
    return np.stack(out)


def synthetic_images(hwc: list[int], count: int, seed: int = 0) -> np.ndarray:
    """Deterministic test images: smooth gradients, coloured discs and bars, some noise."""
    h, w, c = hwc
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = np.empty((count, h, w, c), dtype=np.uint8)
    for i in range(count):
        base = rng.uniform(0, 255, size=c)
        slope = rng.uniform(-1, 1, size=(2, c)) * 128
        img = base + slope[0] * (yy[..., None] / h) + slope[1] * (xx[..., None] / w)
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.4) * min(h, w)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[mask] = rng.uniform(0, 255, size=c)
        if rng.random() < 0.5:
            x0 = int(rng.integers(0, w))
            img[:, x0 : x0 + max(1, w // 8)] = rng.uniform(0, 255, size=c)
        img += rng.normal(0, 8, size=img.shape)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return images


# -- the two sides ---------------------------------------------------------------------------


def keras_probabilities(source: Path, preprocessing: str, images: np.ndarray) -> np.ndarray:
    """The Keras model's output for 0-255 images, preprocessed as the Core ML input does."""
    from convert.check.keras_model import load_keras_model
    from convert.read.h5 import read_model

    graph = read_model(source, with_digests=False)
    model = load_keras_model(graph)
    x = PREPROCESSING[preprocessing].apply(images)
    outs = [np.asarray(model(x[i : i + BATCH], training=False)) for i in range(0, len(x), BATCH)]
    return np.concatenate(outs).astype(np.float64)


def coreml_probabilities(
    pipeline: Path, images: np.ndarray, bundle_main: Path | None = None
) -> tuple[np.ndarray, list[str], list[str]]:
    """(probabilities in label order, labels, linked files bound) from the reference evaluator."""
    from convert.check import reference

    model = reference.load(pipeline)
    image = model.spec.description.input[0].name  # "image" unless zoo.toml renamed it
    outs = []
    for i in range(0, len(images), BATCH):
        result = model.predict({image: images[i : i + BATCH]}, bundle_main=bundle_main)
        outs.append(np.asarray(result["__probabilities__"], dtype=np.float64))
    bound = sorted({Path(p).name for _, p in model.bound})
    return np.concatenate(outs), class_labels(model.spec), bound


def class_labels(spec: Any) -> list[str]:
    """The labels of the (last) classifier in a spec, pipelines included."""
    kind = spec.WhichOneof("Type")
    if kind in ("pipelineClassifier", "pipeline"):
        inner = getattr(spec, kind)
        models = inner.pipeline.models if kind == "pipelineClassifier" else inner.models
        return class_labels(models[-1])
    if kind == "neuralNetworkClassifier":
        nn = spec.neuralNetworkClassifier
        which = nn.WhichOneof("ClassLabels")
        values = getattr(nn, which).vector if which else []
        return [str(v) for v in values]
    return []


def weight_storage(spec: Any) -> str:
    """The weakest weight storage used anywhere in a spec: 8-bit, float16 or float32."""
    found = {"float32"}

    def visit(message: Any) -> None:
        for field, value in message.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            items = [value] if hasattr(value, "ListFields") else value  # message or repeated
            for item in items:
                if not hasattr(item, "ListFields"):  # map<string, string> entries
                    continue
                if type(item).__name__ == "WeightParams":
                    if item.HasField("quantization") or len(item.int8RawValue):
                        found.add("8-bit")
                    elif len(item.float16Value):
                        found.add("float16")
                else:
                    visit(item)

    visit(spec)
    for level in ("8-bit", "float16", "float32"):
        if level in found:
            return level
    return "float32"


# -- a whole build -----------------------------------------------------------------------------


def verify_build(
    out: Path,
    images_dir: Path | None = None,
    count: int = 16,
    tolerances: dict[str, float] | None = None,
    bundle_main: Path | None = None,
    progress=None,
    only: list[str] | None = None,
) -> tuple[list[VerifyResult], list[tuple[str, str]]]:
    """Verify every classifier listed in ``out/report.json``. Returns (results, errors)."""
    from convert.check.reference import load as load_reference

    say = progress or (lambda _msg: None)
    tolerances = {**TOLERANCES, **(tolerances or {})}
    report_path = out / "report.json"
    if not report_path.is_file():
        raise SplitError(out, "no report.json here; run `coreml-split convert` first")
    report = json.loads(report_path.read_text())
    results: list[VerifyResult] = []
    errors: list[tuple[str, str]] = []
    entries = report["classifiers"]
    if only:
        unknown = sorted(set(only) - {e["name"] for e in entries})
        if unknown:
            raise SplitError(report_path, f"no classifier named {', '.join(unknown)}")
        entries = [e for e in entries if e["name"] in only]
    for entry in entries:
        pipeline = out / entry["file"]
        try:
            spec = load_reference(pipeline).spec
            hwc = _image_shape(spec, pipeline)
            images = (
                load_images(images_dir, hwc, count if count else None)
                if images_dir
                else synthetic_images(hwc, count)
            )
            expected = keras_probabilities(Path(entry["source"]), entry["preprocessing"], images)
            got, labels, bound = coreml_probabilities(pipeline, images, bundle_main)
            got = _in_label_order(got, labels, entry["labels"], pipeline)
            storage = _weakest([spec] + [load_reference(out / b).spec for b in bound])
            results.append(_compare(entry, expected, got, storage, tolerances, bound))
            say(results[-1].line)
        except SplitError as exc:
            errors.append((str(exc.path or pipeline), exc.reason))
            say(f"[error] {entry['name']}: {exc.reason}")
    return results, errors


def _image_shape(spec: Any, path: Path) -> list[int]:
    for feature in spec.description.input:
        if feature.type.WhichOneof("Type") == "imageType":
            image = feature.type.imageType
            gray = image.colorSpace == image.GRAYSCALE
            return [int(image.height), int(image.width), 1 if gray else 3]
    raise SplitError(path, "has no image input")


def _weakest(specs: list[Any]) -> str:
    levels = [weight_storage(s) for s in specs]
    for level in ("8-bit", "float16", "float32"):
        if level in levels:
            return level
    return "float32"


def _in_label_order(
    probabilities: np.ndarray, labels: list[str], truth: list[str], path: Path
) -> np.ndarray:
    """Core ML's probabilities rearranged to the Keras model's class order, matched by label:
    a head whose labels were permuted then disagrees with Keras, as it would in an app."""
    if sorted(labels) != sorted(truth):
        raise SplitError(path, f"labels {labels} differ from the model's {truth}")
    return probabilities[:, [labels.index(label) for label in truth]]


def _compare(
    entry: dict[str, Any],
    expected: np.ndarray,
    got: np.ndarray,
    storage: str,
    tolerances: dict[str, float],
    bound: list[str],
) -> VerifyResult:
    if got.shape != expected.shape:
        raise SplitError(
            entry["file"], f"Core ML gives {got.shape} probabilities, Keras {expected.shape}"
        )
    diff = np.abs(got - expected)
    tolerance = tolerances[storage]
    agreement = float(np.mean(np.argmax(got, axis=1) == np.argmax(expected, axis=1)))
    max_diff = float(diff.max()) if diff.size else 0.0
    return VerifyResult(
        name=entry["name"],
        file=entry["file"],
        images=int(len(got)),
        max_abs_diff=max_diff,
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        top1_agreement=agreement,
        weights=storage,
        tolerance=tolerance,
        passed=bool(max_diff <= tolerance),
        bound=bound,
    )


def as_json(results: list[VerifyResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
