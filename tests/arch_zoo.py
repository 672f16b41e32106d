"""Transfer classifiers on every keras.applications backbone, for the architecture sweep.

:func:`save_arch_classifier` writes ``<stem>.h5`` plus ``<stem>.labels.txt``: a frozen
keras.applications backbone (``include_top=False, weights=None, pooling="avg"``), nested as one
layer and called with ``training=False``, then ``Dense(n_classes, softmax)``. Offline and
deterministic:

- The input is the smallest the architecture accepts (:data:`MIN_SIZE`: 32, InceptionV3 75,
  Xception 71) unless ``size`` is given, so every build is as cheap as it can be.
- Backbone weights are a pure function of ``(arch, size, backbone_seed)``: kernels are He-normal
  and biases, BatchNorm gamma/beta and Normalization statistics small draws, each from its own
  stream keyed by the layer's *position* and the weight's index (Keras numbers unnamed layers
  from a global counter, so names are no key). BatchNorm moving statistics are then set to the
  batch statistics of each BatchNorm's input on :func:`images` (preprocessed as the family
  expects), measured in one training-mode pass, so activations stay near unit scale and every
  statistic matters; they are rounded to 11 significant bits so float noise cannot leak in.
  The weights are cached per process and serve both flavours (``"k3"`` Keras 3, ``"k2"``
  tf_keras), which list the same layers in the same order.
- The head is a Glorot draw from ``head_seed``, scaled so that its logits on :func:`images` have
  standard deviation 2: probabilities are neither uniform nor one-hot, so wrong numbers show.

:data:`FAMILIES` holds the family and preprocessing coreml-split should infer for each
architecture, and :func:`preprocess` that preprocessing in numpy, as keras.applications defines
it (the inverse direction of the Core ML image input).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from factory import keras_module

ARCHS = [
    "MobileNet",
    "MobileNetV2",
    "MobileNetV3Small",
    "MobileNetV3Large",
    "ResNet50",
    "ResNet50V2",
    "EfficientNetB0",
    "EfficientNetV2B0",
    "DenseNet121",
    "InceptionV3",
    "Xception",
    "VGG16",
    "NASNetMobile",
    "ConvNeXtTiny",
]

# Smallest input side keras.applications accepts with include_top=False (measured: one pixel
# less raises "Input size must be at least ...").
MIN_SIZE = {arch: 32 for arch in ARCHS} | {"InceptionV3": 75, "Xception": 71}

# arch -> (family that convert.read.families should detect, preprocessing it should choose).
# MobileNetV3, EfficientNet(V2) and ConvNeXt rescale inside the model (Rescaling/Normalization
# layers), so they take 0-255 pixels: "raw".
FAMILIES: dict[str, tuple[str, str]] = {
    "MobileNet": ("MobileNet", "tf"),
    "MobileNetV2": ("MobileNetV2", "tf"),
    "MobileNetV3Small": ("MobileNetV3", "raw"),
    "MobileNetV3Large": ("MobileNetV3", "raw"),
    "ResNet50": ("ResNet", "caffe"),
    "ResNet50V2": ("ResNetV2", "tf"),
    "EfficientNetB0": ("EfficientNet", "raw"),
    "EfficientNetV2B0": ("EfficientNetV2", "raw"),
    "DenseNet121": ("DenseNet", "torch"),
    "InceptionV3": ("InceptionV3", "tf"),
    "Xception": ("Xception", "tf"),
    "VGG16": ("VGG", "caffe"),
    "NASNetMobile": ("NASNet", "tf"),
    "ConvNeXtTiny": ("ConvNeXt", "raw"),
}

CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)

_WEIGHTS: dict[tuple[str, int, int], list[list[np.ndarray]]] = {}
_FEATURES: dict[tuple[str, int, int], np.ndarray] = {}
BUILD_SECONDS: dict[tuple[str, int, int], float] = {}  # first build of each backbone


def preprocess(pixels: np.ndarray, mode: str) -> np.ndarray:
    """keras.applications preprocessing of 0-255 RGB pixels (..., H, W, 3), float32."""
    x = np.asarray(pixels, np.float32)
    if mode == "tf":
        return x / np.float32(127.5) - np.float32(1.0)
    if mode == "caffe":
        return x[..., ::-1] - CAFFE_MEAN_BGR
    if mode == "torch":
        return (x / np.float32(255.0) - TORCH_MEAN) / TORCH_STD
    if mode == "raw":
        return x
    raise ValueError(f"unknown preprocessing {mode!r}")


def images(size: int, n: int = 8, seed: int = 0) -> np.ndarray:
    """``n`` deterministic uint8 RGB images (n, size, size, 3): a coarse colour field, a disc
    and noise, so that every channel and region varies."""
    rng = np.random.default_rng([seed, size, 4242])
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        coarse = rng.uniform(0, 255, (4, 4, 3))
        img = np.kron(coarse, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img = img + rng.normal(0, 12, img.shape)
        out[i] = np.clip(img, 0, 255).round().astype(np.uint8)
    return out


def application(flavour: str, arch: str, size: int) -> Any:
    """keras.applications ``arch`` (no top, weights=None, average pooling) at ``size``."""
    K = keras_module(flavour)
    return getattr(K.applications, arch)(
        include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3)
    )


def _weight_kind(variable: Any) -> str:
    """``kernel``, ``gamma``, ``moving_mean``... (tf_keras: ``conv1/kernel:0``)."""
    return variable.name.split("/")[-1].split(":")[0]


def _draw(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if kind.endswith("kernel") and len(shape) >= 2:
        # Depthwise kernels (kh, kw, cin, multiplier): fan-in kh*kw; the rest prod(shape[:-1]).
        fan_in = int(np.prod(shape[:2] if kind == "depthwise_kernel" else shape[:-1]))
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    if kind == "gamma":
        return rng.uniform(0.5, 1.0, shape)
    if kind in ("beta", "bias"):
        return rng.normal(0.1, 0.1, shape)
    if kind == "mean":  # Normalization after Rescaling(1/255): pixel means in [0, 1]
        return rng.uniform(0.4, 0.6, shape)
    if kind == "variance":
        return rng.uniform(0.04, 0.09, shape)
    return None  # moving statistics (calibrated below), counts: keep what Keras built


def _round(x: np.ndarray, bits: int = 11) -> np.ndarray:
    mantissa, exponent = np.frexp(np.asarray(x, np.float64))
    return np.ldexp(np.round(mantissa * 2**bits) / 2**bits, exponent).astype(np.float32)


def _set_weights(layer: Any, values: list[np.ndarray]) -> None:
    """``set_weights``; Keras 3's Normalization then needs ``finalize_state`` to use them (it
    computes with tensors taken from its variables, as loading from a file does)."""
    layer.set_weights(values)
    if hasattr(layer, "finalize_state") and type(layer).__name__ == "Normalization":
        layer.finalize_state()


def backbone_weights(arch: str, size: int, seed: int = 0) -> list[list[np.ndarray]]:
    """Per layer of ``application(arch)`` (in ``model.layers`` order), its weights."""
    key = (arch, size, seed)
    if key in _WEIGHTS:
        return _WEIGHTS[key]
    import keras

    started = time.perf_counter()
    model = application("k3", arch, size)
    weights: list[list[np.ndarray]] = []
    batchnorms: list[tuple[int, Any]] = []
    for index, layer in enumerate(model.layers):
        current = [np.asarray(w) for w in layer.get_weights()]
        kinds = [_weight_kind(v) for v in layer.weights]
        new = []
        for j, (kind, value) in enumerate(zip(kinds, current, strict=True)):
            drawn = _draw(kind, value.shape, np.random.default_rng([seed, index, j]))
            new.append(value if drawn is None else drawn.astype(np.float32))
        if new:
            _set_weights(layer, new)
        weights.append(new)
        if isinstance(layer, keras.layers.BatchNormalization):
            batchnorms.append((index, layer))
    pixels = images(size, n=16, seed=seed + 1)
    x = preprocess(pixels, FAMILIES[arch][1])
    if batchnorms:
        probe = keras.Model(model.input, [layer.input for _, layer in batchnorms])
        seen = probe(x, training=True)
        seen = seen if isinstance(seen, (list, tuple)) else [seen]
        for (index, layer), value in zip(batchnorms, seen, strict=True):
            value = np.asarray(value, np.float64).reshape(-1, value.shape[-1])
            kinds = [_weight_kind(v) for v in layer.weights]
            stats = {
                "moving_mean": value.mean(axis=0),
                "moving_variance": np.maximum(value.var(axis=0), 1e-3),
            }
            for j, kind in enumerate(kinds):
                if kind in stats:
                    weights[index][j] = _round(stats[kind])
            _set_weights(layer, weights[index])
    _FEATURES[key] = np.asarray(model(x, training=False), np.float64)
    _WEIGHTS[key] = weights
    BUILD_SECONDS[key] = time.perf_counter() - started
    del model
    keras.backend.clear_session()
    return weights


def build_backbone(flavour: str, arch: str, size: int, seed: int = 0) -> Any:
    """``application(arch)`` of ``flavour`` with :func:`backbone_weights`. Not frozen.

    The weighted layers are matched in order: tf_keras adds weightless TFOpLambda layers where
    Keras 3 records operations (MobileNetV3), but both list the weighted layers alike."""
    weights = [w for w in backbone_weights(arch, size, seed) if w]
    model = application(flavour, arch, size)
    layers = [layer for layer in model.layers if layer.weights]
    shapes = [[tuple(v.shape) for v in layer.weights] for layer in layers]
    if shapes != [[w.shape for w in values] for values in weights]:
        raise ValueError(f"{arch} ({flavour}): the weighted layers differ from Keras 3's")
    for layer, values in zip(layers, weights, strict=True):
        _set_weights(layer, values)
    return model


def head_weights(
    arch: str, size: int, backbone_seed: int, n_classes: int, seed: int
) -> list[np.ndarray]:
    """Dense kernel and bias: Glorot from ``seed``, scaled so logits on :func:`images` have
    standard deviation 2."""
    features = _FEATURES[(arch, size, backbone_seed)]
    n_features = features.shape[1]
    rng = np.random.default_rng([seed, 777])
    limit = np.sqrt(6.0 / (n_features + n_classes))
    kernel = rng.uniform(-limit, limit, (n_features, n_classes))
    bias = rng.normal(0.0, 0.1, n_classes)
    logits = features @ kernel
    spread = float(np.std(logits - logits.mean(axis=0)))
    kernel *= 2.0 / max(spread, 1e-6)
    return [kernel.astype(np.float32), bias.astype(np.float32)]


def labels(n_classes: int) -> list[str]:
    return [f"class_{chr(97 + i)}" if i < 26 else f"class_{i}" for i in range(n_classes)]


def save_arch_classifier(
    path: str | Path,
    arch: str,
    flavour: str = "k3",
    n_classes: int = 3,
    head_seed: int = 1,
    backbone_seed: int = 0,
    size: int | None = None,
) -> Path:
    """Write ``path`` (frozen ``arch`` nested in a Functional model, then Dense softmax) and
    ``<stem>.labels.txt``. Same ``arch``, ``size`` and ``backbone_seed``: bit-identical backbone
    weights, whatever the flavour or head."""
    import warnings

    path = Path(path)
    size = size or MIN_SIZE[arch]
    K = keras_module(flavour)
    base = build_backbone(flavour, arch, size, backbone_seed)
    base.trainable = False
    inp = K.Input(shape=(size, size, 3), name="image_input")
    dense = K.layers.Dense(n_classes, activation="softmax", name="predictions")
    model = K.Model(inp, dense(base(inp, training=False)), name=f"{arch.lower()}_classifier")
    dense.set_weights(head_weights(arch, size, backbone_seed, n_classes, head_seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path), include_optimizer=False)
    path.with_name(path.stem + ".labels.txt").write_text(
        "".join(f"{label}\n" for label in labels(n_classes))
    )
    del model, base
    K.backend.clear_session()
    return path


def load_classifier(path: str | Path) -> Any:
    """Load a saved classifier with the Keras that wrote it, as coreml-split does (including its
    repair of Keras 3 files that Keras 3 cannot reload, see convert/check/keras_model.py)."""
    from convert.check.keras_model import load_keras_model
    from convert.read.h5 import read_model

    return load_keras_model(read_model(path, with_digests=False))


def keras_probabilities(path: str | Path, pixels: np.ndarray, mode: str) -> np.ndarray:
    """The saved classifier's probabilities for 0-255 ``pixels``, preprocessed as ``mode``."""
    model = load_classifier(path)
    try:
        return np.asarray(model(preprocess(pixels, mode), training=False), np.float64)
    finally:
        del model
