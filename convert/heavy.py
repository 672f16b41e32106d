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


_FORGO_TENSORFLOW = False


def forgo_tensorflow() -> None:
    """This process will not convert with ct.convert: let coremltools import without
    TensorFlow (about 2 s less). coremltools imports TensorFlow at import time to enable its
    TensorFlow frontend; with it hidden, everything else in coremltools (the protobufs, the
    NeuralNetworkBuilder) works as before. Has no effect once coremltools is imported."""
    global _FORGO_TENSORFLOW
    _FORGO_TENSORFLOW = True


def coremltools_converts_tensorflow() -> bool:
    """Whether the imported coremltools has its TensorFlow frontend (ct.convert from TF)."""
    from coremltools import _deps

    return bool(_deps._HAS_TF_2)


def coremltools() -> Any:
    if "coremltools" not in sys.modules:
        hide = _FORGO_TENSORFLOW and "tensorflow" not in sys.modules
        if not hide:
            tensorflow()  # imported quietly here, before coremltools imports it
        _import_coremltools(hide_tensorflow=hide)
    import coremltools as ct

    return ct


def _import_coremltools(hide_tensorflow: bool) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' progress bars; we print our own
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    if hide_tensorflow:
        sys.modules["tensorflow"] = None  # type: ignore[assignment]  # `import tensorflow` fails
    try:
        with _stderr_silenced():  # "Failed to load _MLModelProxy" notices on Linux
            import coremltools  # noqa: F401
    finally:
        if hide_tensorflow:
            del sys.modules["tensorflow"]
        logger.setLevel(level)


def keras(major: int) -> Any:
    """keras 3 for major >= 3, tf_keras for Keras 2 files."""
    tensorflow()
    if major >= 3:
        import keras as k
    else:
        import tf_keras as k
    return k
