"""Merges and arithmetic: Add, Subtract, Multiply, Maximum, Minimum, Average, Concatenate, and the
binary arithmetic Keras 3 saves as ``keras.ops`` calls (``x + 3.0``) or tf_keras as
``TFOpLambda`` functions (``tf.math.multiply``)."""

from __future__ import annotations

from typing import Any

from convert.build.layers.registry import Unsupported, fail, key_of, label, register
from convert.read.graph import TENSOR_KEY, Layer, Node, is_tensor_ref

MERGES = {
    "Add": ("ADD", "add_add_broadcastable"),
    "Multiply": ("MULTIPLY", "add_multiply_broadcastable"),
    "Maximum": ("MAX", "add_max_broadcastable"),
    "Minimum": ("MIN", "add_min_broadcastable"),
    "Average": ("AVE", None),
    "Subtract": (None, "add_subtract_broadcastable"),
}


def broadcast(layer: Layer, shapes: list[list[int]]) -> list[int]:
    rank = len(shapes[0])
    if any(len(s) != rank for s in shapes):
        raise fail(layer, f"inputs of ranks {[len(s) for s in shapes]}")
    out = []
    for dims in zip(*shapes):
        size = max(dims)
        if any(d not in (1, size) for d in dims):
            raise fail(layer, f"shapes {shapes} do not broadcast")
        out.append(size)
    return out


@register(*MERGES, family="merge", merge=True)
def _merge(e: Any, node: Node, inputs: list) -> Any:
    layer = node.layer
    mode, broadcastable = MERGES[layer.class_name]
    shape = broadcast(layer, [b.shape for b in inputs])
    same = all(b.shape == shape for b in inputs)
    if len(inputs) < 2 or (layer.class_name == "Subtract" and len(inputs) != 2):
        raise fail(layer, f"{len(inputs)} inputs")
    base = layer.name
    if same and mode is not None:
        return e.merge(
            base, inputs, shape, lambda name, xs: e.builder.add_elementwise(name, xs, name, mode)
        )
    if broadcastable is None:
        raise fail(layer, "inputs of different shapes")
    # Broadcasting layers take two inputs: fold left.
    current = inputs[0]
    for i, other in enumerate(inputs[1:], 1):
        step = f"{base}/{i}" if len(inputs) > 2 else base
        out = broadcast(layer, [current.shape, other.shape])
        current = e.merge(
            step,
            [current, other],
            out,
            lambda name, xs: getattr(e.builder, broadcastable)(name, xs, name),
        )
    return current


@register("Concatenate", family="merge", merge=True)
def _concatenate(e: Any, node: Node, inputs: list) -> Any:
    layer = node.layer
    ranks = {b.rank for b in inputs}
    if len(ranks) != 1:
        raise fail(layer, f"inputs of ranks {sorted(ranks)}")
    rank = ranks.pop()
    axis = layer.config.get("axis", -1)
    if not isinstance(axis, int) or not -rank <= axis < rank or axis % rank == 0:
        raise fail(layer, f"axis {axis}")
    keras_axis = axis % rank
    core_axis = {1: 2, 2: 3, 3: 1}[keras_axis] if inputs[0].nchw else keras_axis
    shapes = [b.shape for b in inputs]
    for s in shapes:
        if any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != core_axis):
            raise fail(layer, f"shapes {[b.keras_shape() for b in inputs]} do not concatenate")
    shape = list(shapes[0])
    shape[core_axis] = sum(s[core_axis] for s in shapes)
    if inputs[0].nchw and core_axis == 1:
        return e.merge(
            layer.name,
            inputs,
            shape,
            lambda name, xs: e.builder.add_elementwise(name, xs, name, "CONCAT"),
        )
    return e.merge(
        layer.name,
        inputs,
        shape,
        lambda name, xs: e.builder.add_concat_nd(name, xs, name, core_axis),
    )


# -- arithmetic calls: x op y, each a tensor or a number ----------------------------------------

OPS_ARITHMETIC = {
    "ops.Add": "add",
    "ops.Subtract": "sub",
    "ops.Multiply": "mul",
    "ops.Divide": "div",
    "ops.TrueDivide": "div",
}
TF_ARITHMETIC = {
    "tf.__operators__.add": "add",
    "tf.math.add": "add",
    "tf.math.subtract": "sub",
    "tf.math.multiply": "mul",
    "tf.math.truediv": "div",
    "tf.math.divide": "div",
}
BROADCASTING = {
    "add": "add_add_broadcastable",
    "sub": "add_subtract_broadcastable",
    "mul": "add_multiply_broadcastable",
    "div": "add_divide_broadcastable",
}
ARITHMETIC = OPS_ARITHMETIC | TF_ARITHMETIC


def _operands(node: Node) -> list[Any]:
    """[x, y] of a binary arithmetic call: tensor refs or numbers, from the positional
    arguments (flat, or one list of them) and then the keywords ``x`` / ``y``."""
    args = list(node.args)
    if len(args) == 1 and isinstance(args[0], list):
        args = list(args[0])
    kwargs = {k: v for k, v in node.kwargs.items() if k in ("x", "y")}
    extra = {k for k, v in node.kwargs.items() if k not in ("x", "y") and v is not None}
    if extra - {"name"}:
        raise Unsupported(f"{label(node.layer)} takes keywords {sorted(extra)}")
    for key in ("x", "y"):
        if key in kwargs:
            args.append(kwargs[key])
    if len(args) != 2:
        raise Unsupported(f"{label(node.layer)} has {len(args)} operands")
    for value in args:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number or is_tensor_ref(value)):
            raise Unsupported(f"{label(node.layer)} has an operand {str(value)[:40]}")
    return args


@register(*ARITHMETIC, family="merge", merge=True)
def _arithmetic(e: Any, node: Node, inputs: list) -> Any:
    layer = node.layer
    kind = ARITHMETIC[key_of(layer)]
    x, y = _operands(node)
    base = layer.name
    if is_tensor_ref(x) and is_tensor_ref(y):
        pair = [e.blobs[x[TENSOR_KEY]], e.blobs[y[TENSOR_KEY]]]
        shape = broadcast(layer, [b.shape for b in pair])
        method = BROADCASTING[kind]
        return e.merge(
            base, pair, shape, lambda name, xs: getattr(e.builder, method)(name, xs, name)
        )
    if not (is_tensor_ref(x) or is_tensor_ref(y)):
        raise Unsupported(f"{label(layer)} has no tensor operand")
    tensor_first = is_tensor_ref(x)
    blob = e.blobs[(x if tensor_first else y)[TENSOR_KEY]]
    c = float(y if tensor_first else x)
    if kind == "add":
        alpha, beta = 1.0, c
    elif kind == "mul":
        alpha, beta = c, 0.0
    elif kind == "sub":
        alpha, beta = (1.0, -c) if tensor_first else (-1.0, c)
    elif tensor_first and c != 0.0:  # x / c
        alpha, beta = 1.0 / c, 0.0
    else:  # c / x
        raise fail(layer, "a number divided by a tensor")
    e.use(blob)
    params = [alpha, beta]
    return e.add(
        base,
        blob.shape,
        lambda name, v: e.builder.add_activation(name, "LINEAR", v, name, params=params),
    )
