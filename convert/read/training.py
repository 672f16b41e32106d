"""How an updatable head learns on the device: the settings of ``--updatable`` and of
``updatable = true`` in zoo.toml, checked here so that ``plan`` can refuse bad ones before any
build. Written into the head's ``updateParams`` by :mod:`convert.build.updatable`; an app may
change the learning rate within [0, max(1, rate)] at run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

SGD, ADAM = "sgd", "adam"
OPTIMIZERS = (SGD, ADAM)


@dataclass(frozen=True)
class Training:
    """How an updatable head learns on the device. The defaults: the last Dense layer, SGD at
    learning rate 0.01 without momentum, mini-batches of 8, 10 epochs, shuffled."""

    updatable_layers: int = 1  # the last k Dense layers are updatable
    optimizer: str = SGD
    learning_rate: float = 0.01
    batch_size: int = 8
    epochs: int = 10
    shuffle: bool = True
    seed: int | None = None
    momentum: float = 0.0  # sgd
    beta1: float = 0.9  # adam
    beta2: float = 0.999
    eps: float = 1e-8

    def key(self) -> dict[str, Any]:
        return asdict(self)

    def problem(self) -> str | None:
        """None when the settings are usable, else why not (one line)."""
        if self.optimizer not in OPTIMIZERS:
            return f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}"
        for name in ("updatable_layers", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                return f"{name} must be at least 1, not {getattr(self, name)}"
        if not self.learning_rate > 0:
            return f"learning_rate must be above 0, not {self.learning_rate}"
        for name in ("momentum", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                return f"{name} must be in [0, 1), not {getattr(self, name)}"
        if not self.eps > 0:
            return f"eps must be above 0, not {self.eps}"
        return None


TRAINING_KEYS = tuple(f.name for f in fields(Training))


def training_from(values: Mapping[str, Any], base: Training | None = None) -> Training:
    """``base`` (the defaults) with the ``values`` given; unknown keys are a ValueError."""
    unknown = sorted(set(values) - set(TRAINING_KEYS))
    if unknown:
        raise ValueError(f"unknown training setting {unknown[0]!r} ({', '.join(TRAINING_KEYS)})")
    said = {k: v for k, v in values.items() if v is not None}
    return Training(**(asdict(base or Training()) | said))


def training_problem(values: Mapping[str, Any]) -> str | None:
    """None when ``values`` (training keys) make usable settings, else why not."""
    try:
        return training_from(values).problem()
    except (TypeError, ValueError) as exc:
        return str(exc)
