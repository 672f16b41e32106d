"""Heavy imports, done late and quietly.

TensorFlow prints C++ start-up notices (oneDNN, CUDA) straight to file descriptor 2, and
coremltools logs warnings about untested TensorFlow versions and macOS-only modules. None of it
helps a user of this tool, so the first import of each runs with that noise silenced. Python
exceptions are unaffected: a failing import still raises.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Any


@contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def tensorflow() -> Any:
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with _stderr_silenced():
            import tensorflow  # noqa: F401
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    return tf


def coremltools() -> Any:
    tensorflow()
    os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' progress bars; we print our own
    logger = logging.getLogger("coremltools")
    if "coremltools" not in sys.modules:
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            import coremltools  # noqa: F401
        finally:
            logger.setLevel(level)
    import coremltools as ct

    return ct


def keras(major: int) -> Any:
    """keras 3 for major >= 3, tf_keras for Keras 2 files."""
    tensorflow()
    if major >= 3:
        import keras as k
    else:
        import tf_keras as k
    return k
