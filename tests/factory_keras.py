"""Small Keras ``.h5`` files whose ``model_config`` is edited afterwards with h5py: files that
name code outside Keras (tests/test_untrusted.py), and files in the shape older Kerases wrote
(tests/test_resaved.py). Every model here is tiny (16x16 input, a few hundred weights), so
saving one takes a fraction of a second once Keras is imported.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import factory
import numpy as np

SIZE = 16
CANARY_MODULE = "coreml_split_canary_xyz"


# -- editing a saved file ------------------------------------------------------------------------


def model_config(path: str | Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as f:
        raw = f.attrs["model_config"]
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def edit_model_config(
    src: str | Path, dst: str | Path, edit: Callable[[dict[str, Any]], None], **attrs: str
) -> Path:
    """Copy ``src`` to ``dst``, apply ``edit`` to its parsed model_config in place and write it
    back; ``attrs`` sets other root attributes (``keras_version="3.7.0"``)."""
    import h5py

    dst = Path(dst)
    shutil.copyfile(src, dst)
    config = model_config(dst)
    edit(config)
    with h5py.File(dst, "r+") as f:
        f.attrs["model_config"] = json.dumps(config).encode("utf-8")
        for key, value in attrs.items():
            f.attrs[key] = value
    return dst


def layer_entry(config: dict[str, Any], *path: str) -> dict[str, Any]:
    """The layer entry at ``path`` (names from the top model down) in a model_config."""
    entry = config
    for name in path:
        entry = next(
            e
            for e in entry["config"]["layers"]
            if e.get("name", e.get("config", {}).get("name")) == name
        )
    return entry


def entries(value: Any) -> list[dict[str, Any]]:
    """Every dict with a ``class_name`` in a config, at any depth."""
    found: list[dict[str, Any]] = []
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            if "class_name" in item:
                found.append(item)
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return found


# -- tiny classifiers ------------------------------------------------------------------------------


def _set_weights(model: Any, seed: int) -> None:
    """Deterministic weights, BatchNorm variances positive."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        shape = tuple(int(d) for d in weight.shape)
        name = weight.name.split("/")[-1].split(":")[0]
        if name == "moving_variance":
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("gamma",):
            value = rng.uniform(0.8, 1.2, shape)
        else:
            value = rng.normal(0, 0.3, shape)
        weight.assign(value.astype(np.float32))


def save_tiny_classifier(
    path: str | Path, flavour: str = "k3", n_classes: int = 3, seed: int = 0, norm: bool = False
) -> Path:
    """Functional: Conv2D(4) -> BatchNorm -> ReLU -> GAP -> [LayerNormalization] -> Dense,
    saved by ``flavour``'s Keras (k2: tf_keras, k3: keras 3) with ``labels.txt``-free labels
    ``<stem>.labels.txt``. ``norm=True`` adds a LayerNormalization, which coreml-split does not
    build from the weights: the model then goes through Keras and ct.convert when converted."""
    K = factory.keras_module(flavour)
    path = Path(path)
    inp = K.Input((SIZE, SIZE, 3), name="pixels")
    x = K.layers.Conv2D(4, 3, name="conv")(inp)
    x = K.layers.BatchNormalization(name="bn")(x)
    x = K.layers.ReLU(name="relu")(x)
    x = K.layers.GlobalAveragePooling2D(name="gap")(x)
    if norm:
        x = K.layers.LayerNormalization(name="norm")(x)
    out = K.layers.Dense(n_classes, activation="softmax", name="dense")(x)
    model = K.Model(inp, out, name="tiny")
    _set_weights(model, seed)
    factory.zoo.save_h5(model, path)
    factory.zoo.write_labels(path, factory.default_labels(n_classes))
    return path


def save_tm_like_k3(folder: str | Path, n_classes: int = 2, seed: int = 0) -> Path:
    """What Keras 3.15 writes for a Teachable Machine-like model: ``folder/keras_model.h5`` and
    ``labels.txt``. ``Sequential "sequential_4" [Sequential "sequential_1" [Functional "model1"
    (a tiny stand-in for MobileNetV2: Conv1, bn_Conv1, Conv1_relu), GlobalAveragePooling2D],
    Sequential "sequential_3" [InputLayer, Dense(5, relu), Dense(n, softmax, no bias)]]``."""
    import keras as K

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inp = K.Input((SIZE, SIZE, 3), name="input_1")
    x = K.layers.Conv2D(4, 3, name="Conv1")(inp)
    x = K.layers.BatchNormalization(name="bn_Conv1")(x)
    x = K.layers.ReLU(6.0, name="Conv1_relu")(x)
    submodel = K.Model(inp, x, name="model1")
    features = K.Sequential(
        [submodel, K.layers.GlobalAveragePooling2D(name="global_average_pooling2d_1")],
        name="sequential_1",
    )
    head = K.Sequential(
        [
            K.Input((4,), name="dense_Dense1_input"),
            K.layers.Dense(5, activation="relu", name="dense_Dense1"),
            K.layers.Dense(n_classes, activation="softmax", use_bias=False, name="dense_Dense2"),
        ],
        name="sequential_3",
    )
    model = K.Sequential(
        [K.Input((SIZE, SIZE, 3), name="sequential_1_input"), features, head],
        name="sequential_4",
    )
    _set_weights(model, seed)
    path = folder / "keras_model.h5"
    factory.zoo.save_h5(model, path)
    (folder / "labels.txt").write_text("".join(f"{i} Class {i + 1}\n" for i in range(n_classes)))
    return path


def as_keras_3_7(src: str | Path, dst: str | Path) -> Path:
    """Rewrite a Keras 3.15 file into what Keras 3.7 wrote for the same model (read from the
    v3.7.0 sources; Keras 3.7 is not installable here):

    - every Functional's single input and output as a list of one tensor reference,
      ``[["input_1", 0, 0]]`` (3.0-3.10's ``Functional.get_config`` wrapped a lone KerasTensor;
      3.11 stopped, keras-team/keras#21341), where 3.15 writes ``["input_1", 0, 0]``;
    - InputLayer configs with ``batch_shape``, ``dtype``, ``sparse``, ``name`` only (no
      ``ragged``, ``optional``); Dense without ``quantization_config``; initializers with
      ``seed`` only (no ``input_axes``/``output_axes``);
    - ``keras_version`` "3.7.0".

    The weights are untouched. Keras 3.15 cannot load the result (see test_resaved.py)."""

    def edit(config: dict[str, Any]) -> None:
        for entry in entries(config):
            inner = entry.get("config")
            if not isinstance(inner, dict):
                continue
            cls = entry["class_name"]
            if cls in ("Functional", "Model"):
                for key in ("input_layers", "output_layers"):
                    refs = inner[key]
                    if isinstance(refs[0], str):
                        inner[key] = [refs]
            elif cls == "InputLayer":
                for key in ("ragged", "optional"):
                    inner.pop(key, None)
            elif cls == "Dense":
                inner.pop("quantization_config", None)
            elif entry.get("module") == "keras.initializers":
                for key in ("input_axes", "output_axes"):
                    inner.pop(key, None)

    return edit_model_config(src, dst, edit, keras_version="3.7.0")


# -- code a file may name ------------------------------------------------------------------------


def write_canary_module(folder: str | Path, marker: str | Path) -> str:
    """``folder/coreml_split_canary_xyz.py``, which writes ``marker`` when it is imported and
    defines a ``system`` class and function. Returns the module name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{CANARY_MODULE}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "class system:\n"
        "    @classmethod\n"
        "    def from_config(cls, config):\n"
        f"        Path({str(marker)!r}).write_text('instantiated')\n"
        "        return cls()\n"
        "    def __call__(self, *args, **kwargs):\n"
        f"        Path({str(marker)!r}).write_text('called')\n"
    )
    return CANARY_MODULE


def lambda_function_config(marker: str | Path) -> list[Any]:
    """A tf_keras Lambda ``function`` entry: marshalled bytecode that writes ``marker`` when
    the function runs (Keras calls it while rebuilding the model)."""
    from tf_keras.src.utils import generic_utils

    target = str(marker)

    def evil(x):
        from pathlib import Path

        Path(target).write_text("ran")
        return x

    return list(generic_utils.func_dump(evil))


def resave_with_custom_depthwise(src: str | Path, dst: str | Path) -> Path:
    """What a common patch does to load a Teachable Machine file in Keras 3: load ``src`` with
    a ``CustomDepthwiseConv2D`` (a DepthwiseConv2D that drops ``groups``) in the place of
    DepthwiseConv2D, and save it to ``dst`` (.h5 or .keras). The weights stay bit-identical;
    the file now names a class Keras does not have."""
    return resave_as_subclass(src, dst, "DepthwiseConv2D", "CustomDepthwiseConv2D")


def resave_as_subclass(src: str | Path, dst: str | Path, keras_class: str, name: str) -> Path:
    """``src`` loaded with a subclass ``name`` of Keras' ``keras_class`` in its place (one that
    drops a ``groups`` argument, as the Teachable Machine patch does), saved to ``dst``."""
    import keras as K

    base = getattr(K.layers, keras_class)

    def __init__(self: Any, **kwargs: Any) -> None:
        kwargs.pop("groups", None)
        base.__init__(self, **kwargs)

    subclass = type(name, (base,), {"__init__": __init__})
    model = K.models.load_model(src, compile=False, custom_objects={keras_class: subclass})
    dst = Path(dst)
    if dst.suffix == ".keras":
        model.save(dst)
    else:
        factory.zoo.save_h5(model, dst)
    return dst
