"""Pooling: MaxPooling2D and AveragePooling2D on NCHW tensors, and the global poolings in either
layout (over H and W of an NCHW tensor, or over the middle axes of a tensor in Keras order)."""

from __future__ import annotations

from typing import Any

from convert.build.layers.convolution import channels_last, need_nchw, out_hw, pads, pair
from convert.build.layers.registry import fail, register


@register("MaxPooling2D", "AveragePooling2D", family="pooling")
def _pooling(e: Any, node: Any, inputs: list) -> Any:
    layer, blob = node.layer, inputs[0]
    channels_last(layer)
    need_nchw(layer, blob)
    kernel = pair(layer, "pool_size", 2)
    stride = kernel if layer.config.get("strides") is None else pair(layer, "strides", 2)
    pad = pads(layer, blob.shape[2:], kernel, stride)
    shape = [*blob.shape[:2], *out_hw(blob.shape[2:], pad, kernel, stride)]
    same = str(layer.config.get("padding", "valid")).lower() == "same"
    kind = "MAX" if layer.class_name.startswith("Max") else "AVERAGE"

    def write(name: str, x: str) -> None:
        e.builder.add_pooling(
            name,
            kernel[0],
            kernel[1],
            stride[0],
            stride[1],
            kind,
            "SAME" if same else "VALID",
            x,
            name,
            exclude_pad_area=True,  # TensorFlow averages over real pixels only
        )

    return e.add(layer.name, shape, write)


GLOBAL = [f"Global{kind}Pooling{d}D" for kind in ("Average", "Max") for d in (1, 2, 3)]


@register(*GLOBAL, family="pooling", vector=True)
def _global_pooling(e: Any, node: Any, inputs: list) -> Any:
    layer, blob = node.layer, inputs[0]
    channels_last(layer)
    keep = bool(layer.config.get("keepdims", False))
    mean = layer.class_name.startswith("GlobalAverage")
    rank = {"1D": 3, "2D": 4, "3D": 5}[layer.class_name[-2:]]
    if blob.nchw or not e.vector:
        if layer.class_name.endswith("1D") or layer.class_name.endswith("3D"):
            raise fail(layer, "covered in a head of one chain of layers only")
        need_nchw(layer, blob)
        n, c = blob.shape[:2]
        axes, shape, base = [2, 3], ([n, c, 1, 1] if keep else [n, c]), layer.name
    else:
        if e.rank != rank:
            raise fail(layer, f"input rank {e.rank}, expected {rank}")
        axes = list(range(1, rank - 1))
        shape = [1, *([1] * len(axes)), e.shape[-1]] if keep else [1, e.shape[-1]]
        base = f"{layer.name}/{'reduce_mean' if mean else 'reduce_max'}"

    def write(name: str, x: str) -> None:
        add = e.builder.add_reduce_mean if mean else e.builder.add_reduce_max
        add(name, x, name, axes=axes, keepdims=keep, reduce_all=False)

    return e.add(base, shape, write)
