"""Weights: the one place where a weight's values go into a Core ML layer.

Every translation hands its weights, already in Core ML's order (folded BatchNorms included, in
float64 until here), to :func:`write`. Today they are stored as float32; a choice of stored form
(float16, quantized) belongs here and nowhere else.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def write(params: Any, values: np.ndarray) -> None:
    """Fill the ``WeightParams`` message ``params`` with ``values``, flattened in C order."""
    # protobuf takes a list of floats about 4x faster than the numpy array
    params.floatValue.extend(np.asarray(values, dtype=np.float32).ravel().tolist())
