"""Training an updatable head on Linux (convert/check/reference/train.py) against Keras.

Parity, as issue 12 asks: the same head weights, the same images' features (the linked backbone
run by the reference evaluator), the same mini-batches in order and the same optimizer settings;
one epoch of our trainer and one epoch of Keras' ``fit(shuffle=False)`` give the same weights
within 1e-5 of their largest magnitude, for SGD with momentum and for Adam, on a Teachable
Machine head (Dense 100 relu -> Dense n softmax, no bias) and on a head with a frozen
BatchNormalization between its Dense layers. The same comparison with the gradient's sign
flipped fails.

Keras runs in float64 here, its loss included (a Keras loss computes in float32 unless told),
so that the comparison shows the formulas and not float32 rounding. That matters for Adam: it
divides each step by the root of the squared gradients, so where a gradient is little more than
rounding, float32 decides its step. Keras in float32 is 1.3e-4 from Keras in float64 on the
Teachable Machine head after one epoch of Adam (scripts/bench_train.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convert.check.reference import train as trainer
from convert.check.reference.weights import decode
from convert.read.training import ADAM, SGD, Training

IMAGES = 20  # two full mini-batches of 8 and a short one of 4
PARITY = 1e-5

SETTINGS = {
    "sgd-momentum": Training(optimizer=SGD, learning_rate=0.05, batch_size=8, momentum=0.9),
    "adam": Training(optimizer=ADAM, learning_rate=0.01, batch_size=8, eps=1e-7),
}


def _load(path: Path) -> Any:
    from coremltools.proto import Model_pb2

    return Model_pb2.Model.FromString(path.read_bytes())


@pytest.fixture(scope="module")
def heads(updatable_build) -> dict[str, tuple[Any, np.ndarray, np.ndarray]]:
    """name -> (updatable head spec, its input features for IMAGES synthetic images, labels)."""
    from convert.check.reference import evaluate_spec
    from convert.check.verify import image_shape, synthetic_images

    out, code = updatable_build
    assert code == 0
    found = {}
    for name in ("tm", "bn_head"):
        pipeline = _load(out / f"{name}.mlmodel")
        stub, head = pipeline.pipelineClassifier.pipeline.models
        images = synthetic_images(image_shape(pipeline, out), IMAGES, seed=3)
        got, _ = evaluate_spec(stub, {pipeline.description.input[0].name: images}, model_dir=out)
        features = np.asarray(got[stub.description.output[0].name], dtype=np.float32)
        classes = len(head.neuralNetworkClassifier.stringClassLabels.vector)
        found[name] = (head, features, np.arange(IMAGES) % classes)
    return found


def _dense(head: Any) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, Keras kernel [C_in, C_out], bias or None) of each innerProduct, in order."""
    out = []
    for layer in head.neuralNetworkClassifier.layers:
        if layer.WhichOneof("layer") == "innerProduct":
            p = layer.innerProduct
            w = decode(p.weights, (p.outputChannels, p.inputChannels))
            out.append((layer.name, w.T.copy(), decode(p.bias) if p.hasBias else None))
    return out


def _keras_head(head: Any, features: np.ndarray, dtype: str = "float64") -> Any:
    """The head in Keras, with the spec's weights: Dense(relu) [-> frozen BatchNorm] -> Dense
    softmax, as tests/zoos.py built it."""
    from convert.heavy import keras

    K = keras(3)
    K.utils.set_random_seed(0)
    (n1, k1, b1), (n2, k2, b2) = _dense(head)
    inp = K.Input((features.shape[1],), dtype=dtype)
    first = K.layers.Dense(k1.shape[1], "relu", use_bias=b1 is not None, dtype=dtype)
    x = first(inp)
    norm = None
    for layer in head.neuralNetworkClassifier.layers:
        if layer.WhichOneof("layer") == "batchnorm":
            bn = layer.batchnorm
            norm = K.layers.BatchNormalization(epsilon=bn.epsilon, dtype=dtype)
            x = norm(x)
            stats = [decode(getattr(bn, f)) for f in ("gamma", "beta", "mean", "variance")]
    last = K.layers.Dense(k2.shape[1], "softmax", use_bias=b2 is not None, dtype=dtype)
    model = K.Model(inp, last(x))
    first.set_weights([k1] + ([b1] if b1 is not None else []))
    last.set_weights([k2] + ([b2] if b2 is not None else []))
    if norm is not None:
        norm.set_weights(stats)
        norm.trainable = False  # Keras 3 then runs it on its moving statistics, as Core ML
    return model


def _keras_epoch(
    model: Any, training: Training, x: np.ndarray, y: np.ndarray, dtype: str
) -> list[Any]:
    from convert.heavy import keras

    K = keras(3)
    if training.optimizer == SGD:
        optimizer = K.optimizers.SGD(training.learning_rate, momentum=training.momentum)
    else:
        optimizer = K.optimizers.Adam(
            training.learning_rate, training.beta1, training.beta2, training.eps
        )
    # a Keras loss computes in float32 unless told: its rounding would reach the gradients
    model.compile(optimizer=optimizer, loss=K.losses.SparseCategoricalCrossentropy(dtype=dtype))
    model.fit(x, y, batch_size=training.batch_size, epochs=1, shuffle=False, verbose=0)
    return [layer.get_weights() for layer in model.layers if isinstance(layer, K.layers.Dense)]


def _parity(
    head: Any, features: np.ndarray, labels: np.ndarray, training: Training, dtype="float64"
):
    """(largest weight difference over the largest weight, the same for the step taken)."""
    model = _keras_head(head, features, dtype)
    before = [layer[1:] for layer in _dense(head)]
    keras_after = _keras_epoch(model, training, features, labels, dtype)
    ours = trainer.train(head, features, labels, replace(training, epochs=1, shuffle=False))
    weight_error, step_error = 0.0, 0.0
    for (name, _, _), (k0, b0), got in zip(_dense(head), before, keras_after, strict=True):
        pairs = [(ours.weights[name].T, got[0], k0)]
        if b0 is not None:
            pairs.append((ours.biases[name], got[1], b0))
        for mine, theirs, start in pairs:
            diff = float(np.abs(mine - theirs).max())
            weight_error = max(weight_error, diff / float(np.abs(theirs).max()))
            step_error = max(step_error, diff / float(np.abs(theirs - start).max()))
    return weight_error, step_error


def test_the_keras_head_computes_what_the_core_ml_head_does(heads) -> None:
    from convert.check.reference import evaluate_spec
    from convert.check.reference.features import PROBABILITIES

    for name, (head, features, _) in heads.items():
        model = _keras_head(head, features)
        want = np.asarray(model.predict(features, verbose=0))
        got, _ = evaluate_spec(
            head, {head.description.input[0].name: features}, model_dir=Path(".")
        )
        assert np.abs(got[PROBABILITIES] - want).max() < 1e-5, name


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("name", ["tm", "bn_head"])
def test_one_epoch_matches_keras_fit(heads, name: str, setting: str) -> None:
    head, features, labels = heads[name]
    weight_error, step_error = _parity(head, features, labels, SETTINGS[setting])
    print(f"{name} {setting}: weights {weight_error:.1e}, step {step_error:.1e}")
    assert weight_error <= PARITY
    assert step_error <= 1e-2  # the step itself, not only the weights it moved, is Keras'


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_a_wrong_gradient_sign_fails_parity(heads, setting: str, monkeypatch) -> None:
    head, features, labels = heads["tm"]
    right = trainer.logit_gradient
    monkeypatch.setattr(trainer, "logit_gradient", lambda p, onehot: -right(p, onehot))
    weight_error, _ = _parity(head, features, labels, SETTINGS[setting])
    assert weight_error > 100 * PARITY
