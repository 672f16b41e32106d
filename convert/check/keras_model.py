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
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from convert.errors import ConversionError, ModelFileError
from convert.heavy import keras, tensorflow
from convert.read.archive import Archive, is_archive
from convert.read.graph import Graph, is_tensor_ref
from convert.read.h5 import load_weight


def load_keras_model(graph: Graph) -> Any:
    """Load ``graph.source`` with tf_keras (Keras 2.x files) or keras 3 (3.x files).

    The file's ``model_config`` is checked first (:func:`refuse_foreign_code`): Keras never sees
    a file that names code outside Keras. Every load then runs in Keras' safe mode.
    """
    path = graph.source
    flavour = "keras 3" if graph.keras_major >= 3 else "tf_keras"
    config = _model_config(path)
    try:
        k = keras(graph.keras_major)
        names = _KerasNames.of(graph.keras_major)
    except Exception as exc:  # an installation problem: said in one line like the others
        reason = f"{flavour} cannot load the model: {_first_line(exc)}"
        raise ConversionError(path, reason) from None
    aliased = _apply_aliases(config, graph.aliases)
    try:
        refuse_foreign_code(path, config, names)
    except ConversionError as exc:  # a patched Keras class, saved with its own module?
        unknown = _foreign_class(config, k)
        if unknown is None:
            raise
        raise ConversionError(path, f"{exc.reason}; {_alias_hint(unknown, k)}") from None
    archive = is_archive(Path(path))
    # Keras tells a .keras archive by its name, coreml-split by its content
    misnamed = archive != (Path(path).suffix.lower() == ".keras")
    try:
        if graph.keras_major < 3:
            if aliased or misnamed:
                return _finalized(_from_config(graph, config, k))
            from tf_keras.src.saving.serialization_lib import SafeModeScope

            # tf_keras' HDF5 loader takes no safe_mode; its Lambda layer checks the scope
            # (outside one it unmarshals the bytecode), so the scope is entered here.
            with SafeModeScope(True), k.utils.custom_object_scope(_application_layers(2)):
                return _finalized(k.models.load_model(path, compile=False))
        repaired = _repair_ops_nodes(config)
        repaired |= _repair_single_tensor_io(config, graph.keras_version)
        if not (repaired or aliased or misnamed):
            with k.utils.custom_object_scope(_application_layers(3)):
                return _finalized(k.models.load_model(path, compile=False, safe_mode=True))
        if archive:
            return _finalized(_from_config(graph, config, k))
        return _finalized(_load_repaired(path, config))
    except Exception as exc:  # Keras raises many kinds; the user needs the reason, in one line
        reason = _load_reason(exc)
        unknown = _UNKNOWN_CLASS.search(reason)
        if unknown:
            reason = (
                f"{unknown.group(1)} is not a {flavour} class; {_alias_hint(unknown.group(1), k)}"
            )
        raise ConversionError(path, f"{flavour} cannot load the model: {reason}") from None


def set_dense_weights(model: Any, weights: dict[str, list[Any]], path: Path) -> None:
    """Give the Dense layers named in ``weights`` (anywhere in ``model``, nested models
    included) those weights; a name that is not one Dense layer of a matching shape is a
    ConversionError."""
    found: dict[str, list[Any]] = {}

    def visit(layer: Any) -> None:
        if layer.name in weights and type(layer).__name__ == "Dense":
            found.setdefault(layer.name, []).append(layer)
        for inner in getattr(layer, "layers", []):
            visit(inner)

    visit(model)
    for name, values in weights.items():
        layers = found.get(name, [])
        if len(layers) != 1:
            raise ConversionError(path, f"the model has {len(layers)} Dense layers named {name!r}")
        shapes = [tuple(w.shape) for w in layers[0].get_weights()]
        if shapes != [tuple(v.shape) for v in values]:
            raise ConversionError(
                path, f"Dense layer {name!r} holds weights of shapes {shapes}, not the update's"
            )
        layers[0].set_weights(values)


def _model_config(path: Path | str) -> dict[str, Any]:
    """The file's ``model_config`` (a .keras archive's config.json), parsed as Keras parses it
    (the reader has checked it)."""
    import h5py

    try:
        if is_archive(Path(path)):
            with Archive(Path(path)) as archive:
                config = json.loads(archive.config())
        else:
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except ModelFileError as exc:
        raise ConversionError(path, exc.reason) from None
    except (OSError, TypeError, ValueError) as exc:
        raise ConversionError(path, f"cannot read model_config: {_first_line(exc)}") from None
    if not isinstance(config, dict):
        raise ConversionError(path, "model_config is not a JSON object")
    return config


# -- no code from a model file ------------------------------------------------------------------
#
# Keras configs name Python objects by ``module`` + ``class_name`` (and ``registered_name`` for
# classes registered with ``register_keras_serializable``, "package>Name"). What the installed
# Kerases do with those names when they load an HDF5 file, read from their source:
# - keras 3.15: the legacy HDF5 loader hands every config entry that carries a ``module`` to
#   ``saving/serialization_lib.deserialize_keras_object`` (Sequential/Functional
#   ``from_config``, ``legacy/saving/json_utils._decode_helper``). Its
#   ``_retrieve_class_or_fn`` first takes any class registered under ``registered_name`` (code
#   the process imported, not Keras'), then ``importlib.import_module``s the module if its
#   package is keras, keras_hub, keras_cv or keras_nlp, keeping KerasSaveable classes only. That
#   holds in safe and unsafe mode alike; safe mode only refuses Python lambdas. Keras 3 before
#   3.11 (keras-team/keras#21429) imported any module a file named.
# - tf_keras 2.21: its HDF5 loader deserialises in legacy mode (``in_tf_saved_model_scope``),
#   which looks names up among Keras' own objects and registered ones and imports nothing; its
#   newer ``serialization_lib`` (``.keras`` files, and outside that scope) imports ANY module
#   named, and takes ``builtins`` functions from Python's builtins (``eval``, ``exit``). The
#   HDF5 loader has no safe_mode, and a Lambda (also one inside TimeDistributed) unmarshals and
#   runs its bytecode unless a SafeModeScope is active.
# - a tf_keras TFOpLambda calls any TensorFlow API function by name, on the file's constants:
#   ``io.write_file``, ``io.gfile.remove``, ``load_op_library`` included.
# So before Keras sees a file, every dict in its model_config is checked here.
#
# Allowed: modules "keras", "keras.*", "tf_keras", "tf_keras.*". Measured on files both Kerases
# save (test_untrusted.py saves them: keras.applications MobileNetV2, Teachable Machine-like
# nested Sequentials, layers with activations, initializers, regularizers and constraints):
# keras 3.15 writes "keras" (dtype policies), "keras.initializers", "keras.regularizers",
# "keras.constraints"; tf_keras 2.21 the last three, plus "keras.layers" and
# "tf_keras.src.engine.functional" (registered_name "Functional") inside nested Sequentials.
# Neither writes "builtins" into an HDF5 model_config (activations are written as names); Keras
# 3's serializer writes it for a function object of Python's builtins. It is allowed only for a
# function the loading Keras defines itself (activations, initializers, ...), which is where
# keras 3 looks it up. Registered names ("package>Name") are allowed only if the loading Keras
# registered them itself (tf_keras: "Custom>Adam", ...).

KERAS_PACKAGES = ("keras", "tf_keras")
_NEVER_IMPORTS = "coreml-split never imports code named by a model file"
_RUNS_CODE = "loading it would run Python code stored in the file, so coreml-split refuses it"
CODE_CLASSES = {"Lambda"}  # also inside wrappers (TimeDistributed, Bidirectional), unlike read/
# Layers that load something else from a path the file names.
LOADING_CLASSES = {"TFSMLayer": "a TFSMLayer, which loads another model from a path"}
# tf_keras TFOpLambda functions (by TensorFlow API name) that only compute: these namespaces,
# and top-level functions but those below, which print, load native code or take callables.
TF_NAMESPACES = {"__operators__", "math", "nn", "image", "linalg", "signal", "bitwise", "dtypes"}
TF_REFUSED = {
    "print",
    "py_function",
    "numpy_function",
    "load_op_library",
    "load_library",
    "load_pluggable_device_library",
    "function",
    "init_scope",
    "Variable",
    "Module",
    "device",
}
_TF_OP_LAYERS = {"TFOpLambda", "SlicingOpLambda", "ClassMethod"}


class _KerasNames:
    """What the loading Keras itself defines: its own registered names ("Custom>Adam" in
    tf_keras) and the function names its built-in modules hold (for ``builtins`` entries)."""

    def __init__(self, registered: set[str], functions: set[str]) -> None:
        self.registered = registered
        self.functions = functions

    @classmethod
    def of(cls, major: int) -> _KerasNames:
        if major >= 3:
            import keras as k
            from keras.src.saving import object_registration

            table = object_registration.GLOBAL_CUSTOM_OBJECTS
        else:
            import tf_keras as k
            from tf_keras.src.saving import object_registration

            table = object_registration._GLOBAL_CUSTOM_OBJECTS
        registered = {
            name
            for name, obj in table.items()
            if _is_keras_module(str(getattr(obj, "__module__", "")))
        }
        modules = ("activations", "constraints", "initializers", "losses", "metrics")
        functions = {
            name
            for module in modules
            for name, obj in vars(getattr(k, module)).items()
            if callable(obj)
            and not isinstance(obj, type)
            and not name.startswith("_")
            and name not in ("get", "serialize", "deserialize")
        }
        return cls(registered, functions)


def _is_keras_module(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in KERAS_PACKAGES)


def refuse_foreign_code(path: Path | str, config: dict[str, Any], names: _KerasNames) -> None:
    """Raise ConversionError (one line) if ``config`` names anything Keras would import, run or
    resolve from outside Keras: a module outside the Keras packages, a class registered by other
    code, a Lambda or Python lambda anywhere, a TensorFlow function that does more than compute."""
    root = _entry_name(config) or "model"
    problem = _foreign(config, (), root, names)
    if problem:
        raise ConversionError(path, problem)


def _entry_name(entry: dict[str, Any]) -> str:
    config = entry.get("config")
    name = entry.get("name") or (config.get("name") if isinstance(config, dict) else None)
    return name if isinstance(name, str) else ""


def _foreign(value: Any, where: tuple[str, ...], root: str, names: _KerasNames) -> str | None:
    """The first reason to refuse found in ``value`` (a config, at any depth), or None.
    ``where``: the path of the layer being scanned (empty for the model itself)."""
    if isinstance(value, list):
        for item in value:
            found = _foreign(item, where, root, names)
            if found:
                return found
        return None
    if not isinstance(value, dict):
        return None
    said = f"layer '{'/'.join(where)}'" if where else f"model '{root}'"
    found = _foreign_entry(value, said, names)
    if found:
        return found
    for key, item in value.items():
        if key in ("layers", "layer"):  # a model's layers, a wrapper's layer: name each one
            for layer in item if isinstance(item, list) else [item]:
                inner = where + (_entry_name(layer),) if isinstance(layer, dict) else where
                found = _foreign(layer, inner, root, names)
                if found:
                    return found
            continue
        found = _foreign(item, where, root, names)
        if found:
            return found
    return None


def _foreign_entry(entry: dict[str, Any], where: str, names: _KerasNames) -> str | None:
    class_name = entry.get("class_name")
    module = entry.get("module")
    if class_name in CODE_CLASSES:
        return f"{where} holds a {class_name} layer; {_RUNS_CODE}"
    if class_name == "__lambda__":
        return f"{where} holds a Python lambda; {_RUNS_CODE}"
    if class_name in LOADING_CLASSES:
        return f"{where} is {LOADING_CLASSES[class_name]} the file names; coreml-split refuses it"
    if module is not None:
        if not isinstance(module, str):
            return f"{where} names a module that is not a string ({module!r})"
        builtin_function = (
            module == "builtins"
            and class_name == "function"
            and isinstance(entry.get("config"), str)
            and entry["config"] in names.functions
        )
        if not (_is_keras_module(module) or builtin_function):
            return f"{where} names Python module '{module}'; {_NEVER_IMPORTS}"
    # The legacy format names a registered class by its class_name ("Custom>CustomScaleLayer");
    # the new one by registered_name, and a registered function by its config.
    keys = ("class_name", "registered_name") + (("config",) if class_name == "function" else ())
    for key in keys:
        registered = entry.get(key)
        if isinstance(registered, str) and ">" in registered:
            if registered not in names.registered:
                return (
                    f"{where} names '{registered}', a class or function registered by code "
                    f"outside Keras; {_NEVER_IMPORTS}"
                )
    if class_name in _TF_OP_LAYERS and isinstance(entry.get("config"), dict):
        config = entry["config"]
        symbol = config.get("function", config.get("cls_symbol"))
        if symbol is not None and not _computes_only(symbol):
            return (
                f"{where} calls TensorFlow's tf.{symbol}, which coreml-split does not run "
                "(a TFOpLambda may only compute: math, nn, image and other pure functions)"
            )
    return None


def _computes_only(symbol: Any) -> bool:
    """Whether a TFOpLambda's TensorFlow API name is a pure computation."""
    if not isinstance(symbol, str):
        return False
    for prefix in ("compat.v1.", "compat.v2."):
        symbol = symbol.removeprefix(prefix)
    parts = symbol.split(".")
    if len(parts) == 1:
        return parts[0] not in TF_REFUSED and not parts[0].startswith("_")
    return parts[0] in TF_NAMESPACES


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
#   registered, so the loader does not know them;
# - Keras 3.0 to 3.10 wrote the one input and one output of a Functional model as a list of one
#   tensor reference, ``[["input_1", 0, 0]]``, and unwrapped such lists when loading; Keras 3.11
#   (keras-team/keras#21341) stopped doing both, so it reads an older file's Functional as
#   taking and returning a list of one tensor. Nested in a Sequential (a Teachable Machine
#   model re-saved by Keras 3.7) the next layer then gets a list, and the load fails with
#   'Layer "functional" expects 1 named input(s) ... but it received 2 input tensors'.
# All three are repaired here; the weights are then loaded into the rebuilt model by name order, as
# load_model itself does.


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


def _repair_single_tensor_io(model_config: dict[str, Any], keras_version: str) -> bool:
    """Unwrap the one-tensor ``input_layers`` / ``output_layers`` lists of every Functional in a
    file written by Keras 3.0-3.10, as those versions' loader did; True if any needed it."""
    try:
        major, minor = (int(part) for part in keras_version.split(".")[:2])
    except ValueError:
        return False
    if major != 3 or minor >= 11:
        return False
    repaired = False
    todo = [model_config]
    while todo:
        entry = todo.pop()
        config = entry.get("config")
        if not isinstance(config, dict):
            continue
        if entry.get("class_name") in ("Functional", "Model"):
            for key in ("input_layers", "output_layers"):
                refs = config.get(key)
                if isinstance(refs, list) and len(refs) == 1 and _is_tensor_ref(refs[0]):
                    config[key] = refs[0]
                    repaired = True
        todo.extend(layer for layer in config.get("layers", []) if isinstance(layer, dict))
    return repaired


def _is_tensor_ref(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)


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


# -- aliases and configs Keras is given rebuilt --------------------------------------------------

# What Keras says of a class it does not know (keras 3, tf_keras), once _load_reason shortened it.
_UNKNOWN_CLASS = re.compile(
    r"(?:Unknown layer|Could not locate class):? '([A-Za-z_][A-Za-z0-9_]*)'"
)


def _keras_suffix(class_name: str, k: Any) -> str | None:
    """The longest Keras layer name that ends ``class_name`` after a capital
    (CustomDepthwiseConv2D -> DepthwiseConv2D), if any."""
    return next(
        (
            class_name[i:]
            for i in range(1, len(class_name))
            if class_name[i].isupper() and isinstance(getattr(k.layers, class_name[i:], None), type)
        ),
        None,
    )


def _alias_hint(class_name: str, k: Any) -> str:
    """How to tell coreml-split which Keras class ``class_name`` is."""
    target = _keras_suffix(class_name, k) or "<KerasClass>"
    return (
        f"if it is a Keras layer saved under another name, say which in zoo.toml: "
        f'[aliases] {class_name} = "{target}"'
    )


def _foreign_class(config: Any, k: Any) -> str | None:
    """The first layer class in ``config`` that names a module outside Keras and is a Keras
    layer's name with something before it (CustomDepthwiseConv2D): worth an alias."""
    if isinstance(config, list):
        return next((c for c in map(lambda v: _foreign_class(v, k), config) if c), None)
    if not isinstance(config, dict):
        return None
    name, module = config.get("class_name"), config.get("module")
    if isinstance(name, str) and isinstance(config.get("config"), dict):
        foreign = not (isinstance(module, str) and _is_keras_module(module))
        keras_own = isinstance(getattr(k.layers, name, None), type)
        if foreign and not keras_own and _keras_suffix(name, k):
            return name
    return next((c for c in map(lambda v: _foreign_class(v, k), config.values()) if c), None)


def _apply_aliases(config: Any, aliases: dict[str, str]) -> bool:
    """Rename every aliased class in ``config`` (in place) to the Keras class it stands for, as
    Keras itself would name it; True if any was renamed. No class the file names is looked up."""
    found = False
    if isinstance(config, list):
        for item in config:
            found |= _apply_aliases(item, aliases)
    elif isinstance(config, dict):
        name = config.get("class_name")
        if isinstance(name, str) and name in aliases and isinstance(config.get("config"), dict):
            config["class_name"] = aliases[name]
            if "module" in config:  # the new format: where Keras finds the class
                config["module"] = "keras.layers"
                config["registered_name"] = None
            found = True
        for value in config.values():
            found |= _apply_aliases(value, aliases)
    return found


def _from_config(graph: Graph, config: dict[str, Any], k: Any) -> Any:
    """The model built by Keras from ``config`` (aliased or repaired), in safe mode, its weights
    then set layer by layer from the file, where coreml-split's reader found them."""
    if graph.keras_major < 3:
        from tf_keras.src.saving.serialization_lib import SafeModeScope

        with SafeModeScope(True), k.utils.custom_object_scope(_application_layers(2)):
            model = k.models.model_from_json(json.dumps(config))
    elif is_archive(Path(graph.source)):
        from keras.src.saving import serialization_lib

        with serialization_lib.SafeModeScope(True):
            model = serialization_lib.deserialize_keras_object(
                config, custom_objects=_application_layers(3), safe_mode=True
            )
    else:
        from keras.src.legacy.saving import saving_options, saving_utils
        from keras.src.saving import serialization_lib

        legacy = saving_options.keras_option_scope(use_legacy_config=True)
        with legacy, serialization_lib.SafeModeScope(True):
            model = saving_utils.model_from_config(config, custom_objects=_application_layers(3))
    objects = layer_objects(model, graph)
    for layer in graph.layers():
        if layer.weights:
            values = [load_weight(graph.source, w) for w in layer.weights]
            objects[layer.path].set_weights(values)
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


def _load_reason(exc: BaseException) -> str:
    """Keras' "Error when deserializing class 'Dense' using config={<the whole config>}.
    Exception encountered: <what went wrong>" (nested once per enclosing model), as the
    innermost class and what went wrong, without the configs."""
    text, what = str(exc), ""
    while True:
        head, found, cause = text.partition("Exception encountered:")
        if not (found and head.strip().startswith("Error when deserializing class")):
            break
        what, text = head.strip().split(" using config=", 1)[0], cause.strip()
    if not what:
        return _first_line(exc)
    return f"{what}: {' '.join(text.split())}"[:300]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
