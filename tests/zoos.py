"""The test zoos, one recipe each, and how the suite converts them.

The fixtures build their zoos with these recipes, and ``tests/record_digests.py`` builds the same
zoos, converts them as :data:`CONVERSIONS` says and writes the digests of every ``.mlmodel`` that
comes out into ``tests/data/output_digests.json``. The fixtures' outputs are compared with those
digests (:func:`digests.check`), so any change to the bytes the tool writes shows up as a failing
test naming the file.

Every recipe writes into an empty folder ``zoo`` and is deterministic: the same files, byte for
byte, on every run on one machine, whatever the process built before (each starts from a clean
Keras state, so that names Keras makes up from its global counters do not depend on it).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _keras(flavour: str = "k3"):
    from convert.heavy import keras

    return keras(3 if flavour == "k3" else 2)


def fresh(recipe: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``recipe`` from a clean Keras state (both Kerases' sessions cleared)."""

    @functools.wraps(recipe)
    def run(*args: Any, **kwargs: Any) -> Any:
        for flavour in ("k2", "k3"):
            _keras(flavour).backend.clear_session()
        return recipe(*args, **kwargs)

    return run


# -- the session zoo (tests/conftest.py) ---------------------------------------------------------


@fresh
def session(zoo: Path) -> None:
    """Five classifiers in two families of files, plus one with a single changed BN statistic.

    - nested_k3, nested_k2, flat_k2: one frozen MobileNetV2 (seed 0), written by Keras 3 and by
      tf_keras, nested as one layer or with its layers inline;
    - tm_cats, tm_dogs: Teachable Machine layout (sub-models named model1 / model2) on another
      backbone (seed 7);
    - perturbed: nested_k3 with one BatchNorm moving mean changed (block_3).
    """
    import factory

    factory.save_transfer_classifier(zoo / "nested_k3.h5", "k3", 3, head_seed=1, dropout=True)
    factory.save_transfer_classifier(zoo / "nested_k2.h5", "k2", 4, head_seed=2)
    factory.save_transfer_classifier(
        zoo / "flat_k2.h5", "k2", 2, head_seed=3, layout="flat", hidden=16
    )
    factory.save_teachable_machine(zoo / "tm_cats", 2, "model1", head_seed=4, backbone_seed=7)
    factory.save_teachable_machine(zoo / "tm_dogs", 3, "model2", head_seed=5, backbone_seed=7)
    factory.perturb_bn_moving_mean(zoo / "nested_k3.h5", zoo / "perturbed.h5")
    (zoo / "perturbed.labels.txt").write_text((zoo / "nested_k3.labels.txt").read_text())


@fresh
def standalone(zoo: Path) -> None:
    """One classifier alone: it shares nothing and converts as one NeuralNetworkClassifier."""
    import factory

    factory.save_transfer_classifier(zoo / "only.h5", n_classes=3, head_seed=4)


@fresh
def updatable(zoo: Path) -> None:
    """Heads people have, on one frozen MobileNetV2 (seed 0), for tests/test_updatable.py:

    - tm, tm2: Teachable Machine's Dense(100, relu) -> Dense(n, softmax, no bias);
    - plain: Dropout -> Dense(4, softmax);
    - bn_head: Dense(16, relu) -> BatchNormalization (its statistics not the identity) ->
      Dense(3, softmax).
    """
    import factory

    factory.save_teachable_machine(zoo / "tm", 3, "model1", head_seed=4, backbone_seed=0)
    factory.save_teachable_machine(zoo / "tm2", 2, "model2", head_seed=5, backbone_seed=0)
    factory.save_transfer_classifier(zoo / "plain.h5", "k3", 4, head_seed=2, dropout=True)
    K = _keras()
    base = factory.mobilenet_backbone("k3", seed=0)
    inp = K.Input(base.input.shape[1:])
    x = K.layers.Dense(16, activation="relu", name="hidden")(base(inp, training=False))
    x = K.layers.BatchNormalization(name="norm")(x)
    out = K.layers.Dense(3, activation="softmax", name="predictions")(x)
    model = K.Model(inp, out)
    rng = np.random.default_rng(9)
    for layer in model.layers[-3:]:
        layer.set_weights(
            [
                (
                    rng.uniform(0.5, 1.5, w.shape)
                    if "variance" in v.name
                    else rng.normal(0, 0.3, w.shape)
                ).astype("float32")
                for v, w in zip(layer.weights, layer.get_weights(), strict=True)
            ]
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(zoo / "bn_head.h5"))
    (zoo / "bn_head.labels.txt").write_text("a\nb\nc\n")


# -- the architecture sweep (tests/test_architectures.py) ----------------------------------------

ARCH_CLASSIFIERS = {"first": (3, 1), "second": (4, 2)}  # name -> (classes, head seed)


@fresh
def arch(zoo: Path, name: str) -> None:
    """Two classifiers (3 and 4 classes) on one frozen keras.applications ``name`` backbone."""
    import arch_zoo

    for stem, (classes, head_seed) in ARCH_CLASSIFIERS.items():
        arch_zoo.save_arch_classifier(zoo / f"{stem}.h5", name, "k3", classes, head_seed)


# -- Keras constructs (tests/test_keras_constructs.py) -------------------------------------------

CONSTRUCTS_SIZE = 16


def _construct_classifier(path: Path, flavour: str, n_classes: int, head_seed: int) -> None:
    K = _keras(flavour)
    K.utils.set_random_seed(0)
    inp = K.Input((CONSTRUCTS_SIZE, CONSTRUCTS_SIZE, 3), name="image")
    x = K.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    y = K.layers.Conv2D(8, 3, padding="same", groups=8, name="depthwise")(x)
    y = K.layers.LayerNormalization(epsilon=1e-6, name="norm")(y)
    y = K.layers.Dense(16, name="expand")(y)
    y = K.layers.Activation("gelu", name="gelu")(y)
    y = K.layers.Conv2D(8, 1, groups=2, name="grouped")(y)
    x = x + y  # residual: tf_keras stores y as a keyword tensor
    x = 3.0 + x  # a constant first operand
    x = x * 0.5
    x = K.layers.GlobalAveragePooling2D(name="pool")(x)
    backbone = K.Model(inp, x, name="backbone")
    backbone.trainable = False

    K.utils.set_random_seed(head_seed)
    out = K.layers.Dense(n_classes, activation="softmax", name="head")(backbone.output)
    model = K.Model(backbone.input, out, name="classifier")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path), include_optimizer=False)
    K.backend.clear_session()


@fresh
def constructs(zoo: Path, flavour: str) -> None:
    """Grouped convolutions, LayerNormalization, GELU, residual adds and arithmetic on
    constants, twice on one backbone, saved by ``flavour`` ("k2" tf_keras, "k3" Keras 3)."""
    _construct_classifier(zoo / "first.h5", flavour, 3, head_seed=1)
    _construct_classifier(zoo / "second.h5", flavour, 5, head_seed=2)


# -- whole zoos (tests/test_zoos.py) -------------------------------------------------------------

ZOO_SIZE = 32
TUNED = ("block_16", "Conv_1")  # MobileNetV2's last block and its last convolution


def _save_on(path: Path, base, n_classes: int, head_seed: int) -> None:
    K = _keras()
    inp = K.Input((ZOO_SIZE, ZOO_SIZE, 3))
    out = K.layers.Dense(n_classes, activation="softmax", name="head")(base(inp, training=False))
    model = K.Model(inp, out)
    rng = np.random.default_rng(head_seed)
    kernel = rng.normal(scale=0.5, size=model.layers[-1].get_weights()[0].shape)
    model.layers[-1].set_weights([kernel.astype("float32"), np.zeros(n_classes, "float32")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(path))


def _mobilenet_v2():
    K = _keras()
    K.utils.set_random_seed(0)
    return K.applications.MobileNetV2(
        input_shape=(ZOO_SIZE, ZOO_SIZE, 3),
        alpha=0.35,
        include_top=False,
        weights=None,
        pooling="avg",
    )


def _fine_tune(base, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for layer in base.layers:
        if layer.name.startswith(TUNED):
            layer.set_weights(
                [
                    w + rng.normal(scale=0.05, size=w.shape).astype(w.dtype)
                    for w in layer.get_weights()
                ]
            )


@fresh
def fine_tuned(zoo: Path) -> None:
    """Four MobileNetV2 classifiers: two on the frozen backbone, two with its last block (and
    last convolution) fine-tuned, each differently."""
    base = _mobilenet_v2()
    frozen = [w.copy() for w in base.get_weights()]
    for i, (name, tuned) in enumerate(
        [("kept_a", 0), ("kept_b", 0), ("tuned_c", 1), ("tuned_d", 2)]
    ):
        base.set_weights(frozen)
        if tuned:
            _fine_tune(base, tuned)
        _save_on(zoo / f"{name}.h5", base, 3 + i, head_seed=i)
    _keras().backend.clear_session()


@fresh
def two_families(zoo: Path) -> None:
    """Two classifiers on a MobileNetV2 and two on a MobileNet."""
    K = _keras()
    base = _mobilenet_v2()
    _save_on(zoo / "v2_a.h5", base, 3, head_seed=1)
    _save_on(zoo / "v2_b.h5", base, 4, head_seed=2)
    K.utils.set_random_seed(1)
    v1 = K.applications.MobileNet(
        input_shape=(ZOO_SIZE, ZOO_SIZE, 3),
        alpha=0.25,
        include_top=False,
        weights=None,
        pooling="avg",
    )
    _save_on(zoo / "v1_a.h5", v1, 2, head_seed=3)
    _save_on(zoo / "v1_b.h5", v1, 5, head_seed=4)
    K.backend.clear_session()


# -- zoo.toml (tests/test_manifest_build.py) -----------------------------------------------------

MANIFEST = """
[defaults]
author = "Zoo Keeper"
license = "CC-BY-4.0"
version = "2.1.0"

[models.nested_k3]
display_name = "Shapes"
description = "Tells three shapes apart"
labels = ["circle", "square", "triangle"]
input_name = "photo"
label_name = "shape"
probabilities_name = "shapeProbs"

[models.nested_k2]
input_name = "photo"

[models.flat_k2]
input_name = "photo"

[models.perturbed]
input_name = "photo"
version = "0.1"

[backbones.{backbone}]
name = "SharedMobileNet"
"""


def _plan(zoo: Path) -> dict:
    from convert.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(zoo), "--json"]) == 0
    return json.loads(out.getvalue())


def manifest(zoo: Path, session_zoo: Path) -> None:
    """The session zoo with a zoo.toml that sets metadata, labels, feature names and the
    backbone's file name."""
    shutil.copytree(session_zoo, zoo, dirs_exist_ok=True)
    plan = _plan(zoo)
    group = next(m["group"] for m in plan["models"] if m["name"] == "nested_k3")
    (zoo / "zoo.toml").write_text(MANIFEST.replace("{backbone}", group))


# -- the demo zoo (make convert, tests/test_demo_zoo.py) -----------------------------------------


def demo(zoo: Path) -> str:
    """``scripts/make_demo_zoo.py``, as ``make convert`` runs it; returns what it printed."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_demo_zoo.py"), str(zoo)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# -- what the suite converts ---------------------------------------------------------------------


def _arch_names() -> list[str]:
    import arch_zoo

    return list(arch_zoo.ARCHS)


def conversions() -> dict[str, tuple[Callable[[Path], None], list[str]]]:
    """Key -> (recipe filling an empty zoo folder, extra ``coreml-split convert`` arguments)."""
    table: dict[str, tuple[Callable[[Path], None], list[str]]] = {
        "session": (session, []),
        "session-coremltools": (session, ["--backbone-converter", "coremltools"]),
        "standalone": (standalone, []),
        "fine-tuned": (fine_tuned, ["--jobs", "2"]),
        "two-families": (two_families, ["--jobs", "2"]),
        "demo": (demo, []),
    }
    for flavour in ("k2", "k3"):
        table[f"constructs-{flavour}"] = (lambda z, f=flavour: constructs(z, f), [])
    for name in _arch_names():
        for converter in ("auto", "coremltools"):
            table[f"arch-{name}-{converter}"] = (
                lambda z, n=name: arch(z, n),
                ["--backbone-converter", converter],
            )
    return table


def manifest_conversion(session_zoo: Path) -> tuple[Callable[[Path], None], list[str]]:
    return (lambda z: manifest(z, session_zoo), [])
