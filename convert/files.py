"""Files that every stage writes or recognises: atomic writes, content hashes, and the cache folder.

Reading (the source cache), building (outputs and their cache) and reporting all write files the
same way: to a temporary file in the same folder, renamed into place, so that no reader ever sees
half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib import metadata
from pathlib import Path

from convert import __version__

CACHE_DIR = ".cache"  # under the output folder


def tool_versions() -> dict[str, str]:
    """Versions that change the bytes of converted files, read without importing anything."""
    versions = {"coreml-split": __version__}
    for package in ("coremltools", "tensorflow", "keras", "tf_keras", "protobuf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "-"
    return versions


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, data: bytes) -> int:
    """Write via a temporary file in the same folder and rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)
