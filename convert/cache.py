"""The build cache: what each output was made from, and converted specs by content.

Two levels, both under ``<out>/.cache/``:

- ``state.json`` maps every output file to its *recipe* (a hash of everything its bytes depend
  on: the tool and coremltools versions, the source files' contents, the plan's decisions and
  the manifest's settings) and to the size and mtime it had when written, plus its report row.
  An output whose recipe is unchanged and whose file is untouched is not rebuilt. When nothing
  is stale the build imports neither TensorFlow nor coremltools.
- ``objects/`` holds converted backbone and head specs under the hash of what their
  conversion depends on, so a backbone whose metadata changed (a new member, a new name) is
  re-described, not converted from TensorFlow again.

The cache is an accelerator only: deleting ``.cache`` rebuilds everything, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from convert import __version__

CACHE_DIR = ".cache"
STATE_FILE = "state.json"
STATE_VERSION = 1


def tool_versions() -> dict[str, str]:
    """Versions that change the bytes of converted files, read without importing anything."""
    versions = {"coreml-split": __version__}
    for package in ("coremltools", "tensorflow", "keras", "tf_keras", "protobuf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "-"
    return versions


def recipe(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Entry:
    """What one output file was made from."""

    recipe: str
    size: int
    mtime_ns: int
    row: dict[str, Any] = field(default_factory=dict)  # its report row (backbone or classifier)


class Cache:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.root = out / CACHE_DIR
        self.entries: dict[str, Entry] = {}
        self._load_state()

    # -- outputs -----------------------------------------------------------------------------

    def _load_state(self) -> None:
        try:
            data = json.loads((self.root / STATE_FILE).read_text())
        except (OSError, ValueError):
            return
        if data.get("version") != STATE_VERSION:
            return
        for file, entry in data.get("outputs", {}).items():
            try:
                self.entries[file] = Entry(**entry)
            except TypeError:
                continue

    def fresh(self, file: str, wanted: str) -> Entry | None:
        """The entry for ``file`` if it was made from ``wanted`` and is untouched on disk."""
        entry = self.entries.get(file)
        if entry is None or entry.recipe != wanted:
            return None
        try:
            st = (self.out / file).stat()
        except OSError:
            return None
        if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
            return None
        return entry

    def record(self, file: str, wanted: str, row: dict[str, Any]) -> None:
        st = (self.out / file).stat()
        self.entries[file] = Entry(wanted, st.st_size, st.st_mtime_ns, row)

    def forget(self, file: str) -> None:
        self.entries.pop(file, None)

    def save(self) -> None:
        from convert.emit import write_atomic

        data = {
            "version": STATE_VERSION,
            "outputs": {
                file: {
                    "recipe": e.recipe,
                    "size": e.size,
                    "mtime_ns": e.mtime_ns,
                    "row": e.row,
                }
                for file, e in sorted(self.entries.items())
            },
        }
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / STATE_FILE, json.dumps(data, indent=1).encode())

    # -- converted specs ---------------------------------------------------------------------

    def _object(self, key: str) -> Path:
        return self.root / "objects" / key[:2] / f"{key}.pb"

    def get(self, key: str) -> bytes | None:
        try:
            return self._object(key).read_bytes()
        except OSError:
            return None

    def put(self, key: str, data: bytes) -> None:
        from convert.emit import write_atomic

        path = self._object(key)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)


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

        from convert.emit import write_atomic

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
