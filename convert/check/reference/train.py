"""Training an updatable head on Linux, as ``MLUpdateTask`` trains it on a device.

The head is a NeuralNetworkClassifier that :mod:`convert.build.updatable` made updatable: frozen
layers, then a *tail* from the first updatable innerProduct to the ``softmax`` whose output the
categorical cross-entropy loss reads. The frozen layers run once, through the reference
evaluator (:class:`~convert.check.reference.network.Network`); the tail runs forward and
backward here, in float64, on (N, C) blobs. The tail's layers are those Core ML differentiates
through: innerProduct, activation (ReLU, sigmoid, tanh, linear), batchnorm with its stored
statistics (frozen), flatten and reshapeStatic (the move to rank 4, which changes no value).

What Core ML's proto and documentation say, and what we chose where they are silent:

- the loss is categorical cross-entropy on the softmax output against the one-hot label; its
  gradient on the softmax input is ``(p - onehot) / B``: the loss is the mean over a mini-batch,
  as in Keras (Apple does not say);
- mini-batches of ``miniBatchSize`` in order, the last one shorter when the images do not fill
  it; with ``shuffle``, each epoch's order is a permutation drawn from
  ``numpy.random.default_rng(seed + epoch)`` (Core ML's own order is not documented);
- SGD with momentum: ``v = momentum * v + g``, ``w -= lr * v`` (Keras' form, the same steps);
- Adam, Kingma & Ba's Algorithm 1 in the form their section 2 gives for efficiency, the form
  Keras and TensorFlow use: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
  ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, t counting steps from 1.

Weights and optimizer state are float64 while training; the results are float32, as stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from convert.check.reference import features as feat
from convert.check.reference.errors import ReferenceError, UnsupportedLayer
from convert.check.reference.network import Network
from convert.check.reference.weights import decode
from convert.read.training import ADAM, SGD, Training

ACTIVATIONS = ("ReLU", "sigmoid", "tanh", "linear")


@dataclass
class Trained:
    """What one :func:`train` call learned."""

    losses: list[float]  # the mean cross-entropy of each epoch, over its images
    weights: dict[str, np.ndarray]  # updatable layer -> weights [C_out, C_in], float32
    biases: dict[str, np.ndarray]  # updatable layer with a bias -> bias [C_out], float32


def training_of(spec: Any, path: Path | None = None) -> Training:
    """The optimizer, mini-batch, epochs, shuffle and seed an updatable head's ``updateParams``
    hold, as a :class:`~convert.read.training.Training`."""
    params = _network(spec, path).updateParams
    kind = params.optimizer.WhichOneof("OptimizerType")
    if kind == "sgdOptimizer":
        sgd = params.optimizer.sgdOptimizer
        chosen = Training(
            optimizer=SGD,
            learning_rate=sgd.learningRate.defaultValue,
            batch_size=sgd.miniBatchSize.defaultValue,
            momentum=sgd.momentum.defaultValue,
        )
    elif kind == "adamOptimizer":
        adam = params.optimizer.adamOptimizer
        chosen = Training(
            optimizer=ADAM,
            learning_rate=adam.learningRate.defaultValue,
            batch_size=adam.miniBatchSize.defaultValue,
            beta1=adam.beta1.defaultValue,
            beta2=adam.beta2.defaultValue,
            eps=adam.eps.defaultValue,
        )
    else:
        raise ReferenceError(path, "the updatable head has no optimizer in its updateParams")
    return replace(
        chosen,
        epochs=params.epochs.defaultValue,
        shuffle=params.shuffle.defaultValue,
        seed=params.seed.defaultValue,
    )


def logit_gradient(probs: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """d(mean cross-entropy of a mini-batch) / d(softmax input), for B rows."""
    return (probs - onehot) / len(probs)


def train(
    spec: Any,
    inputs: np.ndarray,
    labels: np.ndarray,
    training: Training | None = None,
    path: Path | None = None,
    say: Callable[[int, float], None] | None = None,
) -> Trained:
    """Train the updatable head ``spec`` on ``inputs`` (a batch of its input feature) and
    ``labels`` (class indices), with ``training`` or else the head's own updateParams. ``say``
    hears each epoch's number (from 1) and mean loss. The spec is not changed: see
    :func:`write_back`."""
    training = training or training_of(spec, path)
    problem = training.problem()
    if problem:
        raise ReferenceError(path, f"cannot train: {problem}")
    tail = Tail(spec, path)
    x = tail.frozen_outputs(inputs)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(x) or not len(x):
        raise ReferenceError(path, f"{len(x)} inputs for {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= tail.classes:
        raise ReferenceError(path, f"a label index outside the {tail.classes} classes")
    onehot = np.eye(tail.classes)[labels]
    step = _Step(training, tail.parameters())
    losses = []
    for epoch in range(training.epochs):
        order = np.arange(len(x))
        if training.shuffle:
            order = np.random.default_rng((training.seed or 0) + epoch).permutation(len(x))
        total = 0.0
        for start in range(0, len(x), training.batch_size):
            rows = order[start : start + training.batch_size]
            probs, cache = tail.forward(x[rows])
            total += float(-np.sum(onehot[rows] * np.log(np.maximum(probs, 1e-300))))
            step(tail.backward(cache, logit_gradient(probs, onehot[rows])))
        losses.append(total / len(x))
        if say:
            say(epoch + 1, losses[-1])
    return Trained(losses, *tail.learned())


def write_back(spec: Any, trained: Trained) -> None:
    """Store what :func:`train` learned into the updatable layers of ``spec`` (float32)."""
    for layer in _network(spec, None).layers:
        if layer.name in trained.weights:
            p = layer.innerProduct
            del p.weights.floatValue[:]
            p.weights.floatValue.extend(trained.weights[layer.name].reshape(-1).tolist())
            if layer.name in trained.biases:
                del p.bias.floatValue[:]
                p.bias.floatValue.extend(trained.biases[layer.name].reshape(-1).tolist())


def _network(spec: Any, path: Path | None) -> Any:
    if spec.WhichOneof("Type") != "neuralNetworkClassifier" or not spec.isUpdatable:
        raise ReferenceError(path, "is not an updatable neural network classifier")
    return spec.neuralNetworkClassifier


@dataclass
class _Dense:
    name: str
    w: np.ndarray  # [C_out, C_in]
    b: np.ndarray | None
    learns_w: bool
    learns_b: bool


class Tail:
    """The layers from the first updatable one to the loss's softmax, as a chain on (N, C)."""

    def __init__(self, spec: Any, path: Path | None) -> None:
        nn = _network(spec, path)
        self.path = path
        self.spec = spec
        layers = list(nn.layers)
        first = next((i for i, layer in enumerate(layers) if layer.isUpdatable), None)
        if first is None:
            raise ReferenceError(path, "the updatable head has no updatable layer")
        loss = [item for item in nn.updateParams.lossLayers]
        if (
            len(loss) != 1
            or loss[0].WhichOneof("LossLayerType") != "categoricalCrossEntropyLossLayer"
        ):
            raise ReferenceError(path, "training needs one categorical cross-entropy loss")
        self.loss_input = loss[0].categoricalCrossEntropyLossLayer.input
        self.start = layers[first].input[0]  # the blob the frozen layers give
        self.layers = layers[first:]
        self.nn = nn
        self.dense: dict[str, _Dense] = {}
        blob = self.start
        for index, layer in enumerate(self.layers):
            kind = layer.WhichOneof("layer")
            if list(layer.input) != [blob] or len(layer.output) != 1:
                raise ReferenceError(
                    path, f"layer {layer.name!r} does not continue the chain from {blob!r}"
                )
            blob = layer.output[0]
            if kind == "softmax":
                if index != len(self.layers) - 1 or blob != self.loss_input:
                    raise ReferenceError(
                        path, f"softmax {layer.name!r} must be the last layer, read by the loss"
                    )
            elif kind == "innerProduct":
                self._dense(layer)
            elif kind == "activation":
                what = layer.activation.WhichOneof("NonlinearityType")
                if what not in ACTIVATIONS:
                    raise UnsupportedLayer(path, layer.name, f"activation {what}", "in training")
            elif kind == "batchnorm":
                if layer.batchnorm.computeMeanVar:
                    raise UnsupportedLayer(path, layer.name, kind, "computeMeanVar in training")
            elif kind not in ("flatten", "reshapeStatic"):
                raise UnsupportedLayer(path, layer.name, kind, "in training")
        if self.layers[-1].WhichOneof("layer") != "softmax":
            raise ReferenceError(path, "the updatable head does not end in the loss's softmax")
        self.classes = len(nn.stringClassLabels.vector) or len(nn.int64ClassLabels.vector)

    def _dense(self, layer: Any) -> None:
        p = layer.innerProduct
        shape = (int(p.outputChannels), int(p.inputChannels))
        bias = decode(p.bias, shape[:1]).astype(np.float64) if p.hasBias else None
        self.dense[layer.name] = _Dense(
            layer.name,
            decode(p.weights, shape).astype(np.float64),
            bias,
            bool(layer.isUpdatable and p.weights.isUpdatable),
            bool(layer.isUpdatable and p.hasBias and p.bias.isUpdatable),
        )

    def frozen_outputs(self, inputs: np.ndarray) -> np.ndarray:
        """What the frozen layers give the tail, as float64 (N, C)."""
        feature = self.spec.description.input[0]
        blobs = {feature.name: feat.array_tensor(self.path, feature, np.asarray(inputs), self.nn)}
        if self.start not in blobs:
            blobs = Network(self.nn, self.path).run(blobs, {self.start})
        x = blobs[self.start]
        return x.reshape(len(x), -1).astype(np.float64)

    def parameters(self) -> list[tuple[str, np.ndarray]]:
        """The arrays that learn, keyed ``layer/weights`` or ``layer/bias``, in layer order."""
        out = []
        for dense in self.dense.values():
            if dense.learns_w:
                out.append((f"{dense.name}/weights", dense.w))
            if dense.learns_b and dense.b is not None:
                out.append((f"{dense.name}/bias", dense.b))
        return out

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The softmax output and each layer's input, for :meth:`backward`."""
        cache = []
        for layer in self.layers:
            cache.append(x)
            x = self._apply(layer, x)
        return x, cache

    def _apply(self, layer: Any, x: np.ndarray) -> np.ndarray:
        kind = layer.WhichOneof("layer")
        if kind == "innerProduct":
            dense = self.dense[layer.name]
            if x.shape[1] != dense.w.shape[1]:
                raise ReferenceError(
                    self.path, f"layer {layer.name!r} expects {dense.w.shape[1]} inputs"
                )
            y = x @ dense.w.T
            return y + dense.b if dense.b is not None else y
        if kind == "activation":
            return _activation(layer.activation, x)
        if kind == "batchnorm":
            factor, shift = self._batchnorm(layer)
            return x * factor + shift
        if kind == "softmax":
            e = np.exp(x - x.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        return x  # flatten, reshapeStatic: the same values in (N, C)

    def _batchnorm(self, layer: Any) -> tuple[np.ndarray, np.ndarray]:
        p = layer.batchnorm
        c = (int(p.channels),)
        gamma, beta, mean, var = (
            decode(getattr(p, f), c).astype(np.float64)
            for f in ("gamma", "beta", "mean", "variance")
        )
        factor = gamma / np.sqrt(var + (p.epsilon or 1e-5))
        return factor, beta - mean * factor

    def backward(self, cache: list[np.ndarray], grad: np.ndarray) -> dict[str, np.ndarray]:
        """The gradients of the learning arrays, from the gradient on the softmax input."""
        grads: dict[str, np.ndarray] = {}
        for layer, x in zip(reversed(self.layers[:-1]), reversed(cache[:-1]), strict=True):
            kind = layer.WhichOneof("layer")
            if kind == "innerProduct":
                dense = self.dense[layer.name]
                if dense.learns_w:
                    grads[f"{layer.name}/weights"] = grad.T @ x
                if dense.learns_b:
                    grads[f"{layer.name}/bias"] = grad.sum(axis=0)
                grad = grad @ dense.w
            elif kind == "activation":
                grad = grad * _activation_slope(layer.activation, x)
            elif kind == "batchnorm":
                grad = grad * self._batchnorm(layer)[0]
        return grads

    def learned(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        weights = {d.name: d.w.astype(np.float32) for d in self.dense.values() if d.learns_w}
        biases = {
            d.name: d.b.astype(np.float32)
            for d in self.dense.values()
            if d.learns_b and d.b is not None
        }
        return weights, biases


def _activation(params: Any, x: np.ndarray) -> np.ndarray:
    what = params.WhichOneof("NonlinearityType")
    if what == "ReLU":
        return np.maximum(x, 0)
    if what == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if what == "tanh":
        return np.tanh(x)
    return params.linear.alpha * x + params.linear.beta


def _activation_slope(params: Any, x: np.ndarray) -> np.ndarray:
    what = params.WhichOneof("NonlinearityType")
    if what == "ReLU":
        return (x > 0).astype(np.float64)
    if what == "sigmoid":
        s = 1 / (1 + np.exp(-x))
        return s * (1 - s)
    if what == "tanh":
        return 1 - np.tanh(x) ** 2
    return np.full_like(x, params.linear.alpha)


class _Step:
    """One optimizer step over the learning arrays, updated in place."""

    def __init__(self, training: Training, parameters: list[tuple[str, np.ndarray]]) -> None:
        self.t = training
        self.arrays = dict(parameters)
        self.first = {k: np.zeros_like(v) for k, v in self.arrays.items()}  # velocity, or m
        self.second = {k: np.zeros_like(v) for k, v in self.arrays.items()}  # Adam's v
        self.count = 0

    def __call__(self, grads: dict[str, np.ndarray]) -> None:
        t = self.t
        self.count += 1
        if t.optimizer == ADAM:
            rate = t.learning_rate * np.sqrt(1 - t.beta2**self.count) / (1 - t.beta1**self.count)
        for key, w in self.arrays.items():
            g = grads[key]
            m = self.first[key]
            if t.optimizer == SGD:
                m *= t.momentum
                m += g
                w -= t.learning_rate * m
            else:
                v = self.second[key]
                m += (1 - t.beta1) * (g - m)
                v += (1 - t.beta2) * (g * g - v)
                w -= rate * m / (np.sqrt(v) + t.eps)
