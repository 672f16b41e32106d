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
from pathlib import Path
from typing import Any

from convert.files import CACHE_DIR, write_atomic

STATE_FILE = "state.json"
STATE_VERSION = 1


def recipe(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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
        path = self._object(key)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
