"""Networks built straight from the .h5 weights: backbones, heads and whole classifiers.

Each is one walk (:mod:`convert.build.walker`) over the neutral graph, between the tensors the
plan chose, through the layer registry (:mod:`convert.build.layers`); no TensorFlow is needed.
The results have exactly the interfaces the ct.convert fallback (:mod:`convert.build.ct_convert`)
gives, so either can sit on either side of a linked stub:

- a backbone: input ``image`` (the model's input size; the preprocessing in Core ML's image
  scaler, plus a per-channel scale layer for a ``std``), output ``features`` (FLOAT32, the split
  tensor's NHWC shape with its batch 1);
- a head: input ``features``, outputs ``classLabelProbs`` then ``classLabel``;
- a classifier: input ``image``, outputs ``classLabelProbs`` then ``classLabel``.

As with ``ct.convert`` and a ``ClassifierConfig``, the probabilities are whatever the network's
last layer computes: a softmax if the model ends in one, the raw values otherwise.

``*_supported`` say whether a network can be built (None) or why not, naming the layer; they read
no weights.
"""

from __future__ import annotations

from typing import Any

from convert.build import spec as specs
from convert.build.layers import Unsupported
from convert.build.layers.preprocessing import image_std
from convert.build.layers.weights import FULL, Precision, StorageError
from convert.build.spec import CLASS_LABEL, CLASS_PROBS, FEATURES, IMAGE
from convert.build.walker import NCHW, VECTOR, Blob, Emitter, to_keras_order, walk
from convert.errors import ConversionError
from convert.heavy import coremltools
from convert.read.families import Preprocessing
from convert.read.graph import Graph


def _static(graph: Graph, tensor: int) -> list[int] | None:
    """The tensor's shape with the batch 1, or None if a dimension is unknown."""
    shape = graph.tensors[tensor].shape
    if shape is None or any(d is None for d in shape[1:]):
        return None
    return [1, *[int(d) for d in shape[1:]]]


def supported(graph: Graph, stop: int) -> str | None:
    """None if the network from the image to tensor ``stop`` (a split tensor: a backbone; the
    output: a whole classifier) can be built from the weights; else the reason."""
    shape = graph.tensors[graph.inputs[0]].shape if len(graph.inputs) == 1 else None
    if shape is None or len(shape) != 4 or any(d is None for d in shape[1:]):
        return "the input is not one image of static size"
    h, w, c = (int(d) for d in shape[1:])
    if c not in (1, 3):
        return f"the input has {c} channels"
    try:
        out = walk(Emitter(graph, NCHW), graph.inputs[0], Blob(IMAGE, [1, c, h, w], True), stop)
    except Unsupported as exc:
        return str(exc)
    if out.rank not in (2, 4):
        return f"the split tensor has rank {out.rank}"
    return None


def head_supported(graph: Graph, split: int, output: int, layout: str) -> str | None:
    """None if the head (``split`` to ``output``) can be built in ``layout``; else why."""
    shape = _static(graph, split)
    if shape is None:
        return "the split tensor's shape is not static"
    if layout == NCHW and len(shape) not in (2, 4):
        return "the split tensor is not of rank 2 or 4"
    try:
        out = walk(Emitter(graph, layout), split, _features(shape, layout), output)
    except Unsupported as exc:
        return str(exc)
    if out.rank != 2:
        return f"the output has shape {out.shape}, not [1, classes]"
    return None


def head_layout(graph: Graph, split: int, output: int) -> str | None:
    """How to build this head from the weights: VECTOR for one chain of layers in Keras order
    (no transposes), else NCHW for anything else the registry covers; None: ct.convert it."""
    for layout in (VECTOR, NCHW):
        if head_supported(graph, split, output, layout) is None:
            return layout
    return None


def _features(shape: list[int], layout: str) -> Blob:
    """The head's input as the walk sees it: rank 4 as NCHW in the image layout."""
    if layout == NCHW and len(shape) == 4:
        n, h, w, c = shape
        return Blob(FEATURES, [n, c, h, w], True)
    return Blob(FEATURES, shape)


def build_backbone(
    graph: Graph, split: int, pre: Preprocessing, hwc: list[int], precision: Precision = FULL
) -> Any:
    """The shared backbone: image in, FEATURES out. Check with :func:`supported` first."""
    return _network(graph, graph.inputs[0], split, NCHW, None, pre, hwc, None, precision)


def build_head(
    graph: Graph,
    split: int,
    labels: list[str],
    feature_shape: list[int],
    layout: str | None = None,
    precision: Precision = FULL,
) -> Any:
    """A head as a NeuralNetworkClassifier: FEATURES (``feature_shape``, NHWC with its batch 1)
    in, class probabilities and label out. ``layout`` defaults to :func:`head_layout`."""
    layout = layout or head_layout(graph, split, graph.outputs[0]) or VECTOR
    labels = [str(x) for x in labels]
    return _network(
        graph, split, graph.outputs[0], layout, labels, None, None, feature_shape, precision
    )


def build_classifier(
    graph: Graph,
    labels: list[str],
    pre: Preprocessing,
    hwc: list[int],
    precision: Precision = FULL,
) -> Any:
    """The whole model as one NeuralNetworkClassifier, for models that share nothing; check
    with ``supported(graph, graph.outputs[0])``."""
    labels = [str(x) for x in labels]
    return _network(
        graph, graph.inputs[0], graph.outputs[0], NCHW, labels, pre, hwc, None, precision
    )


def _network(
    graph: Graph,
    start: int,
    stop: int,
    layout: str,
    labels: list[str] | None,
    pre: Preprocessing | None,
    hwc: list[int] | None,
    feature_shape: list[int] | None,
    precision: Precision = FULL,
) -> Any:
    """From the image (``pre``, ``hwc``) or from the features (``feature_shape``) to ``stop``:
    a NeuralNetwork with output FEATURES, or with ``labels`` a NeuralNetworkClassifier, its
    weights stored as ``precision`` says."""
    coremltools()
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    if feature_shape is None:
        assert pre is not None and hwc is not None
        h, w, c = (int(d) for d in hwc)
        input_name, input_shape = IMAGE, [c, h, w]
    else:
        input_name, input_shape = FEATURES, [int(d) for d in feature_shape]
    builder = NeuralNetworkBuilder(
        input_features=[(input_name, datatypes.Array(*input_shape))],
        output_features=[(FEATURES if labels is None else CLASS_PROBS, None)],
        mode=None if labels is None else "classifier",
        disable_rank5_shape_mapping=True,
        use_float_arraytype=True,
    )
    e = Emitter(graph, layout, builder, precision)
    what = "backbone" if labels is None else ("model" if feature_shape is None else "head")
    try:
        if feature_shape is None:
            first = image_std(e, pre, Blob(IMAGE, [1, c, h, w], True))
            if graph.channel_less_input:  # (None, H, W): grayscale, no channel axis
                e.use(first)
                first = e.add(
                    "image/channel_dropped",
                    [1, h, w],
                    lambda name, x: builder.add_reshape_static(name, x, name, [1, h, w]),
                )
        else:
            first = _features(input_shape, layout)
            if first.nchw:
                e.use(Blob(FEATURES, input_shape))
                first = e.add(
                    "features/to_nchw",
                    first.shape,
                    lambda name, x: builder.add_transpose(name, [0, 3, 1, 2], x, name),
                )
        out = to_keras_order(e, "output", walk(e, start, first, stop))
        if out.name in (IMAGE, FEATURES) or e.layers == 0:  # Core ML needs a layer
            e.use(out)
            out = e.add(
                "identity" if layout == VECTOR else "output/copy",  # as each was first named
                out.shape,
                lambda n, x: builder.add_activation(n, "LINEAR", x, n, params=[1.0, 0.0]),
            )
        if labels is not None and (out.rank != 2 or out.shape[1] != len(labels)):
            raise Unsupported(f"{len(labels)} labels for an output of shape {out.shape}")
    except Unsupported as exc:
        raise ConversionError(graph.source, f"cannot build the {what} directly: {exc}") from None
    except StorageError as exc:
        raise ConversionError(
            graph.source, f"cannot store the {what} as {precision.kernels}: {exc}"
        ) from None
    spec = builder.spec
    if feature_shape is None:
        _image_input(spec, pre, h, w, c)
    else:
        specs.set_array_shape(spec.description.input[0], input_shape)
    if labels is None:
        specs.rename_blob(spec, out.name, FEATURES)
        specs.set_array_shape(spec.description.output[0], out.shape)
    else:
        specs.rename_blob(spec, out.name, CLASS_PROBS)
        builder.set_class_labels(
            labels, predicted_feature_name=CLASS_LABEL, prediction_blob=CLASS_PROBS
        )
        spec = builder.spec
    spec.specificationVersion = max(spec.specificationVersion, specs.SPEC_VERSION)
    return spec


def _image_input(spec: Any, pre: Preprocessing, h: int, w: int, c: int) -> None:
    from coremltools.proto import FeatureTypes_pb2

    image = spec.description.input[0].type
    image.Clear()
    image.imageType.width, image.imageType.height = w, h
    if c == 1:
        image.imageType.colorSpace = FeatureTypes_pb2.ImageFeatureType.GRAYSCALE
    else:
        image.imageType.colorSpace = (
            FeatureTypes_pb2.ImageFeatureType.BGR
            if pre.bgr
            else FeatureTypes_pb2.ImageFeatureType.RGB
        )
    nn = getattr(spec, spec.WhichOneof("Type"))
    del nn.preprocessing[:]
    scaler = nn.preprocessing.add()
    scaler.featureName = IMAGE
    scaler.scaler.channelScale = pre.scale
    if c == 1:
        scaler.scaler.grayBias = pre.bias[0]
    else:
        scaler.scaler.redBias, scaler.scaler.greenBias, scaler.scaler.blueBias = pre.bias
