"""Running parts of a neutral graph with the Keras layers that wrote the file.

Each file is loaded by the Keras flavour that wrote it (tf_keras for 2.x, keras 3 for 3.x). The
graph's nodes are then replayed in topological order on TensorFlow tensors, calling the loaded
layer objects, so any sub-graph (input -> split tensor, split tensor -> output) becomes a plain
function. Wrapped in a concrete ``tf.function`` it converts with coremltools whatever the Keras
flavour, nesting or split point.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from convert.errors import ConversionError
from convert.graph import Graph, is_tensor_ref
from convert.heavy import keras, tensorflow


def load_keras_model(graph: Graph) -> Any:
    """Load ``graph.source`` with tf_keras (Keras 2.x files) or keras 3 (3.x files)."""
    path = graph.source
    try:
        k = keras(graph.keras_major)
        if graph.keras_major >= 3:
            return k.models.load_model(path, compile=False, safe_mode=True)
        return k.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many kinds; the user needs the reason, in one line
        flavour = "keras 3" if graph.keras_major >= 3 else "tf_keras"
        raise ConversionError(
            path, f"{flavour} cannot load the model: {_first_line(exc)}"
        ) from None


def output_size(model: Any, graph: Graph) -> int:
    """Number of classes, from the loaded model's output shape."""
    shape = tuple(model.output_shape if graph.keras_major < 3 else model.outputs[0].shape)
    if len(shape) != 2 or shape[1] is None:
        raise ConversionError(graph.source, f"output shape {shape} is not (None, classes)")
    return int(shape[1])


def layer_objects(model: Any, graph: Graph) -> dict[tuple[str, ...], Any]:
    """Map each primitive layer path in the graph to the loaded layer object."""
    objects: dict[tuple[str, ...], Any] = {}
    for layer in graph.layers():
        if layer.class_name == "InputLayer":
            continue
        obj = model
        try:
            for name in layer.path:
                obj = obj.get_layer(name)
        except ValueError:
            raise ConversionError(
                graph.source, f"loaded model has no layer '{layer.qualified_name}'"
            ) from None
        objects[layer.path] = obj
    return objects


def _accepts_training(obj: Any) -> bool:
    try:
        return "training" in inspect.signature(obj.call).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def subgraph_function(
    graph: Graph, objects: dict[tuple[str, ...], Any], start: int, end: int
) -> Callable[[Any], Any]:
    """A function computing tensor ``end`` from tensor ``start`` by replaying the nodes between.

    ``start`` must dominate ``end`` (every path to ``end`` passes through it); the planner's
    split tensors and the model input both do.
    """
    needed = graph.ancestors([end])
    if start not in graph.inputs:
        needed -= graph.ancestors([start])
    order = sorted(n for n in needed if graph.nodes[n].layer.class_name != "InputLayer")

    def run(x: Any) -> Any:
        values: dict[int, Any] = {start: x}

        def feed(value: Any) -> Any:
            if is_tensor_ref(value):
                return values[value["__tensor__"]]
            if isinstance(value, dict):
                return {k: feed(v) for k, v in value.items()}
            if isinstance(value, list):
                return [feed(v) for v in value]
            return value

        for index in order:
            node = graph.nodes[index]
            obj = objects[node.layer.path]
            args = feed(node.args)
            kwargs = {k: feed(v) for k, v in node.kwargs.items() if k not in ("training", "mask")}
            if _accepts_training(obj):
                kwargs["training"] = False
            out = obj(*args, **kwargs)
            outs = out if isinstance(out, (list, tuple)) else [out]
            for tensor_id, value in zip(node.outputs, outs):
                values[tensor_id] = value
        return values[end]

    return run


def concrete_function(fn: Callable[[Any], Any], shape: list[int], name: str) -> Any:
    """Trace ``fn`` for a float32 input of ``shape`` (batch included) named ``name``."""
    tf = tensorflow()
    spec = tf.TensorSpec(shape, tf.float32, name=name)
    return tf.function(lambda x: fn(x)).get_concrete_function(spec)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
