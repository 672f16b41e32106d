"""The source cache: read models and source hashes kept between runs while a file is untouched."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

from convert.files import CACHE_DIR, file_sha256, tool_versions, write_atomic


class SourceCache:
    """Read models and source hashes, kept between runs while the file is untouched.

    Reading a zoo means hashing every weight (that is what sharing is decided on), which grows
    with the zoo: about 70 ms per MobileNetV2 at 224. A file whose size, modification and change
    times and inode are those recorded is not read again: its graph and hash come from
    ``.cache/sources/``. The change time cannot be set back by tools that copy or touch files,
    so an edited file is always read again.

    An entry is the SHA-256 of its content, then the tool's own pickle of the graph. One that
    does not match its hash is dropped with a warning and the file read afresh; and whatever an
    entry holds, unpickling it makes only the graph's own classes (:class:`_GraphUnpickler`), so
    a planted entry cannot run code.
    """

    def __init__(self, out: Path | None) -> None:
        self.root = None if out is None else out / CACHE_DIR / "sources"
        self.hashes: dict[str, str] = {}
        self.warnings: list[str] = []  # one line per damaged entry that was dropped

    @staticmethod
    def _signature(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def _entry(self, path: Path) -> Path:
        key = hashlib.sha256(os.fsencode(path.resolve())).hexdigest()
        return self.root / f"{key}.graph"  # type: ignore[operator]

    def graph(self, path: Path, aliases: dict[str, str] | None = None) -> Any:
        """The cached graph of ``path`` read with ``aliases``, or None."""
        if self.root is None:
            return None
        entry = self._entry(path)
        try:
            stored = entry.read_bytes()
        except OSError:
            return None
        try:
            head, body = stored[:64], stored[64:]
            if head != hashlib.sha256(body).hexdigest().encode():
                raise ValueError("its content does not match its hash")
            data = _GraphUnpickler(io.BytesIO(body)).load()
            if not isinstance(data, dict) or not {
                "versions",
                "signature",
                "sha256",
                "graph",
            } <= set(data):
                raise ValueError("not a graph entry")
        except Exception as exc:  # damaged, or planted: read the file again
            self.warnings.append(f"{entry}: damaged ({exc}); reading {path} again")
            entry.unlink(missing_ok=True)
            return None
        if data["versions"] != _versions() or data["signature"] != self._signature(path):
            return None  # another version of the tool, or an edited file
        if data.get("aliases", {}) != (aliases or {}):
            return None  # read with other [aliases]
        self.hashes[str(path)] = data["sha256"]
        return data["graph"]

    def remember(self, path: Path, graph: Any, aliases: dict[str, str] | None = None) -> None:
        sha = self.sha256(path)
        if self.root is None:
            return
        data = {
            "versions": _versions(),
            "signature": self._signature(path),
            "sha256": sha,
            "graph": graph,
            "aliases": aliases or {},
        }
        self.root.mkdir(parents=True, exist_ok=True)
        body = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
        write_atomic(self._entry(path), hashlib.sha256(body).hexdigest().encode() + body)

    def sha256(self, path: Path) -> str:
        key = str(path)
        if key not in self.hashes:
            self.hashes[key] = file_sha256(path)
        return self.hashes[key]


class _GraphUnpickler(pickle.Unpickler):
    """Unpickles what :meth:`SourceCache.remember` writes and nothing else: the only classes it
    makes are the graph's and paths, so no entry, whoever wrote it, can call anything else."""

    ALLOWED = {
        ("convert.read.graph", name) for name in ("Graph", "Layer", "Node", "Tensor", "Weight")
    } | {("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to make {module}.{name}")
        return super().find_class(module, name)


# What the reader checks changes without a new tool version between releases; a graph read
# before a check existed (weights tested for NaN since revision 2) is read again.
READER_REVISION = 2


def _versions() -> dict[str, Any]:
    return {**tool_versions(), "reader": READER_REVISION}
