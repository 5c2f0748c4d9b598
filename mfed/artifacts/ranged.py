"""Random access to a stored file: what tensor-by-tensor aggregation reads through.

A `ByteRange` is one file whose size is known and whose bytes are read by (offset, length):
an S3 object read with Range GETs (mfed.storage.StoredRange), a local file, or bytes already in
memory (`BytesRange`, for tests and in-process callers). Reads of a range past the end are a bug
in the caller, never silently short.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class ByteRange(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


class BytesRange:
    """A ByteRange over bytes held in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > len(self._data):
            raise ValueError(f"range [{offset}, {offset + length}) is outside the {len(self._data)} bytes")
        return self._data[offset : offset + length]


class FileRange:
    """A ByteRange over a local file, opened for each read (no descriptor held between passes)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._size = path.stat().st_size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"range [{offset}, {offset + length}) is outside {self._path} ({self._size} bytes)")
        with self._path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(length)
