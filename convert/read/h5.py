"""Read a Keras HDF5 model into a :class:`~convert.read.graph.Graph`, with h5py alone.

Keras 2 and Keras 3 write the same information in different shapes (node references, input
declarations, weight names). Every such difference is resolved here, so that nothing downstream
needs to know which Keras wrote the file. No TensorFlow is imported.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import ModelFileError
from convert.read.graph import Graph, Layer, Node, Tensor, Weight, tensor_ids_in, tensor_ref
from convert.read.shapes import infer_shapes

MODEL_CLASSES = {"Functional", "Model", "Sequential"}
# Layers that store Python code in the file; loading them would execute it.
CODE_LAYERS = {"Lambda"}


def read_model(path: str | Path, *, with_digests: bool = True) -> Graph:
    """Read ``path`` into a neutral graph. Raises :class:`ModelFileError` with a one-line reason."""
    import h5py

    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError:
        raise ModelFileError(path, "no such file") from None
    except OSError as exc:
        raise ModelFileError(
            path, f"not a readable HDF5 file (corrupt or truncated): {exc}"
        ) from None
    with handle as f:
        if "model_config" not in f.attrs:
            if "layer_names" in f.attrs or "model_weights" in f or "layers" in f or len(f.keys()):
                raise ModelFileError(
                    path,
                    "holds weights only (no model_config); save the whole model with model.save()",
                )
            raise ModelFileError(path, "is an HDF5 file but not a Keras model (no model_config)")
        keras_version = _text(f.attrs.get("keras_version", "2"))
        try:
            config = json.loads(_text(f.attrs["model_config"]))
        except (ValueError, TypeError) as exc:
            raise ModelFileError(path, f"model_config is not valid JSON: {exc}") from None
        builder = _GraphBuilder(path, keras_version)
        try:
            outputs = builder.expand(config, None, ())
        except ModelFileError:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ModelFileError(
                path, f"unexpected model_config layout ({type(exc).__name__}: {exc})"
            ) from None
        weights_root = f["model_weights"] if "model_weights" in f else f
        _attach_weights(path, weights_root, builder.layers, with_digests)
    graph = Graph(
        source=path,
        keras_version=keras_version,
        model_class=config.get("class_name", "?"),
        nodes=builder.nodes,
        tensors=builder.tensors,
        inputs=builder.inputs,
        outputs=outputs,
    )
    infer_shapes(graph, builder.recorded_shapes)
    return graph


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _GraphBuilder:
    """Expands (possibly nested) model configs into primitive nodes."""

    def __init__(self, path: Path, keras_version: str) -> None:
        self.path = path
        self.keras2 = not keras_version.startswith("3")
        self.nodes: list[Node] = []
        self.tensors: list[Tensor] = []
        self.inputs: list[int] = []
        self.layers: dict[tuple[str, ...], Layer] = {}
        self.recorded_shapes: dict[int, tuple[int | None, ...]] = {}

    # -- tensors and nodes -------------------------------------------------------------------

    def _new_tensor(self, producer: int, output_index: int) -> int:
        tensor = Tensor(id=len(self.tensors), producer=producer, output_index=output_index)
        self.tensors.append(tensor)
        self.nodes[producer].outputs.append(tensor.id)
        return tensor.id

    def _add_node(self, layer: Layer, args: list[Any], kwargs: dict[str, Any]) -> Node:
        node = Node(index=len(self.nodes), layer=layer, args=args, kwargs=kwargs)
        self.nodes.append(node)
        self._new_tensor(node.index, 0)
        return node

    def output_of(self, node: Node, index: int) -> int:
        while len(node.outputs) <= index:
            self._new_tensor(node.index, len(node.outputs))
        return node.outputs[index]

    def _layer(self, path: tuple[str, ...], class_name: str, config: dict[str, Any]) -> Layer:
        if class_name in CODE_LAYERS:
            raise ModelFileError(
                self.path,
                f"layer '{'/'.join(path)}' is a {class_name} layer; loading it would run Python "
                "code stored in the file, so coreml-split refuses it",
            )
        layer = self.layers.get(path)
        if layer is None:
            layer = Layer(path=path, class_name=class_name, config=config)
            self.layers[path] = layer
        return layer

    def _new_input(self, path: tuple[str, ...], config: dict[str, Any]) -> int:
        shape = config.get("batch_shape") or config.get("batch_input_shape")
        if shape is None:
            raise ModelFileError(self.path, f"input '{'/'.join(path)}' declares no shape")
        layer = self._layer(
            path, "InputLayer", {"shape": list(shape), "dtype": config.get("dtype")}
        )
        node = self._add_node(layer, [], {})
        self.inputs.append(node.outputs[0])
        return node.outputs[0]

    # -- models ------------------------------------------------------------------------------

    def expand(
        self, spec: dict[str, Any], inputs: list[int] | None, prefix: tuple[str, ...]
    ) -> list[int]:
        """Expand a model spec ({class_name, config}); return its output tensor ids."""
        class_name = spec.get("class_name")
        config = spec.get("config", {})
        if class_name == "Sequential":
            return self._expand_sequential(config, inputs, prefix)
        if class_name in MODEL_CLASSES and "layers" in config:
            return self._expand_functional(config, inputs, prefix)
        raise ModelFileError(self.path, f"top-level object is a {class_name}, not a Keras model")

    def _expand_sequential(
        self, config: dict[str, Any], inputs: list[int] | None, prefix: tuple[str, ...]
    ) -> list[int]:
        entries = list(config.get("layers", []))
        if not entries:
            raise ModelFileError(self.path, f"Sequential model '{config.get('name')}' is empty")
        if entries[0].get("class_name") == "InputLayer":
            first = entries.pop(0)
            if inputs is None:
                inputs = [self._new_input(prefix + (_entry_name(first),), first["config"])]
        if inputs is None:
            shape = _declared_input_shape(entries[0]) or config.get("build_input_shape")
            if shape is None:
                raise ModelFileError(self.path, "Sequential model declares no input shape")
            inputs = [self._new_input(prefix + ("input",), {"batch_shape": shape})]
        if len(inputs) != 1:
            raise ModelFileError(self.path, "a Sequential model called with several inputs")
        current = inputs
        for entry in entries:
            current = self._call(entry, [tensor_ref(current[0])], {}, prefix)
            if len(current) != 1:
                raise ModelFileError(self.path, f"layer '{_entry_name(entry)}' has several outputs")
        return current

    def _expand_functional(
        self, config: dict[str, Any], inputs: list[int] | None, prefix: tuple[str, ...]
    ) -> list[int]:
        entries = {_entry_name(e): e for e in config["layers"]}
        produced: dict[tuple[str, int, int], int] = {}
        input_refs = _refs(config.get("input_layers", []))
        if inputs is not None and len(inputs) != len(input_refs):
            raise ModelFileError(self.path, "nested model called with the wrong number of inputs")
        for i, (name, node_index, tensor_index) in enumerate(input_refs):
            if inputs is None:
                tensor = self._new_input(prefix + (name,), entries[name]["config"])
            else:
                tensor = inputs[i]
            produced[(name, node_index, tensor_index)] = tensor

        node_counts = {name: len(e.get("inbound_nodes") or []) for name, e in entries.items()}

        def resolve(ref: tuple[str, int, int]) -> int | None:
            name, node_index, tensor_index = ref
            for key in (
                (name, node_index, tensor_index),
                (name, 0, tensor_index) if node_counts.get(name, 0) <= 1 else None,
                (name, node_index - 1, tensor_index) if self.keras2 else None,
            ):
                if key is not None and key in produced:
                    return produced[key]
            return None

        pending = [
            (name, k, node)
            for name, entry in entries.items()
            if entry.get("class_name") != "InputLayer"
            for k, node in enumerate(entry.get("inbound_nodes") or [])
        ]
        while pending:
            waiting = []
            for name, k, raw in pending:
                call = self._parse_inbound(raw, resolve)
                if call is None:
                    waiting.append((name, k, raw))
                    continue
                args, kwargs = call
                outputs = self._call(entries[name], args, kwargs, prefix)
                for j, tensor in enumerate(outputs):
                    produced[(name, k, j)] = tensor
            if len(waiting) == len(pending):
                missing = ", ".join(sorted({n for n, _, _ in waiting})[:5])
                raise ModelFileError(
                    self.path, f"cannot connect layers (cycle or bad refs): {missing}"
                )
            pending = waiting

        outputs = []
        for ref in _refs(config.get("output_layers", [])):
            tensor = resolve(ref)
            if tensor is None:
                raise ModelFileError(self.path, f"model output {ref[0]} is never computed")
            outputs.append(tensor)
        return outputs

    def _parse_inbound(self, raw: Any, resolve) -> tuple[list[Any], dict[str, Any]] | None:
        """One inbound-node record -> (args, kwargs) with tensor refs, or None if not ready."""
        unresolved = False

        def convert(value: Any) -> Any:
            nonlocal unresolved
            if isinstance(value, dict):
                if value.get("class_name") == "__keras_tensor__":
                    history = value["config"]["keras_history"]
                    tensor = resolve((history[0], int(history[1]), int(history[2])))
                    if tensor is None:
                        unresolved = True
                        return None
                    shape = value["config"].get("shape")
                    if shape is not None:  # Keras 3 records the shape of every tensor it passes
                        self.recorded_shapes[tensor] = tuple(shape)
                    return tensor_ref(tensor)
                return {k: convert(v) for k, v in value.items()}
            if isinstance(value, list):
                return [convert(v) for v in value]
            return value

        def convert_keras2(value: Any) -> Any:
            """Keras 2 keyword arguments: a [layer, node, tensor] list is a tensor."""
            nonlocal unresolved
            if _is_keras2_ref(value):
                tensor = resolve((value[0], int(value[1]), int(value[2])))
                if tensor is None:
                    unresolved = True
                    return None
                return tensor_ref(tensor)
            if isinstance(value, dict):
                return {k: convert_keras2(v) for k, v in value.items()}
            if isinstance(value, list):
                return [convert_keras2(v) for v in value]
            return value

        if isinstance(raw, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
            args = convert(raw.get("args", []))
            kwargs = convert(raw.get("kwargs", {}))
        else:  # Keras 2: [[layer, node, tensor, kwargs], ...], or one such entry (TFOpLambda)
            if raw and isinstance(raw[0], str):
                raw = [raw]
            refs: list[Any] = []
            kwargs = {}
            for item in raw:
                if item[0] == _CONSTANT_VALUE:  # a TFOpLambda whose first operand is a constant
                    refs.append(item[2])
                else:
                    tensor = resolve((item[0], int(item[1]), int(item[2])))
                    if tensor is None:
                        return None
                    refs.append(tensor_ref(tensor))
                if len(item) > 3 and isinstance(item[3], dict) and not kwargs:
                    kwargs = convert_keras2(item[3])
            args = [refs[0]] if len(refs) == 1 else [refs]
        if unresolved:
            return None
        return args, kwargs

    def _call(
        self,
        entry: dict[str, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        prefix: tuple[str, ...],
    ) -> list[int]:
        """Apply one layer entry (primitive or nested model) to tensors; return its outputs."""
        name = _entry_name(entry)
        class_name = entry.get("class_name", "?")
        config = entry.get("config", {})
        if class_name in MODEL_CLASSES and "layers" in config:
            inputs = tensor_ids_in(args)
            return self.expand(entry, inputs, prefix + (name,))
        layer = self._layer(prefix + (name,), class_name, config)
        node = self._add_node(layer, args, kwargs)
        return list(node.outputs)


def _declared_input_shape(entry: dict[str, Any]) -> list[Any] | None:
    """The input shape a layer entry declares, looking inside nested models (Teachable
    Machine's outer Sequential starts with a Sequential whose first layer is a Functional)."""
    config = entry.get("config", {})
    shape = config.get("batch_input_shape") or config.get("batch_shape")
    if shape is not None:
        return shape
    layers = config.get("layers") or []
    if entry.get("class_name") == "Sequential" and layers:
        return _declared_input_shape(layers[0])
    if layers:
        refs = _refs(config.get("input_layers", []))
        by_name = {_entry_name(e): e for e in layers}
        if len(refs) == 1 and refs[0][0] in by_name:
            return _declared_input_shape(by_name[refs[0][0]])
    return config.get("build_input_shape")


# Keras 2 writes a constant first operand of a TFOpLambda (``3.0 + x``) as this "layer" name.
_CONSTANT_VALUE = "_CONSTANT_VALUE"


def _is_keras2_ref(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], str)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value[1:])
    )


def _entry_name(entry: dict[str, Any]) -> str:
    return entry.get("name") or entry.get("config", {}).get("name") or "?"


def _refs(raw: Any) -> list[tuple[str, int, int]]:
    """input_layers / output_layers: Keras 2 writes [[n, i, j], ...], Keras 3 maybe [n, i, j]."""
    if not raw:
        return []
    if isinstance(raw[0], str):
        raw = [raw]
    return [(r[0], int(r[1]), int(r[2])) for r in raw]


# -- weights ---------------------------------------------------------------------------------


def _attach_weights(path: Path, root: Any, layers: dict[tuple[str, ...], Layer], digest: bool):
    """Give every primitive layer its weights, whatever nesting and naming the file used."""
    names = _attr_list(root, "layer_names")
    if names is None:
        return
    for top in (_text(n) for n in names):
        if top not in root:
            continue
        group = root[top]
        group_name = group.name  # an HDF5 call each time it is asked
        owners = _OwnerIndex([layer for p, layer in layers.items() if p[0] == top])
        for raw_name in _attr_list(group, "weight_names") or []:
            weight_name = _text(raw_name)
            owner = owners.find(weight_name)
            if owner is None:
                raise ModelFileError(
                    path, f"cannot tell which layer owns weight '{top}/{weight_name}'"
                )
            dataset = group[weight_name]
            owner.weights.append(
                _weight(f"{group_name}/{weight_name}", weight_name, dataset, digest)
            )


def _attr_list(obj: Any, name: str) -> list[Any] | None:
    """A list attribute. Keras splits one over 64 kB into ``name0``, ``name1``, ... (NASNet)."""
    if name in obj.attrs:
        return list(obj.attrs[name])
    if f"{name}0" not in obj.attrs:
        return None
    out: list[Any] = []
    chunk = 0
    while f"{name}{chunk}" in obj.attrs:
        out.extend(obj.attrs[f"{name}{chunk}"])
        chunk += 1
    return out


class _OwnerIndex:
    """Finds the layer a weight belongs to: the one whose path is the longest suffix of the
    weight's name (without the variable name).

    Layer names may themselves contain "/" (tf_keras MobileNetV3), so paths are compared as
    strings at "/" boundaries rather than component by component. Two layers matching equally
    well are a tie: no owner.
    """

    def __init__(self, owners: list[Layer]) -> None:
        self.only = owners[0] if len(owners) == 1 else None
        self.by_tail: dict[str, set[int]] = {}
        self.layers = owners
        for i, layer in enumerate(owners):
            for k in range(1, len(layer.path) + 1):
                self.by_tail.setdefault("/".join(layer.path[-k:]), set()).add(i)

    def find(self, weight_name: str) -> Layer | None:
        if self.only is not None:
            return self.only
        parts = weight_name.removesuffix(":0").rsplit("/", 1)[0].split("/")
        for start in range(len(parts)):  # longest suffix first
            matches = self.by_tail.get("/".join(parts[start:]))
            if matches:
                return self.layers[next(iter(matches))] if len(matches) == 1 else None
        return None


def _weight(dataset_path: str, weight_name: str, dataset: Any, digest: bool) -> Weight:
    short = weight_name.removesuffix(":0").split("/")[-1]
    shape = tuple(int(d) for d in dataset.shape)
    dtype = np.dtype(dataset.dtype).newbyteorder("<")
    if digest:
        values = np.ascontiguousarray(dataset[()], dtype=dtype)
        h = hashlib.sha256(f"{dtype.str}{shape}".encode())
        h.update(values.data)
        hexdigest = h.hexdigest()
    else:
        hexdigest = ""
    return Weight(dataset=dataset_path, name=short, shape=shape, dtype=dtype.name, digest=hexdigest)


def load_weight(path: str | Path, weight: Weight) -> np.ndarray:
    """Read one weight's values from the file."""
    import h5py

    with h5py.File(path, "r") as f:
        return np.asarray(f[weight.dataset][()])
