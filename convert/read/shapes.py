"""Static shape inference over the neutral graph, for the layer kinds classifiers are made of.

A registry maps a Keras class name to a small function ``(config, input_shapes) -> output_shape``.
A layer missing from it yields an unknown shape (None), never a guess; everything downstream
treats unknown shapes as "ask Keras at conversion time".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from convert.read.graph import Graph

Shape = tuple[int | None, ...]
ShapeFn = Callable[[dict[str, Any], list[Shape]], Shape | None]

SHAPE_RULES: dict[str, ShapeFn] = {}


def rule(*class_names: str) -> Callable[[ShapeFn], ShapeFn]:
    def register(fn: ShapeFn) -> ShapeFn:
        for name in class_names:
            SHAPE_RULES[name] = fn
        return fn

    return register


def infer_shapes(graph: Graph, recorded: dict[int, Shape] | None = None) -> None:
    """Fill ``Tensor.shape`` for every tensor whose shape follows from its inputs.

    ``recorded`` holds shapes the file itself states (Keras 3 writes the shape of every tensor a
    layer consumes); they win over inference.
    """
    recorded = recorded or {}
    for node in graph.nodes:
        if node.layer.class_name == "InputLayer":
            shape = node.layer.config.get("shape")
            graph.tensors[node.outputs[0]].shape = tuple(shape) if shape else None
            continue
        in_shapes = [graph.tensors[t].shape for t in node.inputs]
        fn = SHAPE_RULES.get(node.layer.class_name)
        out = None
        if fn is not None and in_shapes and all(s is not None for s in in_shapes):
            try:
                out = fn(node.layer.config, in_shapes)
            except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError):
                out = None
        if len(node.outputs) == 1:
            graph.tensors[node.outputs[0]].shape = tuple(out) if out is not None else None
        for tensor in node.outputs:
            if tensor in recorded:
                graph.tensors[tensor].shape = recorded[tensor]


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _conv_dim(size: int | None, kernel: int, stride: int, dilation: int, padding: str):
    if size is None:
        return None
    if padding == "same":
        return math.ceil(size / stride)
    effective = (kernel - 1) * dilation + 1
    return (size - effective) // stride + 1


@rule(
    "Activation",
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "Softmax",
    "BatchNormalization",
    "LayerNormalization",
    "Dropout",
    "SpatialDropout2D",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Rescaling",
    "Normalization",
    "RandomFlip",
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomContrast",
    "RandomBrightness",
    "ThresholdedReLU",
    "UnitNormalization",
)
def _same(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    return shapes[0]


@rule("Conv2D", "DepthwiseConv2D", "SeparableConv2D")
def _conv2d(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    if config.get("data_format", "channels_last") != "channels_last":
        raise ValueError("channels_first")
    n, h, w, c = shapes[0]
    kh, kw = _pair(config["kernel_size"])
    sh, sw = _pair(config.get("strides", 1))
    dh, dw = _pair(config.get("dilation_rate", 1))
    padding = config.get("padding", "valid")
    if "filters" in config and config.get("filters"):
        channels = config["filters"]
    else:
        channels = None if c is None else c * int(config.get("depth_multiplier", 1))
    return (
        n,
        _conv_dim(h, kh, sh, dh, padding),
        _conv_dim(w, kw, sw, dw, padding),
        channels,
    )


@rule("MaxPooling2D", "AveragePooling2D")
def _pool2d(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    n, h, w, c = shapes[0]
    kh, kw = _pair(config.get("pool_size", 2))
    strides = config.get("strides") or config.get("pool_size", 2)
    sh, sw = _pair(strides)
    padding = config.get("padding", "valid")
    return n, _conv_dim(h, kh, sh, 1, padding), _conv_dim(w, kw, sw, 1, padding), c


@rule("GlobalAveragePooling2D", "GlobalMaxPooling2D")
def _global_pool2d(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    n, _, _, c = shapes[0]
    return (n, 1, 1, c) if config.get("keepdims") else (n, c)


@rule("ZeroPadding2D")
def _zero_pad(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    n, h, w, c = shapes[0]
    pad = config.get("padding", 1)
    if isinstance(pad, int):
        (top, bottom), (left, right) = (pad, pad), (pad, pad)
    elif isinstance(pad[0], int):
        (top, bottom), (left, right) = (pad[0], pad[0]), (pad[1], pad[1])
    else:
        (top, bottom), (left, right) = pad
    return n, None if h is None else h + top + bottom, None if w is None else w + left + right, c


@rule("Cropping2D")
def _crop(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    n, h, w, c = shapes[0]
    (top, bottom), (left, right) = config.get("cropping", ((0, 0), (0, 0)))
    return n, None if h is None else h - top - bottom, None if w is None else w - left - right, c


@rule("Dense")
def _dense(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    return shapes[0][:-1] + (int(config["units"]),)


@rule("Flatten")
def _flatten(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    rest = shapes[0][1:]
    if any(d is None for d in rest):
        return (shapes[0][0], None)
    return (shapes[0][0], math.prod(rest))


@rule("Reshape")
def _reshape(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    target = list(config["target_shape"])
    if -1 in target:
        rest = shapes[0][1:]
        if any(d is None for d in rest):
            raise ValueError("unknown")
        known = math.prod(d for d in target if d != -1)
        target[target.index(-1)] = math.prod(rest) // known
    return (shapes[0][0], *target)


# tf_keras TFOpLambda functions for the four arithmetic operations.
ARITHMETIC_FUNCTIONS = {
    "math.truediv",
    "math.divide",
    "math.subtract",
    "math.multiply",
    "math.add",
    "__operators__.add",
}
# TFOpLambda functions that broadcast elementwise.
ELEMENTWISE_FUNCTIONS = ARITHMETIC_FUNCTIONS | {
    "math.maximum",
    "math.minimum",
    "math.pow",
    "math.sqrt",
    "math.abs",
    "nn.relu",
    "nn.relu6",
    "math.sigmoid",
    "nn.silu",
    "math.tanh",
}


@rule("TFOpLambda")
def _tf_op(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    if config.get("function") not in ELEMENTWISE_FUNCTIONS:
        raise ValueError("not elementwise")
    return _elementwise(config, shapes)


@rule(
    "Add",
    "Subtract",
    "Multiply",
    "Average",
    "Maximum",
    "Minimum",
    "TrueDivide",
    "Divide",
    "Power",
    "Sqrt",
    "Abs",
    "Negative",
)
def _elementwise(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    out = []
    for dims in zip(*padded):
        known = [d for d in dims if d not in (None, 1)]
        out.append(known[0] if known else (None if None in dims else 1))
    return tuple(out)


@rule("Concatenate")
def _concat(config: dict[str, Any], shapes: list[Shape]) -> Shape:
    axis = int(config.get("axis", -1))
    rank = len(shapes[0])
    axis = axis % rank
    total = sum(s[axis] for s in shapes) if all(s[axis] is not None for s in shapes) else None
    out = list(shapes[0])
    out[axis] = total
    return tuple(out)
