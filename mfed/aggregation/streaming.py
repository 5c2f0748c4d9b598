"""Tensor-by-tensor aggregation over ranged reads: memory of about two models on every path.

The contributions stay where they are (S3, disk); each is a pair of `ByteRange`s read by
(offset, length). Three passes, each over one parameter (tensor) at a time:

1. validate: every site's two files are read once, in data order, one tensor at a time, for
   their SHA-256, structure, dtypes and finiteness: the same checks, reasons and details as
   validate.check_tensors, without ever holding a whole file;
2. Gram (only rules whose level-2 weights depend on the updates, cagrad/gated, and layouts with
   task-level copies): for each shared key, the groups' mean deltas of that key, their pairwise
   dot products added to the T x T Gram matrix. At most `gram_budget_bytes` of float64 group
   means are held at once; when a key's means do not fit, groups are taken in blocks and the
   others re-read (more reads, never more memory);
3. output: for each key of the new model, its value from the per-site tensors of that key,
   written in place into the preallocated safetensors buffer of the result.

Every value is computed with the same numpy operations, in the same (sorted site, sorted group,
sorted key) order as the whole-model aggregators (linear.py, fedavg.RoundAggregator), so the
model's bytes are identical; tests/unit/test_streaming.py checks that on every path.

Memory, for a float32 model of M bytes whose largest tensor has T bytes as float32 (base model
not counted: the caller holds it): the result's buffer M, its final bytes copy M (at the very
end, when nothing else is held), the Gram pass's budget (default M) and a few float64
temporaries of one tensor (about 6T). So peak ~ 2M + 6T, whatever the number of sites or
groups. The price is reads: 2 passes over every contribution for the mean rule (one when every
site passes: fused.py checks the files as it aggregates them), 3 for the rest.

Plugging in another per-coordinate rule (median, trimmed mean...): `site_tensors(key)` of
`StreamedRound` yields (contribution, tensor) for one key in sorted site order; a rule that
maps those to the key's new value can fill `OutputModel` the same way `_linear_value` does.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from mfed.aggregation.crosstask import GroupUpdate, Level2Weighting, level2_from_gram
from mfed.aggregation.linear import plan_coefficients
from mfed.aggregation.ownership import SHARED_TRACK, contribution_view, dual_keys, owner_of
from mfed.aggregation.validate import ContributionRejected, RejectReason
from mfed.artifacts.manifest import ContributionManifest, GlobalManifest, Rejection
from mfed.artifacts.ranged import BufferedRange, ByteRange, BytesRange
from mfed.artifacts.signature import Signature, SignatureMismatch
from mfed.artifacts.tensorfile import (
    StoredDtype,
    TensorEntry,
    TensorFileError,
    TensorIndex,
    float32_layout,
    header_length,
    parse_index,
    tensor_from_bytes,
)

T = TypeVar("T")
R = TypeVar("R")

if TYPE_CHECKING:  # fedavg imports this module; the settings type is only needed by mypy
    from mfed.aggregation.fedavg import AggregationSettings

_HASH_CHUNK = 8 * 2**20  # bytes hashed per read when a header is unreadable

# Reads. Against S3 every read is a round trip (~5 ms on a quiet loopback), so one read per
# tensor per site per pass made a ResNet-18 round ~20x slower than downloading its files
# (bench/aggregation_memory.py --vs-download). Three remedies, none of which changes a value or
# the order of any sum: the validation pass reads SCAN_CHUNK_BYTES at a time, covering many
# small tensors per read; the later passes read a file through a small read-ahead block; and
# the sites' tensors of one key are read PARALLEL_READS at a time. What they may hold is
# bounded (ReadPlan). Files already in memory (the operator's prefetched small files) are read
# as before: there is no round trip to save.
SCAN_CHUNK_BYTES = 4 * 2**20
READ_AHEAD_BYTES = 2**20
MIN_READ_AHEAD_BYTES = 64 * 2**10
PARALLEL_READS = 8


@dataclass(frozen=True)
class ReadPlan:
    """How many reads may be in flight and how many bytes they may hold, for a model of
    `model_bytes` (float32) and `sites` contributions. The validation pass runs before the output
    buffer exists: its `scan_workers` sites at once each hold a chunk and one tensor (hashing and
    the finiteness check release the GIL, so they also use the cores: 100 small in-memory
    contributions validate ~0.5 s faster on 2 cores). The later passes share the memory with the
    output buffer, so their reads hold at most a quarter of the model (at least 4 MiB)."""

    scan_workers: int
    read_budget: int
    read_ahead: int

    @classmethod
    def for_round(cls, model_bytes: int, sites: int) -> ReadPlan:
        budget = max(4 * 2**20, model_bytes // 4)
        read_ahead = min(READ_AHEAD_BYTES, max(MIN_READ_AHEAD_BYTES, budget // (4 * max(sites, 1))))
        scan_workers = PARALLEL_READS // 2
        return cls(scan_workers=scan_workers, read_budget=budget, read_ahead=read_ahead)


def _in_memory(source: ByteRange) -> bool:
    return isinstance(source, BytesRange)


@dataclass(frozen=True)
class RangedContribution:
    """A contribution whose files passed every check; tensors are read on demand."""

    manifest: ContributionManifest
    delta: ByteRange
    decoder: ByteRange
    delta_index: Mapping[str, TensorEntry]
    decoder_index: Mapping[str, TensorEntry]

    @classmethod
    def indexed(
        cls,
        manifest: ContributionManifest,
        delta: ByteRange,
        decoder: ByteRange,
        delta_index: TensorIndex,
        decoder_index: TensorIndex,
    ) -> RangedContribution:
        return cls(manifest, delta, decoder, delta_index.by_name(), decoder_index.by_name())

    @property
    def two_track(self) -> bool:
        return any(k.startswith(SHARED_TRACK) for k in self.delta_index)

    def read(self, site_key: str, *, decoder: bool = False) -> np.ndarray:
        source, index = (self.decoder, self.decoder_index) if decoder else (self.delta, self.delta_index)
        entry = index[site_key]
        return tensor_from_bytes(source.read(entry.begin, entry.end - entry.begin), entry)

    def tensor(self, site_key: str) -> np.ndarray:
        """One tensor by its site-model name, as ValidContribution.tensor (read on demand)."""
        return self.read(site_key, decoder=site_key.startswith("decoder."))

    def read_flat(self, site_key: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor, read by range (no more than that)."""
        source, index = (
            (self.decoder, self.decoder_index)
            if site_key.startswith("decoder.")
            else (
                self.delta,
                self.delta_index,
            )
        )
        entry = index[site_key]
        count = int(np.prod(entry.shape))
        if not 0 <= start <= stop <= count:
            raise IndexError(f"elements [{start}, {stop}) of {site_key} with {count} elements")
        width = (entry.end - entry.begin) // count if count else 0
        part = replace(entry, shape=(stop - start,), begin=entry.begin + start * width, end=entry.begin + stop * width)
        return tensor_from_bytes(source.read(part.begin, part.end - part.begin), part)

    @property
    def in_memory(self) -> bool:
        return _in_memory(self.delta) and _in_memory(self.decoder)

    def stored_bytes(self, site_key: str) -> int:
        index = self.decoder_index if site_key.startswith("decoder.") else self.delta_index
        entry = index[site_key]
        return entry.end - entry.begin


def _scan(site: str, label: str, source: ByteRange, expected_sha: str) -> tuple[TensorIndex, dict[str, bool]]:
    """Hash the whole file and check its header and each tensor's finiteness, one tensor at a time
    (read SCAN_CHUNK_BYTES at a time: a chunk covers many small tensors)."""
    if not _in_memory(source):
        source = BufferedRange(source, SCAN_CHUNK_BYTES)
    hasher = hashlib.sha256()
    size = source.size
    index: TensorIndex | None = None
    finite: dict[str, bool] = {}
    error: TensorFileError | None = None
    cursor = 0
    try:
        head = source.read(0, min(8, size))
        length = header_length(head, size)
        head = source.read(0, 8 + length)
        index = parse_index(head, size)
    except TensorFileError as exc:
        error = exc
    else:
        hasher.update(head)
        cursor = len(head)
        for entry in index.entries:
            chunk = source.read(entry.begin, entry.end - entry.begin)
            hasher.update(chunk)
            finite[entry.name] = bool(np.isfinite(tensor_from_bytes(chunk, entry)).all())
            cursor = entry.end
    while cursor < size:  # an unparsable header: the checksum still decides which reason applies
        step = min(_HASH_CHUNK, size - cursor)
        hasher.update(source.read(cursor, step))
        cursor += step
    actual = hasher.hexdigest()
    if actual != expected_sha:
        raise ContributionRejected(
            site,
            RejectReason.CHECKSUM,
            f"{label} SHA-256 {actual[:12]} does not match the manifest's {expected_sha[:12]}",
        )
    if error is not None or index is None:
        raise ContributionRejected(site, RejectReason.MALFORMED, f"{label}: {error}")
    return index, finite


def check_structure(
    manifest: ContributionManifest,
    delta_index: TensorIndex,
    decoder_index: TensorIndex,
    base_tensors: Mapping[str, np.ndarray],
    finite: Mapping[str, Mapping[str, bool]] | None = None,
) -> None:
    """The files' keys, shapes and dtypes against the model (and, with `finite`: label ->
    tensor -> all finite, their values), in validate.check_tensors's order and reasons; raises
    ContributionRejected."""
    site = manifest.site
    try:
        expected_dtype = StoredDtype.parse(manifest.delta_dtype).value
    except ValueError as exc:
        raise ContributionRejected(site, RejectReason.DTYPE, str(exc)) from exc
    two_track = any(e.name.startswith(SHARED_TRACK) for e in delta_index.entries)
    for label, part, index, allowed in (
        ("delta", "encoder", delta_index, {expected_dtype}),
        ("decoder", "decoder", decoder_index, {"F32"}),
    ):
        view = contribution_view(base_tensors, manifest.task, part, two_track=two_track)
        expected = Signature.of_arrays(view, dtype="-")
        actual = Signature.of((e.name, e.shape, "-") for e in index.entries)
        try:
            expected.require_equal(actual, what=label, check_dtype=False)
        except SignatureMismatch as exc:
            reason = RejectReason.SHAPE if "shape" in exc.detail else RejectReason.KEYS
            raise ContributionRejected(site, reason, str(exc)) from exc
        stored = {e.name: e.dtype for e in index.entries}
        for name in sorted(stored):
            if stored[name] not in allowed:
                raise ContributionRejected(
                    site,
                    RejectReason.DTYPE,
                    f"{label} {name!r} is stored as {stored[name]}, expected {sorted(allowed)[0]}",
                )
            if finite is not None and not finite[label][name]:
                raise ContributionRejected(
                    site, RejectReason.NON_FINITE, f"{label} {name!r} holds NaN or infinite values"
                )


def validate_ranged(
    manifest: ContributionManifest,
    delta: ByteRange,
    decoder: ByteRange,
    base_tensors: Mapping[str, np.ndarray],
) -> RangedContribution:
    """validate.check_tensors over ranged reads: same checks, same order, same reasons."""
    site = manifest.site
    delta_index, delta_finite = _scan(site, "delta", delta, manifest.delta.sha256)
    decoder_index, decoder_finite = _scan(site, "decoder", decoder, manifest.decoder.sha256)
    finite = {"delta": delta_finite, "decoder": decoder_finite}
    check_structure(manifest, delta_index, decoder_index, base_tensors, finite)
    return RangedContribution.indexed(manifest, delta, decoder, delta_index, decoder_index)


class OutputModel:
    """The new global model's safetensors bytes, filled one tensor at a time (all F32)."""

    def __init__(self, base_tensors: Mapping[str, np.ndarray]) -> None:
        self._shapes = {k: tuple(v.shape) for k, v in base_tensors.items()}
        head, self._offsets = float32_layout(self._shapes)
        total = max((end for _, end in self._offsets.values()), default=len(head))
        self._buffer = bytearray(total)
        self._buffer[: len(head)] = head

    def put(self, key: str, value: np.ndarray, start: int = 0) -> None:
        """The tensor `key`, or with `start` its flattened elements from `start` on."""
        begin, end = self._offsets[key]
        target = np.frombuffer(self._buffer, dtype="<f4", count=(end - begin) // 4, offset=begin)
        flat = np.ascontiguousarray(value, dtype="<f4").ravel()
        target[start : start + flat.size] = flat

    def finish(self) -> tuple[bytes, dict[str, np.ndarray]]:
        data = bytes(self._buffer)
        self._buffer = bytearray()  # the copy above is the only one kept
        tensors = {}
        for key in sorted(self._shapes):
            begin, end = self._offsets[key]
            array = np.frombuffer(data, dtype="<f4", count=(end - begin) // 4, offset=begin).reshape(self._shapes[key])
            tensors[key] = array
        return data, tensors


def _accumulate(into: np.ndarray | None, value: np.ndarray, weight: float) -> np.ndarray:
    """fedavg._accumulate for one key: the first term is weight * value, later ones are added."""
    if into is None:
        return weight * value.astype(np.float64)
    into += weight * value.astype(np.float64)
    return into


@dataclass(frozen=True)
class StreamedOutcome:
    model_bytes: bytes
    tensors: dict[str, np.ndarray]
    accepted: list[ContributionManifest]
    level2_weights: dict[str, float]
    evidence: dict[str, object]


class StreamedRound:
    """The validated contributions of one round (sorted by site) and per-key reads over them."""

    def __init__(
        self,
        base_tensors: Mapping[str, np.ndarray],
        contributions: Sequence[RangedContribution],
        pool: Executor | None = None,
        plan: ReadPlan | None = None,
    ) -> None:
        """`pool` (with `plan`): read the sites' tensors of a key in parallel, files through a
        read-ahead block. Without it, one read after another (the values are the same)."""
        self.base_tensors = base_tensors
        self._pool, self._plan = pool, plan
        ordered = sorted(contributions, key=lambda c: c.manifest.site)
        if plan is not None:
            ordered = [_read_ahead(c, plan.read_ahead) for c in ordered]
        self.contributions = ordered
        self.tasks = sorted({c.manifest.task for c in self.contributions})
        self.by_task = {t: [c for c in self.contributions if c.manifest.task == t] for t in self.tasks}
        self.samples = {t: sum(c.manifest.samples for c in self.by_task[t]) for t in self.tasks}

    def _read_in_order(self, wanted: Sequence[tuple[RangedContribution, str]]) -> Iterator[np.ndarray]:
        """Each (contribution, site key)'s tensor, in the order given; with a pool, as many reads
        at once as the plan's budget holds of the largest of them (at least one)."""

        def read(c: RangedContribution, key: str) -> np.ndarray:
            return c.read(key, decoder=key.startswith("decoder."))

        if self._pool is None or self._plan is None or len(wanted) < 2:
            for c, key in wanted:
                yield read(c, key)
            return
        largest = max(c.stored_bytes(key) for c, key in wanted)
        window = max(1, min(PARALLEL_READS, self._plan.read_budget // max(largest, 1)))
        yield from bounded_map(self._pool, lambda item: read(*item), wanted, window)

    def site_tensors(self, site_key: str, task: str | None = None) -> Iterator[tuple[RangedContribution, np.ndarray]]:
        """(contribution, its tensor `site_key`) for every site (of `task`, if given), sorted by site."""
        sites = self.contributions if task is None else self.by_task[task]
        yield from zip(sites, self._read_in_order([(c, site_key) for c in sites]), strict=True)

    def group_sum(self, task: str, site_key: str, *, level2: bool = False) -> np.ndarray:
        """sum_k n_k x_k over the group's sites; `level2` takes a two-track site's shared track."""
        sites = self.by_task[task]
        keys = [SHARED_TRACK + site_key if level2 and c.two_track else site_key for c in sites]
        total: np.ndarray | None = None
        for c, value in zip(sites, self._read_in_order(list(zip(sites, keys, strict=True))), strict=True):
            total = _accumulate(total, value, c.manifest.samples)
        assert total is not None  # every group has at least one site
        return total


def _read_ahead(c: RangedContribution, block: int) -> RangedContribution:
    """The contribution with its files read through a read-ahead block (unless in memory)."""
    delta = c.delta if _in_memory(c.delta) else BufferedRange(c.delta, block)
    decoder = c.decoder if _in_memory(c.decoder) else BufferedRange(c.decoder, block)
    return replace(c, delta=delta, decoder=decoder)


def aggregate_streamed_linear(
    base_tensors: Mapping[str, np.ndarray], round_: StreamedRound, weighting: Level2Weighting
) -> StreamedOutcome:
    """linear.aggregate_linear, tensor by tensor (the mean rule without task-level copies)."""
    manifests = [c.manifest for c in round_.contributions]
    coefficients, level2 = plan_coefficients(manifests, weighting)
    out = OutputModel(base_tensors)
    for key in sorted(base_tensors):
        base = base_tensors[key]
        owner = owner_of(key)
        if owner.task is not None and owner.task not in level2:
            out.put(key, np.array(base, dtype=np.float32))  # task group absent this round: unchanged
            continue
        total = np.zeros(base.shape, dtype=np.float64)
        for c, value in round_.site_tensors(owner.site_key, owner.task):
            coefficient = coefficients[c.manifest.site]
            total += (coefficient.shared if owner.task is None else coefficient.task) * value.astype(np.float64)
        if owner.part != "decoder":
            total += base
        out.put(key, total.astype(np.float32))
    data, tensors = out.finish()
    return StreamedOutcome(model_bytes=data, tensors=tensors, accepted=manifests, level2_weights=level2, evidence={})


def _gram(round_: StreamedRound, shared_keys: Sequence[str], budget_bytes: int) -> np.ndarray:
    """fedavg's Gram matrix of the groups' level-2 mean deltas, one key at a time.

    Each pair (i, j) gets one addition per key, keys in sorted order, exactly as gram_matrix does,
    so the order in which pairs are visited within a key does not change a bit of the result."""
    tasks = round_.tasks
    count = len(tasks)
    gram = np.zeros((count, count), dtype=np.float64)

    def mean(i: int, key: str) -> np.ndarray:
        flat: np.ndarray = (round_.group_sum(tasks[i], key, level2=True) / round_.samples[tasks[i]]).ravel()
        return flat

    for key in shared_keys:
        block = max(1, budget_bytes // max(round_.base_tensors[key].size * 8, 1))
        for start in range(0, count, block):
            stop = min(count, start + block)
            held = [mean(i, key) for i in range(start, stop)]
            for j in range(start, count):
                other = held[j - start] if j < stop else mean(j, key)
                for i in range(start, min(j + 1, stop)):
                    value = float(np.dot(held[i - start], other))
                    gram[i, j] += value
                    if i != j:
                        gram[j, i] += value
                del other
            del held
    return gram


def aggregate_streamed_groups(
    base: GlobalManifest,
    base_tensors: Mapping[str, np.ndarray],
    round_: StreamedRound,
    settings: AggregationSettings,
    gram_budget_bytes: int | None = None,
) -> StreamedOutcome:
    """fedavg.RoundAggregator.finish, tensor by tensor (cagrad, gated, task-level copies)."""
    tasks = round_.tasks
    shared_keys = sorted(k for k in base_tensors if owner_of(k).task is None)
    model_bytes = sum(int(v.size) * 4 for v in base_tensors.values())
    gram = _gram(round_, shared_keys, model_bytes if gram_budget_bytes is None else gram_budget_bytes)
    updates = [GroupUpdate(task=t, samples=round_.samples[t], mean_delta={}) for t in tasks]
    outcome = level2_from_gram(
        gram,
        updates,
        weighting=settings.level2_weighting,
        rule=settings.level2_rule,
        cagrad_c=settings.cagrad_c,
        gate_threshold=settings.gate_threshold,
        gate_momentum=settings.gate_momentum,
        previous=base.aggregation,
    )
    weights = outcome.weights
    mix: dict[str, dict[str, float]] = {}
    for task in tasks:
        mix[task] = {}
        for c in round_.by_task[task]:
            for key in dual_keys(base_tensors, task):
                mix[task][key] = mix[task].get(key, 0.0) + c.manifest.samples * c.manifest.mix_for(key)

    out = OutputModel(base_tensors)
    for key in sorted(base_tensors):
        base_value = base_tensors[key]
        owner = owner_of(key)
        if owner.task is None:
            # weighted_mean over one key, one group mean alive at a time.
            acc = np.zeros(base_value.shape, dtype=np.float64)
            for task, weight in zip(tasks, weights, strict=True):
                acc += weight * (round_.group_sum(task, key, level2=True) / round_.samples[task])
            out.put(key, (base_value.astype(np.float64) + acc).astype(np.float32))
        elif owner.task not in round_.by_task:
            out.put(key, np.array(base_value, dtype=np.float32))  # group absent: unchanged
        elif owner.part == "encoder":
            samples = round_.samples[owner.task]
            delta = round_.group_sum(owner.task, owner.site_key) / samples
            start = base_value.astype(np.float64)
            if owner.site_key in base_tensors:  # dual: the group started from a mix
                alpha = mix[owner.task][owner.site_key] / samples
                start = start + alpha * (base_tensors[owner.site_key].astype(np.float64) - start)
            out.put(key, (start + delta).astype(np.float32))
        else:
            total = round_.group_sum(owner.task, owner.site_key)
            out.put(key, (total / round_.samples[owner.task]).astype(np.float32))
    data, tensors = out.finish()
    return StreamedOutcome(
        model_bytes=data,
        tensors=tensors,
        accepted=[c.manifest for c in round_.contributions],
        level2_weights=dict(zip(tasks, weights, strict=True)),
        evidence=outcome.evidence,
    )


def validate_all(
    base_tensors: Mapping[str, np.ndarray],
    kept: Sequence[tuple[ContributionManifest, Callable[[ContributionManifest], tuple[ByteRange, ByteRange]]]],
    pool: Executor | None = None,
    workers: int = 1,
) -> tuple[list[RangedContribution], list[Rejection]]:
    """Pass 1 over every (sorted) candidate: the accepted ones and the typed rejections. With a
    pool, `workers` sites are validated at once; the outcome is the same, in site order."""

    def check(item: tuple[ContributionManifest, Callable[..., tuple[ByteRange, ByteRange]]]) -> object:
        manifest, open_files = item
        try:
            delta, decoder = open_files(manifest)
            return validate_ranged(manifest, delta, decoder, base_tensors)
        except ContributionRejected as exc:
            return Rejection(site=exc.site, reason=exc.reason.value, detail=exc.detail)

    ordered = sorted(kept, key=lambda item: item[0].site)
    if pool is None or workers < 2:
        outcomes: Iterator[object] = map(check, ordered)
    else:
        outcomes = bounded_map(pool, check, ordered, workers)
    accepted: list[RangedContribution] = []
    rejected: list[Rejection] = []
    for outcome in outcomes:
        if isinstance(outcome, RangedContribution):
            accepted.append(outcome)
        else:
            assert isinstance(outcome, Rejection)
            rejected.append(outcome)
    return accepted, rejected


def bounded_map(pool: Executor, fn: Callable[[T], R], items: Sequence[T], window: int) -> Iterator[R]:
    """fn over items on the pool, at most `window` at once, results in order."""
    pending: deque[Future[R]] = deque()
    for item in items:
        if len(pending) >= window:
            yield pending.popleft().result()
        pending.append(pool.submit(fn, item))
    while pending:
        yield pending.popleft().result()
