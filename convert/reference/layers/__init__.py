"""Layer families; importing this package fills :data:`convert.reference.registry.REGISTRY`."""

from convert.reference.layers import (  # noqa: F401
    activation,
    convolution,
    elementwise,
    linear,
    normalisation,
    reduce,
    shape,
)
