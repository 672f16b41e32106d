"""Backbone families and input preprocessing.

The family only names files and picks a default preprocessing; it never decides what is shared
(fingerprints do). It is recognised from the layer names that keras.applications gives each
architecture, which survive nesting, renaming of the sub-model and Teachable Machine's export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convert.read.graph import Graph
from convert.read.shapes import ARITHMETIC_FUNCTIONS

# (family, layer names that must all be present, preprocessing). First match wins, so more
# specific signatures come first. A name starting with "*" matches any name ending in the rest
# (ConvNeXt prefixes every layer with the model's name: convnext_tiny_..., convnext_base_...).
FAMILY_SIGNATURES: list[tuple[str, tuple[str, ...], str]] = [
    ("MobileNetV2", ("block_1_expand", "Conv_1"), "tf"),
    ("MobileNetV3", ("expanded_conv_project_bn",), "raw"),
    ("MobileNetV3", ("expanded_conv/project",), "raw"),
    ("MobileNet", ("conv_dw_1", "conv_pw_1"), "tf"),
    ("EfficientNet", ("block1a_dwconv", "stem_conv"), "raw"),  # V2 starts with fused blocks
    ("EfficientNetV2", ("block1a_project_conv", "stem_conv", "block2a_expand_conv"), "raw"),
    ("DenseNet", ("conv2_block1_1_conv", "pool2_conv"), "torch"),
    ("ResNetV2", ("conv2_block1_preact_bn",), "tf"),
    ("ResNet", ("conv2_block1_1_conv", "conv1_conv"), "caffe"),
    ("InceptionV3", ("mixed0", "mixed10"), "tf"),
    ("Xception", ("block14_sepconv1",), "tf"),
    ("NASNet", ("stem_conv1",), "tf"),
    ("VGG", ("block1_conv1", "block5_conv3"), "caffe"),
    ("ConvNeXt", ("*_stem_conv", "*_stage_0_block_0_depthwise_conv"), "raw"),
]


@dataclass(frozen=True)
class Preprocessing:
    """How 0-255 RGB pixels become the model's input tensor: ``(x[order] * scale + bias) / std``.

    Core ML's image preprocessing can express ``scale`` and ``bias``; ``std`` (per channel) needs
    extra layers in the backbone.
    """

    name: str
    scale: float
    bias: tuple[float, float, float]
    bgr: bool = False
    std: tuple[float, float, float] | None = None
    description: str = ""

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """The model's input for 0-255 pixels (..., H, W, 3 RGB or 1 gray), as Keras sees it."""
        x = np.asarray(pixels, dtype=np.float32)
        if x.shape[-1] == 1:
            return x * np.float32(self.scale) + np.float32(self.bias[0])
        x = x * np.float32(self.scale) + np.asarray(self.bias, dtype=np.float32)
        if self.std is not None:
            x = x / np.asarray(self.std, dtype=np.float32)
        return x[..., ::-1] if self.bgr else x


PREPROCESSING: dict[str, Preprocessing] = {
    p.name: p
    for p in [
        Preprocessing("tf", 1 / 127.5, (-1.0, -1.0, -1.0), description="x / 127.5 - 1, in [-1, 1]"),
        Preprocessing("unit", 1 / 255, (0.0, 0.0, 0.0), description="x / 255, in [0, 1]"),
        Preprocessing("raw", 1.0, (0.0, 0.0, 0.0), description="0-255 pixels as they are"),
        Preprocessing(
            "caffe",
            1.0,
            (-123.68, -116.779, -103.939),
            bgr=True,
            description="BGR, minus the ImageNet mean (ResNet50, VGG)",
        ),
        Preprocessing(
            "torch",
            1 / 255,
            (-0.485, -0.456, -0.406),
            std=(0.229, 0.224, 0.225),
            description="x / 255 minus mean, over std (DenseNet)",
        ),
    ]
}


def detect_family(graph: Graph, node_indices: set[int] | None = None) -> str | None:
    """The keras.applications family whose layer names the given nodes carry, if any."""
    nodes = graph.nodes if node_indices is None else [graph.nodes[i] for i in node_indices]
    names = {n.layer.name for n in nodes}
    for family, required, _ in FAMILY_SIGNATURES:
        if all(_present(r, names) for r in required):
            return family
    return None


def _present(required: str, names: set[str]) -> bool:
    if required.startswith("*"):
        return any(name.endswith(required[1:]) for name in names)
    return required in names


# Layers that rescale pixels when they sit between the input and the first weighted layer.
SCALING_CLASSES = {"Rescaling", "Normalization", "TrueDivide", "Divide", "Subtract", "Multiply"}
SCALING_FUNCTIONS = ARITHMETIC_FUNCTIONS | {"nn.bias_add"}


def scales_input_inside(graph: Graph) -> bool:
    """True when the model rescales pixels itself (Rescaling, preprocess_input in the graph).

    Such a model takes 0-255 pixels, so the Core ML image input must not scale them again.
    """
    consumers = graph.consumers()
    todo = list(graph.inputs)
    seen: set[int] = set()
    while todo and len(seen) < 32:
        tensor = todo.pop()
        for index in consumers.get(tensor, []):
            if index in seen:
                continue
            seen.add(index)
            node = graph.nodes[index]
            layer = node.layer
            if layer.class_name in SCALING_CLASSES or (
                layer.class_name == "TFOpLambda"
                and layer.config.get("function") in SCALING_FUNCTIONS
            ):
                return True
            if not layer.weights:
                todo.extend(node.outputs)
    return False


def default_preprocessing(
    family: str | None, is_teachable_machine: bool = False, scales_inside: bool = False
) -> str:
    """What the model expects: "raw" if it scales pixels itself; Teachable Machine and the
    MobileNet/Inception families use [-1, 1]; other families per keras.applications."""
    if scales_inside:
        return "raw"
    if is_teachable_machine:
        return "tf"
    for name, _, preprocessing in FAMILY_SIGNATURES:
        if name == family:
            return preprocessing
    return "tf"


def is_teachable_machine(graph: Graph) -> bool:
    """Sequential[Sequential[<sub-model>, GlobalAveragePooling2D], Sequential[Dense, Dense]]."""
    if graph.model_class != "Sequential" or graph.keras_major != 2:
        return False
    tops = {n.layer.path[0] for n in graph.nodes if n.layer.class_name != "InputLayer"}
    deep = [n for n in graph.nodes if len(n.layer.path) >= 3]
    return len(tops) == 2 and bool(deep) and detect_family(graph) == "MobileNetV2"
