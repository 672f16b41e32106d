"""An updatable head's trainable tail as a Keras model, to train beside our trainer.

Used by tests/test_train.py and scripts/bench_train.py. The tail is what
convert/check/reference/train.py trains: from the first updatable layer to the softmax. Its
input is what the head's frozen layers give (:func:`tail_input`). Layer by layer:

- innerProduct: Dense with the spec's weights (kernel = W transposed), trainable only when
  updatable;
- activation ReLU / sigmoid / tanh: Activation;
- batchnorm: BatchNormalization with the spec's statistics, ``trainable = False``, so that
  Keras 3 runs it on those statistics in ``fit`` too;
- flatten, reshapeStatic: nothing (the same values in (N, C));
- softmax: Activation("softmax").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convert.check.reference.train import Tail
from convert.check.reference.weights import decode


def tail_input(head: Any, features: np.ndarray) -> np.ndarray:
    """What the head's frozen layers give its tail for ``features``, float64 (N, C)."""
    return Tail(head, None).frozen_outputs(features)


def keras_tail(head: Any, width: int, dtype: str = "float64") -> Any:
    """The tail of the updatable ``head`` as a Keras 3 model on (N, width) inputs."""
    from convert.heavy import keras

    K = keras(3)
    K.utils.set_random_seed(0)
    inp = K.Input((width,), dtype=dtype)
    x = inp
    setters = []
    for layer in Tail(head, None).layers:
        kind = layer.WhichOneof("layer")
        if kind == "innerProduct":
            p = layer.innerProduct
            dense = K.layers.Dense(
                int(p.outputChannels), use_bias=p.hasBias, dtype=dtype, name=layer.name
            )
            x = dense(x)
            kernel = decode(p.weights, (p.outputChannels, p.inputChannels)).T
            values = [kernel] + ([decode(p.bias)] if p.hasBias else [])
            setters.append((dense, values, bool(layer.isUpdatable)))
        elif kind == "activation":
            what = layer.activation.WhichOneof("NonlinearityType")
            x = K.layers.Activation({"ReLU": "relu"}.get(what, what), dtype=dtype)(x)
        elif kind == "batchnorm":
            bn = layer.batchnorm
            norm = K.layers.BatchNormalization(epsilon=bn.epsilon or 1e-5, dtype=dtype)
            x = norm(x)
            stats = [decode(getattr(bn, f)) for f in ("gamma", "beta", "mean", "variance")]
            setters.append((norm, stats, False))
        elif kind == "softmax":
            x = K.layers.Activation("softmax", dtype=dtype)(x)
    model = K.Model(inp, x)
    for target, values, trainable in setters:
        target.set_weights(values)
        target.trainable = trainable
    return model


def keras_fit(
    model: Any, training: Any, x: np.ndarray, y: np.ndarray, dtype: str = "float64", epochs=1
) -> None:
    """``fit`` with the optimizer, learning rate and mini-batch of ``training`` (a
    read/training.Training), in order (no shuffle), the loss in ``dtype`` too (a Keras loss
    computes in float32 unless told)."""
    from convert.heavy import keras
    from convert.read.training import SGD

    K = keras(3)
    if training.optimizer == SGD:
        optimizer = K.optimizers.SGD(training.learning_rate, momentum=training.momentum)
    else:
        optimizer = K.optimizers.Adam(
            training.learning_rate, training.beta1, training.beta2, training.eps
        )
    model.compile(optimizer=optimizer, loss=K.losses.SparseCategoricalCrossentropy(dtype=dtype))
    model.fit(x, y, batch_size=training.batch_size, epochs=epochs, shuffle=False, verbose=0)


def dense_weights(model: Any) -> dict[str, list[np.ndarray]]:
    """Each trainable Dense layer's [kernel, bias] (or [kernel]), by name."""
    return {
        layer.name: [np.asarray(w) for w in layer.get_weights()]
        for layer in model.layers
        if type(layer).__name__ == "Dense" and layer.trainable
    }


def errors(
    ours: Any, theirs: dict[str, list[np.ndarray]], before: dict[str, list[np.ndarray]]
) -> tuple[float, float]:
    """How far our trained weights (a train.Trained) are from Keras' ``theirs``: the largest
    difference over the largest magnitude of Keras' array it is in, and over the largest step
    Keras took from ``before`` in that array."""
    weights, steps = 0.0, 0.0
    for name, values in theirs.items():
        mine = [ours.weights[name].T] + ([ours.biases[name]] if name in ours.biases else [])
        for a, b, start in zip(mine, values, before[name], strict=True):
            diff = float(np.abs(a - b).max())
            weights = max(weights, diff / float(np.abs(b).max()))
            steps = max(steps, diff / float(np.abs(b - start).max()))
    return weights, steps
