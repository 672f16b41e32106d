"""Keras 3's native ``.keras`` files: a zip archive, read in place.

Keras 3 saves ``config.json`` (the same model config a legacy .h5 keeps in its ``model_config``
attribute), ``metadata.json`` (the Keras version) and ``model.weights.h5`` (the weights, in
another layout than a legacy .h5; :mod:`convert.read.h5` reads both). Only those three members
are read, each by its exact name and within a size bound, so no member's path is ever followed
and nothing is extracted to disk: the weights member is opened where it lies in the archive when
it is stored (Keras stores it), or inflated in memory when a tool has compressed it.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from convert.errors import ModelFileError
from convert.read.limits import (
    MAX_ARCHIVE_MEMBERS,
    MAX_CONFIG_BYTES,
    MAX_INFLATED_WEIGHTS_BYTES,
    MAX_METADATA_BYTES,
    size_text,
)

ZIP_MAGIC = b"PK\x03\x04"
CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS = "model.weights.h5"

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip's local file header, 30 bytes
_END_RECORD = b"PK\x05\x06"  # the end of central directory record, 22 bytes plus a comment
_CHUNK = 1 << 20
_ENTRY_BYTES = 1024  # a directory entry: 46 bytes, the member's name and its extra fields
# What zipfile raises for a damaged or odd archive (an unknown compression method included).
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error, NotImplementedError)
_INFLATED: dict[str, Any] = {}  # the last compressed weights member inflated: key, data


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a zip file (by its first bytes, whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == ZIP_MAGIC
    except OSError:
        return False


class Archive:
    """An open ``.keras`` archive. Raises :class:`ModelFileError` with one line for anything
    that is not a readable Keras archive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed by close())
        except FileNotFoundError:
            raise ModelFileError(path, "no such file") from None
        except OSError as exc:
            raise ModelFileError(path, f"cannot be opened: {exc.strerror or exc}") from None
        try:
            self.size = os.fstat(self.file.fileno()).st_size
            self._check_directory()
            try:
                self.zip = zipfile.ZipFile(self.file)
            except _ZIP_ERRORS as exc:
                raise self._fail(str(exc) or type(exc).__name__) from None
            self.members = self._members()
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what the archive holds --------------------------------------------------------------

    def _fail(self, reason: str) -> ModelFileError:
        return ModelFileError(self.path, f"not a readable .keras archive: {reason}")

    def _check_directory(self) -> None:
        """Refuse an archive whose directory lists more members, or takes more bytes, than a
        Keras file's could, before zipfile builds an object for each entry (it walks the whole
        directory, whatever count the end record gives)."""
        tail = min(self.size, 22 + 0xFFFF)
        self.file.seek(self.size - tail)
        data = self.file.read(tail)
        at = data.rfind(_END_RECORD)
        if at < 0 or len(data) - at < 22:
            raise self._fail("no zip directory at its end (truncated?)")
        count, size = struct.unpack_from("<HL", data, at + 10)
        if count > MAX_ARCHIVE_MEMBERS or size > MAX_ARCHIVE_MEMBERS * _ENTRY_BYTES:
            raise self._fail(
                f"its directory lists {count} members in {size} bytes; a Keras archive holds "
                f"a few, coreml-split reads archives of at most {MAX_ARCHIVE_MEMBERS}"
            )

    def _members(self) -> dict[str, zipfile.ZipInfo]:
        infos = self.zip.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:  # the end record's count was not the truth
            raise self._fail(
                f"it lists {len(infos)} members; coreml-split reads archives of at most "
                f"{MAX_ARCHIVE_MEMBERS}"
            )
        wanted = {CONFIG, METADATA, WEIGHTS}
        found: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename not in wanted:
                continue  # assets, or anything else: never opened
            if info.filename in found:
                raise self._fail(f"it holds two members named {info.filename}")
            if info.flag_bits & 0x1:
                raise self._fail(f"its member {info.filename} is encrypted")
            found[info.filename] = info
        if CONFIG not in found:
            legacy = " (a SavedModel or another zip?)" if WEIGHTS not in found else ""
            raise self._fail(f"it has no {CONFIG}{legacy}")
        return found

    def text(self, name: str, limit: int) -> str | None:
        """Member ``name`` as UTF-8 text (None if absent), refused past ``limit`` bytes."""
        info = self.members.get(name)
        if info is None:
            return None
        if info.file_size > limit:
            raise self._fail(
                f"{name} is {info.file_size} bytes; coreml-split reads at most {size_text(limit)}"
            )
        data = self._read(info, limit)
        try:
            return data.decode("utf-8")
        except UnicodeError as exc:
            raise self._fail(f"{name} is not UTF-8 text: {exc}") from None

    def _read(self, info: zipfile.ZipInfo, limit: int) -> bytes:
        """A member's bytes, at most ``limit`` of them (its declared size may lie), CRC checked."""
        try:
            with self.zip.open(info) as member:
                data = member.read(limit + 1)
        except _ZIP_ERRORS as exc:
            raise self._fail(f"{info.filename} cannot be read ({exc})") from None
        if len(data) > limit:
            raise self._fail(
                f"{info.filename} inflates past {size_text(limit)}, the most coreml-split reads"
            )
        return data

    def config(self) -> str:
        """config.json (its presence was checked when the archive was opened)."""
        text = self.text(CONFIG, MAX_CONFIG_BYTES)
        assert text is not None
        return text

    def keras_version(self) -> str:
        """The Keras version metadata.json records; "3" when it records none."""
        text = self.text(METADATA, MAX_METADATA_BYTES)
        if text is None:
            return "3"
        try:
            metadata = json.loads(text)
        except ValueError as exc:
            raise self._fail(f"{METADATA} is not valid JSON: {exc}") from None
        version = metadata.get("keras_version") if isinstance(metadata, dict) else None
        return version if isinstance(version, str) and version else "3"

    # -- the weights member ------------------------------------------------------------------

    def weights(self) -> tuple[BinaryIO, int]:
        """(a read-only file object over model.weights.h5, its size in bytes)."""
        info = self.members.get(WEIGHTS)
        if info is None:
            raise self._fail(f"it has no {WEIGHTS} (saved without weights?)")
        if info.compress_type != zipfile.ZIP_STORED:
            data = self._inflated(info)
            return io.BytesIO(data), len(data)
        start = self._data_offset(info)
        if info.compress_size != info.file_size or start + info.file_size > self.size:
            raise self._fail(f"{WEIGHTS} runs past the end of the archive (truncated?)")
        return _Window(self.file, start, info.file_size), info.file_size

    def _inflated(self, info: zipfile.ZipInfo) -> bytes:
        """A compressed weights member's bytes, inflated once per process for the archive as
        it is on disk (every weight is read through its own opening of the archive)."""
        stat = os.fstat(self.file.fileno())
        key = (str(self.path), stat.st_size, stat.st_mtime_ns, stat.st_ino, info.CRC)
        if _INFLATED.get("key") != key:
            _INFLATED.clear()
            _INFLATED.update(key=key, data=self._read(info, MAX_INFLATED_WEIGHTS_BYTES))
        return _INFLATED["data"]

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes begin: after its local header, which must name it."""
        self.file.seek(info.header_offset)
        header = self.file.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            raise self._fail(f"the header of {info.filename} is cut off")
        fields = _LOCAL_HEADER.unpack(header)
        name_length, extra_length = fields[-2], fields[-1]
        if fields[0] != ZIP_MAGIC or self.file.read(name_length) != info.orig_filename.encode(
            "utf-8" if info.flag_bits & 0x800 else "cp437"
        ):
            raise self._fail(f"the header of {info.filename} does not match its directory entry")
        return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length

    def check_weights_crc(self) -> None:
        """Read the stored weights member once and compare its CRC with the directory's."""
        info = self.members.get(WEIGHTS)
        if info is None or info.compress_type != zipfile.ZIP_STORED:
            return  # absent (said elsewhere), or inflated through zipfile, which checks
        view, size = self.weights()
        crc, left = 0, size
        while left:
            chunk = view.read(min(_CHUNK, left))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
        if left or crc != info.CRC:
            raise self._fail(f"{WEIGHTS} is damaged (its CRC does not match)")


class _Window(io.RawIOBase):
    """Bytes ``start`` to ``start + size`` of an open file, as a read-only file of their own."""

    def __init__(self, file: BinaryIO, start: int, size: int) -> None:
        super().__init__()
        self._file, self._start, self._size, self._at = file, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        bases = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._size}
        if whence not in bases:
            raise ValueError(f"invalid whence ({whence})")
        if bases[whence] + offset < 0:
            raise ValueError(f"negative seek position {bases[whence] + offset}")
        self._at = bases[whence] + offset
        return self._at

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._size - self._at))
        if n == 0:
            return 0
        self._file.seek(self._start + self._at)
        got = self._file.readinto(memoryview(buffer)[:n])
        self._at += got or 0
        return got or 0
