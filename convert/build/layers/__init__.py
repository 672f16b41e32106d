"""Layer translations, one module per family; importing the package fills the registry.

To add a Keras layer: write one function in its family's module, register it with
:func:`convert.build.layers.registry.register`, and add a test to tests/test_layers.py.
"""

from convert.build.layers import (  # noqa: F401
    activation,
    convolution,
    dense,
    merge,
    normalisation,
    pooling,
    preprocessing,
    shape,
)
from convert.build.layers.registry import REGISTRY, Unsupported, lookup  # noqa: F401
