"""Deterministic builders of small Keras ``.h5`` files for tests.

Every builder is offline (``weights=None``) and takes a few seconds on 2 cores: the backbone is
a keras.applications MobileNetV2 with alpha 0.35 at 64x64 unless told otherwise.

The backbone's weights are a pure function of ``seed`` (and size, alpha), identical bit for bit
in the Keras 2 (``"k2"``, tf_keras) and Keras 3 (``"k3"``) flavour: they are drawn per layer
name, and copied layer by layer, which both flavours list in the same order. BatchNorm moving
statistics are calibrated on a synthetic batch (not the default 0/1), so a changed statistic
really changes the outputs. The builder lives in ``scripts/make_demo_zoo.py`` (scripts stay
standalone); this module loads it with importlib.

Well-formed classifiers:

- :func:`save_transfer_classifier`: frozen backbone + Dense head, in three layouts: ``nested``
  (the backbone model is one layer), ``flat`` (its layers inline) and ``sequential``; writes
  ``<stem>.labels.txt`` beside the ``.h5``.
- :func:`save_teachable_machine`: Teachable Machine's ``keras_model.h5`` layout (tf_keras),
  nested Sequentials around a Functional sub-model named ``model1``, ``model2``..., with a
  ``Conv1_pad`` + valid-conv stem, plus ``labels.txt`` with ``0 Name`` lines.
- :func:`perturb_bn_moving_mean`: a copy of a file with one BatchNorm statistic changed.

Bad inputs, one file each: :func:`write_not_hdf5`, :func:`write_truncated`,
:func:`write_weights_only`, :func:`write_no_image_input`, :func:`write_lambda` (Python code in
the file) and :func:`write_unconvertible` (loads in Keras, but coremltools cannot convert it).

Inputs take MobileNetV2-preprocessed tensors (``x / 127.5 - 1`` is applied outside the model).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_zoo.py"


def _load_zoo() -> Any:
    name = "_coreml_split_make_demo_zoo"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()
keras_module = zoo.keras_module
backbone_weights = zoo.backbone_weights
preprocess = zoo.preprocess

SIZE = 64
ALPHA = 0.35


def default_labels(n_classes: int) -> list[str]:
    """``class_a, class_b, ...`` (``class_26`` and on past z)."""
    return [f"class_{chr(97 + i)}" if i < 26 else f"class_{i}" for i in range(n_classes)]


def mobilenet_backbone(
    flavour: str,
    size: int = SIZE,
    alpha: float = ALPHA,
    seed: int = 0,
    name: str | None = None,
    pooling: str | None = "avg",
) -> Any:
    """A keras.applications MobileNetV2 (include_top=False, weights=None) of ``flavour``.

    Weights depend on ``seed`` only and are bit-identical across flavours. Not frozen.
    """
    return zoo.build_mobilenet(
        flavour, size=size, alpha=alpha, seed=seed, pooling=pooling, name=name
    )


def save_transfer_classifier(
    path: str | Path,
    flavour: str = "k3",
    n_classes: int = 3,
    head_seed: int = 1,
    backbone_seed: int = 0,
    size: int = SIZE,
    layout: str = "nested",
    dropout: bool = False,
    hidden: int = 0,
    labels: bool | list[str] = True,
) -> Path:
    """Frozen MobileNetV2 + [Dropout?, Dense(hidden, relu)?, Dense(n_classes, softmax)].

    layout "nested": ``base(inp, training=False)`` in a Functional model; "flat": the backbone's
    layers inline; "sequential": ``Sequential([base, ...])``. Saved with ``model.save`` as HDF5
    by the flavour's Keras, or, for a ``.keras`` path, as Keras 3's native archive.
    ``labels=True`` writes ``<stem>.labels.txt`` (class_a, ...); a list writes those labels.
    """
    path = Path(path)
    base = mobilenet_backbone(flavour, size=size, seed=backbone_seed)
    dense = zoo.head_weights(int(base.output.shape[-1]), n_classes, hidden, seed=head_seed)
    model = zoo.build_classifier(
        flavour,
        base,
        n_classes,
        layout=layout,
        dropout=dropout,
        hidden=hidden,
        dense_weights=dense,
        name=f"{layout}_classifier",
    )
    if path.suffix == ".keras":
        model.save(path)
    else:
        zoo.save_h5(model, path)
    if labels:
        names = default_labels(n_classes) if labels is True else list(labels)
        if len(names) != n_classes:
            raise ValueError(f"{len(names)} labels for {n_classes} classes")
        zoo.write_labels(path, names)
    return path


def _tm_submodel(name: str, size: int, seed: int) -> Any:
    """MobileNetV2 alpha 0.35 up to out_relu, with Teachable Machine's stem: Conv1_pad (0,1)
    zero padding and a valid Conv1, as the older keras_applications code built it."""
    import tf_keras

    base = zoo._applications_mobilenet("k2", size, 0.35, None, name)
    config = base.get_config()
    layers = config["layers"]
    stem = next(i for i, layer in enumerate(layers) if layer["name"] == "Conv1")
    conv = layers[stem]
    source = conv["inbound_nodes"][0][0][0]
    conv["config"]["padding"] = "valid"
    conv["inbound_nodes"] = [[["Conv1_pad", 0, 0, {}]]]
    layers.insert(
        stem,
        {
            "class_name": "ZeroPadding2D",
            "name": "Conv1_pad",
            "config": {
                "name": "Conv1_pad",
                "trainable": True,
                "dtype": "float32",
                "padding": ((0, 1), (0, 1)),
                "data_format": "channels_last",
            },
            "inbound_nodes": [[[source, 0, 0, {}]]],
        },
    )
    model = tf_keras.Model.from_config(config)
    zoo.set_weights_by_name(model, backbone_weights(size=size, alpha=0.35, seed=seed))
    return model


def save_teachable_machine(
    folder: str | Path,
    n_classes: int = 2,
    submodel_name: str = "model1",
    head_seed: int = 1,
    backbone_seed: int = 0,
    size: int = SIZE,
    labels: list[str] | None = None,
) -> Path:
    """Teachable Machine's export, written by tf_keras: ``folder/keras_model.h5`` and
    ``folder/labels.txt`` (``0 Class 1`` lines).

    ``Sequential "sequential_4" [Sequential "sequential_1" [<Functional submodel_name>,
    GlobalAveragePooling2D], Sequential "sequential_3" [Dense(100, relu), Dense(n, softmax,
    no bias)]]``. Every layer stays trainable, as in Teachable Machine's files. The backbone
    weights depend on ``backbone_seed`` alone, not on ``submodel_name``.
    """
    import tf_keras

    K = tf_keras
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    submodel = _tm_submodel(submodel_name, size, backbone_seed)
    features = K.Sequential(
        [
            submodel,
            K.layers.GlobalAveragePooling2D(
                name="global_average_pooling2d_GlobalAveragePooling2D1"
            ),
        ],
        name="sequential_1",
    )
    hidden = K.layers.Dense(100, activation="relu", name="dense_Dense1")
    out = K.layers.Dense(n_classes, activation="softmax", use_bias=False, name="dense_Dense2")
    head = K.Sequential(
        [K.Input(shape=(1280,), name="dense_Dense1_input"), hidden, out], name="sequential_3"
    )
    model = K.Sequential(
        [K.Input(shape=(size, size, 3), name="sequential_1_input"), features, head],
        name="sequential_4",
    )
    (w1, b1), (w2, _) = zoo.head_weights(1280, n_classes, 100, seed=head_seed)
    hidden.set_weights([w1, b1])
    out.set_weights([w2])
    path = folder / "keras_model.h5"
    zoo.save_h5(model, path)
    names = labels or [f"Class {i + 1}" for i in range(n_classes)]
    (folder / "labels.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(names)))
    return path


def perturb_bn_moving_mean(
    src: str | Path, dst: str | Path, layer_substring: str = "block_3", delta: float = 0.5
) -> Path:
    """Copy ``src`` to ``dst`` and add ``delta`` to element 0 of one BatchNorm moving_mean.

    The dataset changed is the first, in h5py's (alphabetical) visit order under
    ``model_weights``, whose path contains ``layer_substring`` and ends in ``moving_mean``
    (``moving_mean:0`` in Keras 2 files). An h5py-level edit: the file stays loadable.
    """
    import h5py

    src, dst = Path(src), Path(dst)
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        root = f["model_weights"] if "model_weights" in f else f
        found: list[str] = []

        def visit(name: str, obj: Any) -> None:
            leaf = name.rsplit("/", 1)[-1]
            if isinstance(obj, h5py.Dataset) and layer_substring in name:
                if leaf.split(":")[0] == "moving_mean":
                    found.append(name)

        root.visititems(visit)
        if not found:
            raise ValueError(f"{src}: no moving_mean dataset under a path with {layer_substring!r}")
        data = root[found[0]]
        values = data[()]
        values.flat[0] += np.float32(delta)
        data[...] = values
    return dst


# -- bad inputs ----------------------------------------------------------------------------------


def write_not_hdf5(path: str | Path) -> Path:
    """A text file named like a model."""
    path = Path(path)
    path.write_text("This is not an HDF5 file, just text with a .h5 name.\n")
    return path


def write_truncated(path: str | Path, src: str | Path) -> Path:
    """The first half of the bytes of a real ``.h5``."""
    path = Path(path)
    data = Path(src).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_weights_only(path: str | Path, flavour: str = "k2") -> Path:
    """``model.save_weights`` of a nested transfer classifier, without any model_config.

    - k2 (tf_keras): a Keras 2 weights file at ``path``: root attrs ``keras_version`` (2.x),
      ``backend`` and ``layer_names``, one group per layer (``<layer>/<weight>:0`` datasets).
    - k3 (Keras 3): ``save_weights`` insists on a name ending in ``.weights.h5`` and writes the
      new layout: no root attributes, groups ``layers/<layer>/vars/<i>`` and ``vars``. It is
      written under such a name and then moved to ``path`` (which may be any name).
    """
    path = Path(path)
    base = mobilenet_backbone(flavour)
    dense = zoo.head_weights(int(base.output.shape[-1]), 3, 0, seed=1)
    model = zoo.build_classifier(flavour, base, 3, dense_weights=dense)
    if flavour == "k2":
        model.save_weights(str(path))
        return path
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model.weights.h5"
        model.save_weights(str(target))
        shutil.move(target, path)
    return path


def write_no_image_input(path: str | Path, flavour: str = "k3") -> Path:
    """A small classifier on a 16-vector input: Dense(8, relu) -> Dense(3, softmax)."""
    K = keras_module(flavour)
    path = Path(path)
    inp = K.Input(shape=(16,), name="features")
    x = K.layers.Dense(8, activation="relu", name="dense")(inp)
    out = K.layers.Dense(3, activation="softmax", name="predictions")(x)
    model = K.Model(inp, out, name="vector_classifier")
    rng = np.random.default_rng(3)
    for layer in model.layers[1:]:
        layer.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in layer.weights])
    zoo.save_h5(model, path)
    return path


def write_lambda(path: str | Path, size: int = SIZE) -> Path:
    """tf_keras: Lambda(x / 127.5 - 1) before the shared backbone; loading it runs code."""
    import tf_keras as K

    path = Path(path)
    base = mobilenet_backbone("k2", size=size)
    base.trainable = False
    inp = K.Input(shape=(size, size, 3), name="input_2")
    x = K.layers.Lambda(lambda t: t / 127.5 - 1.0, name="preprocess")(inp)
    x = base(x, training=False)
    out = K.layers.Dense(3, activation="softmax", name="predictions")(x)
    model = K.Model(inp, out, name="lambda_classifier")
    model.get_layer("predictions").set_weights(zoo.head_weights(1280, 3, seed=1)[0])
    zoo.save_h5(model, path)
    return path


# Error texts seen from coremltools 9.0 (ct.convert, neuralnetwork, iOS13) for each flavour.
UNCONVERTIBLE_ERRORS = {
    "k3": "Conversion for TF op 'Bucketize' not implemented.",
    "k2": "Conversion for TF op 'Lgamma' not implemented.",
}


def write_unconvertible(
    path: str | Path, flavour: str = "k3", size: int = SIZE, n_classes: int = 3
) -> Path:
    """An image classifier that loads in its Keras without running code from the file, but that
    coremltools 9.0 cannot convert. The culprit sits in the head, after the shared backbone
    (backbone_seed 0): ``backbone -> X -> Dense(n_classes, softmax)``, where X is

    - k3: ``keras.layers.Discretization(bin_boundaries=[0.25, 0.5, 1.0])``, a built-in layer
      lowered to TF's ``Bucketize`` op;
    - k2: ``tf.math.lgamma(features + 1.0)``, two built-in ``TFOpLambda`` layers (the op is
      found by its API name, no bytecode is stored). Keras 3 refuses TFOpLambda, so this one
      loads in tf_keras only.

    ct.convert raises ``NotImplementedError`` with the text in :data:`UNCONVERTIBLE_ERRORS`.
    """
    K = keras_module(flavour)
    path = Path(path)
    base = mobilenet_backbone(flavour, size=size)
    base.trainable = False
    inp = K.Input(shape=(size, size, 3), name=zoo._MODEL_INPUT[flavour])
    x = base(inp, training=False)
    if flavour == "k3":
        x = K.layers.Discretization(bin_boundaries=[0.25, 0.5, 1.0], name="discretize")(x)
    else:
        import tensorflow as tf

        x = tf.math.lgamma(x + 1.0)
    out = K.layers.Dense(n_classes, activation="softmax", name="predictions")
    model = K.Model(inp, out(x), name="unconvertible_classifier")
    out.set_weights(zoo.head_weights(1280, n_classes, seed=1)[0])
    zoo.save_h5(model, path)
    return path


def save_tiny_lgamma_classifier(path: Path, head_seed: int) -> Path:
    """tf_keras: conv (fixed weights) -> lgamma -> pooling -> dense; 16x16 input, 2 classes.

    Two of these with different ``head_seed`` share a backbone that coremltools cannot convert
    (no Core ML op for lgamma); it fails in about a second.
    """
    import numpy as np
    import tensorflow as tf
    import tf_keras as K

    inp = K.Input((16, 16, 3), name="pixels")
    conv = K.layers.Conv2D(8, 3, name="conv", use_bias=False)
    x = tf.math.lgamma(conv(inp) + 2.0)
    x = K.layers.GlobalAveragePooling2D(name="gap")(x)
    dense = K.layers.Dense(2, activation="softmax", name="dense")
    model = K.Model(inp, dense(x))
    conv.set_weights([np.random.default_rng(0).normal(size=(3, 3, 3, 8)).astype("float32")])
    rng = np.random.default_rng(head_seed)
    dense.set_weights([rng.normal(size=(8, 2)).astype("float32"), np.zeros(2, "float32")])
    model.save(path)
    return path
