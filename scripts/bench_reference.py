"""Benchmark the numpy reference evaluator against Keras on the same batch, in one run.

    python scripts/bench_reference.py [--batch 8] [--repeats 3] [--markdown BENCHMARKS.md]

Builds a MobileNetV2 (alpha 1.0, 224x224, weights=None, fixed seed) classifier with a Dense head,
converts it with coreml-split (backbone + linked pipeline), then times, on one batch of
deterministic images:

- Keras: ``model(x, training=False)`` (TensorFlow, both cores);
- the reference evaluator: the Core ML pipeline, linked backbone resolved from disk.

Times are the best of ``--repeats`` runs after one warm-up. Absolute seconds on these machines
are noisy; the ratio measured side by side is the figure to compare.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def build_model(folder: Path, size: int, alpha: float) -> Path:
    from convert.heavy import keras

    k = keras(3)
    k.utils.set_random_seed(0)
    base = k.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=alpha, include_top=False, weights=None, pooling="avg"
    )
    base.trainable = False
    inp = k.Input((size, size, 3), name="image")
    # small head weights keep the softmax away from saturation, so |dprob| means something
    head = k.layers.Dense(
        10,
        activation="softmax",
        name="head",
        kernel_initializer=k.initializers.RandomNormal(stddev=0.05, seed=0),
    )
    out = head(base(inp, training=False))
    path = folder / "bench.h5"
    k.Model(inp, out).save(path)
    (folder / "bench.labels.txt").write_text("".join(f"c{i}\n" for i in range(10)))
    shutil.copy(path, folder / "bench_b.h5")  # a second member, so a linked pipeline is emitted
    (folder / "bench_b.labels.txt").write_text((folder / "bench.labels.txt").read_text())
    return path


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", type=Path, help="write the table into this file")
    args = parser.parse_args(argv)

    from convert.check.reference import load
    from convert.check.verify import synthetic_images
    from convert.cli import main as cli
    from convert.heavy import keras
    from convert.read.families import PREPROCESSING

    with tempfile.TemporaryDirectory() as tmp:
        zoo, out = Path(tmp) / "zoo", Path(tmp) / "build"
        zoo.mkdir()
        path = build_model(zoo, args.size, args.alpha)
        started = time.perf_counter()
        if cli(["convert", str(zoo), "--out", str(out), "--quiet"]) != 0:
            return 1
        convert_seconds = time.perf_counter() - started
        images = synthetic_images([args.size, args.size, 3], args.batch)
        model = keras(3).models.load_model(path, compile=False)
        x = PREPROCESSING["tf"].apply(images)
        pipeline = load(out / "bench.mlmodel")

        def run_keras():
            return np.asarray(model(x, training=False))

        def run_reference():
            return pipeline.predict({"image": images})["__probabilities__"]

        keras_s = best_of(run_keras, args.repeats)
        reference_s = best_of(run_reference, args.repeats)
        expected = run_keras()
        diff = float(np.max(np.abs(expected - np.asarray(run_reference()))))
        spread = float(expected.max() - expected.min())

    rows = [
        ("Keras 3 (TensorFlow 2.21)", keras_s, 1.0),
        ("coreml-split reference evaluator (numpy)", reference_s, reference_s / keras_s),
    ]
    title = (
        f"MobileNetV2 alpha {args.alpha} {args.size}x{args.size} + Dense(10), batch {args.batch}, "
        f"best of {args.repeats}; {os.cpu_count()} cores, {platform.machine()}"
    )
    lines = [
        f"### Reference evaluator vs Keras ({time.strftime('%Y-%m-%d')})",
        "",
        title,
        "",
        "| runner | seconds per batch | relative to Keras |",
        "|---|---:|---:|",
        *[f"| {name} | {seconds:.2f} | {ratio:.1f}x |" for name, seconds, ratio in rows],
        "",
        f"max |dprob| between the two: {diff:.1e}; the probabilities span only {spread:.1e} "
        "on this random-weight model, so accuracy is left to the parity tests. "
        f"Converting the zoo (backbone once, two heads) took {convert_seconds:.1f} s.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        _write_section(args.markdown, "Reference evaluator vs Keras", table)
    return 0


def publish(
    args: argparse.Namespace, section: str, lead: str, prose: str, body: list[str], work: Path
) -> None:
    """The benchmark's section (a dated heading; ``lead``, the machine and ``prose`` as one
    paragraph; ``body``) printed and, unless ``--no-write``, put into ``--markdown``; the work
    folder removed unless ``--work`` kept it."""
    text = "\n".join(
        [
            f"### {section} ({time.strftime('%Y-%m-%d')})",
            "",
            f"{lead}; {os.cpu_count()} cores, {platform.machine()}. {prose}",
            "",
            *body,
        ]
    )
    print(text)
    if not args.no_write:
        _write_section(args.markdown, section, text + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def _write_section(path: Path, marker: str, table: str) -> None:
    """Replace this benchmark's section in the file (or append it), leaving others alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(f"### {marker}")
    if start == -1:
        text = text.rstrip() + "\n\n" + table
    else:
        end = text.find("\n### ", start + 1)
        text = text[:start] + table + ("" if end == -1 else text[end:])
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
