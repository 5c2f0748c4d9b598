"""A strict safetensors codec over numpy arrays.

Why our own codec instead of `safetensors.numpy`: the library's numpy side has no bfloat16, and
bf16 deltas halve traffic. The format is tiny (an 8-byte little-endian header length, a JSON
header, one contiguous byte buffer), and received bytes are untrusted, so the reader checks
every offset, shape and dtype before it touches the buffer. Files written here are read by the
`safetensors` library and vice versa (tests use the library as the independent oracle).
Nothing here ever unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

# A header larger than this is an attack or a bug, not a model (the library uses the same cap).
MAX_HEADER_BYTES = 100 * 1024 * 1024


class StoredDtype(StrEnum):
    """How a floating tensor is stored on the wire."""

    F64 = "F64"
    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"

    @classmethod
    def parse(cls, text: str) -> StoredDtype:
        aliases = {
            "float64": cls.F64,
            "fp64": cls.F64,
            "float32": cls.F32,
            "fp32": cls.F32,
            "float16": cls.F16,
            "fp16": cls.F16,
            "half": cls.F16,
            "bfloat16": cls.BF16,
            "bf16": cls.BF16,
        }
        key = text.strip()
        if key.upper() in cls.__members__:
            return cls[key.upper()]
        if key.lower() in aliases:
            return aliases[key.lower()]
        raise ValueError(f"unknown tensor dtype {text!r}: use one of float32, float16, bfloat16 (or F32/F16/BF16)")


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8}
_NUMPY_OF: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
}


class TensorFileError(ValueError):
    """The bytes are not a well-formed safetensors file of the kinds we accept."""


@dataclass(frozen=True)
class TensorFile:
    """Decoded tensors (read-only arrays), how each was stored, and the header metadata."""

    tensors: Mapping[str, np.ndarray]
    stored_dtypes: Mapping[str, str]
    metadata: Mapping[str, str]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (what torch does)."""
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4").astype(np.uint64)
    rounding_bias = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding_bias) >> 16).astype("<u2")


def _from_bf16_bits(raw: np.ndarray) -> np.ndarray:
    return (raw.astype("<u4") << 16).view("<f4")


def encode_tensors(
    tensors: Mapping[str, np.ndarray],
    *,
    float_dtype: StoredDtype = StoredDtype.F32,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialise tensors; floating arrays are stored as `float_dtype`, keys in sorted order.

    Sorted keys and a fixed layout make the bytes a pure function of the values, so digests
    of re-runs compare equal.
    """
    header: dict[str, object] = {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        if np.issubdtype(array.dtype, np.floating):
            stored = float_dtype.value
            if stored == "BF16":
                payload = _to_bf16_bits(array.astype(np.float32)).tobytes()
            else:
                payload = np.ascontiguousarray(array, dtype=_NUMPY_OF[stored]).tobytes()
        elif np.issubdtype(array.dtype, np.integer):
            stored = "I64"
            payload = np.ascontiguousarray(array, dtype=_NUMPY_OF["I64"]).tobytes()
        else:
            raise TensorFileError(f"tensor {name!r} has unsupported dtype {array.dtype}")
        header[name] = {
            "dtype": stored,
            "shape": [int(d) for d in array.shape],
            "data_offsets": [offset, offset + len(payload)],
        }
        chunks.append(payload)
        offset += len(payload)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    # Pad with spaces so the buffer starts 8-byte aligned, as the reference writer does.
    header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(chunks)


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise TensorFileError(f"header repeats the key {key!r}")
        result[key] = value
    return result


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a file: [begin, end) counted from the start of the FILE."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class TensorIndex:
    """A checked header: every entry, in data order, covering the buffer exactly once."""

    header_bytes: int  # 8 + the JSON header's length: where the buffer starts
    entries: tuple[TensorEntry, ...]
    metadata: Mapping[str, str]

    def by_name(self) -> dict[str, TensorEntry]:
        return {e.name: e for e in self.entries}


def header_length(prefix: bytes, file_size: int) -> int:
    """The JSON header's length from the file's first 8 bytes, checked against the file size."""
    if len(prefix) < 8 or file_size < 8:
        raise TensorFileError("file is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise TensorFileError(f"header length {header_len} does not fit in {file_size} bytes")
    return int(header_len)


def parse_index(head: bytes, file_size: int) -> TensorIndex:
    """Check the header (`head` = the file's first 8 + header-length bytes) of a file of
    `file_size` bytes without its buffer: what a ranged reader needs before reading tensors."""
    header_len = header_length(head, file_size)
    try:
        header = json.loads(head[8 : 8 + header_len].decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"header is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    buffer_len = file_size - 8 - header_len
    raw_metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(raw_metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_metadata.items()
    ):
        raise TensorFileError("__metadata__ must map strings to strings")

    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise TensorFileError(f"tensor {name!r}: entry needs exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise TensorFileError(f"tensor {name!r}: dtype {dtype!r} is not accepted")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise TensorFileError(f"tensor {name!r}: shape must be a list of non-negative ints")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise TensorFileError(f"tensor {name!r}: data_offsets must be two ints")
        begin, end = offsets
        expected = math.prod(shape) * _ITEMSIZE[dtype]
        if begin < 0 or end - begin != expected:
            raise TensorFileError(f"tensor {name!r}: offsets [{begin}, {end}] do not hold {shape} x {dtype}")
        entries.append((begin, end, name, dtype, tuple(shape)))

    # The buffer must be covered exactly once, in order: no overlaps (aliasing), no holes, no
    # trailing bytes that a different reader might interpret.
    entries.sort()
    cursor = 0
    for begin, end, name, _, _ in entries:
        if begin != cursor:
            raise TensorFileError(f"tensor {name!r}: starts at {begin}, expected {cursor}")
        cursor = end
    if cursor != buffer_len:
        raise TensorFileError(f"buffer has {buffer_len} bytes but tensors cover {cursor}")
    start = 8 + header_len
    return TensorIndex(
        header_bytes=start,
        entries=tuple(TensorEntry(n, d, s, start + b, start + e) for b, e, n, d, s in entries),
        metadata=dict(raw_metadata),
    )


def tensor_from_bytes(chunk: bytes | memoryview, entry: TensorEntry) -> np.ndarray:
    """A read-only array over one tensor's bytes (BF16 widened to float32)."""
    if entry.dtype == "BF16":
        array = _from_bf16_bits(np.frombuffer(chunk, dtype="<u2")).reshape(entry.shape)
    else:
        array = np.frombuffer(chunk, dtype=_NUMPY_OF[entry.dtype]).reshape(entry.shape)
    array.flags.writeable = False
    return array


def decode_tensors(data: bytes) -> TensorFile:
    """Parse untrusted bytes into read-only float arrays (BF16 widened to float32)."""
    header_len = header_length(data, len(data))
    index = parse_index(data[: 8 + header_len], len(data))
    view = memoryview(data)
    tensors: dict[str, np.ndarray] = {}
    stored: dict[str, str] = {}
    for entry in index.entries:
        tensors[entry.name] = tensor_from_bytes(view[entry.begin : entry.end], entry)
        stored[entry.name] = entry.dtype
    return TensorFile(tensors=tensors, stored_dtypes=stored, metadata=dict(index.metadata))


def float32_layout(shapes: Mapping[str, tuple[int, ...]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The header `encode_tensors` writes for float tensors of these shapes stored as F32, and
    where (file offsets) each tensor's bytes go: a writer can then fill the file tensor by
    tensor, never holding a second copy of the model, and produce the same bytes."""
    header: dict[str, object] = {}
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for name in sorted(shapes):
        shape = [int(d) for d in shapes[name]]
        size = math.prod(shape) * _ITEMSIZE["F32"]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offsets[name] = (offset, offset + size)
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    head = struct.pack("<Q", len(header_bytes)) + header_bytes
    return head, {name: (len(head) + b, len(head) + e) for name, (b, e) in offsets.items()}
