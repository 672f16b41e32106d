"""The source cache: read models and source hashes kept between runs while a file is untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from convert.files import CACHE_DIR, file_sha256, tool_versions, write_atomic


class SourceCache:
    """Read models and source hashes, kept between runs while the file is untouched.

    Reading a zoo means hashing every weight (that is what sharing is decided on), which grows
    with the zoo: about 70 ms per MobileNetV2 at 224. A file whose size, modification and change
    times and inode are those recorded is not read again: its graph and hash come from
    ``.cache/sources/``. The change time cannot be set back by tools that copy or touch files,
    so an edited file is always read again. The entries are the tool's own pickles; a damaged or
    foreign one is ignored and the file read afresh.
    """

    def __init__(self, out: Path | None) -> None:
        self.root = None if out is None else out / CACHE_DIR / "sources"
        self.hashes: dict[str, str] = {}

    @staticmethod
    def _signature(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def _entry(self, path: Path) -> Path:
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()
        return self.root / f"{key}.pickle"  # type: ignore[operator]

    def graph(self, path: Path) -> Any:
        """The cached graph of ``path``, or None."""
        import pickle

        if self.root is None:
            return None
        try:
            data = pickle.loads(self._entry(path).read_bytes())
            if data["versions"] != tool_versions() or data["signature"] != self._signature(path):
                return None
        except Exception:  # missing, damaged, or from another version: read the file again
            return None
        self.hashes[str(path)] = data["sha256"]
        return data["graph"]

    def remember(self, path: Path, graph: Any) -> None:
        import pickle

        sha = self.sha256(path)
        if self.root is None:
            return
        data = {
            "versions": tool_versions(),
            "signature": self._signature(path),
            "sha256": sha,
            "graph": graph,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self._entry(path), pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))

    def sha256(self, path: Path) -> str:
        key = str(path)
        if key not in self.hashes:
            self.hashes[key] = file_sha256(path)
        return self.hashes[key]
