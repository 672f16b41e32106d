"""Apple's own weight sharing, as a baseline: ML Programs merged into one multifunction package.

    python scripts/apple_multifunction.py DIR --out OUT [--json]

Each ``.h5`` in DIR (sorted; sub-folders too) is loaded with the Keras of its file (tf_keras for
``keras_version`` 2.x, Keras 3 otherwise), traced as
``tf.function(lambda x: model(x, training=False))`` with an input named ``image``, and converted
with ``ct.convert(..., convert_to="mlprogram", compute_precision=FLOAT16,
minimum_deployment_target=iOS18)``: an image input scaled as MobileNetV2 wants (``x / 127.5 -
1``, by default) and a ClassifierConfig with the model's labels (``<stem>.labels.txt`` or
``labels.txt``, read by coreml-split's reader) or ``class_0``, ``class_1``, ... Each is saved as
``OUT/apart/<stem>.mlpackage``; then ``ct.utils.save_multifunction`` merges them, one function
per classifier named after its stem, into ``OUT/multifunction.mlpackage`` (constants equal in
value are stored once). Needs iOS 18 / macOS 15 to run; writing works on Linux.

Tracing works for both Keras flavours in one process, whichever one ``tf.keras`` points to.
Seconds to convert cover loading, tracing, converting and saving every model; seconds to merge
cover ``save_multifunction`` alone. Bytes are the sums of the file sizes under each package.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MERGED = "multifunction.mlpackage"


def _imports() -> tuple[Any, Any]:
    """TensorFlow and coremltools, imported quietly (coreml-split's own helpers)."""
    import logging
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.simplefilter("ignore")
    sys.path.insert(0, str(ROOT))
    from convert.heavy import coremltools, tensorflow

    for name in ("absl", "tensorflow", "coremltools"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return tensorflow(), coremltools()


def package_bytes(path: Path) -> int:
    """The sum of the sizes of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def function_name(stem: str) -> str:
    """A MIL function name for a model: its stem, with anything but letters, digits and ``_``
    replaced."""
    name = re.sub(r"\W", "_", stem)
    return name if name[:1].isalpha() else f"f_{name}"


def _load(path: Path) -> Any:
    import h5py

    from convert.heavy import keras

    with h5py.File(path, "r") as f:
        version = f.attrs.get("keras_version", "3")
    version = version.decode() if isinstance(version, bytes) else str(version)
    major = int(version.split(".")[0])
    options = {"safe_mode": True} if major >= 3 else {}
    return keras(major).models.load_model(path, compile=False, **options)


def _labels(path: Path, count: int) -> list[str]:
    from convert.read.labels import labels_file_for, read_labels

    source = labels_file_for(path)
    labels = read_labels(source) if source else [f"class_{i}" for i in range(count)]
    if len(labels) != count:
        raise ValueError(f"{source}: {len(labels)} labels for {count} classes")
    return labels


def convert_one(
    path: Path, out: Path, scale: float = 1 / 127.5, bias: float = -1.0
) -> tuple[Path, float]:
    """One Keras classifier as an fp16 ML Program at ``out``; returns (out, seconds)."""
    tf, ct = _imports()
    started = time.perf_counter()
    model = _load(path)
    shape = [1, *model.input_shape[1:]]
    spec = tf.TensorSpec(shape, tf.float32, name="image")
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    channels = shape[-1]
    mlmodel = ct.convert(
        [function],
        source="tensorflow",
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        minimum_deployment_target=ct.target.iOS18,
        inputs=[ct.ImageType(name="image", shape=shape, scale=scale, bias=[bias] * channels)],
        classifier_config=ct.ClassifierConfig(_labels(path, int(model.output_shape[-1]))),
    )
    if out.exists():
        shutil.rmtree(out)
    mlmodel.save(str(out))
    return out, time.perf_counter() - started


def multifunction(models: list[Path], out: Path) -> dict[str, Any]:
    """Convert ``models`` one by one into ``out/apart/``, merge them into ``out/`` +
    :data:`MERGED`, and return the bytes and seconds of both steps."""
    if not models:
        raise ValueError("no models to convert")
    _, ct = _imports()
    apart = out / "apart"
    apart.mkdir(parents=True, exist_ok=True)
    names = [function_name(p.stem) for p in models]
    if len(set(names)) != len(names):
        raise ValueError(f"two models give the same function name: {names}")
    packages, seconds = [], []
    for path, name in zip(models, names):
        package, took = convert_one(path, apart / f"{name}.mlpackage")
        packages.append(package)
        seconds.append(took)

    started = time.perf_counter()
    descriptor = ct.utils.MultiFunctionDescriptor()
    for package, name in zip(packages, names):
        descriptor.add_function(str(package), src_function_name="main", target_function_name=name)
    descriptor.default_function_name = names[0]
    merged = out / MERGED
    if merged.exists():
        shutil.rmtree(merged)
    ct.utils.save_multifunction(descriptor, str(merged))
    merge_seconds = time.perf_counter() - started

    return {
        "models": len(models),
        "functions": names,
        "merged": str(merged),
        "bytes_merged": package_bytes(merged),
        "bytes_apart": sum(package_bytes(p) for p in packages),
        "bytes_each": {n: package_bytes(p) for n, p in zip(names, packages)},
        "seconds_convert": sum(seconds),
        "seconds_each": dict(zip(names, seconds)),
        "seconds_merge": merge_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("zoo", type=Path, help="folder of Keras .h5 classifiers")
    parser.add_argument("--out", type=Path, required=True, help="folder for the packages")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    models = sorted(p for p in args.zoo.rglob("*") if p.suffix.lower() in (".h5", ".hdf5"))
    if not models:
        print(f"{args.zoo}: no .h5 files", file=sys.stderr)
        return 1
    result = multifunction(models, args.out)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    mb = 1e6
    print(
        f"{result['models']} models: {result['bytes_apart'] / mb:.2f} MB apart, "
        f"{result['bytes_merged'] / mb:.2f} MB merged "
        f"({result['bytes_merged'] / result['bytes_apart']:.3f}x); "
        f"convert {result['seconds_convert']:.1f} s, merge {result['seconds_merge']:.1f} s "
        f"-> {result['merged']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
