"""Tensor-by-tensor aggregation (ranged reads) gives the same bytes as the whole-model paths.

The oracle is the whole-contribution aggregator (fedavg.RoundAggregator / linear.py, which read
every contribution as one decoded file and are themselves checked against numpy in
test_aggregation.py and test_task_level.py): the same sources, with and without `open_files`,
must give byte-identical models and manifests on every path, group count, dtype and rejection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tracemalloc

import numpy as np
import pytest

from mfed.aggregation import robust_round, streaming
from mfed.aggregation.crosstask import Level2Rule, Level2Weighting
from mfed.aggregation.fedavg import AggregationSettings, ContributionSource, aggregate
from mfed.aggregation.fused import HashedReads
from mfed.aggregation.ownership import layout_global
from mfed.aggregation.robust import RobustRule, RobustSettings
from mfed.aggregation.streaming import StreamedRound, aggregate_streamed_groups, validate_all
from mfed.artifacts.layout import MODEL_FILE
from mfed.artifacts.manifest import FileRef, GlobalManifest, TaskGroupInfo
from mfed.artifacts.ranged import BytesRange
from mfed.artifacts.signature import Signature
from mfed.artifacts.tensorfile import StoredDtype, decode_tensors, encode_tensors, sha256_hex
from mfed.privacy.settings import PrivacySettings
from mfed.spec import ArchSpec, SharingMode, SharingPolicy
from tests.unit.factories import ENCODER_SHAPES, make_contribution

DUAL = SharingPolicy(mode=SharingMode.DEPTH, depth=1, task_level=True)
PATHS = {
    "mean": (SharingPolicy(), AggregationSettings()),
    "mean-samples": (SharingPolicy(), AggregationSettings(level2_weighting=Level2Weighting.SAMPLES)),
    "cagrad": (SharingPolicy(), AggregationSettings(level2_rule=Level2Rule.CAGRAD)),
    "gated": (SharingPolicy(), AggregationSettings(level2_rule=Level2Rule.GATED, gate_threshold=0.1)),
    "task-level": (DUAL, AggregationSettings()),
    "auto (task-level + cagrad)": (DUAL, AggregationSettings(level2_rule=Level2Rule.CAGRAD)),
    "depth-shared mean": (SharingPolicy(mode=SharingMode.DEPTH, depth=1), AggregationSettings()),
    "median": (SharingPolicy(), AggregationSettings(robust=RobustSettings(rule=RobustRule.MEDIAN))),
    "trimmed-mean + norm screen": (
        SharingPolicy(mode=SharingMode.DEPTH, depth=1),
        AggregationSettings(robust=RobustSettings(rule=RobustRule.TRIMMED_MEAN, trim=0.25, norm_factor=1.5)),
    ),
}


def _base(tasks: list[str], sharing: SharingPolicy, seed: int = 0):
    rng = np.random.default_rng(seed)
    encoder = {k: rng.standard_normal(s).astype(np.float32) for k, s in ENCODER_SHAPES.items()}
    decoders = {
        t: {"decoder.0.weight": rng.standard_normal((2 + i, 2)).astype(np.float32)} for i, t in enumerate(tasks)
    }
    tensors = layout_global(encoder, decoders, sharing)
    data = encode_tensors(tensors)
    manifest = GlobalManifest(
        federation="fed",
        round=0,
        model=FileRef(name=MODEL_FILE, sha256=sha256_hex(data), size=len(data)),
        encoder=ArchSpec(name="toy"),
        encoder_signature=Signature.of_arrays(encoder),
        sharing=sharing,
        tasks={
            t: TaskGroupInfo(
                type="toy", params={}, decoder=ArchSpec(name="toy"), decoder_signature=Signature.of_arrays(decoders[t])
            )
            for t in tasks
        },
    )
    return manifest, dict(decode_tensors(data).tensors), decoders


def _contributions(base, tasks, decoders, rng, *, dtype=StoredDtype.F32):
    out = []
    for i, task in enumerate(tasks):
        for j in range(2):
            decoder = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in decoders[task].items()}
            mix = {"encoder.stages.0.": float(rng.uniform())} if base.sharing.task_level else None
            out.append(
                make_contribution(
                    base, f"s{i:02d}-{j}", task, 5 + 3 * i + j, rng, decoder=decoder, delta_dtype=dtype, start_mix=mix
                )[:3]
            )
    return out


class RemoteRange:
    """Bytes behind a ByteRange that is not a BytesRange, so the aggregator reads it as it reads
    S3 (read-ahead blocks, chunked validation, parallel reads); every read is logged. What it
    does not have: S3's latency (bench/aggregation_memory.py --vs-download measures that)."""

    def __init__(self, data: bytes, log: list[tuple[int, int]]) -> None:
        self._data, self._log = data, log

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= len(self._data)
        self._log.append((offset, length))
        return self._data[offset : offset + length]


def _sources(items, *, ranged: bool, remote_log: list | None = None) -> list[ContributionSource]:
    def opened(d, c):
        if remote_log is not None:
            return RemoteRange(d, remote_log), RemoteRange(c, remote_log)
        return BytesRange(d), BytesRange(c)

    def one(m, d, c):
        return ContributionSource(
            site=m.site,
            read_manifest=lambda: m,
            read_files=lambda _m: (d, c),
            open_files=(lambda _m: opened(d, c)) if ranged else None,
        )

    return [one(*item) for item in items]


def _both(base, tensors, items, settings, remote_log=None):
    whole = aggregate(base, tensors, 1, _sources(items, ranged=False), settings)
    streamed = aggregate(base, tensors, 1, _sources(items, ranged=True, remote_log=remote_log), settings)
    return whole, streamed


@pytest.fixture
def small_reads(monkeypatch):
    """Blocks and chunks of a few hundred bytes: every read-ahead block and validation chunk of
    these small test models then ends inside a tensor, the case that could go wrong."""
    monkeypatch.setattr(streaming, "SCAN_CHUNK_BYTES", 300)
    monkeypatch.setattr(streaming, "READ_AHEAD_BYTES", 200)
    monkeypatch.setattr(streaming, "MIN_READ_AHEAD_BYTES", 200)


@pytest.mark.parametrize("sharing", [SharingPolicy(), SharingPolicy(mode=SharingMode.DEPTH, depth=1)])
def test_private_rounds_streamed_give_the_same_bytes_for_the_same_noise(sharing, small_reads):
    tasks = ["t0", "t1"]
    base, tensors, decoders = _base(tasks, sharing)
    items = _contributions(base, tasks, decoders, np.random.default_rng(6))
    settings = AggregationSettings(privacy=PrivacySettings(clip_norm=0.7, noise_multiplier=0.9))
    log: list[tuple[int, int]] = []
    whole = aggregate(base, tensors, 1, _sources(items, ranged=False), settings, noise_rng=np.random.default_rng(1))
    streamed = aggregate(
        base, tensors, 1, _sources(items, ranged=True, remote_log=log), settings, noise_rng=np.random.default_rng(1)
    )
    assert log, "the streamed round read by ranges"
    assert streamed.model_bytes == whole.model_bytes
    assert streamed.manifest.to_json() == whole.manifest.to_json()


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_streamed_aggregation_over_remote_reads_gives_the_same_bytes(path, groups, small_reads):
    sharing, settings = PATHS[path]
    tasks = [f"t{i}" for i in range(groups)]
    base, tensors, decoders = _base(tasks, sharing)
    items = _contributions(base, tasks, decoders, np.random.default_rng(5))
    log: list[tuple[int, int]] = []
    whole, streamed = _both(base, tensors, items, settings, remote_log=log)
    assert streamed.model_bytes == whole.model_bytes
    assert streamed.manifest.to_json() == whole.manifest.to_json()
    assert log  # the remote path was taken


def test_remote_reads_cover_many_small_tensors_per_read(monkeypatch):
    base, tensors, decoders = _base(["a", "b"], SharingPolicy())
    items = _contributions(base, ["a", "b"], decoders, np.random.default_rng(6))
    per_tensor: list[tuple[int, int]] = []
    monkeypatch.setattr(streaming, "SCAN_CHUNK_BYTES", 1)  # one read per tensor, as before
    monkeypatch.setattr(streaming, "READ_AHEAD_BYTES", 1)
    monkeypatch.setattr(streaming, "MIN_READ_AHEAD_BYTES", 1)
    _both(base, tensors, items, AggregationSettings(), remote_log=per_tensor)
    monkeypatch.undo()
    buffered: list[tuple[int, int]] = []
    whole, streamed = _both(base, tensors, items, AggregationSettings(), remote_log=buffered)
    assert streamed.model_bytes == whole.model_bytes
    # files of a few hundred bytes: with the default block, each of a site's two files is read
    # once in all (the mean rule checks a file as it aggregates it, fused.py), where one read
    # per tensor took 3x more
    assert len(buffered) == 2 * len(items)
    assert len(per_tensor) >= 3 * len(buffered)


def test_a_corrupt_remote_file_is_rejected_with_the_same_reason(small_reads):
    base, tensors, decoders = _base(["a", "b"], SharingPolicy())
    items = _contributions(base, ["a", "b"], decoders, np.random.default_rng(7))
    m, d, c = items[0]
    flipped = bytearray(d)
    flipped[-3] ^= 0xFF  # inside the last tensor: only the checksum notices
    items[0] = (m, bytes(flipped), c)
    for log in (None, []):
        result = aggregate(base, tensors, 1, _sources(items, ranged=True, remote_log=log), AggregationSettings())
        assert [(r.site, r.reason) for r in result.manifest.rejected] == [(m.site, "ChecksumMismatch")]


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_streamed_aggregation_gives_the_bytes_of_the_whole_model_aggregation(path, groups):
    sharing, settings = PATHS[path]
    tasks = [f"t{i}" for i in range(groups)]
    base, tensors, decoders = _base(tasks, sharing)
    items = _contributions(
        base, tasks[: max(1, groups - 1)] if groups > 2 else tasks, decoders, np.random.default_rng(3)
    )
    whole, streamed = _both(base, tensors, items, settings)
    assert streamed.model_bytes == whole.model_bytes
    assert streamed.manifest.to_json() == whole.manifest.to_json()
    assert sorted(streamed.tensors) == sorted(whole.tensors)
    for key, value in whole.tensors.items():
        assert streamed.tensors[key].tobytes() == np.asarray(value, dtype="<f4").tobytes()


@pytest.mark.parametrize("dtype", [StoredDtype.BF16, StoredDtype.F16])
def test_half_precision_deltas_stream_to_the_same_bytes(dtype):
    base, tensors, decoders = _base(["a", "b"], SharingPolicy())
    items = _contributions(base, ["a", "b"], decoders, np.random.default_rng(4), dtype=dtype)
    for settings in (AggregationSettings(), AggregationSettings(level2_rule=Level2Rule.CAGRAD)):
        whole, streamed = _both(base, tensors, items, settings)
        assert streamed.model_bytes == whole.model_bytes


def test_a_gram_budget_smaller_than_one_key_gives_the_same_weights():
    # With a budget below one tensor the Gram pass holds one group mean at a time and re-reads
    # the others: more reads, the same matrix to the bit.
    tasks = ["a", "b", "c", "d"]
    base, tensors, decoders = _base(tasks, SharingPolicy())
    items = _contributions(base, tasks, decoders, np.random.default_rng(5))
    settings = AggregationSettings(level2_rule=Level2Rule.CAGRAD)
    opened = [(m, (lambda _m, d=d, c=c: (BytesRange(d), BytesRange(c)))) for m, d, c in items]
    accepted, _ = validate_all(tensors, opened)
    round_ = StreamedRound(tensors, accepted)
    small = aggregate_streamed_groups(base, tensors, round_, settings, gram_budget_bytes=1)
    large = aggregate_streamed_groups(base, tensors, round_, settings, gram_budget_bytes=10**9)
    assert small.model_bytes == large.model_bytes
    assert small.level2_weights == large.level2_weights
    whole, _ = _both(base, tensors, items, settings)
    assert small.model_bytes == whole.model_bytes


def _corrupt(case, m, d, c):
    if case == "tampered delta":
        return m, d[:-4] + b"\x00\x00\x80\x3f", c
    if case == "garbage bytes":
        d = b"\x08\x00\x00\x00\x00\x00\x00\x00not json"
    elif case == "short file":
        d = b"\x01\x02"
    elif case == "header longer than the file":
        d = b"\xff\x00\x00\x00\x00\x00\x00\x00{}"
    else:
        delta = dict(decode_tensors(d).tensors)
        decoder = {k: np.array(v) for k, v in decode_tensors(c).tensors.items()}
        if case == "missing key":
            delta.pop("encoder.stages.0.bias")
        elif case == "wrong shape":
            delta["encoder.stages.0.weight"] = np.zeros((4, 3), np.float32)
        elif case == "nan":
            delta["encoder.stages.0.bias"] = np.array([0.0, np.nan, 0.0], np.float32)
        elif case == "inf in decoder":
            decoder["decoder.0.weight"][0, 0] = np.inf
        d = encode_tensors(delta, float_dtype=StoredDtype.F16 if case == "wrong dtype" else StoredDtype.F32)
        c = encode_tensors(decoder)
    return (
        dataclasses.replace(
            m,
            delta=dataclasses.replace(m.delta, sha256=sha256_hex(d)),
            decoder=dataclasses.replace(m.decoder, sha256=sha256_hex(c)),
        ),
        d,
        c,
    )


BAD = [
    "tampered delta",
    "garbage bytes",
    "short file",
    "header longer than the file",
    "missing key",
    "wrong shape",
    "wrong dtype",
    "nan",
    "inf in decoder",
]


@pytest.mark.parametrize("path", ["mean", "cagrad", "task-level"])
@pytest.mark.parametrize("case", BAD)
def test_a_bad_contribution_is_rejected_with_the_same_reason_and_detail_when_streamed(case, path):
    sharing, settings = PATHS[path]
    base, tensors, decoders = _base(["a", "b"], sharing)
    items = _contributions(base, ["a", "b"], decoders, np.random.default_rng(6))
    items[1] = _corrupt(case, *items[1])
    whole, streamed = _both(base, tensors, items, settings)
    assert len(whole.manifest.rejected) == 1
    assert streamed.manifest.to_json() == whole.manifest.to_json()  # same reason and detail
    assert streamed.model_bytes == whole.model_bytes


def test_peak_memory_stays_near_two_models_with_many_groups_on_the_cagrad_path():
    # 8 groups, 2 sites each, a 1 MiB encoder: the whole-model path holds two float64 sums per
    # group (> 30 models); the streamed one the output, its copy and per-key temporaries.
    shapes = {f"encoder.stages.{i}.weight": (128, 256) for i in range(8)}
    tasks = [f"t{i}" for i in range(8)]
    rng = np.random.default_rng(7)
    encoder = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    decoders = {t: {"decoder.0.weight": rng.standard_normal((2, 2)).astype(np.float32)} for t in tasks}
    tensors = layout_global(encoder, decoders, SharingPolicy())
    data = encode_tensors(tensors)
    base = GlobalManifest(
        federation="fed",
        round=0,
        model=FileRef(name=MODEL_FILE, sha256=sha256_hex(data), size=len(data)),
        encoder=ArchSpec(name="toy"),
        encoder_signature=Signature.of_arrays(encoder),
        sharing=SharingPolicy(),
        tasks={
            t: TaskGroupInfo(
                type="toy", params={}, decoder=ArchSpec(name="toy"), decoder_signature=Signature.of_arrays(decoders[t])
            )
            for t in tasks
        },
    )
    items = []
    for i, task in enumerate(tasks):
        for j in range(2):
            delta = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            m, d, c, _, _ = make_contribution(base, f"s{i}-{j}", task, 10, rng, delta=delta, decoder=decoders[task])
            items.append((m, d, c))
    sources = _sources(items, ranged=True)
    model = sum(v.size * 4 for v in tensors.values())
    tracemalloc.start()
    result = aggregate(base, tensors, 1, sources, AggregationSettings(level2_rule=Level2Rule.CAGRAD))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert not result.manifest.rejected
    assert peak < 3 * model, peak / model


def test_storage_open_range_reads_exact_ranges_of_a_local_file_and_refuses_reads_past_its_end(tmp_path):
    from mfed.storage import NotFound, Storage

    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)))
    blob = Storage().open_range(str(path))
    assert blob.size == 256
    assert blob.read(10, 3) == bytes([10, 11, 12]) and blob.read(256, 0) == b""
    with pytest.raises(ValueError, match="outside"):
        blob.read(250, 10)
    with pytest.raises(NotFound):
        Storage().open_range(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "settings",
    [
        AggregationSettings(robust=RobustSettings(rule=RobustRule.MEDIAN)),
        AggregationSettings(robust=RobustSettings(rule=RobustRule.TRIMMED_MEAN, trim=0.25)),
        AggregationSettings(privacy=PrivacySettings(clip_norm=0.7, noise_multiplier=0.9)),
    ],
    ids=["median", "trimmed-mean", "dp"],
)
def test_per_key_rules_give_the_same_bytes_in_slices_of_a_few_values(settings, monkeypatch):
    """Slices of 3 float64 values per site (robust_round.SLICE_BYTES) cut every tensor into many
    pieces: the combined values, and the noise stream drawn slice by slice, are those of one piece."""
    tasks = ["t0", "t1", "t2"]
    base, tensors, decoders = _base(tasks, SharingPolicy(mode=SharingMode.DEPTH, depth=1))
    items = _contributions(base, tasks, decoders, np.random.default_rng(8))

    def run():
        sources = _sources(items, ranged=True, remote_log=[])
        return aggregate(base, tensors, 1, sources, settings, noise_rng=np.random.default_rng(2)).model_bytes

    whole = run()
    monkeypatch.setattr(robust_round, "SLICE_BYTES", 8 * 3 * 2)
    assert robust_round.slices(10, 2) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert run() == whole


def test_hashed_reads_give_the_files_digest_whatever_the_order_of_the_reads():
    data = np.random.default_rng(9).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    expected = hashlib.sha256(data).hexdigest()
    orders = [
        [(0, 10_000)],
        [(0, 8), (0, 300), (300, 5000), (5300, 4700)],  # header, then in file order
        [(6000, 100), (0, 8), (50, 10)],  # a jump ahead (the gap is hashed), then reads behind
        [(100, 900), (500, 2000), (9000, 1000)],  # overlapping reads, then the tail skipped to
        [],  # nothing read: the digest reads it all
    ]
    for reads in orders:
        source = HashedReads(BytesRange(data))
        for offset, length in reads:
            assert source.read(offset, length) == data[offset : offset + length]
        assert source.sha256() == expected, reads
