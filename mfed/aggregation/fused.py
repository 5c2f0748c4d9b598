"""The mean rule in ONE read of every contribution: checked while it is aggregated.

streaming.py reads each file twice: a validation pass (SHA-256, structure, finiteness) before
any value is used, then the output pass. For the plain weighted mean that first pass is most of
the cost on large encoders (bench/aggregation_memory.py --vs-download). Here the checks ride on
the output pass instead:

- structure (keys, shapes, dtypes) is checked from each file's header, read first;
- the SHA-256 of each file is computed from the bytes the output pass reads, in file order
  (`HashedReads`: a read past the hashed prefix first hashes the gap, so any visiting order
  still hashes every byte once, in order; the unread tail is hashed at the end);
- finiteness is read off the result: a NaN or infinity in any site's tensor makes that key's
  weighted sum non-finite, so a finite result means finite inputs.

The answer is optimistic. If every site passes, its model is the one the two-pass path gives,
byte for byte: the same contributions, the same arithmetic in the same order
(streaming.aggregate_streamed_linear). If anything fails (a checksum, a header, a non-finite
key), the result is thrown away (None) and the caller runs the two-pass path, which finds and
records the culprit: a bad site costs the round a second read, never a wrong model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor

import numpy as np

from mfed.aggregation.crosstask import Level2Weighting
from mfed.aggregation.streaming import (
    RangedContribution,
    ReadPlan,
    StreamedOutcome,
    StreamedRound,
    aggregate_streamed_linear,
    bounded_map,
    check_structure,
)
from mfed.aggregation.validate import ContributionRejected
from mfed.artifacts.manifest import ContributionManifest
from mfed.artifacts.ranged import ByteRange, BytesRange
from mfed.artifacts.tensorfile import TensorFileError, TensorIndex, header_length, parse_index

_GAP_CHUNK = 4 * 2**20  # bytes hashed per read when the visiting order skips part of a file

OpenFiles = Callable[[ContributionManifest], tuple[ByteRange, ByteRange]]


class HashedReads:
    """A ByteRange that hashes its file's bytes, in order, as they are read (one reader at a time)."""

    def __init__(self, inner: ByteRange) -> None:
        self._inner = inner
        self._hasher = hashlib.sha256()
        self._hashed = 0  # bytes [0, _hashed) are in the hash

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def inner(self) -> ByteRange:
        return self._inner

    def read(self, offset: int, length: int) -> bytes:
        self._hash_up_to(offset)
        data = self._inner.read(offset, length)
        end = offset + length
        if end > self._hashed:
            self._hasher.update(data[self._hashed - offset :])
            self._hashed = end
        return data

    def _hash_up_to(self, offset: int) -> None:
        while self._hashed < offset:
            step = min(_GAP_CHUNK, offset - self._hashed)
            self._hasher.update(self._inner.read(self._hashed, step))
            self._hashed += step

    def sha256(self) -> str:
        """The whole file's digest (reads what no one has read yet)."""
        self._hash_up_to(self.size)
        return self._hasher.hexdigest()


class _Prefixed:
    """A file whose first bytes are already in memory (the read that found its header): reads
    inside them cost nothing, so a small file is read once in all."""

    def __init__(self, inner: HashedReads, prefix: bytes) -> None:
        self.inner, self._prefix = inner, prefix

    @property
    def size(self) -> int:
        return self.inner.size

    def read(self, offset: int, length: int) -> bytes:
        if offset >= 0 and offset + length <= len(self._prefix):
            return self._prefix[offset : offset + length]
        return self.inner.read(offset, length)


def _indexed(source: HashedReads, first_read: int) -> tuple[TensorIndex, _Prefixed]:
    head = source.read(0, min(max(first_read, 8), source.size))
    length = 8 + header_length(head[:8], source.size)
    if length > len(head):
        head = source.read(0, length)
    return parse_index(head[:length], source.size), _Prefixed(source, head)


def _open_checked(
    manifest: ContributionManifest,
    open_files: OpenFiles,
    base_tensors: Mapping[str, np.ndarray],
    first_read: int,
) -> RangedContribution | None:
    """The contribution over hashing reads, its headers checked; None when they do not pass."""
    try:
        delta_file, decoder_file = open_files(manifest)  # ContributionRejected: a file is missing
        delta_index, delta = _indexed(HashedReads(delta_file), first_read)
        decoder_index, decoder = _indexed(HashedReads(decoder_file), first_read)
        check_structure(manifest, delta_index, decoder_index, base_tensors)
    except (TensorFileError, ContributionRejected):
        return None
    return RangedContribution.indexed(manifest, delta, decoder, delta_index, decoder_index)


def _held_in_memory(source: ByteRange) -> bool:
    return isinstance(source, _Prefixed) and isinstance(source.inner.inner, BytesRange)


def _digests_match(c: RangedContribution) -> bool:
    assert isinstance(c.delta, _Prefixed) and isinstance(c.decoder, _Prefixed)
    return c.delta.inner.sha256() == c.manifest.delta.sha256 and c.decoder.inner.sha256() == c.manifest.decoder.sha256


def aggregate_fused_linear(
    base_tensors: Mapping[str, np.ndarray],
    opened: Sequence[tuple[ContributionManifest, OpenFiles]],
    weighting: Level2Weighting,
    pool: Executor,
    plan: ReadPlan,
) -> StreamedOutcome | None:
    """aggregate_streamed_linear over every contribution in one read each, or None when any of
    them would not pass validation (the caller then validates and aggregates in two passes)."""
    ordered = sorted(opened, key=lambda item: item[0].site)
    contributions = list(
        bounded_map(
            pool,
            lambda item: _open_checked(item[0], item[1], base_tensors, plan.read_ahead),
            ordered,
            plan.scan_workers,
        )
    )
    accepted = [c for c in contributions if c is not None]
    if len(accepted) != len(contributions) or not accepted:
        return None
    in_memory = all(_held_in_memory(f) for c in accepted for f in (c.delta, c.decoder))
    round_ = StreamedRound(base_tensors, accepted) if in_memory else StreamedRound(base_tensors, accepted, pool, plan)
    outcome = aggregate_streamed_linear(base_tensors, round_, weighting)
    if not all(np.isfinite(t).all() for t in outcome.tensors.values()):
        return None
    if not all(bounded_map(pool, _digests_match, accepted, plan.scan_workers)):
        return None
    return outcome
