"""Layer families; importing this package fills the registry
(:data:`convert.check.reference.registry.REGISTRY`)."""

from convert.check.reference.layers import (  # noqa: F401
    activation,
    convolution,
    elementwise,
    linear,
    normalisation,
    reduce,
    shape,
)
