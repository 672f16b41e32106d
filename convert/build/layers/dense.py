"""Dense: innerProduct on a vector, batchedMatMul on the last axis of a higher-rank tensor."""

from __future__ import annotations

from typing import Any

from convert.build.layers import activation, weights
from convert.build.layers.registry import expect_weights, fail, register


@register("Dense", family="dense", vector=True)
def _dense(e: Any, node: Any, inputs: list) -> Any:
    layer = node.layer
    if inputs[0].nchw:
        raise fail(layer, "a Dense layer on an image-like tensor")
    found = expect_weights(layer, {"kernel"}, {"bias"})
    kernel = found["kernel"]
    if len(kernel.shape) != 2 or kernel.shape[0] != e.shape[-1]:
        raise fail(layer, f"kernel {list(kernel.shape)} does not fit input {e.shape}")
    n_in, n_out = kernel.shape
    has_bias = "bias" in found
    if has_bias and tuple(found["bias"].shape) != (n_out,):
        raise fail(layer, f"bias {list(found['bias'].shape)} does not fit {n_out} units")
    activation.activation_name(layer, layer.config.get("activation"))  # a custom one fails early
    if e.rank == 2:

        def fill(spec: Any) -> None:
            p = spec.innerProduct
            p.inputChannels, p.outputChannels, p.hasBias = n_in, n_out, has_bias
            kernel = e.weight(layer, "kernel").T  # Keras [in, out]: [out, in]
            weights.write(p.weights, kernel, e.precision.kernel(spec.name), kernel=True)
            if has_bias:
                weights.write(p.bias, e.weight(layer, "bias"), e.precision.other(spec.name))

    elif e.rank <= 5:  # Dense acts on the last axis; innerProduct would flatten C, H, W

        def fill(spec: Any) -> None:
            p = spec.batchedMatmul
            p.transposeA = p.transposeB = False
            p.weightMatrixFirstDimension, p.weightMatrixSecondDimension = n_in, n_out
            p.hasBias = has_bias
            kernel = e.weight(layer, "kernel").T  # stored [out, in], as for innerProduct
            weights.write(p.weights, kernel, e.precision.kernel(spec.name), kernel=True)
            if has_bias:
                weights.write(p.bias, e.weight(layer, "bias"), e.precision.other(spec.name))

    else:
        raise fail(layer, f"input rank {e.rank}")
    e.raw_layer(layer.name, [*e.shape[:-1], n_out], fill)
    activation.apply(e, layer, layer.config.get("activation"), layer.name)
    return e.current()
