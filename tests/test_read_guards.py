"""Bad model files on the read side (issue 10): whatever a file holds, reading it ends in one
``ModelFileError`` line that says why, never h5py's traceback or an internal error, and no file
makes the reader allocate, recurse or loop without bound.

Every case starts from a tiny real Keras file (tf_keras and Keras 3, 16x16 input, seven layers)
and damages or edits a copy of it with h5py, or writes a fresh file around an edited config.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import factory
import h5py
import numpy as np
import pytest

import convert.build.layers  # noqa: F401  (before the walker, which its modules import)
from convert.build.walker import NCHW, Emitter
from convert.cli import main
from convert.errors import LabelsError, ModelFileError
from convert.read import h5 as reader
from convert.read.h5 import load_weight, read_model
from convert.read.labels import read_labels

LABELS = ["a", "b", "c"]


def _tiny(flavour: str, path: Path) -> Path:
    """image 16x16x3 -> Conv2D(4) -> BN -> ReLU -> DepthwiseConv2D -> SeparableConv2D(6) ->
    GlobalAveragePooling2D -> Dense(3, softmax), saved by ``flavour``'s Keras."""
    K = factory.keras_module(flavour)
    K.utils.set_random_seed(0)
    inp = K.Input((16, 16, 3), name="image")
    x = K.layers.Conv2D(4, 3, name="conv")(inp)
    x = K.layers.BatchNormalization(name="bn")(x)
    x = K.layers.ReLU(name="relu")(x)
    x = K.layers.DepthwiseConv2D(3, name="dw")(x)
    x = K.layers.SeparableConv2D(6, 3, name="sep")(x)
    x = K.layers.GlobalAveragePooling2D(name="pool")(x)
    out = K.layers.Dense(3, activation="softmax", name="dense")(x)
    factory.zoo.save_h5(K.Model(inp, out, name="tiny"), path)
    K.backend.clear_session()
    factory.zoo.write_labels(path, LABELS)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {flavour: _tiny(flavour, root / f"{flavour}.h5") for flavour in ("k2", "k3")}


# -- helpers --------------------------------------------------------------------------------------


def _copy(src: Path, folder: Path, stem: str = "model") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / f"{stem}.h5"
    shutil.copyfile(src, dst)
    shutil.copyfile(src.with_name(src.stem + ".labels.txt"), folder / f"{stem}.labels.txt")
    return dst


def _reason(path: Path, **kwargs: Any) -> str:
    with pytest.raises(ModelFileError) as caught:
        read_model(path, **kwargs)
    error = caught.value
    assert error.path == path
    assert str(error) == f"{path}: {error.reason}" and "\n" not in str(error)
    return error.reason


def _dataset_path(path: Path, layer: str, weight: str) -> str:
    """The dataset of ``layer``'s weight ``weight`` (``kernel``, ``kernel:0``, ...)."""
    with h5py.File(path, "r") as f:
        found: list[str] = []

        def visit(name: str, obj: Any) -> None:
            parts = name.split("/")
            if isinstance(obj, h5py.Dataset) and parts[-2] == layer:
                if parts[-1].split(":")[0] == weight:
                    found.append(name)

        f["model_weights"].visititems(visit)
    assert len(found) == 1, found
    return f"model_weights/{found[0]}"


def _replace(path: Path, dataset: str, data: Any = None, **create: Any) -> None:
    with h5py.File(path, "r+") as f:
        parent, name = dataset.rsplit("/", 1)
        del f[parent][name]
        f[parent].create_dataset(name, data=data, **create)


def _header(path: Path, name: str) -> int:
    with h5py.File(path, "r") as f:
        return h5py.h5o.get_info(f[name].id).addr


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _config(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["model_config"])


def _write_config(path: Path, config: Any, keras_version: str = "2.15.0", src: Path | None = None):
    """A fresh file holding ``config`` (JSON text, or an object to dump) and ``src``'s weights.
    Written with the newest file format, whose attributes may exceed 64 kB."""
    text = config if isinstance(config, (str, bytes)) else json.dumps(config)
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["keras_version"] = keras_version
        f.attrs["model_config"] = text
        if src is not None:
            with h5py.File(src, "r") as s:
                s.copy(s["model_weights"], f, "model_weights")
    return path


def _layer_entry(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in config["config"]["layers"] if e["name"] == name)


def _json_depth(value: Any) -> int:
    """How deep lists and dicts nest (iteratively: the configs here nest too deep to recurse)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in children)
    return deepest


def _wrap(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


def _deep_text(config: dict[str, Any], layer: str, depth: int) -> str:
    """``config`` as JSON, with ``depth`` nested lists in an extra key of ``layer``'s config
    (which the reader ignores); written as text, since json.dumps recurses."""
    _layer_entry(config, layer)["config"]["extra"] = "@deep@"
    return json.dumps(config).replace('"@deep@"', "[" * depth + "0" + "]" * depth)


def test_the_tiny_files_read_and_every_weight_is_checked(tiny: dict[str, Path]) -> None:
    for path in tiny.values():
        graph = read_model(path)
        kinds = {layer.class_name for layer in graph.layers() if layer.weights}
        assert kinds == {
            "Conv2D",
            "BatchNormalization",
            "DepthwiseConv2D",
            "SeparableConv2D",
            "Dense",
        }


# -- 1. damaged HDF5 ------------------------------------------------------------------------------


def test_a_listed_weight_missing_from_the_file(tiny, tmp_path: Path) -> None:
    path = _copy(tiny["k2"], tmp_path)
    with h5py.File(path, "r+") as f:
        del f["model_weights/dense/dense/kernel:0"]
    assert (
        _reason(path)
        == "weight 'dense/kernel:0' is listed in layer 'dense' but missing from the file"
    )


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("model_weights/dense/dense/kernel:0", "opening weight 'dense/kernel:0'"),
        ("model_weights/dense", "opening the weights of layer 'dense'"),
        ("model_weights", "opening the group 'model_weights'"),
    ],
)
def test_a_damaged_object_header(tiny, tmp_path: Path, name: str, what: str) -> None:
    path = _copy(tiny["k2"], tmp_path)
    _overwrite(path, _header(path, name), b"\xff" * 8)
    assert _reason(path) == (
        f"damaged HDF5 file ({what}: Unable to synchronously open object "
        "(bad object header version number))"
    )


def test_a_damaged_global_heap_holding_the_attributes(tiny, tmp_path: Path) -> None:
    path = _copy(tiny["k2"], tmp_path)
    data = path.read_bytes()
    assert data.count(b"GCOL") == 1  # variable-length strings: keras_version, model_config, ...
    _overwrite(path, data.index(b"GCOL"), b"XXXX")
    reason = _reason(path)
    assert reason.startswith("damaged HDF5 file (reading attribute '"), reason
    assert reason.endswith("(bad global heap collection signature))"), reason


def _in_a_process(path: Path) -> str:
    """read_model(path) in a child process: a damaged file may hang or crash HDF5 itself.
    Returns the one line it ended with."""
    import subprocess

    code = f"from convert.read.h5 import read_model\nread_model({str(path)!r})"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail("reading hung")
    assert done.returncode == 1, (done.returncode, done.stderr[-500:])
    return done.stderr.strip().splitlines()[-1]


def _heap_objects(data: bytes, at: int) -> list[tuple[int, int, int]]:
    """(offset, index, size) of each object of the global heap collection at ``at``."""
    end, p, objects = at + int.from_bytes(data[at + 8 : at + 16], "little"), at + 16, []
    while p + 16 <= end:
        index, size = (
            int.from_bytes(data[p : p + 2], "little"),
            int.from_bytes(data[p + 8 : p + 16], "little"),
        )
        objects.append((p, index, size))
        p += 16 + (size + 7) // 8 * 8 if index else size
    return objects


@pytest.mark.parametrize("large", [False, True])
def test_a_global_heap_object_of_the_wrong_size(tiny, tmp_path, monkeypatch, large) -> None:
    """Searched for in the whole file, or (in a large file) around the datasets' values."""
    if large:
        monkeypatch.setattr(reader, "_SKIP_VALUES_ABOVE", 0)
    path = _copy(tiny["k2"], tmp_path)
    data = path.read_bytes()
    at = data.index(b"GCOL\x01\x00\x00\x00")
    first = _heap_objects(data, at)[0][0]
    _overwrite(path, first + 8, (1 << 40).to_bytes(8, "little"))
    assert _reason(path) == (
        f"damaged HDF5 file (global heap at byte {at}: object 1 runs past the end of the "
        "collection)"
    )


def test_a_global_heap_that_would_make_hdf5_loop_forever(tiny, tmp_path: Path) -> None:
    """One object's size made to end inside the free space, on zeros: HDF5 1.14.6 reads a
    free-space record of size 0 there and never moves on."""
    path = _copy(tiny["k2"], tmp_path)
    data = path.read_bytes()
    at = data.index(b"GCOL\x01\x00\x00\x00")
    objects = _heap_objects(data, at)
    free, index, _ = objects[-1]
    assert index == 0 and data[free + 16 : free + 48] == bytes(32)  # the free space: zeros
    start = objects[0][0]
    _overwrite(path, start + 8, (free + 32 - start - 16).to_bytes(8, "little"))
    assert _in_a_process(path).endswith(
        f"{path}: damaged HDF5 file (global heap at byte {at}: an object of no size)"
    )


def test_an_attribute_whose_type_is_not_text(tiny, tmp_path: Path) -> None:
    """model_config's type made a variable-length sequence: HDF5 1.14.6 crashes reading it."""
    path = _copy(tiny["k2"], tmp_path)
    data = path.read_bytes()
    name = data.index(b"model_config\x00")
    kind = name + 16  # the name, padded to 8 bytes, then the datatype message
    assert data[kind : kind + 2] == b"\x19\x01"  # version 1, variable-length; a string
    _overwrite(path, kind + 1, b"\x09")
    assert _in_a_process(path).endswith(f"{path}: attribute 'model_config' holds object, not text")


@pytest.fixture
def damaged_chunks(tiny, tmp_path: Path) -> Path:
    """The Dense kernel stored in chunks, its chunk index (a B-tree) damaged."""
    path = _copy(tiny["k2"], tmp_path)
    name = "model_weights/dense/dense/kernel:0"
    with h5py.File(path, "r") as f:
        values = f[name][()]
    _replace(path, name, values, chunks=(2, 3))
    data = path.read_bytes()
    assert data.count(b"TREE\x01") == 1  # the one chunk B-tree (groups' are TREE\x00)
    _overwrite(path, data.index(b"TREE\x01"), b"XXXX")
    return path


def test_damaged_values_while_reading(damaged_chunks: Path) -> None:
    assert _reason(damaged_chunks) == (
        "damaged HDF5 file (reading weight 'dense/kernel:0': Can't synchronously read data "
        "(wrong B-tree signature))"
    )


def test_damaged_values_while_building(damaged_chunks: Path) -> None:
    graph = read_model(damaged_chunks, with_digests=False)  # metadata only: reads
    dense = next(layer for layer in graph.layers() if layer.name == "dense")
    kernel = next(w for w in dense.weights if w.name == "kernel")
    with pytest.raises(ModelFileError) as caught:
        load_weight(damaged_chunks, kernel)
    assert caught.value.reason == (
        "damaged HDF5 file (reading weight '/model_weights/dense/dense/kernel:0': Can't "
        "synchronously read data (wrong B-tree signature))"
    )
    with pytest.raises(ModelFileError):
        Emitter(graph, NCHW).weight(dense, "kernel")


@pytest.mark.parametrize("flavour", ["k2", "k3"])
def test_random_bit_flips_give_a_graph_or_one_model_file_error(tiny, tmp_path, flavour) -> None:
    """A few flipped bits anywhere: the file reads, or the reason is one ModelFileError; the
    same for loading every weight, as the builder does."""
    base = tiny[flavour].read_bytes()
    rng = random.Random(10)
    path = tmp_path / "flipped.h5"
    outcomes = {"read": 0, "refused": 0}
    for _ in range(60):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            graph = read_model(path)
            for layer in graph.layers():
                for weight in layer.weights:
                    load_weight(path, weight)
            outcomes["read"] += 1
        except ModelFileError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["read"] and outcomes["refused"], outcomes


# -- 2. weights checked where they are read -------------------------------------------------------

WRONG_SHAPES = [  # layer, weight, a wrong shape, the shape the layer needs, class
    ("conv", "kernel", (3, 3, 2, 4), "(3, 3, 3, 4)", "Conv2D"),
    ("conv", "bias", (5,), "(4,)", "Conv2D"),
    ("bn", "moving_variance", (5,), "(4,)", "BatchNormalization"),
    ("bn", "gamma", (4, 1), "(4,)", "BatchNormalization"),
    ("sep", "pointwise_kernel", (1, 1, 4, 7), "(1, 1, 4, 6)", "SeparableConv2D"),
    ("sep", "depthwise_kernel", (3, 3, 4, 2), "(3, 3, 4, 1)", "SeparableConv2D"),
    ("dense", "kernel", (6, 4), "(6, 3)", "Dense"),
    ("dense", "bias", (2,), "(3,)", "Dense"),
]


@pytest.mark.parametrize("flavour", ["k2", "k3"])
@pytest.mark.parametrize(("layer", "weight", "shape", "needed", "kind"), WRONG_SHAPES)
def test_a_weight_of_the_wrong_shape(tiny, tmp_path, flavour, layer, weight, shape, needed, kind):
    path = _copy(tiny[flavour], tmp_path)
    _replace(path, _dataset_path(path, layer, weight), np.zeros(shape, np.float32))
    assert _reason(path) == (
        f"layer '{layer}' ({kind}): weight '{weight}' has shape {shape} but the layer needs "
        f"{needed}"
    )


@pytest.mark.parametrize("flavour", ["k2", "k3"])
def test_a_depthwise_kernel_of_the_wrong_shape(tiny, tmp_path, flavour) -> None:
    name = {"k2": "depthwise_kernel", "k3": "kernel"}[flavour]  # Keras 3 renamed it
    path = _copy(tiny[flavour], tmp_path)
    _replace(path, _dataset_path(path, "dw", name), np.zeros((3, 3, 5, 1), np.float32))
    assert _reason(path) == (
        f"layer 'dw' (DepthwiseConv2D): weight '{name}' has shape (3, 3, 5, 1) but the layer "
        "needs (3, 3, 4, 1)"
    )


@pytest.mark.parametrize(
    ("layer", "weight", "message"),
    [
        ("dense", "bias", "layer 'dense' (Dense): weight 'bias' of shape (3,) is missing"),
        ("bn", "gamma", "layer 'bn' (BatchNormalization): weight 'gamma' of shape (4,) is missing"),
        (
            "conv",
            "kernel",
            "layer 'conv' (Conv2D): weight 'kernel' of shape (3, 3, 3, 4) is missing",
        ),
    ],
)
def test_a_needed_weight_the_file_does_not_list(tiny, tmp_path, layer, weight, message) -> None:
    path = _copy(tiny["k3"], tmp_path)
    dataset = _dataset_path(path, layer, weight)
    with h5py.File(path, "r+") as f:
        del f[dataset]
        group = f[f"model_weights/{layer}"]
        names = [n for n in group.attrs["weight_names"] if n.split("/")[-1] != weight]
        group.attrs["weight_names"] = names
    assert _reason(path) == f"{message} from the file"


@pytest.mark.parametrize("flavour", ["k2", "k3"])
def test_nan_or_inf_in_a_weight(tiny, tmp_path: Path, flavour: str) -> None:
    path = _copy(tiny[flavour], tmp_path)
    dataset = _dataset_path(path, "dense", "kernel")
    with h5py.File(path, "r+") as f:
        values = f[dataset][()]
        values[0, 0], values[1, 2], values[5, 1] = np.nan, np.inf, -np.inf
        f[dataset][...] = values
    message = "layer 'dense': weight 'kernel' holds NaN or Inf (3 of 18 values)"
    assert _reason(path) == message
    # metadata only, as `verify` reads: the builder's one place that loads values says the same
    graph = read_model(path, with_digests=False)
    dense = next(layer for layer in graph.layers() if layer.name == "dense")
    emitter = Emitter(graph, NCHW)
    with pytest.raises(ModelFileError) as caught:
        emitter.weight(dense, "kernel")
    assert caught.value.reason == message and caught.value.path == path
    assert emitter.weight(dense, "bias").shape == (3,)


def test_the_builder_asks_for_a_weight_the_layer_lacks(tiny) -> None:
    graph = read_model(tiny["k3"], with_digests=False)
    dense = next(layer for layer in graph.layers() if layer.name == "dense")
    with pytest.raises(ModelFileError) as caught:  # was StopIteration
        Emitter(graph, NCHW).weight(dense, "gamma")
    assert caught.value.reason == "layer 'dense': weight 'gamma' is missing from the file"


def test_a_weight_changed_between_reading_and_building(tiny, tmp_path: Path) -> None:
    path = _copy(tiny["k3"], tmp_path)
    graph = read_model(path, with_digests=False)
    dense = next(layer for layer in graph.layers() if layer.name == "dense")
    dataset = _dataset_path(path, "dense", "kernel")
    _replace(path, dataset, np.zeros((6, 4), np.float32))
    with pytest.raises(ModelFileError) as caught:
        Emitter(graph, NCHW).weight(dense, "kernel")
    assert caught.value.reason == (
        f"weight '/{dataset}' has shape (6, 4) but was read as (6, 3) (was the file changed?)"
    )
    with h5py.File(path, "r+") as f:
        del f[dataset]
    with pytest.raises(ModelFileError) as caught:
        Emitter(graph, NCHW).weight(dense, "kernel")
    assert caught.value.reason == f"weight '/{dataset}' is missing from the file"


def test_a_weight_that_is_not_numbers(tiny, tmp_path: Path) -> None:
    path = _copy(tiny["k2"], tmp_path)
    _replace(path, "model_weights/dense/dense/kernel:0", np.full((6, 3), b"abcd"))
    assert _reason(path) == (
        "weight 'dense/kernel:0' holds |S4; coreml-split reads numbers of up to 64 bits"
    )


def test_links_out_of_the_file_are_not_followed(tiny, tmp_path: Path) -> None:
    path = _copy(tiny["k2"], tmp_path)
    other = _copy(tiny["k2"], tmp_path / "other")
    with h5py.File(path, "r+") as f:
        del f["model_weights/dense"]
        f["model_weights/dense"] = h5py.ExternalLink(str(other), "/model_weights/dense")
    assert _reason(path) == (
        "the weights of layer 'dense' is reached through a soft or external link; "
        "coreml-split reads only what the file itself holds"
    )


def test_values_stored_in_another_file_are_not_read(tiny, tmp_path: Path) -> None:
    path = _copy(tiny["k2"], tmp_path)
    outside = tmp_path / "values.bin"
    outside.write_bytes(np.ones((6, 3), np.float32).tobytes())
    _replace(
        path,
        "model_weights/dense/dense/kernel:0",
        shape=(6, 3),
        dtype=np.float32,
        external=[(str(outside), 0, 72)],
    )
    assert _reason(path) == (
        "weight 'dense/kernel:0' keeps its values in another file; coreml-split reads only "
        "what the file itself holds"
    )


# -- 3. bounded reading ---------------------------------------------------------------------------

OVER_32_MIB = 32 * 2**20 + 1


def test_a_model_config_over_32_mib_is_refused_before_it_is_read(tiny, tmp_path) -> None:
    text = json.dumps(_config(tiny["k2"])).encode() + b" " * OVER_32_MIB  # valid JSON
    path = tmp_path / "big.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["model_config"] = np.bytes_(text)  # a fixed-size string: its size is declared
    assert _reason(path) == (
        f"attribute 'model_config' is {len(text)} bytes; coreml-split reads at most 32 MiB"
    )


def test_a_variable_length_model_config_over_32_mib(tiny, tmp_path) -> None:
    text = json.dumps(_config(tiny["k2"])) + " " * OVER_32_MIB
    path = _write_config(tmp_path / "big.h5", text, src=tiny["k2"])
    assert _reason(path) == (
        f"model_config is {len(text)} characters; coreml-split reads at most 32 MiB"
    )


@pytest.mark.parametrize("depth", [700, 5000])
def test_json_nested_too_deep(tiny, tmp_path: Path, depth: int) -> None:
    text = _deep_text(_config(tiny["k2"]), "relu", depth)
    path = _write_config(tmp_path / "deep.h5", text, src=tiny["k2"])
    # {config: {layers: [{config: {extra: ...}}]}}: five levels above the extra ones
    if depth < 900:  # json.loads recurses
        assert _json_depth(json.loads(text)) == 5 + depth
    assert _reason(path) == (
        f"model_config nests {5 + depth} levels deep; coreml-split reads at most 512"
    )


def _wrapped(inner: dict[str, Any], levels: int) -> dict[str, Any]:
    """``inner`` as the only layer of ``levels`` nested Sequentials (s1 outermost)."""
    model = inner
    for i in range(levels, 0, -1):
        model = {"class_name": "Sequential", "config": {"name": f"s{i}", "layers": [model]}}
    return model


def test_models_nested_too_deep(tiny, tmp_path: Path) -> None:
    path = _write_config(tmp_path / "deep.h5", _wrapped(_config(tiny["k2"]), 70), src=tiny["k2"])
    assert _reason(path) == "model 's65' is nested 65 models deep; coreml-split reads at most 64"


def test_a_few_hundred_nested_sequentials(tiny, tmp_path: Path) -> None:
    """Once a RecursionError: the JSON bound comes first now."""
    config = _wrapped(_config(tiny["k2"]), 300)
    path = _write_config(tmp_path / "deep.h5", config, src=tiny["k2"])
    assert _reason(path) == (
        f"model_config nests {_json_depth(config)} levels deep; coreml-split reads at most 512"
    )


def test_a_recursion_error_that_still_escapes_is_one_line(tiny, tmp_path: Path) -> None:
    """The last resort: within every bound, but on a nearly exhausted stack."""
    path = _write_config(tmp_path / "deep.h5", _wrapped(_config(tiny["k2"]), 40), src=tiny["k2"])
    frames = 0
    frame = sys._getframe()
    while frame is not None:
        frames, frame = frames + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(frames + 100)
    try:
        reason = _reason(path)
    finally:
        sys.setrecursionlimit(limit)
    assert reason == "model_config nests too deeply to read (Python's recursion limit)"


def _activations(n: int, reverse: bool = False) -> dict[str, Any]:
    """A Keras 2 Functional config: input -> a1 -> ... -> an, listed in order or reversed."""
    layers = [
        {
            "class_name": "InputLayer",
            "name": "x",
            "config": {"name": "x", "batch_input_shape": [None, 4]},
            "inbound_nodes": [],
        }
    ]
    for i in range(1, n + 1):
        source = "x" if i == 1 else f"a{i - 1}"
        layers.append(
            {
                "class_name": "Activation",
                "name": f"a{i}",
                "config": {"name": f"a{i}", "activation": "relu", "trainable": True},
                "inbound_nodes": [[[source, 0, 0, {}]]],
            }
        )
    if reverse:
        layers = layers[:1] + layers[:0:-1]
    return {
        "class_name": "Functional",
        "config": {
            "name": "chain",
            "layers": layers,
            "input_layers": [["x", 0, 0]],
            "output_layers": [[f"a{n}", 0, 0]],
        },
    }


def test_too_many_layer_calls(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "long.h5", _activations(20_001))
    assert _reason(path) == (
        "model_config makes more than 20000 layer calls; coreml-split reads at most 20000"
    )


def test_layers_listed_consumers_first_are_read_in_linear_time(tmp_path, monkeypatch) -> None:
    """Every waiting call was tried again on every pass: n^2 / 2 tries for a reversed chain."""
    n = 1500
    path = _write_config(tmp_path / "reversed.h5", _activations(n, reverse=True))
    tries = 0
    parse = reader._GraphBuilder._parse_inbound

    def counted(self, *args: Any, **kwargs: Any) -> Any:
        nonlocal tries
        tries += 1
        return parse(self, *args, **kwargs)

    monkeypatch.setattr(reader._GraphBuilder, "_parse_inbound", counted)
    graph = read_model(path)
    assert [node.layer.name for node in graph.nodes] == ["x"] + [f"a{i}" for i in range(1, n + 1)]
    assert tries < 3 * n, tries


def _old_order(config: dict[str, Any]) -> list[str]:
    """The reader's call order as it was: pass after pass over the pending calls in file
    order, each made as soon as its inputs are there (Keras 2 refs, one node per layer)."""
    entries = config["config"]["layers"]
    produced = {e["name"] for e in entries if e["class_name"] == "InputLayer"}
    pending = [e for e in entries if e["class_name"] != "InputLayer"]
    order = [e["name"] for e in entries if e["class_name"] == "InputLayer"]
    while pending:
        waiting = []
        for e in pending:
            if all(ref[0] in produced for ref in e["inbound_nodes"][0]):
                produced.add(e["name"])
                order.append(e["name"])
            else:
                waiting.append(e)
        assert len(waiting) < len(pending)
        pending = waiting
    return order


def test_the_order_of_calls_is_that_of_passes_over_the_file(tmp_path: Path) -> None:
    """Random DAGs of Add and Activation layers listed in random order: the graph's nodes
    come in the order the pass-after-pass reader made them (the output bytes depend on it)."""
    rng = random.Random(3)
    for trial in range(20):
        config = _activations(1)
        layers = config["config"]["layers"][:1]
        names = ["x"]
        for i in range(60):
            if len(names) > 1 and rng.random() < 0.4:
                a, b = rng.sample(names, 2)
                entry = {"class_name": "Add", "name": f"m{i}", "config": {"name": f"m{i}"}}
                entry["inbound_nodes"] = [[[a, 0, 0, {}], [b, 0, 0, {}]]]
            else:
                source = rng.choice(names)
                entry = {"class_name": "ReLU", "name": f"r{i}", "config": {"name": f"r{i}"}}
                entry["inbound_nodes"] = [[[source, 0, 0, {}]]]
            layers.append(entry)
            names.append(entry["name"])
        rest = layers[1:]
        rng.shuffle(rest)
        config["config"]["layers"] = layers[:1] + rest
        config["config"]["output_layers"] = [[names[-1], 0, 0]]
        path = _write_config(tmp_path / f"dag{trial}.h5", config)
        assert [node.layer.name for node in read_model(path).nodes] == _old_order(config)


def test_call_arguments_nested_too_deep(tiny, tmp_path: Path) -> None:
    config = _config(tiny["k3"])
    node = _layer_entry(config, "dense")["inbound_nodes"][0]
    node["args"] = _wrap(node["args"], 40)
    path = _write_config(tmp_path / "args.h5", config, keras_version="3.1.0", src=tiny["k3"])
    assert _reason(path) == (
        "layer 'dense': call arguments nest more than 32 levels deep; coreml-split reads at most 32"
    )


def _with_input_shape(tiny, tmp_path: Path, shape: list[Any]) -> Path:
    config = _config(tiny["k2"])
    _layer_entry(config, "image")["config"]["batch_input_shape"] = shape
    return _write_config(tmp_path / "input.h5", config, src=tiny["k2"])


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([None, 16, 16, 3, 1, 1, 1, 1, 1], "declares rank 9; coreml-split reads at most rank 8"),
        (
            [None, 20000, 16, 3],
            "declares shape [None, 20000, 16, 3]; coreml-split reads at most 16384 per side",
        ),
        (
            [None, 16, -16, 3],
            "declares shape [None, 16, -16, 3]: -16 is not a positive whole number or None",
        ),
        (
            [None, 16.0, 16, 3],
            "declares shape [None, 16.0, 16, 3]: 16.0 is not a positive whole number or None",
        ),
        (
            [None, 16, "16", 3],
            "declares shape [None, 16, '16', 3]: '16' is not a positive whole number or None",
        ),
        (
            [None, 16384, 16384, 8],
            "declares shape [None, 16384, 16384, 8] (2147483648 elements); coreml-split reads "
            "at most 1073741824",
        ),
    ],
)
def test_declared_input_shapes_are_bounded(tiny, tmp_path, shape, message) -> None:
    assert _reason(_with_input_shape(tiny, tmp_path, shape)) == f"input 'image' {message}"


def test_inferred_tensors_are_bounded(tiny, tmp_path: Path) -> None:
    config = _config(tiny["k2"])
    _layer_entry(config, "image")["config"]["batch_input_shape"] = [None, 16384, 16384, 3]
    _layer_entry(config, "conv")["config"]["filters"] = 16
    path = _write_config(tmp_path / "huge.h5", config, src=tiny["k2"])
    assert _reason(path, with_digests=False) == (
        f"layer 'conv' gives a tensor of shape (None, 16382, 16382, 16) ({16382**2 * 16} "
        "elements); coreml-split reads at most 2147483648 elements per tensor"
    )


def test_a_weight_declaring_more_bytes_than_the_file_can_hold(tiny, tmp_path: Path) -> None:
    """Chunks never written take no room in the file, but reading allocates all of them."""
    path = _copy(tiny["k2"], tmp_path)
    _replace(
        path,
        "model_weights/dense/dense/kernel:0",
        shape=(2000, 1000),
        dtype=np.float32,
        chunks=(100, 100),
    )
    assert path.stat().st_size < 100_000  # the bound is 16 x that + 1 MiB < 8 MB declared
    assert _reason(path) == (
        "weight 'dense/kernel:0' declares 8000000 bytes, more than the file can hold; "
        "coreml-split reads at most 16 times the file's size plus 1 MiB"
    )


def test_a_labels_file_over_16_mib(tmp_path: Path) -> None:
    path = tmp_path / "model.labels.txt"
    with open(path, "wb") as f:
        f.truncate(16 * 2**20 + 1)  # sparse: no disk used
    with pytest.raises(LabelsError) as caught:
        read_labels(path)
    assert caught.value.reason == "labels file is over 16 MiB; coreml-split reads at most 16 MiB"


# -- through the command line ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_folder(tiny, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """One good model and four bad ones beside it; file name -> the reason expected."""
    root = tmp_path_factory.mktemp("read_guards_zoo")
    _copy(tiny["k3"], root, "good")
    missing = _copy(tiny["k2"], root, "missing")
    with h5py.File(missing, "r+") as f:
        del f["model_weights/dense/dense/kernel:0"]
    damaged = _copy(tiny["k2"], root, "damaged")
    _overwrite(damaged, _header(damaged, "model_weights/conv"), b"\xff" * 8)
    nan = _copy(tiny["k3"], root, "nan")
    with h5py.File(nan, "r+") as f:
        f["model_weights/conv/conv/kernel"][0, 0, 0, 0] = np.nan
    _write_config(root / "deep.h5", _deep_text(_config(tiny["k2"]), "relu", 5000), src=tiny["k2"])
    (root / "deep.labels.txt").write_text("a\nb\nc\n")
    return root, {
        "missing.h5": "weight 'dense/kernel:0' is listed in layer 'dense' but missing from "
        "the file",
        "damaged.h5": "damaged HDF5 file (opening the weights of layer 'conv': Unable to "
        "synchronously open object (bad object header version number))",
        "nan.h5": "layer 'conv': weight 'kernel' holds NaN or Inf (1 of 108 values)",
        "deep.h5": "model_config nests 5005 levels deep; coreml-split reads at most 512",
    }


def _check_lines(root: Path, expected: dict[str, str], err: str) -> None:
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert sorted(lines) == sorted(f"error: {root / f}: {r}" for f, r in expected.items()), lines


def test_the_cli_says_one_line_per_bad_file_and_converts_the_good_one(bad_folder, tmp_path, capsys):
    root, expected = bad_folder
    out = tmp_path / "build"
    assert main(["convert", str(root), "--out", str(out), "--quiet"]) == 1
    _check_lines(root, expected, capsys.readouterr().err)
    assert (out / "good.mlmodel").is_file()


def test_the_command_in_its_own_process(bad_folder) -> None:
    import subprocess

    root, expected = bad_folder
    tool = Path(sys.executable).with_name("coreml-split")
    done = subprocess.run(
        [str(tool), "plan", str(root), "--quiet"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    _check_lines(root, expected, done.stderr)
