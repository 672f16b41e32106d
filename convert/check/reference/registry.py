"""The layer registry: NeuralNetworkLayer kind -> small numpy function.

Every blob is a float32 numpy array whose axis 0 is the *prediction* axis: one entry per
example of the batch being evaluated (or 1 for constants, which broadcast). The Core ML tensor
of one example is ``blob[i]``, so a blob's Core ML rank is ``blob.ndim - 1``. Layer functions
take ``(layer, inputs)`` and return one array or a list (one per output). Axes given in a layer's
parameters are Core ML axes; :func:`axis` maps them onto the array.

A layer function raises :class:`~convert.check.reference.errors.Unsupported` for a parameter
value it does not implement; the network reports that as ``UnsupportedLayer`` with the layer's name.

The *compute* precision is what a device would round to: ``"float32"`` (the CPU) or
``"float16"`` (the GPU and the Neural Engine). In float16 the network rounds its inputs and
every layer's outputs, and :meth:`Layer.weight` rounds the decoded weights, with
:func:`rounded`; the math inside a layer stays float32, as a device accumulates in more than
float16. Layer functions need not know which precision they run in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from convert.check.reference import weights
from convert.check.reference.errors import Unsupported

Arrays = list[np.ndarray]
LayerFn = Callable[["Layer", Arrays], "np.ndarray | Arrays"]

REGISTRY: dict[str, LayerFn] = {}
COMPUTES = ("float32", "float16")


def register(*kinds: str) -> Callable[[LayerFn], LayerFn]:
    """Register ``fn`` for each layer kind (the name ``layer.WhichOneof("layer")`` returns)."""

    def add(fn: LayerFn) -> LayerFn:
        for kind in kinds:
            if kind in REGISTRY:
                raise ValueError(f"layer kind {kind!r} registered twice")
            REGISTRY[kind] = fn
        return fn

    return add


@dataclass
class Layer:
    """One NeuralNetworkLayer as the layer functions see it; decoded weights are cached."""

    name: str
    kind: str
    params: Any
    compute: str = "float32"
    _weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def weight(
        self, name: str, shape: Sequence[int] | None = None, axis: int = 0, of: Any = None
    ) -> np.ndarray:
        """The WeightParams field ``name`` of the parameters (or of the sub-message ``of``),
        decoded once (see :func:`convert.check.reference.weights.decode`) and rounded to the
        compute precision."""
        key = name if of is None else f"{of.DESCRIPTOR.name}.{name}"
        if key not in self._weights:
            wanted = None if shape is None else tuple(int(d) for d in shape)
            message = self.params if of is None else of
            values = weights.decode(getattr(message, name), wanted, axis)
            self._weights[key] = rounded(values, self.compute)
        return self._weights[key]

    def cached(self, key: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        """A derived constant (e.g. a reshaped weight), computed on first use."""
        if key not in self._weights:
            self._weights[key] = make()
        return self._weights[key]

    def enum(self, field_name: str, message: Any = None) -> str:
        """The name of an enum field's value, e.g. ``"MAX"``."""
        message = self.params if message is None else message
        descriptor = message.DESCRIPTOR.fields_by_name[field_name].enum_type
        value = getattr(message, field_name)
        entry = descriptor.values_by_number.get(value)
        return entry.name if entry else str(value)

    def unsupported(self, detail: str) -> NoReturn:
        raise Unsupported(detail)


def rounded(x: np.ndarray, compute: str) -> np.ndarray:
    """``x`` itself in float32; in float16, ``x`` rounded to float16 and back to float32, values
    beyond float16's range becoming +-inf as on a device."""
    if compute == "float32":
        return x
    with np.errstate(over="ignore"):
        return x.astype(np.float16).astype(np.float32)


# -- helpers shared by the layer families ----------------------------------------------------


def rank(x: np.ndarray) -> int:
    """Core ML rank of a blob (its prediction axis excluded)."""
    return x.ndim - 1


def axis(a: int, core_rank: int) -> int:
    """Array axis of Core ML axis ``a`` (negative counts from the end) for a blob of that rank."""
    if not -core_rank <= a < core_rank:
        raise ValueError(f"axis {a} out of range for rank {core_rank}")
    return a % core_rank + 1


def axes(values: Sequence[int], core_rank: int) -> tuple[int, ...]:
    return tuple(sorted({axis(int(a), core_rank) for a in values}))


def with_rank(x: np.ndarray, core_rank: int) -> np.ndarray:
    """``x`` with unit axes inserted after the prediction axis up to ``core_rank``."""
    missing = core_rank - rank(x)
    if missing <= 0:
        return x
    return x.reshape(x.shape[:1] + (1,) * missing + x.shape[1:])


def aligned(xs: Sequence[np.ndarray]) -> Arrays:
    """Inputs brought to one Core ML rank, so numpy broadcasting matches Core ML's."""
    top = max(rank(x) for x in xs)
    return [with_rank(x, top) for x in xs]


def need_rank(layer: Layer, x: np.ndarray, minimum: int) -> None:
    if rank(x) < minimum:
        raise ValueError(
            f"{layer.kind} needs an input of rank >= {minimum}, got shape {x.shape[1:]}"
        )


def batch_broadcast(xs: Sequence[np.ndarray]) -> Arrays:
    """Inputs whose prediction axis is 1 (constants) repeated to the batch of the others."""
    n = max(x.shape[0] for x in xs)
    return [x if x.shape[0] == n else np.broadcast_to(x, (n, *x.shape[1:])) for x in xs]
