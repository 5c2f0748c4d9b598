"""Structural signatures: parameter names, shapes and dtypes, and a digest of them.

Encoders can only be averaged when their signatures are equal. When they are not, the error
names the first parameter (in sorted order) that differs, which is what a user needs to find
the misconfigured site.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ParamShape:
    name: str
    shape: tuple[int, ...]
    dtype: str


class SignatureMismatch(ValueError):
    def __init__(self, what: str, param: str, detail: str) -> None:
        super().__init__(f"{what} signature differs at parameter {param!r}: {detail}")
        self.param = param
        self.detail = detail


@dataclass(frozen=True)
class Signature:
    params: tuple[ParamShape, ...]

    @classmethod
    def of(cls, entries: Iterable[tuple[str, tuple[int, ...], str]]) -> Signature:
        params = (ParamShape(n, tuple(int(d) for d in s), str(t)) for n, s, t in entries)
        return cls(tuple(sorted(params, key=lambda p: p.name)))

    @classmethod
    def of_arrays(cls, arrays: Mapping[str, np.ndarray], *, dtype: str | None = None) -> Signature:
        """Signature of numpy arrays; `dtype` overrides the array dtype (e.g. a widened bf16)."""
        return cls.of((n, a.shape, dtype or str(a.dtype)) for n, a in arrays.items())

    def to_json(self) -> list[list[object]]:
        return [[p.name, list(p.shape), p.dtype] for p in self.params]

    @classmethod
    def from_json(cls, data: object) -> Signature:
        if not isinstance(data, list):
            raise ValueError("signature must be a list of [name, shape, dtype]")
        entries = []
        for item in data:
            if not (
                isinstance(item, list)
                and len(item) == 3
                and isinstance(item[0], str)
                and isinstance(item[1], list)
                and isinstance(item[2], str)
            ):
                raise ValueError(f"bad signature entry {item!r}")
            entries.append((item[0], tuple(item[1]), item[2]))
        return cls.of(entries)

    @property
    def digest(self) -> str:
        text = json.dumps(self.to_json(), separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def parameter_count(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.params)

    def require_equal(self, other: Signature, what: str = "encoder", *, check_dtype: bool = True) -> None:
        """Raise SignatureMismatch naming the first differing parameter (sorted by name)."""
        mine = {p.name: p for p in self.params}
        theirs = {p.name: p for p in other.params}
        for name in sorted(set(mine) | set(theirs)):
            a, b = mine.get(name), theirs.get(name)
            if a is None:
                raise SignatureMismatch(what, name, "present in the candidate but not expected")
            if b is None:
                raise SignatureMismatch(what, name, "expected but missing from the candidate")
            if a.shape != b.shape:
                raise SignatureMismatch(what, name, f"shape {list(b.shape)} != expected {list(a.shape)}")
            if check_dtype and a.dtype != b.dtype:
                raise SignatureMismatch(what, name, f"dtype {b.dtype} != expected {a.dtype}")
