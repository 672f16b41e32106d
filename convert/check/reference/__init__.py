"""A reference evaluator of Core ML NeuralNetwork specs, in numpy.

Core ML runs only on Apple platforms and coremltools cannot predict on Linux, so this package
evaluates ``.mlmodel`` files itself, to check converted models against their Keras originals::

    from convert.check import reference

    model = reference.load("build/shapes.mlmodel")
    out = model.predict({"image": images})          # PIL image(s) or uint8 (N, H, W, 3)
    out["classLabel"]          # list[str], one per image
    out["classLabelProbs"]     # list[dict[str, float]]
    out["__probabilities__"]   # float32 (N, n_classes), in label order
    model.bound                # [("models[0]", Path(".../MobileNetV2-1234abcd.mlmodel"))]

Conventions:

- Every call is batched. Image inputs take a PIL image, a uint8 array (H, W, 3) (or (H, W) for a
  grayscale input), or a batch: a list of PIL images or an array (N, H, W, 3) / (N, H, W).
  Images must already have the declared size. Multi-array inputs take an array of the declared
  shape or a batch of them (a leading axis N); a declared leading 1 may be left out.
- Multi-array outputs are float32 arrays (N, *shape), where shape is the declared shape (or the
  computed one when none is declared) without its leading 1: a ``features`` output declared
  (1, 1280) comes out as (N, 1280). Classifier outputs are lists of N items; the probabilities
  also come as one array under ``"__probabilities__"``.
- Linked models resolve from the folder of the file that holds the link; ``$BUNDLE_MAIN`` maps
  to ``bundle_main`` (default: the model's folder). See :mod:`convert.check.reference.linking`.
- Layers are computed in float32 as the NeuralNetwork.proto formulas describe. A layer kind or
  parameter value outside :data:`REGISTRY`'s coverage raises :class:`UnsupportedLayer`, never
  a guess.
- ``predict(..., compute="float16")`` rounds as a float16 device (the GPU, the Neural Engine)
  would: the network inputs, every layer's outputs and the weights go through float16, the
  math inside a layer stays float32. The default, ``"float32"``, rounds nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convert.check.reference import features as _features
from convert.check.reference.errors import LinkedModelNotFound, ReferenceError, UnsupportedLayer
from convert.check.reference.evaluate import Cache, Evaluator, Scope, read_spec
from convert.check.reference.network import Network as _Network  # noqa: F401  (fills REGISTRY)
from convert.check.reference.registry import COMPUTES, REGISTRY

__all__ = [
    "COMPUTES",
    "REGISTRY",
    "LinkedModelNotFound",
    "ReferenceError",
    "ReferenceModel",
    "UnsupportedLayer",
    "evaluate_spec",
    "load",
]

PROBABILITIES = _features.PROBABILITIES


class ReferenceModel:
    """A parsed ``.mlmodel`` file, ready to evaluate. Prepared layers and linked models are
    cached between calls (a linked file is re-read when it changes on disk)."""

    def __init__(self, path: str | Path, spec: Any) -> None:
        self.path = Path(path)
        self.spec = spec
        self.bound: list[tuple[str, Path]] = []
        self._cache = Cache()

    def predict(
        self,
        inputs: dict[str, Any],
        *,
        bundle_main: Path | None = None,
        compute: str = "float32",
    ) -> dict[str, Any]:
        """Outputs by name for a batch of inputs (see the module docstring for the formats and
        ``compute``)."""
        source = f"{self.path.resolve()}"
        scope = Scope(self.path, self.path.resolve().parent, source)
        self.bound = []
        outputs, self.bound = _predict(self.spec, inputs, scope, self._cache, bundle_main, compute)
        return outputs

    def __repr__(self) -> str:
        return f"ReferenceModel({str(self.path)!r}, {self.spec.WhichOneof('Type')})"


def load(path: str | Path) -> ReferenceModel:
    """Read a ``.mlmodel`` file. Nothing is evaluated (nor linked) until ``predict``."""
    return ReferenceModel(path, read_spec(Path(path)))


def evaluate_spec(
    spec: Any,
    inputs: dict[str, Any],
    *,
    model_dir: Path,
    bundle_main: Path | None = None,
    compute: str = "float32",
) -> tuple[dict[str, Any], list[tuple[str, Path]]]:
    """Evaluate an in-memory spec as if it were a file in ``model_dir``: (outputs, bound)."""
    scope = Scope(None, Path(model_dir), f"<spec {id(spec)}>")
    return _predict(spec, inputs, scope, Cache(), bundle_main, compute)


def _predict(
    spec: Any,
    inputs: dict[str, Any],
    scope: Scope,
    cache: Cache,
    bundle_main: Path | None,
    compute: str,
) -> tuple[dict[str, Any], list[tuple[str, Path]]]:
    declared = {f.name: f for f in spec.description.input}
    unknown = sorted(set(inputs) - set(declared))
    if unknown:
        raise ReferenceError(
            scope.path,
            f"unknown input(s) {', '.join(unknown)}; the model takes: "
            f"{', '.join(declared) or 'nothing'}",
        )
    batches = {}
    for name, feature in declared.items():
        if name not in inputs:
            raise ReferenceError(scope.path, f"missing input {name!r}")
        batches[name] = _features.user_input(scope.path, feature, inputs[name])
    _same_batch(scope, batches)
    evaluator = Evaluator(cache, None if bundle_main is None else Path(bundle_main), compute)
    produced = evaluator.run(spec, batches, scope)
    return _features.user_outputs(produced, spec.description.output), evaluator.bound


def _same_batch(scope: Scope, batches: dict[str, Any]) -> None:
    sizes = {name: len(value) for name, value in batches.items()}
    if len(set(sizes.values())) > 1:
        raise ReferenceError(scope.path, f"inputs have different batch sizes: {sizes}")
