"""The bad-input corpus: files a user might hand coreml-split, each with the one line it must give.

Every case is made here, from two small good classifiers that Keras writes at the start (one by
Keras 3, one by tf_keras), by copying one of them and damaging the copy with h5py or with plain
byte edits: a missing weight, a flipped bit in the file's structure, a NaN, a config nested
400 models deep, labels that do not fit. No binary file is kept in the repository.

``python tests/corpus.py FOLDER`` writes the corpus into ``FOLDER`` (the good models included,
as ``good_k3.h5`` and ``good_k2.h5``) and prints each case with the error it expects, so that
anyone can hand it to ``coreml-split convert FOLDER``. ``tests/test_corpus.py`` does exactly
that and checks every line.

:data:`CASES` maps a case name to ``(base, make, expected)``: the good model it starts from,
the function that writes ``<name>.h5`` (and maybe labels) into the folder, and a part of the
``error: <file>: <reason>`` line it must give. ``file`` is the file the line names, when that
is not ``<name>.h5`` (a labels file).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 32
CLASSES = 3
GOOD = {"k3": "good_k3.h5", "k2": "good_k2.h5"}


# -- the two good models -------------------------------------------------------------------------


def write_good(folder: Path, flavour: str) -> Path:
    """A small image classifier: conv, BatchNorm, ReLU, depthwise conv, pooling, softmax.

    Its weights are drawn from a fixed seed; moving variances are positive, so nothing but a
    damaged copy holds a NaN."""
    from factory import keras_module, zoo

    K = keras_module(flavour)
    L = K.layers
    inp = K.Input(shape=(SIZE, SIZE, 3), name="image")
    x = L.Conv2D(8, 3, strides=2, padding="same", name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    out = L.Dense(CLASSES, activation="softmax", name="predictions")(x)
    model = K.Model(inp, out, name=f"small_{flavour}")
    rng = np.random.default_rng(7)
    for layer in model.layers:
        values = [rng.normal(0, 0.3, w.shape).astype(np.float32) for w in layer.weights]
        if layer.name == "bn":
            values[3] = np.abs(values[3]) + 0.5  # moving variance
        if values:
            layer.set_weights(values)
    path = folder / GOOD[flavour]
    zoo.save_h5(model, path)
    zoo.write_labels(path, [f"label_{i}" for i in range(CLASSES)])
    return path


# -- editing tools -------------------------------------------------------------------------------


def _config(path: Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as f:
        raw = f.attrs["model_config"]
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def _set_config(path: Path, config: Any) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        f.attrs["model_config"] = json.dumps(config) if not isinstance(config, str) else config


def _edit_config(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        config = _config(path)
        result = edit(config)
        _set_config(path, config if result is None else result)

    return make


def _layer(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in config["config"]["layers"] if e["config"]["name"] == name)


def _weights_group(f: Any, layer: str) -> Any:
    root = f["model_weights"] if "model_weights" in f else f
    return root[layer]


def datasets(group: Any) -> list[str]:
    """The paths of every dataset under an h5py group, relative to it."""
    import h5py

    found: list[str] = []

    def visit(name: str, obj: Any) -> None:  # h5py stops visiting when this returns a value
        if isinstance(obj, h5py.Dataset):
            found.append(name)

    group.visititems(visit)
    return found


def _edit_weight(layer: str, weight: str, edit: Callable[[Any, str], None]) -> Callable:
    """``edit(group, dataset_name)`` on the dataset of ``layer`` whose name ends in ``weight``."""

    def make(path: Path) -> None:
        import h5py

        with h5py.File(path, "r+") as f:
            group = _weights_group(f, layer)
            name = next(d for d in datasets(group) if d.split("/")[-1].split(":")[0] == weight)
            edit(group, name)

    return make


def _replace(values: Callable[[np.ndarray], np.ndarray]) -> Callable[[Any, str], None]:
    def edit(group: Any, name: str) -> None:
        new = values(np.asarray(group[name][()]))
        del group[name]
        group.create_dataset(name, data=new)

    return edit


def _poison(value: float) -> Callable[[Any, str], None]:
    def edit(group: Any, name: str) -> None:
        data = np.asarray(group[name][()])
        data.flat[1] = value
        group[name][...] = data

    return edit


def _bytes(edit: Callable[[bytearray], None]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        data = bytearray(path.read_bytes())
        edit(data)
        path.write_bytes(bytes(data))

    return make


def _flip_signature(signature: bytes, which: int) -> Callable[[bytearray], None]:
    """Flip one bit in the ``which``-th HDF5 structure signature (``TREE``, ``SNOD``, ``HEAP``):
    what a bad copy does to a file's internal structure."""

    def edit(data: bytearray) -> None:
        at, seen = -1, 0
        while True:
            at = data.find(signature, at + 1)
            if at < 0:
                raise ValueError(f"no signature {signature!r} number {which}")
            if seen == which:
                break
            seen += 1
        data[at + 1] ^= 0x04

    return edit


def _flip_weight_bytes(layer: str, weight: str) -> Callable[[Path], None]:
    """Overwrite one float of a weight in place with 0xFFFFFFFF, a NaN, as a bad copy would."""

    def make(path: Path) -> None:
        import h5py

        with h5py.File(path, "r") as f:
            group = _weights_group(f, layer)
            name = next(d for d in datasets(group) if d.split("/")[-1].split(":")[0] == weight)
            offset = group[name].id.get_offset()
        data = bytearray(path.read_bytes())
        data[offset + 4 : offset + 8] = b"\xff\xff\xff\xff"
        path.write_bytes(bytes(data))

    return make


def _nest(depth: int) -> Callable[[Path], None]:
    """The model wrapped in ``depth`` Sequentials (written as text: json itself recurses)."""

    def make(path: Path) -> None:
        inner = json.dumps(_config(path))
        head = "".join(
            f'{{"class_name": "Sequential", "config": {{"name": "wrap_{i}", "layers": ['
            for i in range(depth)
        )
        _set_config(path, head + inner + "]}}" * depth)

    return make


def _deep_value(depth: int) -> Callable[[Path], None]:
    """A config value nested ``depth`` lists deep, in one layer's config."""

    def make(path: Path) -> None:
        config = _config(path)
        _layer(config, "conv")["config"]["note"] = "DEEP"
        text = json.dumps(config).replace('"DEEP"', "[" * depth + "0" + "]" * depth)
        _set_config(path, text)

    return make


def _input_shape(shape: list[Any]) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        cfg = _layer(config, "image")["config"]
        key = "batch_shape" if "batch_shape" in cfg else "batch_input_shape"
        cfg[key] = shape

    return edit


def _rename_inbound(layer: str, new: str) -> Callable[[dict[str, Any]], None]:
    """Make ``layer`` read from ``new`` (a cycle when ``new`` comes after it)."""

    def edit(config: dict[str, Any]) -> None:
        text = json.dumps(_layer(config, layer)["inbound_nodes"])
        for old in ("image", "conv", "bn", "relu", "depthwise", "pool"):
            text = text.replace(f'"{old}"', f'"{new}"')
        _layer(config, layer)["inbound_nodes"] = json.loads(text)

    return edit


def _set(layer: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        _layer(config, layer)["config"][key] = value

    return edit


def _class(layer: str, class_name: str) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        _layer(config, layer)["class_name"] = class_name

    return edit


def _drop_input_shape(config: dict[str, Any]) -> None:
    cfg = _layer(config, "image")["config"]
    cfg.pop("batch_shape", None)
    cfg.pop("batch_input_shape", None)


def _labels(text: bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.with_name(path.stem + ".labels.txt").write_bytes(text)

    return make


def _weights_only(path: Path) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        del f.attrs["model_config"]


def _not_keras(path: Path) -> None:
    import h5py

    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("pixels", data=np.zeros((4, 4), np.float32))
        f.attrs["comment"] = "an HDF5 file, but not a model"


def _text(content: bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.write_bytes(content)

    return make


def _truncate(keep: Callable[[int], int]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: keep(len(data))])

    return make


# -- the cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    base: str  # "k3" or "k2": the good model the case starts from
    make: Callable[[Path], None]
    expected: str  # a part of the error line
    file: str | None = None  # the file the line names, when not the case's .h5 (its labels)


def _drop_weight(layer: str, weight: str) -> Callable[[Path], None]:
    return _edit_weight(layer, weight, lambda group, name: group.__delitem__(name))


CASES: dict[str, Case] = {
    # not a model at all
    "empty": Case("k3", _text(b""), "not a readable HDF5 file"),
    "text": Case("k3", _text(b"<html>404 Not Found</html>\n"), "not a readable HDF5 file"),
    "truncated_half": Case("k3", _truncate(lambda n: n // 2), "not a readable HDF5 file"),
    "truncated_end": Case("k2", _truncate(lambda n: n - 100), "not a readable HDF5 file"),
    "weights_only": Case("k2", _weights_only, "holds weights only"),
    "other_hdf5": Case("k3", _not_keras, "not a Keras model"),
    # a damaged structure or damaged values
    "flipped_group_node": Case("k3", _bytes(_flip_signature(b"SNOD", 3)), "damaged HDF5 file"),
    "flipped_btree": Case("k2", _bytes(_flip_signature(b"TREE", 2)), "damaged HDF5 file"),
    "weight_missing": Case("k3", _drop_weight("conv", "kernel"), "missing from the file"),
    "weight_missing_k2": Case("k2", _drop_weight("bn", "moving_variance"), "missing"),
    "weight_shape": Case(
        "k3",
        _edit_weight("predictions", "kernel", _replace(lambda v: v[:, :2])),
        "shape",
    ),
    "weight_nan": Case("k3", _edit_weight("conv", "kernel", _poison(np.nan)), "NaN or Inf"),
    "weight_inf": Case("k2", _edit_weight("predictions", "bias", _poison(np.inf)), "NaN or Inf"),
    "weight_nan_bytes": Case("k3", _flip_weight_bytes("depthwise", "kernel"), "NaN"),
    "weight_text": Case(
        "k3",
        _edit_weight("predictions", "bias", _replace(lambda v: np.array([b"x"] * len(v)))),
        "holds |S1",
    ),
    # a config that cannot be a model
    "config_not_json": Case("k3", lambda p: _set_config(p, "{'layers': [}"), "not valid JSON"),
    "config_a_list": Case("k3", lambda p: _set_config(p, "[1, 2, 3]"), "not an object"),
    "config_not_a_model": Case(
        "k3", _edit_config(lambda c: {"class_name": "Dense", "config": {}}), "not a Keras model"
    ),
    "cycle": Case("k3", _edit_config(_rename_inbound("conv", "pool")), "cycle"),
    "output_never_computed": Case(
        "k2",
        _edit_config(lambda c: c["config"].__setitem__("output_layers", [["ghost", 0, 0]])),
        "never computed",
    ),
    "input_without_shape": Case("k3", _edit_config(_drop_input_shape), "declares no shape"),
    "input_huge": Case("k3", _edit_config(_input_shape([None, 10**6, 10**6, 3])), "at most"),
    "input_rank": Case("k2", _edit_config(_input_shape([None] + [2] * 11)), "rank"),
    "input_negative": Case("k3", _edit_config(_input_shape([None, -32, 32, 3])), "shape"),
    "nested_100": Case("k3", _nest(100), "at most"),
    "nested_400": Case("k2", _nest(400), "at most"),
    "json_deep": Case("k3", _deep_value(5000), "at most"),
    "lambda": Case("k2", _edit_config(_class("relu", "Lambda")), "Lambda layer"),
    "unknown_layer": Case("k3", _edit_config(_class("relu", "FancyActivation")), "FancyActivation"),
    "wrong_units": Case("k3", _edit_config(_set("predictions", "units", 5)), "shape"),
    "not_an_image": Case("k3", _edit_config(_input_shape([None, 96])), "not an image"),
    # labels
    "labels_too_few": Case(
        "k3", _labels(b"cat\ndog\n"), "has 2 labels but", file="labels_too_few.labels.txt"
    ),
    "labels_empty": Case("k2", _labels(b"\n\n"), "labels file is empty", "labels_empty.labels.txt"),
    "labels_binary": Case(
        "k3", _labels(b"\xff\xfe\x00\x81garbage"), "cannot read labels", "labels_binary.labels.txt"
    ),
    "labels_duplicate": Case(
        "k3", _labels(b"cat\ncat\ndog\n"), "duplicate labels", "labels_duplicate.labels.txt"
    ),
}


def write_corpus(folder: Path) -> dict[str, Case]:
    """Write the good models and every case into ``folder``; returns :data:`CASES`."""
    folder.mkdir(parents=True, exist_ok=True)
    goods = {flavour: write_good(folder, flavour) for flavour in GOOD}
    for name, case in CASES.items():
        target = folder / f"{name}.h5"
        shutil.copy(goods[case.base], target)
        shutil.copy(
            goods[case.base].with_name(goods[case.base].stem + ".labels.txt"),
            folder / f"{name}.labels.txt",
        )
        try:
            case.make(target)
        except Exception as exc:
            raise RuntimeError(f"corpus case {name}: {exc!r}") from exc
    return CASES


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/corpus.py FOLDER")
    for name, case in write_corpus(Path(sys.argv[1])).items():
        print(f"{case.file or name + '.h5':34} {case.expected}")
