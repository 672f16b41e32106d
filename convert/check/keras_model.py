"""Running parts of a neutral graph with the Keras layers that wrote the file.

Each file is loaded by the Keras flavour that wrote it (tf_keras for 2.x, keras 3 for 3.x). The
graph's nodes are then replayed in topological order on TensorFlow tensors, calling the loaded
layer objects, so any sub-graph (input -> split tensor, split tensor -> output) becomes a plain
function. Wrapped in a concrete ``tf.function`` it converts with coremltools whatever the Keras
flavour, nesting or split point.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from convert.errors import ConversionError
from convert.heavy import keras, tensorflow
from convert.read.graph import Graph, is_tensor_ref


def load_keras_model(graph: Graph) -> Any:
    """Load ``graph.source`` with tf_keras (Keras 2.x files) or keras 3 (3.x files)."""
    path = graph.source
    flavour = "keras 3" if graph.keras_major >= 3 else "tf_keras"
    try:
        k = keras(graph.keras_major)
        if graph.keras_major < 3:
            with k.utils.custom_object_scope(_application_layers(2)):
                return _finalized(k.models.load_model(path, compile=False))
        config = _keras3_config(path)
        if config is None or not _repair_ops_nodes(config):
            with k.utils.custom_object_scope(_application_layers(3)):
                return _finalized(k.models.load_model(path, compile=False, safe_mode=True))
        return _finalized(_load_repaired(path, config))
    except Exception as exc:  # Keras raises many kinds; the user needs the reason, in one line
        raise ConversionError(
            path, f"{flavour} cannot load the model: {_first_line(exc)}"
        ) from None


def _finalized(model: Any) -> Any:
    """Let every layer with adapted state recompute it from its loaded weights.

    A Normalization layer computes with ``mean`` and ``variance`` tensors that it derives from its
    stored weights in ``finalize_state()``. Keras 3's legacy HDF5 loader calls that only on the
    layers it sets weights on directly, so in a backbone nested as one layer (EfficientNet's
    Normalization, the usual transfer-learning layout) the tensors keep their build-time values,
    mean 0 and variance 1, and the reloaded model no longer computes what it was trained with.
    """
    for layer in _all_layers(model):
        finalize = getattr(layer, "finalize_state", None)
        if callable(finalize) and getattr(layer, "built", False):
            finalize()
    return model


def _all_layers(model: Any) -> list[Any]:
    out, todo = [], list(getattr(model, "layers", []))
    while todo:
        layer = todo.pop()
        out.append(layer)
        todo.extend(getattr(layer, "layers", []) or [])
    return out


# Keras 3 cannot reload some of its own legacy HDF5 files:
# - its writer drops ``module`` and ``registered_name`` from the nodes of keras.ops calls that
#   are not layers (``x + 3.0`` in MobileNetV3's hard_sigmoid, ConvNeXt's residual adds), and
#   the loader then takes ``Add``/``Multiply`` for the merge layers of the same name, which
#   refuse a constant operand ("Only input tensors may be passed as positional arguments");
# - layers defined inside keras.applications modules (ConvNeXt's LayerScale, ...) are not
#   registered, so the loader does not know them.
# Both are repaired here; the weights are then loaded into the rebuilt model by name order, as
# load_model itself does.


def _keras3_config(path: str) -> dict[str, Any] | None:
    import h5py

    with h5py.File(path, "r") as f:
        raw = f.attrs.get("model_config")
    if raw is None:
        return None
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def _repair_ops_nodes(model_config: dict[str, Any]) -> bool:
    """Give keras.ops nodes back their module; True if any node needed it."""
    repaired = False
    for layer in model_config.get("config", {}).get("layers", []):
        if layer.get("class_name") in ("Functional", "Sequential", "Model"):
            repaired |= _repair_ops_nodes(layer)
        elif set(layer.get("config", {})) == {"name"} and "module" not in layer:
            layer["module"] = "keras.src.ops.numpy"
            layer["registered_name"] = layer["class_name"]
            repaired = True
    return repaired


def _application_layers(major: int) -> dict[str, Any]:
    """Layer classes keras.applications defines but does not register for deserialisation."""
    if major >= 3:
        from keras.src.applications import convnext, inception_resnet_v2
    else:
        from tf_keras.src.applications import convnext, inception_resnet_v2
    return {
        "LayerScale": convnext.LayerScale,
        "StochasticDepth": convnext.StochasticDepth,
        "CustomScaleLayer": inception_resnet_v2.CustomScaleLayer,
    }


def _load_repaired(path: str, config: dict[str, Any]) -> Any:
    """What Keras 3's legacy load_model does, from a repaired config."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format, saving_options, saving_utils
    from keras.src.saving import serialization_lib

    legacy = saving_options.keras_option_scope(use_legacy_config=True)
    with legacy, serialization_lib.SafeModeScope(True), h5py.File(path, "r") as f:
        model = saving_utils.model_from_config(config, custom_objects=_application_layers(3))
        weights = f["model_weights"] if "model_weights" in f else f
        legacy_h5_format.load_weights_from_hdf5_group(weights, model)
    return model


def output_size(model: Any, graph: Graph) -> int:
    """Number of classes, from the loaded model's output shape."""
    shape = tuple(model.output_shape if graph.keras_major < 3 else model.outputs[0].shape)
    if len(shape) != 2 or shape[1] is None:
        raise ConversionError(graph.source, f"output shape {shape} is not (None, classes)")
    return int(shape[1])


def layer_objects(model: Any, graph: Graph) -> dict[tuple[str, ...], Any]:
    """Map each primitive layer path in the graph to the loaded layer object (or, for keras.ops
    nodes of Keras 3, the operation object)."""
    objects: dict[tuple[str, ...], Any] = {}
    for layer in graph.layers():
        if layer.class_name == "InputLayer":
            continue
        obj = model
        for name in layer.path:
            obj = _child(obj, name)
            if obj is None:
                raise ConversionError(
                    graph.source, f"loaded model has no layer '{layer.qualified_name}'"
                )
        objects[layer.path] = obj
    return objects


def _child(parent: Any, name: str) -> Any:
    try:
        return parent.get_layer(name)
    except ValueError:
        pass
    for operation in getattr(parent, "operations", ()):  # Keras 3: ops nodes are not layers
        if operation.name == name:
            return operation
    return None


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


def concrete_function(fn: Callable[[Any], Any], shape: list[int], name: str, source: str) -> Any:
    """Trace ``fn`` for a float32 input of ``shape`` (batch included) named ``name``."""
    tf = tensorflow()
    spec = tf.TensorSpec(shape, tf.float32, name=name)
    try:
        with _grouped_convolutions_inline():
            return tf.function(lambda x: fn(x), autograph=False).get_concrete_function(spec)
    except Exception as exc:  # a layer that cannot be replayed: Keras raises many kinds
        reason = _keras_reason(exc)
        raise ConversionError(source, f"cannot trace the model's layers: {reason}") from None


@contextlib.contextmanager
def _grouped_convolutions_inline() -> Iterator[None]:
    """Trace grouped convolutions as one plain Conv op.

    Both Kerases wrap a grouped convolution (ConvNeXt's depthwise Conv2D with
    ``groups=channels``) in a nested XLA function, because TensorFlow cannot run it on a CPU.
    coremltools cannot convert a nested function call ("TF op 'StatefulPartitionedCall'"), but
    it converts a grouped Conv op. The traced graph is only converted, never run by TensorFlow,
    so for the time of the trace the plain op is used.
    """
    tf = tensorflow()
    restore: list[tuple[Any, str, Any]] = []
    backend = sys.modules.get("keras.src.backend.tensorflow.nn")  # keras 3
    if backend is not None:
        original = backend.conv

        def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
            fmt = backend.backend.standardize_data_format(data_format)
            if fmt != "channels_last" or inputs.shape[-1] == kernel.shape[-2]:
                return original(inputs, kernel, strides, padding, data_format, dilation_rate)
            return tf.nn.convolution(
                inputs, kernel, strides, padding.upper(), dilations=dilation_rate
            )

        restore.append((backend, "conv", original))
        backend.conv = conv
    base_conv = sys.modules.get("tf_keras.src.layers.convolutional.base_conv")  # tf_keras
    if base_conv is not None:
        restore.append(
            (
                base_conv.Conv,
                "_jit_compiled_convolution_op",
                base_conv.Conv.__dict__.get("_jit_compiled_convolution_op"),
            )
        )
        base_conv.Conv._jit_compiled_convolution_op = lambda self, x, kernel: self.convolution_op(
            x, kernel
        )
    try:
        yield
    finally:
        for owner, name, value in restore:
            setattr(owner, name, value)


def _keras_reason(exc: BaseException) -> str:
    """The line of a Keras error inside a trace that says what went wrong."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "Exception encountered when calling layer" in line:
            layer = line.split("Exception encountered when calling ", 1)[1].rstrip(".")
            detail = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{layer}: {detail}"[:300]
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
