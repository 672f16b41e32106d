"""The fallback: convert a backbone, head or whole model with ``ct.convert`` through TensorFlow.

Used for every network that has a layer :mod:`convert.build.layers` does not translate. The Keras
model is loaded (:mod:`convert.check.keras_model`), the part between two tensors is traced as a
concrete function, and coremltools converts it to a NeuralNetwork with the interface the direct
builder gives.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from convert.build.spec import (
    FEATURES,
    IMAGE,
    SPEC_VERSION,
    feature_shape,
    name_classifier_outputs,
    rename_output,
    set_array_shape,
)
from convert.errors import ConversionError
from convert.heavy import coremltools, coremltools_converts_tensorflow, tensorflow
from convert.plan.types import GroupPlan, ModelPlan
from convert.read.families import PREPROCESSING, Preprocessing


@contextmanager
def _quiet_coremltools():
    """coremltools logs, warns and draws progress bars (tqdm, on sys.stderr) while converting;
    keep the user's terminal readable. Exceptions still propagate."""
    import io
    import logging
    import warnings
    from contextlib import redirect_stderr

    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


def _ct_convert(source: Path, what: str, function: Any, inputs: list[Any], **kwargs: Any) -> Any:
    ct = coremltools()
    if not coremltools_converts_tensorflow():  # a bug in deciding the run needs no TensorFlow
        raise ConversionError(
            source,
            f"internal error: the {what} needs ct.convert, but coremltools was imported "
            "without TensorFlow for this run; rerun with --backbone-converter coremltools",
        )
    _register_missing_tf_ops()
    _reset_op_names()
    try:
        with _quiet_coremltools():
            mlmodel = ct.convert(
                [function],
                source="tensorflow",
                inputs=inputs,
                convert_to="neuralnetwork",
                minimum_deployment_target=ct.target.iOS13,
                pass_pipeline=_pass_pipeline(ct),
                **kwargs,
            )
    except Exception as exc:  # coremltools raises anything from NotImplementedError to KeyError
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
        raise ConversionError(source, f"coremltools cannot convert the {what}: {text}") from None
    return mlmodel.get_spec()


# coremltools 9.0's common::fuse_elementwise_to_batchnorm rebuilds the mul + add that Keras 3's
# BatchNormalization traces to as batch_norm(mean 0, variance 1) without an epsilon, so the
# default 1e-5 scales every such BatchNorm by 1/sqrt(1 + 1e-5). Deep backbones accumulate it:
# ResNet50 probabilities moved by 1.2e-3, 5e-5 without the pass. File sizes do not change.
SKIPPED_PASSES = ["common::fuse_elementwise_to_batchnorm"]


def _pass_pipeline(ct: Any) -> Any:
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(SKIPPED_PASSES)
    return pipeline


def _register_missing_tf_ops() -> None:
    """TensorFlow ops coremltools 9.0 has no translation for, written with MIL ops it has.

    ``Erfc``: Keras 3 traces the exact GELU (ConvNeXt, ViT-style heads) as
    ``0.5 * x * erfc(-x / sqrt(2))``; erfc(x) = 1 - erf(x).
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.tensorflow.tf_op_registry import (
        _TF_OPS_REGISTRY,
        register_tf_op,
    )

    if "Erfc" in _TF_OPS_REGISTRY:
        return

    def Erfc(context: Any, node: Any) -> None:  # noqa: N802 - the TF op's name
        x = context[node.inputs[0]]
        context.add(node.name, mb.sub(x=1.0, y=mb.erf(x=x), name=node.name))

    register_tf_op(Erfc)


def _reset_op_names() -> None:
    """coremltools names generated ops from a process-wide counter that it resets only after a
    successful conversion; after a failed one, the next model's layer names (and bytes) would
    depend on that history. Reset it first, so output depends on the input alone."""
    try:
        from coremltools.converters.mil.converter import _reset_conversion_state
    except ImportError:  # a coremltools without it: names may then vary after a failure
        return
    _reset_conversion_state()


def image_type(preprocessing: Preprocessing, hwc: list[int]) -> Any:
    ct = coremltools()
    h, w, c = hwc
    if c == 1:
        return ct.ImageType(
            name=IMAGE,
            shape=(1, h, w, 1),
            scale=preprocessing.scale,
            bias=preprocessing.bias[0],
            color_layout=ct.colorlayout.GRAYSCALE,
        )
    r, g, b = preprocessing.bias
    return ct.ImageType(
        name=IMAGE,
        shape=(1, h, w, 3),
        scale=preprocessing.scale,
        bias=[b, g, r] if preprocessing.bgr else [r, g, b],  # coremltools reads it in layout order
        color_layout=ct.colorlayout.BGR if preprocessing.bgr else ct.colorlayout.RGB,
    )


def _with_std(fn: Any, std: tuple[float, float, float] | None) -> Any:
    """Per-channel division that Core ML's image scaler cannot express, as a layer in the model."""
    if std is None:
        return fn
    tf = tensorflow()
    divisor = tf.constant(std, dtype=tf.float32)
    return lambda x: fn(x / divisor)


def _image_in(graph: Any, fn: Any) -> Any:
    """``fn`` fed the (1, H, W, C) image: a model declared (None, H, W) gets it without the
    channel axis (it is grayscale, one channel)."""
    if not graph.channel_less_input:
        return fn
    tf = tensorflow()
    return lambda x: fn(tf.reshape(x, x.shape[:-1]))


def convert_backbone(graph: Any, objects: Any, model: ModelPlan, group: GroupPlan) -> Any:
    """Input image -> split tensor, as a NeuralNetwork spec with output ``features``."""
    from convert.check.keras_model import concrete_function, subgraph_function

    pre = PREPROCESSING[group.preprocessing]
    fn = _image_in(graph, subgraph_function(graph, objects, graph.inputs[0], model.split_tensor))
    cf = concrete_function(_with_std(fn, pre.std), [1, *model.input_shape], IMAGE, graph.source)
    spec = _ct_convert(graph.source, "backbone", cf, [image_type(pre, model.input_shape)])
    rename_output(spec, FEATURES)
    shape = feature_shape(graph, model.split_tensor)
    set_array_shape(spec.description.output[0], shape)
    spec.specificationVersion = max(spec.specificationVersion, SPEC_VERSION)
    return spec


def convert_head(graph: Any, objects: Any, model: ModelPlan) -> Any:
    """Split tensor -> class probabilities, as a NeuralNetworkClassifier spec."""
    from convert.check.keras_model import concrete_function, subgraph_function

    ct = coremltools()

    shape = feature_shape(graph, model.split_tensor)
    fn = subgraph_function(graph, objects, model.split_tensor, graph.outputs[0])
    cf = concrete_function(fn, shape, FEATURES, graph.source)
    spec = _ct_convert(
        graph.source,
        "head",
        cf,
        [ct.TensorType(name=FEATURES, shape=tuple(shape))],
        classifier_config=ct.ClassifierConfig(list(model.labels)),
    )
    name_classifier_outputs(spec)
    set_array_shape(spec.description.input[0], shape)
    spec.specificationVersion = max(spec.specificationVersion, SPEC_VERSION)
    return spec


def convert_standalone(graph: Any, objects: Any, model: ModelPlan) -> Any:
    """The whole model as one NeuralNetworkClassifier (for models that share nothing)."""
    from convert.check.keras_model import concrete_function, subgraph_function

    ct = coremltools()

    pre = PREPROCESSING[model.preprocessing]
    fn = _image_in(graph, subgraph_function(graph, objects, graph.inputs[0], graph.outputs[0]))
    cf = concrete_function(_with_std(fn, pre.std), [1, *model.input_shape], IMAGE, graph.source)
    spec = _ct_convert(
        graph.source,
        "model",
        cf,
        [image_type(pre, model.input_shape)],
        classifier_config=ct.ClassifierConfig(list(model.labels)),
    )
    name_classifier_outputs(spec)
    spec.specificationVersion = max(spec.specificationVersion, SPEC_VERSION)
    return spec
