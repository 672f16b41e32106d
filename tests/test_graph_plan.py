"""The reader and planner on small hand-written HDF5 files: no TensorFlow involved.

The files follow Keras 3's layout (model_config JSON, model_weights/<layer>/<weight>), written
with h5py alone, so the graph logic is tested on exact, known structures.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from convert.errors import ModelFileError
from convert.plan.cuts import cut_tensors
from convert.plan.make import make_plan, model_names
from convert.read.h5 import read_model


def _tensor(name: str) -> dict:
    return {"class_name": "__keras_tensor__", "config": {"keras_history": [name, 0, 0]}}


def _layer(cls: str, name: str, inputs: list[str], **config) -> dict:
    args = [_tensor(inputs[0])] if len(inputs) == 1 else [[_tensor(i) for i in inputs]]
    return {
        "class_name": cls,
        "name": name,
        "config": {"name": name, **config},
        "inbound_nodes": [{"args": args, "kwargs": {}}] if inputs else [],
    }


def write_model(path: Path, layers: list[dict], output: str, weights: dict, shape=(8, 8, 3)):
    """A Keras-3-style Functional .h5 file. ``weights``: layer name -> list of arrays."""
    entries = [
        {
            "class_name": "InputLayer",
            "name": "input",
            "config": {"name": "input", "batch_shape": [None, *shape]},
            "inbound_nodes": [],
        },
        *layers,
    ]
    config = {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": entries,
            "input_layers": ["input", 0, 0],
            "output_layers": [output, 0, 0],
        },
    }
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "3.15.1"
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(config)
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = [e["name"] for e in entries]
        for e in entries:
            lg = g.create_group(e["name"])
            arrays = weights.get(e["name"], [])
            names = [f"{e['name']}/w{i}" for i in range(len(arrays))]
            lg.attrs["weight_names"] = names
            for n, a in zip(names, arrays):
                lg.create_dataset(n, data=a)
    return path


def residual_classifier(path: Path, head_seed: int, stem_seed: int = 0, classes: int = 3) -> Path:
    """input -> conv -> [conv_a ; identity] -> add -> gap -> dense(softmax)."""
    rng = np.random.default_rng(stem_seed)
    head = np.random.default_rng(head_seed)
    conv = dict(filters=4, kernel_size=[3, 3], strides=[1, 1], padding="same", use_bias=False)
    layers = [
        _layer("Conv2D", "stem", ["input"], **conv),
        _layer("Conv2D", "branch", ["stem"], **conv),
        _layer("Add", "add", ["stem", "branch"]),
        _layer("GlobalAveragePooling2D", "gap", ["add"]),
        _layer("Dense", "dense", ["gap"], units=classes, activation="softmax"),
    ]
    weights = {
        "stem": [rng.normal(size=(3, 3, 3, 4)).astype("float32")],
        "branch": [rng.normal(size=(3, 3, 4, 4)).astype("float32")],
        "dense": [head.normal(size=(4, classes)).astype("float32"), np.zeros(classes, "float32")],
    }
    return write_model(path, layers, "dense", weights)


def _producer_name(graph, tensor: int) -> str:
    return graph.producer(tensor).layer.name


def test_cuts_skip_the_inside_of_a_residual_block(tmp_path: Path) -> None:
    graph = read_model(residual_classifier(tmp_path / "r.h5", 1))
    cuts = [_producer_name(graph, t) for t in cut_tensors(graph)]
    # "branch" is bypassed by the skip connection, so it is not a cut; "stem" and "add" are.
    assert cuts == ["stem", "add", "gap"]
    assert graph.tensors[graph.outputs[0]].shape == (None, 3)


def test_models_with_identical_backbones_share_and_the_split_is_deepest(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    residual_classifier(zoo / "a.h5", head_seed=1)
    residual_classifier(zoo / "b.h5", head_seed=2, classes=5)
    residual_classifier(zoo / "other.h5", head_seed=3, stem_seed=9)
    plan, _ = make_plan(zoo)
    assert not plan.errors
    assert len(plan.groups) == 1
    group = plan.groups[0]
    assert group.members == ["a", "b"]
    assert group.split_layer == "gap"
    assert group.backbone_parameters == 3 * 3 * 3 * 4 + 3 * 3 * 4 * 4
    assert plan.model("other").group is None
    assert "shares no backbone" in plan.model("other").standalone_reason


def test_one_changed_weight_value_prevents_sharing(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    residual_classifier(zoo / "a.h5", head_seed=1)
    path = residual_classifier(zoo / "b.h5", head_seed=2)
    with h5py.File(path, "r+") as f:
        data = f["model_weights/branch/branch/w0"]
        values = data[()]
        values[0, 0, 0, 0] += 1e-3
        data[...] = values
    plan, _ = make_plan(zoo, min_shared=0.0)
    # Only the stem (before the changed branch) may still be shared.
    assert [g.split_layer for g in plan.groups] == ["stem"]
    plan, _ = make_plan(zoo, min_shared=0.5)  # the shared stem holds less than half
    assert plan.groups == []


def chain_classifier(path: Path, convs: list[tuple[int, int]], head_seed: int) -> Path:
    """input -> conv_0 -> conv_1 -> ... -> gap -> dense(3, softmax); ``convs``: (filters, seed)
    per convolution, so equal seeds at equal depths give equal weights."""
    layers, weights, previous, channels = [], {}, "input", 3
    for i, (filters, seed) in enumerate(convs):
        conv = dict(filters=filters, kernel_size=[3, 3], strides=[1, 1], padding="same")
        layers.append(_layer("Conv2D", f"conv_{i}", [previous], use_bias=False, **conv))
        kernel = np.random.default_rng(seed).normal(size=(3, 3, channels, filters))
        weights[f"conv_{i}"] = [kernel.astype("float32")]
        previous, channels = f"conv_{i}", filters
    layers.append(_layer("GlobalAveragePooling2D", "gap", [previous]))
    layers.append(_layer("Dense", "dense", ["gap"], units=3, activation="softmax"))
    head = np.random.default_rng(head_seed)
    weights["dense"] = [head.normal(size=(channels, 3)).astype("float32"), np.zeros(3, "float32")]
    return write_model(path, layers, "dense", weights)


def test_fine_tuned_last_blocks_share_the_deepest_common_cut(tmp_path: Path) -> None:
    """Two models kept the backbone, two fine-tuned its last convolution: all four share the
    frozen prefix (3 x prefix saved beats 1 x the whole backbone for the pair)."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name, last_seed in [("kept_a", 5), ("kept_b", 5), ("tuned_c", 6), ("tuned_d", 7)]:
        chain_classifier(zoo / f"{name}.h5", [(8, 1), (8, 2), (8, last_seed)], head_seed=len(name))
    plan, _ = make_plan(zoo)
    assert len(plan.groups) == 1
    group = plan.groups[0]
    assert group.members == ["kept_a", "kept_b", "tuned_c", "tuned_d"]
    assert group.split_layer == "conv_1"
    prefix = 3 * 3 * 3 * 8 + 3 * 3 * 8 * 8
    assert group.saved_bytes == 3 * prefix * 4
    for model in plan.models:
        assert model.head_parameters == 3 * 3 * 8 * 8 + 8 * 3 + 3  # the last conv moved in
    # The alternative it beat: the untouched pair sharing the whole backbone (to the pooling),
    # the fine-tuned ones alone (their shared stem alone is under half of each model).
    assert group.alternative == "kept_a, kept_b split after gap; tuned_c, tuned_d standalone"
    assert group.alternative_saved_bytes == (prefix + 3 * 3 * 8 * 8) * 4
    assert group.alternative_saved_bytes < group.saved_bytes


def test_the_split_points_are_chosen_over_the_whole_zoo(tmp_path: Path) -> None:
    """One stem shared by four models, and two deeper backbones shared by pairs: opening the
    widest group first (greedy) saves 3 x 216 parameters; the pairs save 2 x 504."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name, seed in [("a", 2), ("b", 2), ("c", 3), ("d", 3)]:
        chain_classifier(zoo / f"{name}.h5", [(8, 1), (4, seed)], head_seed=ord(name))
    plan, _ = make_plan(zoo, min_shared=0.0)
    assert sorted(g.members for g in plan.groups) == [["a", "b"], ["c", "d"]]
    assert {g.split_layer for g in plan.groups} == {"gap"}
    assert sum(g.saved_bytes for g in plan.groups) == 2 * (216 + 288) * 4
    for group in plan.groups:  # without it: the other pair keeps its split, this one the stem
        assert group.alternative == f"{', '.join(group.members)} split after conv_0"
        assert group.alternative_saved_bytes == (216 + 288 + 216) * 4


def test_a_model_belongs_to_one_group_and_groups_differ(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name, (first, second) in {"a": (1, 2), "b": (1, 2), "c": (4, 5), "d": (4, 5)}.items():
        chain_classifier(zoo / f"{name}.h5", [(8, first), (8, second)], head_seed=ord(name))
    chain_classifier(zoo / "loner.h5", [(8, 9), (8, 9)], head_seed=1)
    plan, _ = make_plan(zoo)
    members = [m for g in plan.groups for m in g.members]
    assert sorted(members) == ["a", "b", "c", "d"] and len(set(members)) == len(members)
    assert len({g.id for g in plan.groups}) == 2
    assert plan.model("loner").group is None


def test_names_never_decide(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    residual_classifier(zoo / "a.h5", head_seed=1)
    path = residual_classifier(zoo / "b.h5", head_seed=2)
    with h5py.File(path, "r+") as f:  # rename every layer and weight
        config = f.attrs["model_config"].replace('"stem"', '"x1"').replace('"branch"', '"x2"')
        f.attrs["model_config"] = config
        g = f["model_weights"]
        g.move("stem", "x1")
        g.move("branch", "x2")
        g["x1"].move("stem", "x1")
        g["x2"].move("branch", "x2")
        g["x1"].attrs["weight_names"] = ["x1/w0"]
        g["x2"].attrs["weight_names"] = ["x2/w0"]
        g.attrs["layer_names"] = ["input", "x1", "x2", "add", "gap", "dense"]
    plan, _ = make_plan(zoo)
    assert [g.members for g in plan.groups] == [["a", "b"]]


def test_not_an_image_input_is_a_clear_error(tmp_path: Path) -> None:
    layers = [_layer("Dense", "dense", ["input"], units=2, activation="softmax")]
    path = write_model(
        tmp_path / "vec.h5", layers, "dense", {"dense": [np.zeros((16, 2), "float32")]}, (16,)
    )
    plan, _ = make_plan(tmp_path)
    assert [e.line for e in plan.errors] == [
        f"{path}: input shape (None, 16) is not an image (expected (None, H, W, 1 or 3), "
        "or (None, H, W) for grayscale)"
    ]


def test_weights_only_and_garbage_files(tmp_path: Path) -> None:
    weights = tmp_path / "w.h5"
    with h5py.File(weights, "w") as f:
        f.attrs["layer_names"] = ["dense"]
        f.create_group("dense").attrs["weight_names"] = []
    with pytest.raises(ModelFileError, match="weights only"):
        read_model(weights)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(ModelFileError, match="not a readable HDF5 file"):
        read_model(junk)


def test_model_names_are_unique_and_use_folders_for_keras_model_h5(tmp_path: Path) -> None:
    paths = [
        tmp_path / "cats" / "keras_model.h5",
        tmp_path / "dogs" / "keras_model.h5",
        tmp_path / "a" / "m.h5",
        tmp_path / "b" / "m.h5",
        tmp_path / "solo.h5",
    ]
    names = model_names(paths)
    assert names[paths[0]] == "cats" and names[paths[1]] == "dogs"
    assert names[paths[2]] == "a-m" and names[paths[3]] == "b-m"
    assert names[paths[4]] == "solo"
