"""The layer registry (convert/build/layers/): one translation per Keras layer, each in a family,
each exercised by a parity test, and a layer without one is a lookup miss that names it.

The parity tests themselves live with the networks they build: tests/test_backbones.py (the
image layout: a whole construct as a backbone, against Keras) and tests/test_heads.py (the
vector layout: a head, against Keras and ct.convert). This file checks that between them they
reach every registered translation, so that adding a layer without a test fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
import test_backbones
import test_heads

from convert.build.layers import REGISTRY, Unsupported, lookup
from convert.build.layers.registry import FAMILIES, key_of, register
from convert.read.graph import IDENTITY_AT_INFERENCE, Layer
from convert.read.h5 import read_model

FLAVOURS = ("k2", "k3")
# Keys one Keras never writes: tf_keras saves arithmetic as TFOpLambda functions, Keras 3 as
# keras.ops calls; Keras 3.15 cannot save RandomBrightness to HDF5.
ONLY_K2 = {key for key in REGISTRY if key.startswith("tf.")} | {"RandomBrightness"}
ONLY_K3 = {key for key in REGISTRY if key.startswith("ops.")}
# tf.math.divide(x, y) computes x / y, so tf_keras 2.21 saves it as math.truediv; files from
# other TensorFlow versions may name it, and it is the same translation as tf.math.truediv.
NOT_WRITTEN_TODAY = {"tf.math.divide"}


def _keys(path) -> set[str]:
    graph = read_model(path)
    return {key_of(node.layer) for node in graph.nodes if node.layer.class_name != "InputLayer"}


@pytest.fixture(scope="module")
def exercised(saved) -> dict[str, dict[str, set[str]]]:
    """flavour -> registry key -> the parity cases (constructs and heads) whose files hold it."""
    found: dict[str, dict[str, set[str]]] = {f: {} for f in FLAVOURS}
    for flavour in FLAVOURS:
        cases = {
            f"backbone {name}": test_backbones.saved_construct(saved, name, flavour)
            for name in test_backbones.CONSTRUCTS
        } | {
            f"head {name}": test_heads.saved_head(saved, name, flavour) for name in test_heads.HEADS
        }
        for case, path in cases.items():
            for key in _keys(path):
                found[flavour].setdefault(key, set()).add(case)
    return found


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_translation_is_exercised_by_a_parity_test(exercised, flavour: str) -> None:
    skip = (ONLY_K3 if flavour == "k2" else ONLY_K2) | NOT_WRITTEN_TODAY
    missing = sorted(set(REGISTRY) - skip - set(exercised[flavour]))
    assert not missing, f"registered but in no construct or head of {flavour}: {missing}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_every_layer_of_the_parity_tests_is_registered(exercised, flavour: str) -> None:
    """The constructs use no layer the registry lacks (they would test the fallback instead)."""
    extra = sorted(set(exercised[flavour]) - set(REGISTRY))
    assert not extra, extra


def test_every_translation_names_a_family_and_a_layout() -> None:
    assert set(REGISTRY) >= IDENTITY_AT_INFERENCE
    for key, translation in REGISTRY.items():
        assert translation.key == key
        assert translation.family in FAMILIES, key
        if translation.merge:  # several inputs: a chain of one layer each cannot hold them
            assert not translation.vector, key


def _layer(class_name: str, config: dict[str, Any] | None = None) -> Layer:
    config = {"name": "probe", "trainable": True, "dtype": "float32"} if config is None else config
    return Layer(path=("probe",), class_name=class_name, config=config)


def test_a_layer_without_a_translation_is_a_miss_that_names_it() -> None:
    with pytest.raises(Unsupported, match=r"layer 'probe' \(UpSampling2D\) is not covered"):
        lookup(_layer("UpSampling2D"), vector=False)
    with pytest.raises(Unsupported, match="keras.ops or TensorFlow call"):
        lookup(_layer("Power", {"name": "probe"}), vector=False)  # a keras.ops call
    with pytest.raises(Unsupported, match="keras.ops or TensorFlow call"):
        lookup(_layer("TFOpLambda", {"name": "probe", "function": "math.pow"}), vector=False)


def test_image_layout_translations_are_refused_in_a_chain_head() -> None:
    assert lookup(_layer("Dense"), vector=True).family == "dense"
    assert lookup(_layer("Conv2D"), vector=False).family == "convolution"
    with pytest.raises(Unsupported, match="one chain of layers"):
        lookup(_layer("Conv2D"), vector=True)


def test_a_key_is_registered_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("Dense", family="dense")(lambda e, node, inputs: inputs[0])
    with pytest.raises(ValueError, match="unknown family"):
        register("Probe", family="geometry")
