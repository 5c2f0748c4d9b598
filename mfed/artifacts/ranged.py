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


class BufferedRange:
    """A ByteRange that reads `block` bytes ahead: consecutive small reads (a file's small
    tensors, one after another) cost one read of the underlying range, not one each. A read of
    `block` bytes or more goes through unbuffered. Holds at most one block; not thread-safe
    (one reader at a time per file, as the aggregation reads)."""

    def __init__(self, inner: ByteRange, block: int) -> None:
        self._inner = inner
        self._block = max(1, block)
        self._start = 0
        self._data = b""

    @property
    def size(self) -> int:
        return self._inner.size

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self._start and offset + length <= self._start + len(self._data):
            begin = offset - self._start
            return self._data[begin : begin + length]
        if length >= self._block:
            return self._inner.read(offset, length)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range [{offset}, {offset + length}) is outside the {self.size} bytes")
        self._data = b""  # never two blocks at once
        self._start, self._data = offset, self._inner.read(offset, min(self._block, self.size - offset))
        return self._data[:length]
