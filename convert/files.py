"""Files that every stage writes or recognises: atomic writes, content hashes, and the cache folder.

Reading (the source cache), building (outputs and their cache) and reporting all write files the
same way: to a temporary file in the same folder, renamed into place, so that no reader ever sees
half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
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
    """Write via a temporary file in the same folder and rename: never a half-written file.

    A failure to write (a full disk, a read-only folder) is a WriteError naming the file."""
    from convert.errors import WriteError

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(path, f"cannot write the file ({exc.strerror or exc})") from exc
        raise
    return len(data)


LOCK_FILE = "lock"
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")  # what write_atomic's mkstemp names


def text_bytes(text: str) -> bytes:
    """``text`` as UTF-8 for a report file. A file name's bytes that are not UTF-8 (Python holds
    them as surrogates, ``surrogateescape``) come back as they were; any other lone surrogate
    (a ``"\\ud800"`` in a model's JSON config) becomes U+FFFD instead of failing the run."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        kept = "".join(
            "\ufffd" if "\ud800" <= c <= "\udfff" and not "\udc80" <= c <= "\udcff" else c
            for c in text
        )
        return kept.encode("utf-8", "surrogateescape")


def prepare_output(folder: Path) -> None:
    """Make sure ``folder`` is (or can become) a folder this run may write; else RunError.

    Nothing is written anywhere else: a path that names a file, or a parent that cannot be
    created, stops the run before the first byte."""
    from convert.errors import RunError

    if folder.exists() and not folder.is_dir():
        raise RunError(folder, "the output folder is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(folder, f"cannot create the output folder: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunError(folder, "the output folder is not writable")


@contextlib.contextmanager
def locked(folder: Path, say: Callable[[str], None]) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs: one run at a time writes a folder.

    A second run waits for the first, and says so. The lock is an ``flock`` on
    ``.cache/lock``, which the kernel releases when its holder dies, so a run that was killed
    leaves nothing to clean up by hand: the next run takes over, and removes the temporary
    files the killed run left half-written."""
    import fcntl

    from convert.errors import RunError

    path = folder / CACHE_DIR / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as exc:
        raise RunError(
            folder, f"cannot write in the output folder: {exc.strerror or exc}"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting: another coreml-split run{_holder(fd)} is writing {folder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        left = _holder(fd)
        if left:  # its holder died without letting go: whatever it half-wrote goes
            removed = remove_temporaries(folder)
            say(f"taking over from an interrupted run{left}; removed {removed} temporary file(s)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
        os.ftruncate(fd, 0)  # a clean exit: the next run finds no holder
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """' (pid N)' for the run named in the lock file, or ''."""
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f" (pid {text})" if text.isdigit() else ""


def remove_temporaries(folder: Path) -> int:
    """Delete the temporary files of :func:`write_atomic` under ``folder``: call only while
    holding its lock, when no other writer can own them."""
    removed = 0
    for tmp in folder.rglob(".*.tmp"):
        if tmp.is_file() and _TEMPORARY.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
