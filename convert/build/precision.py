"""``--weights auto``: the smallest storage per layer that keeps every classifier of a group
within a budget, measured on the user's images.

Some layers move a network far more than others when their weights are quantized: often the
first convolution, some depthwise convolutions and the last projections. The search, for one
backbone and the heads of its members, all built in float32 first:

1. The float32 backbone and heads, run by the reference evaluator on the images, give the
   features and probabilities every trial is compared with.
2. Heads: the smallest storage of :data:`HEAD_LADDER` whose heads alone (on the float32
   features) keep top-1 and stay within half the budget.
3. Sensitivity: each backbone kernel stored alone at :data:`PROBE` (every other at float16)
   moves the features by some relative RMS; that, per parameter the layer holds, orders the
   layers from the most to the least worth protecting.
4. For each pair of :data:`PAIRS` (a base storage and a larger one), the first k layers of that
   order are stored in the larger and the rest in the base; bisection finds the smallest k for
   which every classifier keeps max |dprob| <= the budget and top-1 agreement at 100%.
5. The passing assignment of the fewest bytes wins (float32 when none passes, not even every
   kernel in float16). Every trial is recorded, with its bytes and fidelity.

Each trial is a spec whose layers are stored through :func:`weights.store_layer`, the function
the final file is written with. The backbone ships exactly as measured; a quantized head is
stored again for the file, calibrated on the stored backbone's features rather than the
float32 ones, so its bytes may differ slightly from its trial's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convert.build.layers import weights
from convert.build.layers.weights import Inputs, Precision
from convert.read.manifest import FLOAT16, FLOAT32, INT8

PROBE = "palette4"  # the storage each layer's sensitivity is measured at
# (base, protected): most layers in the base storage, the most sensitive in the other one
PAIRS = (
    ("palette4", "palette8"),
    ("palette6", "palette8"),
    ("palette4", FLOAT16),
    ("palette6", FLOAT16),
    ("palette8", FLOAT16),
    (INT8, FLOAT16),
)
HEAD_LADDER = ("palette6", INT8, FLOAT16)
BATCH = 8


@dataclass
class Trial:
    """One assignment tried: what it was, its weight bytes, and how far it moved the heads."""

    what: str
    bytes: int  # the serialised layers of the backbone and every head
    max_dprob: float
    top1: float  # the lowest top-1 agreement over the heads
    passed: bool


@dataclass
class Choice:
    """What the search chose for one group."""

    backbone: Precision
    heads: str
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.backbone.kernels,
            "layers": dict(self.backbone.layers),
            "heads": self.heads,
            "trials": [t.__dict__ for t in self.trials],
            "seconds": round(self.seconds, 1),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Choice:
        return cls(
            backbone=Precision(data["base"], dict(data["layers"])),
            heads=data["heads"],
            trials=[Trial(**t) for t in data["trials"]],
            seconds=data.get("seconds", 0.0),
        )


class _Stored:
    """A float32 network and its layers stored in each storage, each made once."""

    def __init__(self, spec: Any, inputs: dict[str, Inputs] | None = None) -> None:
        self.spec = spec
        self.inputs = inputs or {}
        self.nn = getattr(spec, spec.WhichOneof("Type"))
        self.sizes = {  # kernel layer -> its parameters, in layer order
            layer.name: len(getattr(layer, layer.WhichOneof("layer")).weights.floatValue)
            for layer in self.nn.layers
            if weights.has_kernel(layer)
        }
        self.kernels = list(self.sizes)
        self._layers: dict[tuple[int, str], Any] = {}

    def _layers_at(self, index: int, storage: str) -> list[Any]:
        """Layer ``index`` stored as ``storage``: the layers that replace it (made once)."""
        key = (index, storage)
        if key not in self._layers:
            layer = type(self.nn.layers[index])()
            layer.CopyFrom(self.nn.layers[index])
            inputs = self.inputs.get(layer.name)
            self._layers[key] = weights.store_layer(layer, Precision(storage), inputs)
        return self._layers[key]

    def _stored(self, precision: Precision) -> list[Any]:
        out = []
        for index, layer in enumerate(self.nn.layers):
            storage = precision.kernel(layer.name)
            out.extend([layer] if storage == FLOAT32 else self._layers_at(index, storage))
        return out

    def build(self, precision: Precision) -> Any:
        """A copy of the spec with every layer stored as ``precision`` says."""
        spec = type(self.spec)()
        spec.CopyFrom(self.spec)
        nn = getattr(spec, spec.WhichOneof("Type"))
        del nn.layers[:]
        nn.layers.extend(self._stored(precision))
        return spec

    def layer_bytes(self, precision: Precision) -> int:
        return sum(layer.ByteSize() for layer in self._stored(precision))


def input_statistics(spec: Any, feed: str, values: np.ndarray) -> dict[str, Inputs]:
    """What the batch ``values`` fed to input ``feed`` of ``spec`` (one network) says about the
    input of every kernel layer: its mean per channel, and the second moment of what each
    output reads (:class:`weights.Inputs`)."""
    from convert.check.reference import features as feat
    from convert.check.reference.network import Network

    nn = getattr(spec, spec.WhichOneof("Type"))
    moments = {
        layer.name: _Moments(layer)
        for layer in nn.layers
        if weights.has_kernel(layer) and len(layer.input) == 1
    }
    wanted = {layer.input[0] for layer in nn.layers if layer.name in moments}
    net = Network(nn, None)
    declared = next(f for f in spec.description.input if f.name == feed)
    for i in range(0, len(values), BATCH):
        batch = values[i : i + BATCH]
        if declared.type.WhichOneof("Type") == "imageType":
            x = feat.image_tensor(None, declared, batch, nn)
        else:
            x = feat.array_tensor(None, declared, batch, nn)
        blobs = net.run({feed: x}, wanted)
        for layer in nn.layers:
            if layer.name in moments:
                moments[layer.name].add(np.asarray(blobs[layer.input[0]], dtype=np.float64))
    found = {name: m.inputs() for name, m in moments.items()}
    return {name: inputs for name, inputs in found.items() if inputs is not None}


def mirrored(images: np.ndarray) -> np.ndarray:
    """The images (N, H, W[, C]) and their mirror images: twice the samples for the
    statistics, and a photograph's mirror image is as likely a photograph."""
    return np.concatenate([images, images[:, :, ::-1]])


class _Moments:
    """The running sums behind one kernel layer's :class:`weights.Inputs`."""

    def __init__(self, layer: Any) -> None:
        self.kind = layer.WhichOneof("layer")
        self.params = getattr(layer, self.kind)
        self.sum: np.ndarray | float = 0.0
        self.second: np.ndarray | float = 0.0
        self.count = 0  # values summed per channel
        self.samples = 0  # windows (or vectors) in the second moment
        self.fits = True

    def add(self, blob: np.ndarray) -> None:
        if not self.fits:
            return
        if self.kind == "convolution":
            if self.params.isDeconvolution or blob.ndim < 3:
                self.fits = False
                return
            self._add_windows(blob.reshape(-1, *blob.shape[-3:]))
            return
        if self.kind == "innerProduct":
            width = self.params.inputChannels
            if blob.ndim >= 5:  # rank 4 or 5 past the batch: the last three axes are flattened
                blob = blob.reshape(*blob.shape[:-3], -1)
        else:
            width = self.params.weightMatrixFirstDimension
        if blob.shape[-1] != width:
            self.fits = False
            return
        rows = blob.reshape(-1, width)
        self.sum = self.sum + rows.sum(axis=0)
        self.count += len(rows)
        self.second = self.second + (rows.T @ rows)[None]
        self.samples += len(rows)

    def _add_windows(self, blob: np.ndarray) -> None:
        from convert.check.reference.layers.convolution import windows

        groups = self.params.nGroups or 1
        self.sum = self.sum + blob.sum(axis=(0, 2, 3))
        self.count += blob.shape[0] * blob.shape[2] * blob.shape[3]
        for one in blob:  # an image at a time bounds the windows' copy
            view = windows(self.params, one[None])[0]  # C, Ho, Wo, kh, kw
            channels, ho, wo, kh, kw = view.shape
            cols = view.transpose(0, 3, 4, 1, 2).reshape(groups, channels // groups * kh * kw, -1)
            self.second = self.second + cols @ cols.transpose(0, 2, 1)
            self.samples += ho * wo

    def inputs(self) -> Inputs | None:
        if not self.fits or not self.count:
            return None
        second = None
        assert isinstance(self.second, np.ndarray)
        if self.samples >= self.second.shape[-1]:  # fewer would leave it singular
            second = self.second / self.samples
        return Inputs(np.asarray(self.sum) / self.count, second)


def store(spec: Any, precision: Precision, inputs: dict[str, Inputs]) -> None:
    """Store a float32 spec's layers as ``precision`` says, in place, each quantized kernel
    rounded with compensation and its bias corrected (:func:`input_statistics`)."""
    nn = getattr(spec, spec.WhichOneof("Type"))
    stored = [
        new
        for layer in nn.layers
        for new in weights.store_layer(layer, precision, inputs.get(layer.name))
    ]
    del nn.layers[:]
    nn.layers.extend(stored)


def run(spec: Any, feed: str, values: np.ndarray, want: str) -> np.ndarray:
    """Output ``want`` of an in-memory spec for the batch ``values`` fed to input ``feed``."""
    from convert.check.reference import evaluate_spec

    outs = []
    for i in range(0, len(values), BATCH):
        got, _ = evaluate_spec(spec, {feed: values[i : i + BATCH]}, model_dir=Path("."))
        outs.append(np.asarray(got[want], dtype=np.float64))
    return np.concatenate(outs)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.sqrt(np.mean(b**2))) or 1.0
    return float(np.sqrt(np.mean((a - b) ** 2))) / scale


def choose(
    backbone: Any,
    heads: dict[str, Any],
    images: np.ndarray,
    max_dprob: float,
    say: Callable[[str], None] | None = None,
    image: str = "image",
    fixed_heads: dict[str, str] | None = None,
    inputs: dict[str, Inputs] | None = None,
) -> Choice:
    """The storage for ``backbone`` (a float32 spec: image -> features) and the ``heads`` of
    its members (float32 specs: features -> probabilities), from the uint8 ``images``. Heads
    named in ``fixed_heads`` keep the storage given there; the rest share the one chosen.
    ``inputs``: the backbone layers' input statistics (:func:`input_statistics`; else from
    ``images``), for compensated rounding and bias correction."""
    fixed = dict(fixed_heads or {})
    say = say or (lambda _msg: None)
    started = time.perf_counter()
    probs = "__probabilities__"
    if inputs is None:
        inputs = input_statistics(backbone, image, mirrored(images))
    back = _Stored(backbone, inputs)
    features = run(backbone, image, images, "features")
    stored_heads = {
        name: _Stored(spec, input_statistics(spec, "features", features.astype(np.float32)))
        for name, spec in heads.items()
    }
    expected = {n: run(h, "features", features.astype(np.float32), probs) for n, h in heads.items()}
    reference_top1 = {n: p.argmax(axis=1) for n, p in expected.items()}

    def fidelity(got: dict[str, np.ndarray]) -> tuple[float, float]:
        worst = max(float(np.abs(got[n] - expected[n]).max()) for n in got)
        top1 = min(float(np.mean(got[n].argmax(axis=1) == reference_top1[n])) for n in got)
        return worst, top1

    def heads_at(storage: str, feats: np.ndarray) -> dict[str, np.ndarray]:
        return {
            n: run(
                s.build(Precision(fixed.get(n, storage))),
                "features",
                feats.astype(np.float32),
                probs,
            )
            for n, s in stored_heads.items()
        }

    def head_bytes(storage: str) -> int:
        return sum(s.layer_bytes(Precision(fixed.get(n, storage))) for n, s in stored_heads.items())

    choice = Choice(backbone=Precision(FLOAT32), heads=FLOAT32)
    # 2. the heads alone, unless every head's storage is given
    for storage in HEAD_LADDER if set(heads) - set(fixed) else ():
        worst, top1 = fidelity(heads_at(storage, features))
        passed = worst <= max_dprob / 2 and top1 == 1.0
        choice.trials.append(
            Trial(f"heads {storage}, backbone float32", head_bytes(storage), worst, top1, passed)
        )
        if passed:
            choice.heads = storage
            break
    # 3. sensitivity of each backbone kernel
    say(f"measuring the sensitivity of {len(back.kernels)} layers on {len(images)} images")
    order = []  # (relative RMS change of the features, per parameter; layer)
    for name in back.kernels:
        moved = run(back.build(Precision(FLOAT16, {name: PROBE})), image, images, "features")
        order.append((_relative(moved, features) / max(back.sizes[name], 1), name))
    ranked = [name for _, name in sorted(order, reverse=True)]

    def trial(precision: Precision, what: str) -> Trial:
        feats = run(back.build(precision), image, images, "features")
        worst, top1 = fidelity(heads_at(choice.heads, feats))
        size = back.layer_bytes(precision) + head_bytes(choice.heads)
        t = Trial(what, size, worst, top1, worst <= max_dprob and top1 == 1.0)
        choice.trials.append(t)
        say(f"{what}: max |dprob| {worst:.2g}, top-1 {top1:.0%}, {size / 1e6:.2f} MB")
        return t

    def protected(base: str, kept: str, k: int) -> Precision:
        return Precision(base, {name: kept for name in ranked[:k]})

    # 4. per pair of storages, the fewest layers to keep in the larger one
    best: tuple[int, Precision] | None = None
    for base, kept in PAIRS:
        if best is not None and back.layer_bytes(Precision(base)) >= best[0]:
            continue  # even with nothing kept larger, no smaller than the best found
        low, high = 0, len(ranked)
        found: tuple[int, Precision] | None = None
        while low <= high:
            k = (low + high) // 2
            precision = protected(base, kept, k)
            t = trial(precision, f"{base}, {k} of {len(ranked)} layers {kept}")
            if t.passed:
                found = (t.bytes, precision)
                high = k - 1
            else:
                low = k + 1
        if found and (best is None or found[0] < best[0]):
            best = found
    if best is None:  # not even float16 kernels (k = all) met the budget
        say(f"no storage smaller than float32 keeps max |dprob| <= {max_dprob:g}: float32")
        best = (0, Precision(FLOAT32))
    choice.backbone = best[1]
    choice.seconds = time.perf_counter() - started
    return choice
