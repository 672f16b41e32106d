"""Read a Keras HDF5 model into a :class:`~convert.read.graph.Graph`, with h5py alone.

Keras 2 and Keras 3 write the same information in different shapes (node references, input
declarations, weight names). Every such difference is resolved here, so that nothing downstream
needs to know which Keras wrote the file. No TensorFlow is imported.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from convert.errors import ModelFileError
from convert.read.archive import WEIGHTS, Archive, is_archive
from convert.read.graph import Graph, Layer, Node, Tensor, Weight, tensor_ids_in, tensor_ref
from convert.read.limits import (
    MAX_ATTRIBUTE_BYTES,
    MAX_CALL_DEPTH,
    MAX_CONFIG_BYTES,
    MAX_INPUT_ELEMENTS,
    MAX_INPUT_RANK,
    MAX_INPUT_SIDE,
    MAX_JSON_DEPTH,
    MAX_LAYER_CALLS,
    MAX_MODEL_DEPTH,
    WEIGHT_BYTES_PER_FILE_BYTE,
    WEIGHT_BYTES_SLACK,
    size_text,
)
from convert.read.shapes import check_weights, infer_shapes

MODEL_CLASSES = {"Functional", "Model", "Sequential"}
# Layers that store Python code in the file; loading them would execute it.
CODE_LAYERS = {"Lambda"}

# What h5py raises when a file's internal structure is damaged (a few flipped bits in an object
# header, a B-tree, a heap): seen are OSError, KeyError, RuntimeError and ValueError, and
# TypeError for a datatype numpy has no equivalent of.
_H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError)
# What a malformed model_config raises while it is expanded.
_LAYOUT_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError)


def read_model(
    path: str | Path, *, with_digests: bool = True, aliases: dict[str, str] | None = None
) -> Graph:
    """Read ``path`` into a neutral graph. Raises :class:`ModelFileError` with a one-line reason.

    ``aliases`` (zoo.toml's ``[aliases]``) read a layer class the file names as another: a
    Keras class saved under a subclass' name reads as the Keras class.

    Every h5py access is guarded (a damaged file is one line, not h5py's traceback) and every
    size the file declares is bounded (:mod:`convert.read.limits`) before it is acted on.
    """
    path = Path(path)
    try:
        return _read_model(path, with_digests, aliases or {})
    except RecursionError:  # a last resort: the bounds in limits.py should come first
        raise ModelFileError(
            path, "model_config nests too deeply to read (Python's recursion limit)"
        ) from None
    except MemoryError:
        raise ModelFileError(path, "reading it needs more memory than there is") from None


def _read_model(path: Path, with_digests: bool, aliases: dict[str, str]) -> Graph:
    with _open(path) as (f, archive, file_size):
        _check_global_heaps(path, f)
        if archive is None:
            config, keras_version = _legacy_config(path, f)
        else:
            config = _parse_config(path, archive.config(), "config.json")
            keras_version = archive.keras_version()
        builder = _GraphBuilder(path, keras_version, aliases)
        try:
            outputs = builder.expand(config, None, ())
        except ModelFileError:
            raise
        except _LAYOUT_ERRORS as exc:
            raise ModelFileError(
                path, f"unexpected model_config layout ({type(exc).__name__}: {exc})"
            ) from None
        bound = _weight_bytes_bound(file_size)
        if archive is None:
            weights_root = _child(path, f, "model_weights", "the group 'model_weights'")
            _attach_weights(path, weights_root or f, builder.layers, with_digests, bound)
        else:
            _attach_archive_weights(path, f, config, builder.layers, with_digests, bound)
            if with_digests:
                archive.check_weights_crc()
    graph = Graph(
        source=path,
        keras_version=keras_version,
        model_class=str(config.get("class_name", "?")),
        nodes=builder.nodes,
        tensors=builder.tensors,
        inputs=builder.inputs,
        outputs=outputs,
        aliases=builder.aliased,
    )
    infer_shapes(graph, builder.recorded_shapes)
    check_weights(graph)
    return graph


def _legacy_config(path: Path, f: Any) -> tuple[dict[str, Any], str]:
    """A legacy .h5's model config and the Keras version that wrote it."""
    with _reading(path, "reading the file's attributes"):
        has_config = "model_config" in f.attrs
    if not has_config:
        with _reading(path, "listing the file's contents"):
            # Keras 2 save_weights: layer_names; Keras 3 .weights.h5: layers/ and vars/
            weights = "layer_names" in f.attrs or "model_weights" in f
            weights = weights or ("layers" in f and "vars" in f)
        if weights:
            raise ModelFileError(
                path,
                "holds weights only (no model_config); save the whole model with model.save()",
            )
        raise ModelFileError(path, "is an HDF5 file but not a Keras model (no model_config)")
    version = _attr(path, f, "keras_version")
    keras_version = "2" if version is None else _attr_text(path, version, "keras_version")
    return _model_config(path, f), keras_version


# -- guarded reading ---------------------------------------------------------------------------


@contextmanager
def _open(path: Path) -> Iterator[tuple[Any, Archive | None, int]]:
    """(the HDF5 file open for reading, the .keras archive holding it or None, its size), or
    one line saying why it cannot be opened. A .keras archive is told by its content."""
    import h5py

    archive = Archive(path) if is_archive(path) else None
    try:
        if archive is None:
            source: Any = path
        else:
            source, size = archive.weights()
        try:
            handle = h5py.File(source, "r")
        except FileNotFoundError:
            raise ModelFileError(path, "no such file") from None
        except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            where = "" if archive is None else f"{WEIGHTS} inside it is "
            raise ModelFileError(
                path, f"{where}not a readable HDF5 file (corrupt or truncated): {_first_line(exc)}"
            ) from None
        with handle as f:
            if archive is None:
                with _reading(path, "reading the file's size"):
                    size = f.id.get_filesize()
            yield f, archive, size
    finally:
        if archive is not None:
            archive.close()


def _first_line(exc: BaseException) -> str:
    said = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    lines = said.strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """h5py's errors while doing ``what`` become one ModelFileError; ours pass through."""
    try:
        yield
    except (ModelFileError, RecursionError):  # a RecursionError is a RuntimeError
        raise
    except _H5_ERRORS as exc:
        raise ModelFileError(path, f"damaged HDF5 file ({what}: {_first_line(exc)})") from None


def _attr(path: Path, obj: Any, name: str, limit: int = MAX_ATTRIBUTE_BYTES) -> Any:
    """Attribute ``name`` of ``obj`` (None if absent), refused if it declares over ``limit``
    bytes (h5py allocates what an attribute declares before it reads) or is not text."""
    import h5py

    with _reading(path, f"reading attribute '{name}'"):
        if name not in obj.attrs:
            return None
        attr = obj.attrs.get_id(name)
        kind = attr.get_type()
        elements = math.prod(attr.shape or ())
        # its dataspace times its type's size (get_storage_size() fails on empty attributes)
        size = elements * kind.get_size()
        if size > limit:
            raise ModelFileError(
                path,
                f"attribute '{name}' is {size} bytes; coreml-split reads at most "
                f"{size_text(limit)}",
            )
        # Keras writes text (an empty list may come as an empty float array). Reading anything
        # else where text belongs is refused: HDF5 1.14.6 crashes converting some damaged
        # variable-length types.
        if elements and kind.get_class() != h5py.h5t.STRING:
            raise ModelFileError(path, f"attribute '{name}' holds {attr.dtype}, not text")
        return obj.attrs[name]


def _model_config(path: Path, f: Any) -> dict[str, Any]:
    raw = _attr(path, f, "model_config", MAX_CONFIG_BYTES)
    try:
        text = _text(raw)
    except UnicodeError as exc:
        raise ModelFileError(path, f"model_config is not UTF-8 text: {exc}") from None
    return _parse_config(path, text, "model_config")


def _parse_config(path: Path, text: str, what: str) -> dict[str, Any]:
    """The model config's JSON text, parsed within the bounds of :mod:`convert.read.limits`."""
    if len(text) > MAX_CONFIG_BYTES:  # a variable-length string: its size shows once read
        raise ModelFileError(
            path,
            f"{what} is {len(text)} characters; coreml-split reads at most "
            f"{size_text(MAX_CONFIG_BYTES)}",
        )
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ModelFileError(
            path,
            f"{what} nests {depth} levels deep; coreml-split reads at most {MAX_JSON_DEPTH}",
        )
    try:
        config = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise ModelFileError(path, f"{what} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelFileError(path, f"{what} is a JSON {type(config).__name__}, not an object")
    return config


_BRACKETS = np.zeros(256, np.int8)
_BRACKETS[[ord("["), ord("{")]] = 1
_BRACKETS[[ord("]"), ord("}")]] = -1


def _json_depth(text: str) -> int:
    """How deep the brackets and braces of JSON ``text`` nest, strings aside, without parsing
    it (json.loads recurses once per level). Linear, in numpy: 1 ms for a MobileNetV2 config
    (140 kB), 4 ms for NASNetMobile's (690 kB).

    A quote opens or closes a string unless an odd number of backslashes precede it; a
    bracket counts when an even number of such quotes precede it."""
    data = text.encode("utf-8", "surrogatepass")
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return 0  # cannot nest deeper than the bound
    codes = np.frombuffer(data, np.uint8)
    quotes = np.flatnonzero(codes == ord('"'))
    slashes = np.flatnonzero(codes == ord("\\"))
    if len(slashes) and len(quotes):
        # the run of backslashes that ends right before each quote, if any
        starts = np.ones(len(slashes), bool)
        starts[1:] = slashes[1:] != slashes[:-1] + 1
        first = np.maximum.accumulate(np.where(starts, np.arange(len(slashes)), 0))
        k = np.minimum(np.searchsorted(slashes, quotes - 1), len(slashes) - 1)
        run = np.where(slashes[k] == quotes - 1, k - first[k] + 1, 0)
        quotes = quotes[run % 2 == 0]
    steps = _BRACKETS[codes]
    brackets = np.flatnonzero(steps)
    outside = brackets[np.searchsorted(quotes, brackets) % 2 == 0]
    if not len(outside):
        return 0
    return int(np.cumsum(steps[outside], dtype=np.int64).max())


# A global heap collection (where HDF5 keeps variable-length strings: every Keras attribute),
# version 1. HDF5 1.14.6 loops forever on a collection whose objects do not tile it (one with
# a wrong size can land on a free-space record of size 0), so the reader walks each first.
_GLOBAL_HEAP = b"GCOL\x01\x00\x00\x00"


# Files larger than this are searched around their datasets' values, not through them.
_SKIP_VALUES_ABOVE = 16 << 20


def _check_global_heaps(path: Path, f: Any) -> None:
    """Refuse a file whose global heap collections HDF5 could not walk to their end.

    The collections are found by their signature: in the whole file (0.7 ms per MB), or, in a
    file over 16 MiB, only between the values of its contiguous datasets, which HDF5 lists
    without reading any attribute (10 ms for a 95 MB ResNet50 file, instead of 70). Files whose
    offsets and lengths are not 8 bytes are not searched."""
    import mmap

    with _reading(path, "reading the file's layout"):
        if f.id.get_create_plist().get_sizes() != (8, 8):
            return
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return
        spans = [(0, size)] if size <= _SKIP_VALUES_ABOVE else _between_values(path, f, size)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for start, end in spans:
                at = data.find(_GLOBAL_HEAP, start, end)
                while at >= 0:
                    problem = _heap_problem(data, at, size)
                    if problem:
                        raise ModelFileError(
                            path, f"damaged HDF5 file (global heap at byte {at}: {problem})"
                        )
                    at = data.find(_GLOBAL_HEAP, at + len(_GLOBAL_HEAP), end)


def _between_values(path: Path, f: Any, size: int) -> list[tuple[int, int]]:
    """The spans of the file outside the values of its contiguous datasets."""
    import h5py

    values: list[tuple[int, int]] = []

    def visit(name: bytes, info: Any) -> None:
        if info.type == h5py.h5o.TYPE_DATASET:
            dataset = h5py.h5o.open(f.id, name)
            offset = dataset.get_offset()  # None unless contiguous, in this file
            if offset is not None:  # as the file says: perhaps past its end, if damaged
                end = offset + dataset.get_storage_size()
                values.append((min(offset, size), min(end, size)))

    with _reading(path, "listing the file's datasets"):
        h5py.h5o.visit(f.id, visit, info=True)
    spans, at = [], 0
    for start, end in sorted(values):
        if start > at:
            spans.append((at, start))
        at = max(at, end)
    spans.append((at, size))
    return spans


def _heap_problem(data: Any, at: int, size: int) -> str | None:
    """What is wrong with the collection at ``at``, walked as HDF5 walks it; None if nothing.
    Each object: index (2 bytes), references (2), reserved (4), size (8), then its bytes padded
    to 8; index 0 is the free space, whose size counts its own header."""
    if at + 16 > size:
        return "its header runs past the end of the file"
    end = at + int.from_bytes(data[at + 8 : at + 16], "little")
    if end > size:
        return "it runs past the end of the file"
    if end < at + 16:
        return "it is smaller than its header"
    p = at + 16
    while p + 16 <= end:  # less than an object header left: free space
        index = int.from_bytes(data[p : p + 2], "little")
        length = int.from_bytes(data[p + 8 : p + 16], "little")
        need = 16 + (length + 7) // 8 * 8 if index else length
        if need == 0:
            return "an object of no size"
        if p + need > end:
            return f"object {index} runs past the end of the collection"
        p += need
    return None


def _child(
    path: Path, group: Any, name: str, what: str, opened: dict[str, Any] | None = None
) -> Any:
    """``group[name]`` (a path of ``/``-separated links) as an h5py Group or Dataset, or None if
    a link is absent. Only hard links are followed: a soft or external link could lead out of
    the file (to another file, a device, a pipe that blocks forever). ``opened`` keeps the
    groups on the way, for the next call with the same ``group``."""
    import h5py

    parts = [part for part in name.split("/") if part]
    with _reading(path, f"opening {what}"):
        node, prefix = group.id, ""
        for part in parts:
            if not isinstance(node, h5py.h5g.GroupID):
                return None
            prefix = f"{prefix}/{part}" if prefix else part
            if opened is not None and prefix in opened:
                node = opened[prefix]
                continue
            key = part.encode("utf-8")
            try:
                link = node.links.get_info(key)
            except _H5_ERRORS:  # absent (then asked, to tell it from damage), or damaged
                if not node.links.exists(key):
                    return None
                raise
            if link.type != h5py.h5l.TYPE_HARD:
                raise ModelFileError(
                    path,
                    f"{what} is reached through a soft or external link; coreml-split "
                    "reads only what the file itself holds",
                )
            node = h5py.h5o.open(node, key)
            if opened is not None and isinstance(node, h5py.h5g.GroupID):
                opened[prefix] = node
        if isinstance(node, h5py.h5g.GroupID):
            return h5py.Group(node)
        if isinstance(node, h5py.h5d.DatasetID):
            return h5py.Dataset(node)
        return None  # a named datatype


def _text(value: Any) -> str:
    """An attribute's text. Raises UnicodeError (a ValueError) for bytes that are not UTF-8,
    also when h5py has already decoded them, with surrogates standing for the bad bytes."""
    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
    text.encode("utf-8")
    return text


def _attr_text(path: Path, value: Any, what: str) -> str:
    try:
        return _text(value)
    except UnicodeError:
        raise ModelFileError(path, f"{what} is not UTF-8 text (a damaged file?)") from None


class _GraphBuilder:
    """Expands (possibly nested) model configs into primitive nodes."""

    def __init__(self, path: Path, keras_version: str, aliases: dict[str, str]) -> None:
        self.path = path
        self.aliases = aliases
        self.aliased: dict[str, str] = {}  # the aliases this file used
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
        if len(self.nodes) >= MAX_LAYER_CALLS:
            raise ModelFileError(
                self.path,
                f"model_config makes more than {MAX_LAYER_CALLS} layer calls; coreml-split "
                f"reads at most {MAX_LAYER_CALLS}",
            )
        node = Node(index=len(self.nodes), layer=layer, args=args, kwargs=kwargs)
        self.nodes.append(node)
        self._new_tensor(node.index, 0)
        return node

    def output_of(self, node: Node, index: int) -> int:
        while len(node.outputs) <= index:
            self._new_tensor(node.index, len(node.outputs))
        return node.outputs[index]

    def _layer(self, path: tuple[str, ...], class_name: str, config: dict[str, Any]) -> Layer:
        if not isinstance(class_name, str) or not class_name:
            raise ModelFileError(
                self.path, f"layer '{'/'.join(path)}' names no class (class_name {class_name!r})"
            )
        if not isinstance(config, dict):
            raise ModelFileError(
                self.path,
                f"layer '{'/'.join(path)}': its config is a {type(config).__name__}, not an object",
            )
        if class_name in CODE_LAYERS:
            raise ModelFileError(
                self.path,
                f"layer '{'/'.join(path)}' is a {class_name} layer; loading it would run Python "
                "code stored in the file, so coreml-split refuses it",
            )
        layer = self.layers.get(path)
        if layer is None:
            if class_name in self.aliases:
                self.aliased[class_name] = class_name = self.aliases[class_name]
            layer = Layer(path=path, class_name=class_name, config=config)
            self.layers[path] = layer
        return layer

    def _new_input(self, path: tuple[str, ...], config: dict[str, Any]) -> int:
        shape = config.get("batch_shape") or config.get("batch_input_shape")
        if shape is None:
            raise ModelFileError(self.path, f"input '{'/'.join(path)}' declares no shape")
        shape = self._input_shape("/".join(path), shape)
        layer = self._layer(
            path, "InputLayer", {"shape": list(shape), "dtype": config.get("dtype")}
        )
        node = self._add_node(layer, [], {})
        self.inputs.append(node.outputs[0])
        return node.outputs[0]

    def _input_shape(self, name: str, shape: Any) -> list[int | None]:
        """A declared input shape, within :mod:`convert.read.limits`."""
        if not isinstance(shape, (list, tuple)):
            raise ModelFileError(self.path, f"input '{name}' declares shape {shape!r}, not a list")
        said = "[" + ", ".join("None" if d is None else repr(d) for d in shape[:10]) + "]"
        if len(shape) > 10:
            said = said[:-1] + ", ...]"
        if len(shape) > MAX_INPUT_RANK:
            raise ModelFileError(
                self.path,
                f"input '{name}' declares rank {len(shape)}; coreml-split reads at most rank "
                f"{MAX_INPUT_RANK}",
            )
        for d in shape:
            if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d <= 0):
                raise ModelFileError(
                    self.path,
                    f"input '{name}' declares shape {said}: {d!r} is not a positive whole "
                    "number or None",
                )
            if d is not None and d > MAX_INPUT_SIDE:
                raise ModelFileError(
                    self.path,
                    f"input '{name}' declares shape {said}; coreml-split reads at most "
                    f"{MAX_INPUT_SIDE} per side",
                )
        elements = math.prod(d for d in shape if d is not None)
        if elements > MAX_INPUT_ELEMENTS:
            raise ModelFileError(
                self.path,
                f"input '{name}' declares shape {said} ({elements} elements); coreml-split "
                f"reads at most {MAX_INPUT_ELEMENTS}",
            )
        return list(shape)

    # -- models ------------------------------------------------------------------------------

    def expand(
        self, spec: dict[str, Any], inputs: list[int] | None, prefix: tuple[str, ...]
    ) -> list[int]:
        """Expand a model spec ({class_name, config}); return its output tensor ids."""
        class_name = spec.get("class_name")
        config = spec.get("config", {})
        if len(prefix) >= MAX_MODEL_DEPTH:
            raise ModelFileError(
                self.path,
                f"model '{prefix[-1]}' is nested {len(prefix) + 1} models deep; coreml-split "
                f"reads at most {MAX_MODEL_DEPTH}",
            )
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

        def candidates(ref: tuple[str, int, int]) -> list[tuple[str, int, int]]:
            """The keys ``ref`` may be produced under, the preferred first."""
            name, node_index, tensor_index = ref
            keys = [(name, node_index, tensor_index)]
            if node_counts.get(name, 0) <= 1:
                keys.append((name, 0, tensor_index))
            if self.keras2:
                keys.append((name, node_index - 1, tensor_index))
            return keys

        def resolve(ref: tuple[str, int, int]) -> int | None:
            for key in candidates(ref):
                if key in produced:
                    return produced[key]
            return None

        pending = [
            (name, k, node)
            for name, entry in entries.items()
            if entry.get("class_name") != "InputLayer"
            for k, node in enumerate(entry.get("inbound_nodes") or [])
        ]
        # Layer calls are made pass after pass over the pending ones, in file order, each as soon
        # as its inputs are there (Keras writes producers first, so one pass does). A call that
        # waits is tried again only when what it waits for appears: in this pass if it comes
        # later in the order, else in the next one. The order of calls, and so of the graph's
        # nodes, is that of retrying every waiting call every pass, without its quadratic cost
        # when the layers are listed consumers first.
        this_pass = list(range(len(pending)))  # already a heap
        next_pass: list[int] = []
        waiting: set[int] = set()
        waiters: dict[tuple[str, int, int], list[int]] = {}
        while this_pass:
            at = heapq.heappop(this_pass)
            name, k, raw = pending[at]
            call, missing = self._parse_inbound(raw, resolve, "/".join(prefix + (name,)))
            if call is None:
                waiting.add(at)
                for key in candidates(missing):
                    waiters.setdefault(key, []).append(at)
            else:
                args, kwargs = call
                outputs = self._call(entries[name], args, kwargs, prefix)
                for j, tensor in enumerate(outputs):
                    key = (name, k, j)
                    produced[key] = tensor
                    for woken in waiters.pop(key, ()):
                        if woken in waiting:
                            waiting.discard(woken)
                            if woken > at:
                                heapq.heappush(this_pass, woken)
                            else:
                                next_pass.append(woken)
            if not this_pass and next_pass:
                this_pass, next_pass = sorted(next_pass), []
        if waiting:
            missing_names = ", ".join(sorted({pending[i][0] for i in waiting})[:5])
            raise ModelFileError(
                self.path, f"cannot connect layers (cycle or bad refs): {missing_names}"
            )

        outputs = []
        for ref in _refs(config.get("output_layers", [])):
            tensor = resolve(ref)
            if tensor is None:
                raise ModelFileError(self.path, f"model output {ref[0]} is never computed")
            outputs.append(tensor)
        return outputs

    def _parse_inbound(
        self, raw: Any, resolve, name: str
    ) -> tuple[tuple[list[Any], dict[str, Any]] | None, tuple[str, int, int] | None]:
        """One inbound-node record -> ((args, kwargs) with tensor refs, None), or, if a tensor
        it reads is not there yet, (None, the first such tensor's reference)."""
        missing: list[tuple[str, int, int]] = []
        shapes: list[tuple[int, Any]] = []

        def deep(depth: int) -> None:
            if depth > MAX_CALL_DEPTH:
                raise ModelFileError(
                    self.path,
                    f"layer '{name}': call arguments nest more than {MAX_CALL_DEPTH} levels "
                    f"deep; coreml-split reads at most {MAX_CALL_DEPTH}",
                )

        def convert(value: Any, depth: int = 0) -> Any:
            if isinstance(value, dict):
                if value.get("class_name") == "__keras_tensor__":
                    history = value["config"]["keras_history"]
                    ref = (history[0], int(history[1]), int(history[2]))
                    tensor = resolve(ref)
                    if tensor is None:
                        missing.append(ref)
                        return None
                    shape = value["config"].get("shape")
                    if shape is not None:  # Keras 3 records the shape of every tensor it passes
                        shapes.append((tensor, tuple(shape)))
                    return tensor_ref(tensor)
                deep(depth + 1)
                return {k: convert(v, depth + 1) for k, v in value.items()}
            if isinstance(value, list):
                deep(depth + 1)
                return [convert(v, depth + 1) for v in value]
            return value

        def convert_keras2(value: Any, depth: int = 0) -> Any:
            """Keras 2 keyword arguments: a [layer, node, tensor] list is a tensor."""
            if _is_keras2_ref(value):
                ref = (value[0], int(value[1]), int(value[2]))
                tensor = resolve(ref)
                if tensor is None:
                    missing.append(ref)
                    return None
                return tensor_ref(tensor)
            if isinstance(value, dict):
                deep(depth + 1)
                return {k: convert_keras2(v, depth + 1) for k, v in value.items()}
            if isinstance(value, list):
                deep(depth + 1)
                return [convert_keras2(v, depth + 1) for v in value]
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
                    ref = (item[0], int(item[1]), int(item[2]))
                    tensor = resolve(ref)
                    if tensor is None:
                        return None, ref
                    refs.append(tensor_ref(tensor))
                if len(item) > 3 and isinstance(item[3], dict) and not kwargs:
                    kwargs = convert_keras2(item[3])
            args = [refs[0]] if len(refs) == 1 else [refs]
        if missing:
            return None, missing[0]
        for tensor, shape in shapes:
            self.recorded_shapes[tensor] = shape
        return (args, kwargs), None

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
    name = entry.get("name") or entry.get("config", {}).get("name") or "?"
    if not isinstance(name, str):
        raise TypeError(f"a layer's name is a {type(name).__name__}, not a string")
    return name


def _refs(raw: Any) -> list[tuple[str, int, int]]:
    """input_layers / output_layers: Keras 2 writes [[n, i, j], ...], Keras 3 maybe [n, i, j]."""
    if not raw:
        return []
    if isinstance(raw[0], str):
        raw = [raw]
    return [(r[0], int(r[1]), int(r[2])) for r in raw]


# -- weights ---------------------------------------------------------------------------------


def _weight_bytes_bound(file_size: int) -> int:
    return WEIGHT_BYTES_PER_FILE_BYTE * file_size + WEIGHT_BYTES_SLACK


def _attach_weights(
    path: Path, root: Any, layers: dict[tuple[str, ...], Layer], digest: bool, bound: int
) -> None:
    """Give every primitive layer its weights, whatever nesting and naming the file used."""
    names = _attr_list(path, root, "layer_names")
    if names is None:
        return
    by_top: dict[str, list[Layer]] = {}  # grouped once: a pass per group would be quadratic
    for layer_path, layer in layers.items():
        by_top.setdefault(layer_path[0], []).append(layer)
    for top in (_attr_text(path, n, "a name in layer_names") for n in names):
        group = _child(path, root, top, f"the weights of layer '{top}'")
        if group is None:
            continue
        with _reading(path, f"opening the weights of layer '{top}'"):
            group_name = group.name  # an HDF5 call each time it is asked
        owners = _OwnerIndex(by_top.get(top, []))
        opened: dict[str, Any] = {}
        for raw_name in _attr_list(path, group, "weight_names") or []:
            weight_name = _attr_text(path, raw_name, f"a weight name of layer '{top}'")
            owner = owners.find(weight_name)
            if owner is None:
                raise ModelFileError(
                    path, f"cannot tell which layer owns weight '{top}/{weight_name}'"
                )
            dataset = _child(path, group, weight_name, f"weight '{weight_name}'", opened)
            if dataset is None:
                raise ModelFileError(
                    path,
                    f"weight '{weight_name}' is listed in layer '{top}' but missing from the file",
                )
            owner.weights.append(
                _weight(
                    path, owner, f"{group_name}/{weight_name}", weight_name, dataset, digest, bound
                )
            )


def _attach_archive_weights(
    path: Path,
    f: Any,
    config: dict[str, Any],
    layers: dict[tuple[str, ...], Layer],
    digest: bool,
    bound: int,
) -> None:
    """Give every primitive layer its weights from a .keras archive's model.weights.h5.

    Keras 3 keeps a model's layers (InputLayers left out) under ``layers/<key>``, the key being
    the snake_case class name made unique in the model's order (``conv2d``, ``conv2d_1``); a
    nested model's under its own ``layers/<key>/layers/``. A layer's variables are
    ``vars/0``, ``vars/1``, ... in Keras' order; the ``vars`` group records the layer's name.
    """

    def visit(spec: dict[str, Any], group: str, prefix: tuple[str, ...]) -> None:
        used: dict[str, int] = {}
        listed: dict[str, str] | None = None  # layer name -> key, read only if a key misses
        for entry in spec.get("config", {}).get("layers", []):
            class_name = entry.get("class_name")
            if class_name == "InputLayer" or _is_operation(entry):
                continue  # not among the model's layers: no weights, no key
            name = _entry_name(entry)
            key = _unique_key(_snake_case(str(class_name)), used)
            if _vars_name(path, f, f"{group}/{key}") not in (None, name):
                listed = listed if listed is not None else _keys_by_name(path, f, group)
                key = listed.get(name, key)
            here = f"{group}/{key}"
            if class_name in MODEL_CLASSES and "layers" in entry.get("config", {}):
                visit(entry, f"{here}/layers", prefix + (name,))
            elif (layer := layers.get(prefix + (name,))) is not None:
                _attach_vars(path, f, here, layer, digest, bound)

    visit(config, "layers", ())


def _is_operation(entry: dict[str, Any]) -> bool:
    """A keras.ops call in a Keras 3 config (``x + 3.0``): a node, not a layer of the model."""
    module = entry.get("module")
    return isinstance(module, str) and module.startswith("keras.src.ops")


def _snake_case(name: str) -> str:
    """A class name as Keras 3 writes it into a weights file's paths."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _unique_key(key: str, used: dict[str, int]) -> str:
    if key not in used:
        used[key] = 0
        return key
    used[key] += 1
    return f"{key}_{used[key]}"


def _vars_name(path: Path, f: Any, group: str) -> str | None:
    """The layer name a weights group records (None: no such group, or no name recorded)."""
    found = _child(path, f, f"{group}/vars", f"the weights group '{group}'")
    if found is None:
        return None
    raw = _attr(path, found, "name")
    return None if raw is None else _attr_text(path, raw, f"the name of '{group}/vars'")


def _keys_by_name(path: Path, f: Any, group: str) -> dict[str, str]:
    """Every key under ``group`` by the layer name its ``vars`` group records."""
    found = _child(path, f, group, f"the weights group '{group}'")
    if found is None:
        return {}
    with _reading(path, f"listing '{group}'"):
        keys = list(found.keys())[:MAX_LAYER_CALLS]
    names = {}
    for key in keys:
        name = _vars_name(path, f, f"{group}/{key}")
        if name is not None:
            names.setdefault(name, key)
    return names


# What Keras 3 names the variables it saves as vars/0, vars/1, ..., by layer class (the names a
# legacy .h5 of Keras 3 gives them). Other classes' variables keep their index as their name.
def _variable_names(class_name: str, config: dict[str, Any]) -> list[str]:
    bias = ["bias"] if config.get("use_bias", True) else []
    scale = ["gamma"] if config.get("scale", True) else []
    center = ["beta"] if config.get("center", True) else []
    if class_name in _KERNEL_CLASSES:
        return ["kernel", *bias]
    if class_name in ("SeparableConv1D", "SeparableConv2D"):
        return ["depthwise_kernel", "pointwise_kernel", *bias]
    if class_name == "BatchNormalization":
        return [*scale, *center, "moving_mean", "moving_variance"]
    if class_name in ("LayerNormalization", "GroupNormalization"):
        return [*scale, *center]
    return _OTHER_VARIABLES.get(class_name, [])


_KERNEL_CLASSES = {
    "Dense",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
}
_OTHER_VARIABLES = {
    "Normalization": ["mean", "variance", "count"],
    "PReLU": ["alpha"],
    "Embedding": ["embeddings"],
}
MAX_LAYER_VARIABLES = 64


def _attach_vars(path: Path, f: Any, group: str, layer: Layer, digest: bool, bound: int) -> None:
    names = _variable_names(layer.class_name, layer.config)
    opened: dict[str, Any] = {}
    for i in range(MAX_LAYER_VARIABLES + 1):
        dataset = _child(path, f, f"{group}/vars/{i}", f"weight '{group}/vars/{i}'", opened)
        if dataset is None:
            return
        if i == MAX_LAYER_VARIABLES:
            raise ModelFileError(
                path, f"layer '{layer.qualified_name}' has more than {i} variables"
            )
        short = names[i] if i < len(names) else str(i)
        layer.weights.append(
            _weight(path, layer, f"/{group}/vars/{i}", short, dataset, digest, bound)
        )


def _attr_list(path: Path, obj: Any, name: str) -> list[Any] | None:
    """A list attribute. Keras splits one over 64 kB into ``name0``, ``name1``, ... (NASNet)."""
    value = _attr(path, obj, name)
    if value is not None:
        with _reading(path, f"reading attribute '{name}'"):
            return list(value)
    with _reading(path, f"reading attribute '{name}'"):
        if f"{name}0" not in obj.attrs:
            return None
    out: list[Any] = []
    chunk = 0
    while (value := _attr(path, obj, f"{name}{chunk}")) is not None:
        with _reading(path, f"reading attribute '{name}{chunk}'"):
            out.extend(value)
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
        # no longer suffix can match: a bound for a weight name of a million "/"s
        self.longest = max((tail.count("/") + 1 for tail in self.by_tail), default=0)

    def find(self, weight_name: str) -> Layer | None:
        if self.only is not None:
            return self.only
        parts = weight_name.removesuffix(":0").rsplit("/", 1)[0].split("/")
        for start in range(max(0, len(parts) - self.longest), len(parts)):  # longest first
            matches = self.by_tail.get("/".join(parts[start:]))
            if matches:
                return self.layers[next(iter(matches))] if len(matches) == 1 else None
        return None


def _weight(
    path: Path,
    owner: Layer,
    dataset_path: str,
    weight_name: str,
    dataset: Any,
    digest: bool,
    bound: int,
) -> Weight:
    short = weight_name.removesuffix(":0").split("/")[-1]
    shape, dtype = _dataset_header(path, dataset, weight_name, bound)
    if digest:
        with _reading(path, f"reading weight '{weight_name}'"):
            values = np.ascontiguousarray(dataset[()], dtype=dtype)
        _check_finite(path, owner, short, values)
        h = hashlib.sha256(f"{dtype.str}{shape}".encode())
        h.update(values.data)
        hexdigest = h.hexdigest()
    else:
        hexdigest = ""
    return Weight(dataset=dataset_path, name=short, shape=shape, dtype=dtype.name, digest=hexdigest)


def _dataset_header(
    path: Path, dataset: Any, name: str, bound: int
) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, little-endian dtype) of a weight dataset, checked before its values are read:
    numbers, values kept in this file, no more bytes than the file can hold."""
    import h5py

    if not isinstance(dataset, h5py.Dataset):
        raise ModelFileError(path, f"weight '{name}' is a group, not a dataset")
    with _reading(path, f"reading the header of weight '{name}'"):
        shape = tuple(int(d) for d in dataset.id.shape)
        dtype = np.dtype(dataset.id.dtype)
        plist = dataset.id.get_create_plist()
        elsewhere = plist.get_layout() == h5py.h5d.VIRTUAL or plist.get_external_count() > 0
    # numbers, or raw values without fields (bfloat16 is saved as an opaque type), which h5py
    # reads as bytes, harmlessly
    numbers = dtype.kind in "biuf" or (dtype.kind == "V" and dtype.fields is None)
    if not numbers or dtype.itemsize > 8:
        raise ModelFileError(
            path, f"weight '{name}' holds {dtype}; coreml-split reads numbers of up to 64 bits"
        )
    if elsewhere:
        raise ModelFileError(
            path,
            f"weight '{name}' keeps its values in another file; coreml-split reads only "
            "what the file itself holds",
        )
    declared = math.prod(shape) * dtype.itemsize
    if declared > bound:
        raise ModelFileError(
            path,
            f"weight '{name}' declares {declared} bytes, more than the file can hold; "
            f"coreml-split reads at most {WEIGHT_BYTES_PER_FILE_BYTE} times the file's size "
            f"plus {size_text(WEIGHT_BYTES_SLACK)}",
        )
    return shape, dtype.newbyteorder("<")


def _check_finite(path: Path, layer: Layer, name: str, values: np.ndarray) -> None:
    if values.dtype.kind != "f" or np.isfinite(values).all():
        return
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    raise ModelFileError(
        path,
        f"layer '{layer.qualified_name}': weight '{name}' holds NaN or Inf "
        f"({bad} of {values.size} values)",
    )


def load_weight(path: str | Path, weight: Weight) -> np.ndarray:
    """Read one weight's values from the file, as :func:`read_model` found it: the same
    shape, within the same bounds. Raises :class:`ModelFileError` if it no longer reads."""
    path = Path(path)
    try:
        with _open(path) as (f, _, size):
            dataset = _child(path, f, weight.dataset, f"weight '{weight.dataset}'")
            if dataset is None:
                raise ModelFileError(path, f"weight '{weight.dataset}' is missing from the file")
            shape, _ = _dataset_header(path, dataset, weight.dataset, _weight_bytes_bound(size))
            if shape != tuple(weight.shape):
                raise ModelFileError(
                    path,
                    f"weight '{weight.dataset}' has shape {shape} but was read as "
                    f"{tuple(weight.shape)} (was the file changed?)",
                )
            with _reading(path, f"reading weight '{weight.dataset}'"):
                return np.asarray(dataset[()])
    except MemoryError:
        raise ModelFileError(path, "reading it needs more memory than there is") from None
