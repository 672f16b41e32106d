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

The cache is an accelerator only: deleting ``.cache`` rebuilds everything, byte for byte. A
damaged cache is no worse: every entry of ``state.json`` carries a hash of itself and is checked
against a schema, every object carries the hash of its content, and whatever fails a check is
dropped with one warning line (in :attr:`Cache.warnings`) and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from convert.files import CACHE_DIR, write_atomic

STATE_FILE = "state.json"
STATE_VERSION = 2  # 2: each entry carries its own hash; objects carry their content's
OBJECTS = "objects"
_HASH = 64  # hex digits of a SHA-256


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

    def digest(self, file: str) -> str:
        return recipe(file, asdict(self))

    @classmethod
    def parse(cls, file: Any, data: Any) -> Entry:
        """An entry of state.json, checked: ValueError says what is wrong with it."""
        if not isinstance(file, str) or not file.endswith(".mlmodel") or "/" in file:
            raise ValueError("not an output file name")
        if not isinstance(data, dict) or set(data) != {
            "recipe",
            "size",
            "mtime_ns",
            "row",
            "check",
        }:
            raise ValueError("not an entry")
        entry = cls(data["recipe"], data["size"], data["mtime_ns"], data["row"])
        if not (_is_hash(entry.recipe) and _count(entry.size) and _count(entry.mtime_ns)):
            raise ValueError("a field has the wrong type")
        if not isinstance(entry.row, dict) or not _valid_row(file, entry.size, entry.row):
            raise ValueError("its report row does not fit")
        if data["check"] != entry.digest(file):
            raise ValueError("its hash does not match")
        return entry


def _is_hash(value: Any) -> bool:
    return (
        isinstance(value, str)
        and len(value) == _HASH
        and all(c in "0123456789abcdef" for c in value)
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _valid_row(file: str, size: int, row: dict[str, Any]) -> bool:
    """A backbone's row ({file, bytes}) or a classifier's (every ClassifierReport field), with
    the types the report needs, for this file and this size."""
    from convert.report import ClassifierReport

    if row.get("file") != file or row.get("bytes") != size:
        return False
    if set(row) == {"file", "bytes"}:
        return True
    if set(row) != {f.name for f in fields(ClassifierReport)}:
        return False
    text = ("name", "source", "preprocessing")
    counts = ("head_bytes", "standalone_bytes", "classes")
    return (
        all(isinstance(row[k], str) for k in text)
        and all(_count(row[k]) for k in counts)
        and (row["group"] is None or isinstance(row["group"], str))
        and isinstance(row["labels"], list)
        and all(isinstance(label, str) for label in row["labels"])
    )


class Cache:
    def __init__(self, out: Path, state: bool = True) -> None:
        """``state=False``: the objects only (a job in a worker reads no state.json)."""
        self.out = out
        self.root = out / CACHE_DIR
        self.entries: dict[str, Entry] = {}
        self.warnings: list[str] = []  # one line per damaged entry or object that was dropped
        if state:
            self._load_state()

    # -- outputs -----------------------------------------------------------------------------

    def _load_state(self) -> None:
        path = self.root / STATE_FILE
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as exc:
            self.warnings.append(f"{path}: damaged ({_why(exc)}); rebuilding what it recorded")
            return
        if not isinstance(data, dict) or not isinstance(data.get("outputs"), dict):
            self.warnings.append(f"{path}: damaged (not a state file); rebuilding what it recorded")
            return
        if data.get("version") != STATE_VERSION:
            return  # written by another version of the tool: silently start afresh
        for file, raw in data["outputs"].items():
            try:
                self.entries[file] = Entry.parse(file, raw)
            except (ValueError, TypeError) as exc:
                self.warnings.append(
                    f"{path}: entry {str(file)[:80]!r} dropped ({exc}); rebuilding it"
                )

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
                file: asdict(e) | {"check": e.digest(file)}
                for file, e in sorted(self.entries.items())
            },
        }
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / STATE_FILE, json.dumps(data, indent=1).encode())

    # -- converted specs ---------------------------------------------------------------------

    # Each object is the SHA-256 of its content (64 hex digits), then the content.

    def _object(self, key: str) -> Path:
        return self.root / OBJECTS / key[:2] / f"{key}.pb"

    def get(self, key: str) -> bytes | None:
        """The object stored under ``key`` if it is whole; a damaged one is dropped."""
        path = self._object(key)
        try:
            stored = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.warnings.append(f"{path}: unreadable ({_why(exc)}); rebuilding it")
            return None
        head, data = stored[:_HASH], stored[_HASH:]
        if head != hashlib.sha256(data).hexdigest().encode():
            self.drop(key, "its content does not match its hash")
            return None
        return data

    def drop(self, key: str, why: str) -> None:
        """Forget a damaged object, with a warning."""
        path = self._object(key)
        self.warnings.append(f"{path}: damaged ({why}); rebuilding it")
        path.unlink(missing_ok=True)

    def put(self, key: str, data: bytes) -> None:
        path = self._object(key)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, hashlib.sha256(data).hexdigest().encode() + data)


def _why(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "strerror", None) or exc).split())[:120] or type(exc).__name__
