"""Build the demo zoo: small Keras image classifiers that share one frozen MobileNetV2 backbone.

    python scripts/make_demo_zoo.py models/ [--force]

Everything is made here, offline and deterministically: the backbone is a keras.applications
MobileNetV2 (alpha 0.35, 96x96, ``weights=None``) whose weights are drawn from a fixed seed and
whose BatchNorm moving statistics are calibrated on a synthetic batch, so activations are
healthy and every statistic matters. Each head is trained for a few epochs on synthetic numpy
images (shapes, colours, dot counts, stripes) using precomputed backbone features.

Pixel convention (as in keras.applications): images are 0..255 RGB, and MobileNetV2
preprocessing ``x / 127.5 - 1`` is applied *outside* the model, so each ``.h5`` takes the
preprocessed tensor.

Output, per classifier: ``<stem>.h5`` plus ``<stem>.labels.txt`` (one label per line), some
saved by tf_keras (Keras 2 HDF5 layout) and some by Keras 3, all with bit-identical backbone
weights; plus ``demo-images/<stem>-<label>.png``, one sample image per label (the first held-out
image its classifier gets right), and ``demo-images/expected.json`` with the Keras probabilities
for each, for later verification of converted models; and ``demo-photos/<stem>/<label>/``, eight
new images per label for ``coreml-split update`` to learn from.

This file is also the one place that knows how to build the shared backbone: ``tests/factory.py``
imports ``keras_module``, ``backbone_weights`` and ``build_mobilenet`` from it via importlib.
Heavy imports (TensorFlow, both Keras flavours) stay inside functions.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 96
PHOTOS_PER_LABEL = 8  # demo-photos/<classifier>/<label>/
ALPHA = 0.35
BACKBONE_SEED = 0
# Names given explicitly so files do not depend on Keras' global name counters.
_BACKBONE_INPUT = {"k2": "input_1", "k3": "input_layer"}
_MODEL_INPUT = {"k2": "input_2", "k3": "input_layer_1"}


# -- the shared backbone --------------------------------------------------------------------------


def keras_module(flavour: str) -> Any:
    """The Keras package for ``flavour``: "k2" is tf_keras (Keras 2), "k3" is Keras 3."""
    if flavour == "k2":
        import tf_keras

        return tf_keras
    if flavour == "k3":
        import keras

        return keras
    raise ValueError(f"flavour must be 'k2' or 'k3', not {flavour!r}")


def _applications_mobilenet(flavour: str, size: int, alpha: float, pooling: str | None, name: str):
    """keras.applications MobileNetV2 (no top, weights=None) with every layer name fixed."""
    K = keras_module(flavour)
    inp = K.Input(shape=(size, size, 3), name=_BACKBONE_INPUT[flavour])
    base = K.applications.MobileNetV2(
        input_tensor=inp, alpha=alpha, include_top=False, weights=None, pooling=None
    )
    out = base.output
    if pooling == "avg":
        out = K.layers.GlobalAveragePooling2D(name="global_average_pooling2d")(out)
    elif pooling == "max":
        out = K.layers.GlobalMaxPooling2D(name="global_max_pooling2d")(out)
    elif pooling is not None:
        raise ValueError(f"pooling must be 'avg', 'max' or None, not {pooling!r}")
    return K.Model(inp, out, name=name)


def _layer_rng(seed: int, layer_name: str) -> np.random.Generator:
    # Per-layer streams: a layer's weights depend on the seed and its name, not on layer order.
    return np.random.default_rng([seed, zlib.crc32(layer_name.encode())])


def synthetic_batch(size: int, seed: int = 0, n: int = 32) -> np.ndarray:
    """A deterministic batch of smooth random images with edges, in [-1, 1] (preprocessed)."""
    rng = np.random.default_rng([seed, 12345])
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        coarse = rng.uniform(-1, 1, (4, 4, 3))
        img = np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[disc] = rng.uniform(-1, 1, 3)
        img += rng.normal(0, 0.15, img.shape)
        images[i] = np.clip(img, -1, 1)
    return images


def _bn_affine(name: str, rng: np.random.Generator, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm gamma and beta. A random ReLU network this deep scrambles its input; keeping
    most ReLU6 units in their linear range (beta well above 0) and only the last block strongly
    non-linear leaves features that a small head can learn from."""
    if name.endswith("project_BN"):  # linear bottleneck, no activation follows
        return _f32(rng.uniform(0.6, 1.4, shape)), _f32(rng.normal(0.0, 0.2, shape))
    if name == "Conv_1_bn":
        return _f32(rng.uniform(0.8, 1.2, shape)), _f32(rng.normal(0.0, 0.3, shape))
    return _f32(rng.uniform(0.2, 0.5, shape)), _f32(rng.normal(1.5, 0.3, shape))


def _f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


_WEIGHTS_CACHE: dict[tuple, dict[str, list[np.ndarray]]] = {}


def backbone_weights(
    size: int = SIZE,
    alpha: float = ALPHA,
    seed: int = BACKBONE_SEED,
    calibration: np.ndarray | None = None,
) -> dict[str, list[np.ndarray]]:
    """Deterministic MobileNetV2 weights, ``{layer name: [arrays in get_weights() order]}``.

    Kernels are He-normal draws and BatchNorm gamma/beta uniform/normal draws from ``seed``.
    The moving mean and variance of every BatchNorm are then set to the batch statistics of its
    input on ``calibration`` (default: :func:`synthetic_batch`), computed in one forward pass in
    training mode, so inference reproduces that pass and activations stay near unit scale. The
    statistics are rounded through float16, so tiny float differences between runs vanish.
    The result serves both flavours: per-layer weight order is the same in Keras 2 and Keras 3.
    """
    key = (size, float(alpha), seed, None if calibration is None else calibration.tobytes())
    if key in _WEIGHTS_CACHE:
        return _WEIGHTS_CACHE[key]
    import keras

    if calibration is None:
        calibration = synthetic_batch(size, seed)
    model = _applications_mobilenet("k3", size, alpha, None, "calibration")
    weights: dict[str, list[np.ndarray]] = {}
    bn_layers = []
    for layer in model.layers:
        current = layer.get_weights()
        if not current:
            continue
        rng = _layer_rng(seed, layer.name)
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta = _bn_affine(layer.name, rng, current[0].shape)
            weights[layer.name] = [gamma, beta, current[2], current[3]]
            bn_layers.append(layer)
        else:
            new = []
            for w in current:
                # Depthwise kernels are (kh, kw, channels, 1): fan-in kh*kw; others kh*kw*cin.
                is_depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
                fan_in = int(np.prod(w.shape[:2] if is_depthwise else w.shape[:-1]))
                new.append(rng.normal(0.0, np.sqrt(2.0 / fan_in), w.shape).astype(np.float32))
            weights[layer.name] = new
        layer.set_weights(weights[layer.name])
    probe = keras.Model(model.input, [layer.input for layer in bn_layers])
    inputs = probe(calibration, training=True)
    for layer, x in zip(bn_layers, inputs, strict=True):
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        mean = x.mean(axis=0).astype(np.float16).astype(np.float32)
        var = np.maximum(x.var(axis=0), 1e-3).astype(np.float16).astype(np.float32)
        weights[layer.name][2:] = [mean, var]
    _WEIGHTS_CACHE[key] = weights
    return weights


def set_weights_by_name(model: Any, weights: dict[str, list[np.ndarray]]) -> None:
    """Copy ``weights`` into every layer of ``model`` (recursing into sub-models) by name."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            set_weights_by_name(layer, weights)
        if layer.name in weights:
            layer.set_weights(weights[layer.name])


def build_mobilenet(
    flavour: str,
    *,
    size: int = SIZE,
    alpha: float = ALPHA,
    seed: int = BACKBONE_SEED,
    pooling: str | None = "avg",
    name: str | None = None,
    calibration: np.ndarray | None = None,
) -> Any:
    """A keras.applications MobileNetV2 (no top) of ``flavour`` with :func:`backbone_weights`.

    The same arguments give bit-identical weights in both flavours. Not frozen.
    """
    model = _applications_mobilenet(
        flavour, size, alpha, pooling, name or f"mobilenetv2_{alpha}_{size}"
    )
    set_weights_by_name(
        model, backbone_weights(size=size, alpha=alpha, seed=seed, calibration=calibration)
    )
    return model


def head_weights(
    n_features: int, n_classes: int, hidden: int = 0, seed: int = 1, bias: bool = True
) -> list[list[np.ndarray]]:
    """Glorot-uniform Dense weights for a head, ``[[kernel, bias?], ...]`` (hidden layer first)."""
    rng = np.random.default_rng([seed, 777])
    sizes = [n_features] + ([hidden] if hidden else []) + [n_classes]
    out = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        layer = [rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)]
        if bias:
            layer.append(rng.normal(0.0, 0.05, fan_out).astype(np.float32))
        out.append(layer)
    return out


def build_classifier(
    flavour: str,
    base: Any,
    n_classes: int,
    *,
    layout: str = "nested",
    dropout: bool = False,
    hidden: int = 0,
    dense_weights: list[list[np.ndarray]] | None = None,
    name: str = "classifier",
) -> Any:
    """Frozen ``base`` plus a head [Dropout?, Dense(hidden, relu)?, Dense(n_classes, softmax)].

    layout "nested": Functional, ``base`` used as one layer (``base(inp, training=False)``);
    "flat": ``Model(base.input, head(base.output))``; "sequential": ``Sequential([base, ...])``.
    """
    K = keras_module(flavour)
    base.trainable = False
    head = []
    if dropout:
        head.append(K.layers.Dropout(0.2, name="dropout"))
    if hidden:
        head.append(K.layers.Dense(hidden, activation="relu", name="dense_hidden"))
    head.append(K.layers.Dense(n_classes, activation="softmax", name="predictions"))
    shape = tuple(base.input.shape[1:])
    if layout == "nested":
        inp = K.Input(shape=shape, name=_MODEL_INPUT[flavour])
        x = base(inp, training=False)
        for layer in head:
            x = layer(x)
        model = K.Model(inp, x, name=name)
    elif layout == "flat":
        x = base.output
        for layer in head:
            x = layer(x)
        model = K.Model(base.input, x, name=name)
    elif layout == "sequential":
        model = K.Sequential(
            [K.Input(shape=shape, name=_MODEL_INPUT[flavour]), base, *head], name=name
        )
    else:
        raise ValueError(f"layout must be 'nested', 'flat' or 'sequential', not {layout!r}")
    if dense_weights is not None:
        dense = [layer for layer in head if isinstance(layer, K.layers.Dense)]
        for layer, w in zip(dense, dense_weights, strict=True):
            layer.set_weights(w)
    return model


def save_h5(model: Any, path: Path) -> None:
    """``model.save(path)`` in the HDF5 format, without the optimizer, quietly."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path), include_optimizer=False)


def write_labels(path: Path, labels: list[str]) -> Path:
    """Write ``<stem>.labels.txt`` beside ``path``, one label per line."""
    target = path.with_name(path.stem + ".labels.txt")
    target.write_text("".join(f"{label}\n" for label in labels))
    return target


# -- synthetic images ------------------------------------------------------------------------------


def _canvas(rng: np.random.Generator, size: int) -> np.ndarray:
    grey = rng.uniform(60, 200)
    img = np.full((size, size, 3), grey, np.float32) + rng.uniform(-20, 20, 3)
    return img + rng.normal(0, 8, img.shape)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _colour(rng: np.random.Generator, canvas_mean: float) -> np.ndarray:
    # A saturated colour that stands out from the grey background.
    c = rng.uniform(0, 255, 3)
    c[rng.integers(3)] = 255 if canvas_mean < 128 else 0
    return c


def gen_shapes(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """circle / square / triangle of random size, place and colour."""
    img = _canvas(rng, size)
    yy, xx = _grid(size)
    r = rng.uniform(0.18, 0.3) * size
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    if label == 0:
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif label == 1:
        mask = (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    else:
        top, bottom = cy - r, cy + r
        half = (yy - top) / (bottom - top) * r
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
    img[mask] = _colour(rng, img.mean())
    return img


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 30),
}


def gen_colours(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """A blob of one of four colours (brightness jittered) on a grey background."""
    img = _canvas(rng, size)
    yy, xx = _grid(size)
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    mask = (xx - cx) ** 2 / rng.uniform(0.6, 1.6) + (yy - cy) ** 2 <= r * r
    colour = np.array(list(COLOURS.values())[label], np.float32) * rng.uniform(0.75, 1.1)
    img[mask] = colour + rng.normal(0, 10, 3)
    return img


def gen_count(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """1, 2 or 3 dark dots that do not overlap."""
    img = _canvas(rng, size)
    yy, xx = _grid(size)
    r = rng.uniform(0.08, 0.12) * size
    centres: list[np.ndarray] = []
    while len(centres) < label + 1:
        c = rng.uniform(r + 1, size - r - 1, 2)
        if all(np.hypot(*(c - d)) > 2.3 * r for d in centres):
            centres.append(c)
    dot = rng.uniform(0, 40, 3)
    for cx, cy in centres:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = dot
    return img


def gen_stripes(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Horizontal or vertical stripes of random period, phase and colours."""
    yy, xx = _grid(size)
    axis = yy if label == 0 else xx
    period = rng.uniform(8, 20)
    wave = (np.sin(2 * np.pi * axis / period + rng.uniform(0, 2 * np.pi)) > 0)[..., None]
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    b = np.where(np.abs(a - b).max() < 80, 255 - a, b)
    img = np.where(wave, a, b).astype(np.float32)
    return img + rng.normal(0, 8, img.shape)


@dataclass(frozen=True)
class Task:
    stem: str
    labels: tuple[str, ...]
    generate: Any
    flavour: str
    layout: str = "nested"
    hidden: int = 0
    dropout: bool = False


TASKS = (
    Task("shapes", ("circle", "square", "triangle"), gen_shapes, "k3", hidden=32, dropout=True),
    Task("colours", ("red", "green", "blue", "yellow"), gen_colours, "k2"),
    Task("count", ("one", "two", "three"), gen_count, "k3", layout="sequential"),
    Task("stripes", ("horizontal", "vertical"), gen_stripes, "k2"),
)


def make_images(
    task: Task, per_class: int, seed: int, size: int = SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` uint8 RGB images per label (interleaved by class) and their label indices."""
    rng = np.random.default_rng([seed, zlib.crc32(task.stem.encode())])
    images, labels = [], []
    for _ in range(per_class):
        for label in range(len(task.labels)):
            images.append(np.clip(task.generate(label, rng, size), 0, 255).round().astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.array(labels)


def preprocess(images: np.ndarray) -> np.ndarray:
    """MobileNetV2 preprocessing, applied outside the model: 0..255 -> [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


# -- training -------------------------------------------------------------------------------------


def train_head(
    features: np.ndarray, labels: np.ndarray, task: Task, epochs: int, seed: int
) -> tuple[list[list[np.ndarray]], float]:
    """Train the head on precomputed features with Keras 3; return Dense weights, train accuracy.

    Features are standardised for training, and the standardisation is folded into the first
    Dense layer afterwards, so the saved head takes raw backbone features.
    """
    import keras

    keras.utils.set_random_seed(seed)
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    std = np.maximum(std, 0.05 * float(np.median(std)) + 1e-6)
    n_classes = len(task.labels)
    inp = keras.Input(shape=(features.shape[1],))
    x = keras.layers.Dropout(0.2, seed=seed)(inp) if task.dropout else inp
    dense = []
    if task.hidden:
        dense.append(keras.layers.Dense(task.hidden, activation="relu"))
        x = dense[-1](x)
    dense.append(keras.layers.Dense(n_classes, activation="softmax"))
    model = keras.Model(inp, dense[-1](x))
    init = head_weights(features.shape[1], n_classes, task.hidden, seed=seed)
    for layer, w in zip(dense, init, strict=True):
        layer.set_weights(w)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    standardised = ((features - mean) / std).astype(np.float32)
    model.fit(standardised, labels, epochs=epochs, batch_size=32, shuffle=False, verbose=0)
    trained = [layer.get_weights() for layer in dense]
    kernel, bias = trained[0]
    trained[0] = [_f32(kernel / std[:, None]), _f32(bias - (mean / std) @ kernel)]
    accuracy = float((head_predict(features, trained).argmax(axis=1) == labels).mean())
    return trained, accuracy


def head_predict(features: np.ndarray, dense: list[list[np.ndarray]]) -> np.ndarray:
    """Logits of a Dense head (ReLU between layers) in numpy float64."""
    x = features.astype(np.float64)
    for i, (kernel, bias) in enumerate(dense):
        x = x @ kernel + bias
        if i < len(dense) - 1:
            x = np.maximum(x, 0)
    return x


def build_zoo(
    out: Path, *, per_class: int = 100, held_out: int = 40, epochs: int = 30, seed: int = 0
) -> list[dict]:
    """Write the zoo into ``out``; return one summary row per classifier."""
    import json

    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # Calibrate the backbone's BatchNorm statistics on a mix of generic and task images.
    calibration = [synthetic_batch(SIZE, BACKBONE_SEED, n=16)]
    for task in TASKS:
        calibration.append(preprocess(make_images(task, 4, seed + 1000)[0]))
    calibration = np.concatenate(calibration)
    extractor = build_mobilenet("k3", seed=BACKBONE_SEED, calibration=calibration)
    print(
        f"backbone: MobileNetV2 alpha {ALPHA}, {SIZE}x{SIZE}, seed {BACKBONE_SEED} "
        f"({time.perf_counter() - started:.1f} s)"
    )

    rows = []
    samples = out / "demo-images"
    samples.mkdir(exist_ok=True)
    expected = {}
    for task in TASKS:
        t0 = time.perf_counter()
        images, labels = make_images(task, per_class, seed)
        features = np.asarray(extractor.predict(preprocess(images), batch_size=100, verbose=0))
        trained, accuracy = train_head(features, labels, task, epochs, seed)
        test_images, test_labels = make_images(task, held_out, seed + 1)
        test = np.asarray(extractor.predict(preprocess(test_images), batch_size=100, verbose=0))
        predicted = head_predict(test, trained).argmax(axis=1)
        test_accuracy = float((predicted == test_labels).mean())

        base = build_mobilenet(task.flavour, seed=BACKBONE_SEED, calibration=calibration)
        model = build_classifier(
            task.flavour,
            base,
            len(task.labels),
            layout=task.layout,
            dropout=task.dropout,
            hidden=task.hidden,
            dense_weights=trained,
            name=task.stem,
        )
        path = out / f"{task.stem}.h5"
        save_h5(model, path)
        write_labels(path, list(task.labels))
        # One sample per label: the first held-out image the classifier gets right.
        for index, label in enumerate(task.labels):
            hits = np.flatnonzero((test_labels == index) & (predicted == index))
            image = test_images[hits[0] if hits.size else np.flatnonzero(test_labels == index)[0]]
            name = f"{task.stem}-{label}.png"
            Image.fromarray(image).save(samples / name)
            probs = np.asarray(model.predict(preprocess(image[None]), verbose=0))[0]
            expected[name] = {
                "model": path.name,
                "label": label,
                "predicted": task.labels[int(probs.argmax())],
                "probabilities": [round(float(p), 5) for p in probs],
            }
        rows.append(
            {
                "file": path.name,
                "flavour": task.flavour,
                "layout": task.layout,
                "classes": len(task.labels),
                "train_accuracy": accuracy,
                "held_out_accuracy": test_accuracy,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"{path.name}: train accuracy {accuracy:.3f} ({rows[-1]['seconds']:.1f} s)")
    (samples / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    write_photos(out / "demo-photos", seed + 2)
    return rows


def write_photos(folder: Path, seed: int, per_label: int = PHOTOS_PER_LABEL) -> None:
    """The "user's photos" that ``coreml-split update`` learns from: for each classifier, one
    sub-folder per label (as Create ML takes them) of images no head was trained on."""
    from PIL import Image

    for task in TASKS:
        images, labels = make_images(task, per_label, seed)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            target = folder / task.stem / task.labels[label]
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(target / f"{i // len(task.labels):02d}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the .h5 files into")
    parser.add_argument("--force", action="store_true", help="write even if .h5 files are there")
    parser.add_argument("--epochs", type=int, default=30, help="head training epochs (30)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported
    for logger in ("absl", "tensorflow"):  # "saving as HDF5 is legacy" and the like
        logging.getLogger(logger).setLevel(logging.ERROR)
    existing = [p for p in sorted(args.out.rglob("*")) if p.suffix in (".h5", ".hdf5")]
    if existing and not args.force:
        print(
            f"{args.out} already holds {len(existing)} Keras file(s) ({existing[0]}); "
            "refusing to overwrite without --force",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    rows = build_zoo(args.out, epochs=args.epochs)
    print()
    header = ("file", "flavour", "layout", "classes", "train acc", "held-out", "s")
    print("{:<14}{:<9}{:<12}{:>8}{:>11}{:>10}{:>7}".format(*header))
    for r in rows:
        print(
            f"{r['file']:<14}{r['flavour']:<9}{r['layout']:<12}{r['classes']:>8}"
            f"{r['train_accuracy']:>11.3f}{r['held_out_accuracy']:>10.3f}{r['seconds']:>7.1f}"
        )
    print(f"demo zoo written to {args.out} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
