"""Doing: turn a plan into Core ML files.

One backbone NeuralNetwork per group (converted once), and per classifier a PipelineClassifier
of [LinkedModel stub -> NeuralNetworkClassifier head]. Everything that touches protobufs lives
here; what to build was decided in :mod:`convert.plan`.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from convert import __version__
from convert.errors import ConversionError
from convert.families import PREPROCESSING, Preprocessing
from convert.heavy import coremltools, coremltools_converts_tensorflow, tensorflow
from convert.plan import GroupPlan, ModelPlan

SPEC_VERSION = 4  # iOS 13 / macOS 10.15: the minimum for linked models
IMAGE = "image"
FEATURES = "features"
CLASS_LABEL = "classLabel"
CLASS_PROBS = "classLabelProbs"
SEARCH_PATH = ".:$BUNDLE_MAIN"
TOOL = f"coreml-split {__version__}"


def _proto():
    coremltools()
    from coremltools.proto import FeatureTypes_pb2, Model_pb2

    return Model_pb2, FeatureTypes_pb2


# -- conversion with coremltools --------------------------------------------------------------


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


def convert_backbone(graph: Any, objects: Any, model: ModelPlan, group: GroupPlan) -> Any:
    """Input image -> split tensor, as a NeuralNetwork spec with output ``features``."""
    from convert.keras_exec import concrete_function, subgraph_function

    pre = PREPROCESSING[group.preprocessing]
    fn = subgraph_function(graph, objects, graph.inputs[0], model.split_tensor)
    cf = concrete_function(_with_std(fn, pre.std), [1, *model.input_shape], IMAGE, graph.source)
    spec = _ct_convert(graph.source, "backbone", cf, [image_type(pre, model.input_shape)])
    _rename_output(spec, FEATURES)
    shape = feature_shape(graph, model.split_tensor)
    set_array_shape(spec.description.output[0], shape)
    spec.specificationVersion = max(spec.specificationVersion, SPEC_VERSION)
    return spec


def feature_shape(graph: Any, tensor: int) -> list[int]:
    shape = graph.tensors[tensor].shape
    if shape is None or any(d is None for d in shape[1:]):
        raise ConversionError(graph.source, "the split tensor's shape is not static")
    return [1, *[int(d) for d in shape[1:]]]


def convert_head(graph: Any, objects: Any, model: ModelPlan) -> Any:
    """Split tensor -> class probabilities, as a NeuralNetworkClassifier spec."""
    from convert.keras_exec import concrete_function, subgraph_function

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
    _name_classifier_outputs(spec)
    set_array_shape(spec.description.input[0], shape)
    spec.specificationVersion = max(spec.specificationVersion, SPEC_VERSION)
    return spec


def convert_standalone(graph: Any, objects: Any, model: ModelPlan) -> Any:
    """The whole model as one NeuralNetworkClassifier (for models that share nothing)."""
    from convert.keras_exec import concrete_function, subgraph_function

    ct = coremltools()

    pre = PREPROCESSING[model.preprocessing]
    fn = subgraph_function(graph, objects, graph.inputs[0], graph.outputs[0])
    cf = concrete_function(_with_std(fn, pre.std), [1, *model.input_shape], IMAGE, graph.source)
    spec = _ct_convert(
        graph.source,
        "model",
        cf,
        [image_type(pre, model.input_shape)],
        classifier_config=ct.ClassifierConfig(list(model.labels)),
    )
    _name_classifier_outputs(spec)
    spec.specificationVersion = max(spec.specificationVersion, SPEC_VERSION)
    return spec


# -- spec surgery ------------------------------------------------------------------------------


def _network(spec: Any) -> Any:
    kind = spec.WhichOneof("Type")
    if kind not in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"):
        raise ValueError(f"not a neural network spec: {kind}")
    return getattr(spec, kind)


def rename_blob(spec: Any, old: str, new: str) -> None:
    """Rename a feature/blob everywhere a NeuralNetwork spec mentions it."""
    for feature in [*spec.description.input, *spec.description.output]:
        if feature.name == old:
            feature.name = new
    d = spec.description
    if d.predictedFeatureName == old:
        d.predictedFeatureName = new
    if d.predictedProbabilitiesName == old:
        d.predictedProbabilitiesName = new
    nn = _network(spec)
    for layer in nn.layers:
        for i, name in enumerate(layer.input):
            if name == old:
                layer.input[i] = new
        for i, name in enumerate(layer.output):
            if name == old:
                layer.output[i] = new
    for pre in nn.preprocessing:
        if pre.featureName == old:
            pre.featureName = new
    if spec.WhichOneof("Type") == "neuralNetworkClassifier":
        if nn.labelProbabilityLayerName == old:
            nn.labelProbabilityLayerName = new


def _rename_output(spec: Any, new: str) -> None:
    if len(spec.description.output) != 1:
        raise ValueError("expected one output")
    rename_blob(spec, spec.description.output[0].name, new)


def _name_classifier_outputs(spec: Any) -> None:
    d = spec.description
    if d.predictedFeatureName != CLASS_LABEL:
        rename_blob(spec, d.predictedFeatureName, CLASS_LABEL)
    if d.predictedProbabilitiesName != CLASS_PROBS:
        rename_blob(spec, d.predictedProbabilitiesName, CLASS_PROBS)
    # Apple's classifiers list the probabilities first, then the label; keep one stable order.
    outputs = sorted(d.output, key=lambda f: f.name != CLASS_PROBS)
    copies = [type(f)() for f in outputs]
    for copy, f in zip(copies, outputs):
        copy.CopyFrom(f)
    del d.output[:]
    d.output.extend(copies)


def name_features(
    spec: Any, image: str | None = None, label: str | None = None, probs: str | None = None
) -> None:
    """Give a backbone, head or standalone classifier the feature names a user asked for."""
    for old, new in ((IMAGE, image), (CLASS_LABEL, label), (CLASS_PROBS, probs)):
        if new and new != old and any(f.name == old for f in _features(spec)):
            rename_blob(spec, old, new)


def _features(spec: Any) -> list[Any]:
    return [*spec.description.input, *spec.description.output]


def set_array_shape(feature: Any, shape: list[int]) -> None:
    """Make a feature a FLOAT32 multi-array of exactly ``shape`` (no flexible shapes)."""
    Model_pb2, FeatureTypes_pb2 = _proto()
    array = feature.type.multiArrayType
    del array.shape[:]
    array.shape.extend(shape)
    array.dataType = FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    array.ClearField("ShapeFlexibility")


def make_stub(backbone: Any, backbone_file: str) -> Any:
    """A LinkedModel with the backbone's exact interface, pointing at its compiled form."""
    Model_pb2, _ = _proto()
    stub = Model_pb2.Model()
    stub.specificationVersion = SPEC_VERSION
    stub.description.input.extend(backbone.description.input)
    stub.description.output.extend(backbone.description.output)
    link = stub.linkedModel.linkedModelFile
    link.linkedModelFileName.defaultValue = compiled_name(backbone_file)
    link.linkedModelSearchPath.defaultValue = SEARCH_PATH
    return stub


def compiled_name(mlmodel_file: str) -> str:
    """Xcode compiles ``X.mlmodel`` in an app target into ``X.mlmodelc`` in the bundle."""
    return Path(mlmodel_file).stem + ".mlmodelc"


def make_pipeline(stub: Any, head: Any) -> Any:
    """PipelineClassifier [stub, head]: input ``image``; outputs the head's two outputs."""
    Model_pb2, _ = _proto()
    spec = Model_pb2.Model()
    spec.specificationVersion = max(
        SPEC_VERSION, stub.specificationVersion, head.specificationVersion
    )
    pipeline = spec.pipelineClassifier.pipeline
    pipeline.models.add().CopyFrom(stub)
    pipeline.models.add().CopyFrom(head)
    pipeline.names.extend(["backbone", "head"])
    spec.description.input.extend(stub.description.input)
    spec.description.output.extend(head.description.output)
    spec.description.predictedFeatureName = head.description.predictedFeatureName
    spec.description.predictedProbabilitiesName = head.description.predictedProbabilitiesName
    return spec


def merge_standalone(backbone: Any, head: Any, *, backbone_layers: bool = True) -> Any:
    """Backbone and head fused into one NeuralNetworkClassifier, as a one-by-one conversion
    would ship it. Used to measure that size without converting from TensorFlow again.

    With ``backbone_layers=False`` the backbone's layers are left out (everything else, the
    renaming of clashing head layers included, is as with them): :func:`standalone_size` then
    gives the full spec's size without copying megabytes of weights for every classifier."""
    Model_pb2, _ = _proto()
    spec = Model_pb2.Model()
    spec.specificationVersion = max(backbone.specificationVersion, head.specificationVersion)
    spec.description.input.extend(backbone.description.input)
    spec.description.output.extend(head.description.output)
    spec.description.predictedFeatureName = head.description.predictedFeatureName
    spec.description.predictedProbabilitiesName = head.description.predictedProbabilitiesName
    head = _copy(head)
    bb_nn = backbone.neuralNetwork
    taken = {name for layer in bb_nn.layers for name in [layer.name, *layer.output]}
    for layer in head.neuralNetworkClassifier.layers:
        for name in [*layer.output]:
            if name in taken and name != FEATURES:
                rename_blob(head, name, f"head/{name}")
        if layer.name in taken:
            layer.name = f"head/{layer.name}"
    nn = spec.neuralNetworkClassifier
    if backbone_layers:
        nn.layers.extend(bb_nn.layers)
    nn.layers.extend(head.neuralNetworkClassifier.layers)
    nn.preprocessing.extend(bb_nn.preprocessing)
    nn.arrayInputShapeMapping = bb_nn.arrayInputShapeMapping
    nn.imageInputShapeMapping = bb_nn.imageInputShapeMapping
    nn.stringClassLabels.CopyFrom(head.neuralNetworkClassifier.stringClassLabels)
    nn.labelProbabilityLayerName = head.neuralNetworkClassifier.labelProbabilityLayerName
    return spec


def layers_size(spec: Any) -> int:
    """Bytes a NeuralNetwork's layers take inside it, each with its field tag and length."""
    sizes = [layer.ByteSize() for layer in _network(spec).layers]
    return sum(_LAYERS_TAG + _varint_size(n) + n for n in sizes)


def standalone_size(merged: Any, backbone_layer_bytes: int) -> int:
    """The serialised size of ``merged`` (from ``merge_standalone(..., backbone_layers=False)``)
    had the backbone's layers, of :func:`layers_size` ``backbone_layer_bytes``, been put in.

    Protobuf sizes add up: the layers are a repeated field of the NeuralNetworkClassifier, which
    is one length-delimited field of the Model; only that field's length prefix changes."""
    inner = merged.neuralNetworkClassifier.ByteSize()
    total = inner + backbone_layer_bytes
    return merged.ByteSize() - _varint_size(inner) - inner + _varint_size(total) + total


_LAYERS_TAG = 1  # NeuralNetwork*.layers is field 1: one byte of tag


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _copy(spec: Any) -> Any:
    Model_pb2, _ = _proto()
    out = Model_pb2.Model()
    out.CopyFrom(spec)
    return out


# -- metadata ----------------------------------------------------------------------------------


def describe(
    spec: Any,
    short: str,
    user: dict[str, str],
    preprocessing: Preprocessing | None,
    *,
    author: str | None = None,
    license: str | None = None,
    version: str | None = None,
) -> None:
    """Replace coremltools' metadata (which carries the date) with our own, deterministic one.

    ``author``, ``license`` and ``version`` come from the manifest; without them the author is
    the tool and the version the tool's."""
    meta = spec.description.metadata
    meta.Clear()
    meta.shortDescription = short
    meta.versionString = version or __version__
    meta.author = author or TOOL
    if license:
        meta.license = license
    meta.userDefined["com.github.apple.coremltools.version"] = _coremltools_version()
    meta.userDefined["coreml-split.version"] = __version__
    for key, value in sorted(user.items()):
        meta.userDefined[f"coreml-split.{key}"] = value
    for feature in spec.description.input:
        if feature.name == IMAGE and feature.type.WhichOneof("Type") == "imageType":
            feature.shortDescription = _image_description(feature, preprocessing)
        elif feature.name == FEATURES:
            feature.shortDescription = "Backbone feature tensor"
    for feature in spec.description.output:
        feature.shortDescription = {
            CLASS_LABEL: "Most likely class",
            CLASS_PROBS: "Probability of each class",
            FEATURES: "Backbone feature tensor",
        }.get(feature.name, feature.shortDescription)


def _image_description(feature: Any, preprocessing: Preprocessing | None) -> str:
    image = feature.type.imageType
    text = f"{image.width}x{image.height} image"
    if preprocessing is not None:
        text += f"; scaled inside the model: {preprocessing.description}"
    return text


def _coremltools_version() -> str:
    return coremltools().__version__


def labels_metadata(labels: list[str]) -> str:
    return json.dumps(labels, ensure_ascii=False)


# -- files -------------------------------------------------------------------------------------


def serialise(spec: Any) -> bytes:
    return spec.SerializeToString(deterministic=True)


def write_spec(path: Path, spec: Any, source: Path) -> int:
    """Check ``spec`` against Core ML's validation rules, then write it atomically.

    A violation here is a bug in coreml-split, not in the user's model; it is reported against
    the source file and nothing is written.
    """
    from convert.validate import validate_spec

    problems = validate_spec(spec, path.name, strict_types=True)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConversionError(
            source, f"emitted {path.name} breaks a Core ML rule: {problems[0]}{more}"
        )
    return write_atomic(path, serialise(spec))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> int:
    """Write via a temporary file in the same folder and rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)
