"""How much of a file coreml-split is willing to read: the bounds that keep a damaged or hostile
model file from exhausting memory, the stack or time.

Every bound sits far above what a real image classifier needs (the figures in brackets are the
largest seen in the suite's keras.applications sweep), and far below what would hurt the
machine. A file past a bound is refused with a :class:`~convert.errors.ModelFileError` that
names the bound, like any other bad input: the rest of the zoo converts.
"""

from __future__ import annotations

MiB = 1 << 20

# The model_config attribute: the JSON of the whole model. A ConvNeXt or NASNet config is under
# 1 MiB [NASNetMobile: 0.7 MiB]; 32 MiB holds several thousand layers. It is checked before it
# is read (for a fixed-size string the attribute's storage size says it), and again after
# (a variable-length string's size is known only once read; it cannot exceed the file).
MAX_CONFIG_BYTES = 32 * MiB

# Any other attribute read (layer_names, weight_names, keras_version): Keras splits a list over
# 64 kB into several attributes, so 32 MiB is generous, and a damaged header that declares
# billions of elements is refused before h5py allocates them.
MAX_ATTRIBUTE_BYTES = 32 * MiB

# Nesting depth of the model_config JSON (brackets and braces). Python's json and pickle (the
# graphs are pickled between stages) recurse once per level and stop near 1000; a config
# nests about 10 levels plus 3 per nested model [Keras 3 files: 14].
MAX_JSON_DEPTH = 512

# Models inside models (Sequential in Functional in Sequential ...). Teachable Machine nests
# 3; the reader recurses a few frames per level, so 64 keeps far from the recursion limit.
MAX_MODEL_DEPTH = 64

# Depth of one layer call's arguments (lists and dicts around its input tensors; a Concatenate
# takes [[a, b]]). Later stages walk these structures recursively.
MAX_CALL_DEPTH = 32

# Layer calls after nested models are expanded (a model called twice counts twice). NASNetMobile,
# the largest keras.applications backbone a classifier is likely to use, makes 771.
MAX_LAYER_CALLS = 20_000

# Declared input shapes: rank at most 8 (an image is 4), every dimension a positive whole number
# or None, at most 16384 per side (a 16K image) and 2^30 elements in all (a 4 GiB float32
# tensor), so that no shape arithmetic downstream meets absurd numbers.
MAX_INPUT_RANK = 8
MAX_INPUT_SIDE = 16_384
MAX_INPUT_ELEMENTS = 1 << 30

# Any tensor the static shape inference computes: 2^31 elements (8 GiB of float32). A
# MobileNetV2 at 224 peaks at 1.2 M per image; a larger one means a broken or hostile config.
MAX_TENSOR_ELEMENTS = 1 << 31

# A weight dataset may declare at most this many times the file's size, plus the slack, in
# bytes: h5py allocates what the dataset declares before it reads. Keras writes weights
# uncompressed, so a real file's datasets declare less than the file's size; the factor leaves
# room for compression.
WEIGHT_BYTES_PER_FILE_BYTE = 16
WEIGHT_BYTES_SLACK = 1 * MiB

# A .keras archive (convert/read/archive.py): Keras writes three members, plus assets for layers
# that keep files (vocabularies); the count is read from the zip's end record before zipfile
# lists them. metadata.json holds a version and a date. A weights member that a tool compressed
# is inflated in memory, up to 2 GiB (a stored one, as Keras writes it, is read in place).
MAX_ARCHIVE_MEMBERS = 4096
MAX_METADATA_BYTES = 1 * MiB
MAX_INFLATED_WEIGHTS_BYTES = 2048 * MiB

# A labels file: one label per line. 16 MiB is a million long labels; ImageNet's 21k classes
# take 0.4 MiB.
MAX_LABELS_BYTES = 16 * MiB


def size_text(n: int) -> str:
    """Bytes as the bounds above are written: ``32 MiB``, else the plain number."""
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n} bytes"
