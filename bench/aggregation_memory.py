"""Aggregation time and peak memory, streaming vs. "load everything, then average".

A ResNet-18-sized encoder (~11M parameters, built by mfed's own `resnet` encoder) and two task
groups; 2..64 sites, each contribution a real safetensors file on disk with its manifest. Both
methods read the same files in the same process; the naive baseline decodes every contribution
into memory and averages with numpy, the streaming one is `mfed.aggregation.fedavg.aggregate`.
Peak memory is traced with tracemalloc (numpy reports its buffers to it) in a separate pass
from the timing pass, so tracing does not slow the timed run.

    python bench/aggregation_memory.py [--sites 2,4,8,16,32,64] [--dtype float32|bfloat16]

`--all-paths` measures the operator's path (tensor by tensor over ranged reads of the files,
ContributionSource.open_files) on every level-2 path: mean, cagrad, gated, task-level copies
(mean) and auto (task-level copies + two-track uploads + cagrad), with 2 sites per task group
and `--groups` task groups (default 2,4,16), and ends with the worst peak over the model size:

    python bench/aggregation_memory.py --all-paths [--groups 2,4,16]

`--vs-download` puts the contributions in a real S3 server (SeaweedFS, on 127.0.0.1) and times,
in the same process, the operator's whole aggregation of a round (its `aggregate_round`: read,
validate, aggregate tensor by tensor, write the model) against merely downloading the same
objects (every manifest, delta and decoder, whole, PREFETCH_THREADS at a time, as the
operator's prefetch does), for the default encoder (small files: read whole) and the ResNet-18
one (43 MiB deltas: ranged reads), and ends with the worst ratio:

    python bench/aggregation_memory.py --vs-download [--sites 8,32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mfed.aggregation.crosstask import Level2Rule
from mfed.aggregation.fedavg import AggregationSettings, ContributionSource, aggregate
from mfed.aggregation.ownership import layout_global
from mfed.aggregation.robust import RobustRule, RobustSettings
from mfed.artifacts.layout import DECODER_FILE, DELTA_FILE, MODEL_FILE
from mfed.artifacts.manifest import ContributionManifest, FileRef, GlobalManifest, TaskGroupInfo
from mfed.artifacts.ranged import FileRange
from mfed.artifacts.signature import Signature
from mfed.artifacts.tensorfile import StoredDtype, decode_tensors, encode_tensors, sha256_hex
from mfed.privacy.settings import PrivacySettings
from mfed.spec import ArchSpec, SharingPolicy

TASKS = ("cls", "seg")
SITES_PER_GROUP = 2


def resnet_shapes() -> dict[str, tuple[int, ...]]:
    from mfed.learning.encoders import build_encoder

    encoder = build_encoder(ArchSpec(name="resnet"))
    return {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}


def make_base(
    shapes: dict[str, tuple[int, ...]], tasks: tuple[str, ...] = TASKS, sharing: SharingPolicy = SharingPolicy()
) -> tuple[GlobalManifest, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    encoder = {k: rng.standard_normal(s, dtype=np.float32) * 0.01 for k, s in shapes.items()}
    decoders = {t: {"decoder.0.weight": rng.standard_normal((10, 512), dtype=np.float32)} for t in tasks}
    tensors = layout_global(encoder, decoders, sharing)
    data = encode_tensors(tensors)
    manifest = GlobalManifest(
        federation="bench",
        round=0,
        model=FileRef(name=MODEL_FILE, sha256=sha256_hex(data), size=len(data)),
        encoder=ArchSpec(name="resnet"),
        encoder_signature=Signature.of_arrays(encoder),
        sharing=sharing,
        tasks={
            t: TaskGroupInfo(
                type="classification",
                params={},
                decoder=ArchSpec(name="mlp"),
                decoder_signature=Signature.of_arrays(decoders[t]),
            )
            for t in tasks
        },
    )
    return manifest, dict(decode_tensors(data).tensors)


def write_contributions(
    base: GlobalManifest,
    shapes: dict[str, tuple[int, ...]],
    count: int,
    folder: Path,
    dtype: StoredDtype,
    tasks: tuple[str, ...] = TASKS,
    two_track: bool = False,
) -> list[ContributionManifest]:
    manifests = []
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        site, task = f"site-{i:03d}", tasks[i % len(tasks)]
        delta_values = {k: rng.standard_normal(s, dtype=np.float32) * 1e-3 for k, s in shapes.items()}
        decoder_values = {"decoder.0.weight": rng.standard_normal((10, 512), dtype=np.float32)}
        if two_track:  # auto's sites upload their shared track beside their task-level one
            delta_values |= {f"shared.{k}": v * 0.5 for k, v in delta_values.items()}
            decoder_values |= {f"shared.{k}": v for k, v in decoder_values.items()}
        delta = encode_tensors(delta_values, float_dtype=dtype)
        decoder = encode_tensors(decoder_values)
        del delta_values, decoder_values
        (folder / f"{site}.delta").write_bytes(delta)
        (folder / f"{site}.decoder").write_bytes(decoder)
        manifests.append(
            ContributionManifest(
                federation="bench",
                round=1,
                site=site,
                task=task,
                task_type="classification",
                samples=100 + i,
                base_digest=base.digest,
                encoder_signature=base.encoder_signature.digest,
                decoder_signature=base.tasks[task].decoder_signature.digest,
                delta=FileRef(name=DELTA_FILE, sha256=sha256_hex(delta), size=len(delta)),
                decoder=FileRef(name=DECODER_FILE, sha256=sha256_hex(decoder), size=len(decoder)),
                delta_dtype=dtype.value,
            )
        )
    return manifests


def streaming(
    base: GlobalManifest, tensors: dict[str, np.ndarray], manifests: list[ContributionManifest], folder: Path
) -> dict[str, np.ndarray]:
    def source(m: ContributionManifest) -> ContributionSource:
        return ContributionSource(
            site=m.site,
            read_manifest=lambda: m,
            read_files=lambda _: (
                (folder / f"{m.site}.delta").read_bytes(),
                (folder / f"{m.site}.decoder").read_bytes(),
            ),
        )

    result = aggregate(base, tensors, 1, [source(m) for m in manifests])
    assert not result.manifest.rejected
    return dict(result.tensors)


def naive(
    base: GlobalManifest, tensors: dict[str, np.ndarray], manifests: list[ContributionManifest], folder: Path
) -> dict[str, np.ndarray]:
    """Load every contribution, then average: FedAvg per task, uniform mean of the tasks."""
    loaded = [(m, decode_tensors((folder / f"{m.site}.delta").read_bytes()).tensors) for m in manifests]
    out = {}
    for key in (k for k in tensors if k.startswith("encoder.")):
        group_means = []
        for task in TASKS:
            members = [(m.samples, d[key]) for m, d in loaded if m.task == task]
            group_means.append(np.average(np.stack([d for _, d in members]), axis=0, weights=[n for n, _ in members]))
        out[key] = (tensors[key] + np.mean(np.stack(group_means), axis=0)).astype(np.float32)
    return out


def measure(fn: Callable[[], dict[str, np.ndarray]]) -> tuple[float, int, dict[str, np.ndarray]]:
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak, result


PATHS: dict[str, tuple[SharingPolicy, AggregationSettings, bool]] = {
    "mean": (SharingPolicy(), AggregationSettings(), False),
    "cagrad": (SharingPolicy(), AggregationSettings(level2_rule=Level2Rule.CAGRAD), False),
    "gated": (SharingPolicy(), AggregationSettings(level2_rule=Level2Rule.GATED), False),
    "task-level": (SharingPolicy(task_level=True), AggregationSettings(), False),
    "auto": (SharingPolicy(task_level=True), AggregationSettings(level2_rule=Level2Rule.CAGRAD), True),
    "median": (SharingPolicy(), AggregationSettings(robust=RobustSettings(rule=RobustRule.MEDIAN)), False),
    "trimmed": (
        SharingPolicy(),
        AggregationSettings(robust=RobustSettings(rule=RobustRule.TRIMMED_MEAN, norm_factor=3.0)),
        False,
    ),
    "dp": (SharingPolicy(), AggregationSettings(privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=1.0)), False),
}


def ranged(
    base: GlobalManifest,
    tensors: dict[str, np.ndarray],
    manifests: list[ContributionManifest],
    folder: Path,
    settings: AggregationSettings,
) -> None:
    """The operator's path: each contribution read by ranges (here from disk, in the operator S3)."""

    def source(m: ContributionManifest) -> ContributionSource:
        return ContributionSource(
            site=m.site,
            read_manifest=lambda: m,
            read_files=lambda _: (
                (folder / f"{m.site}.delta").read_bytes(),
                (folder / f"{m.site}.decoder").read_bytes(),
            ),
            open_files=lambda _: (FileRange(folder / f"{m.site}.delta"), FileRange(folder / f"{m.site}.decoder")),
        )

    result = aggregate(base, tensors, 1, [source(m) for m in manifests], settings)
    assert not result.manifest.rejected


def all_paths(groups: list[int], dtype: StoredDtype, only: list[str] | None = None) -> None:
    shapes = resnet_shapes()
    columns = (("path", 10), ("groups", 6), ("sites", 5), ("seconds", 7), ("peak MiB", 8), ("model MiB", 9))
    print("  ".join(f"{name:>{width}}" for name, width in columns) + f"  {'peak/model':>10}")
    worst = (0.0, "", 0)
    for count in groups:
        tasks = tuple(f"task-{i:02d}" for i in range(count))
        for name, (sharing, settings, two_track) in PATHS.items():
            if only and name not in only:
                continue
            base, tensors = make_base(shapes, tasks, sharing)
            model = sum(v.size * 4 for v in tensors.values())
            with tempfile.TemporaryDirectory(prefix="mfed-bench-") as tmp:
                folder = Path(tmp)
                manifests = write_contributions(
                    base, shapes, SITES_PER_GROUP * count, folder, dtype, tasks, two_track=two_track
                )
                tracemalloc.start()
                started = time.perf_counter()
                ranged(base, tensors, manifests, folder, settings)
                seconds = time.perf_counter() - started
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            ratio = peak / model
            worst = max(worst, (ratio, name, count))
            print(
                f"{name:>10}  {count:>6}  {len(manifests):>5}  {seconds:>7.1f}  {peak / 2**20:>8.0f}  "
                f"{model / 2**20:>9.0f}  {ratio:>10.2f}",
                flush=True,
            )
    print(f"worst_peak_over_model={worst[0]:.2f} path={worst[1]} groups={worst[2]}")


def small_cnn_shapes() -> dict[str, tuple[int, ...]]:
    from mfed.learning.encoders import build_encoder

    encoder = build_encoder(ArchSpec(name="small_cnn"))
    return {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}


def vs_download(counts: list[int], dtype: StoredDtype, repeats: int = 3) -> None:
    """Aggregation wall time over the time to download its objects, from a real S3 server."""
    from concurrent.futures import ThreadPoolExecutor

    from mfed_operator.adapters.dataplane import PREFETCH_THREADS, CountingStorage, aggregate_round
    from mfed_operator.domain.actions import Aggregate, Aggregated

    from mfed.artifacts.layout import MANIFEST_FILE, join
    from mfed.model_store import GlobalModel
    from mfed.storage import S3Settings, Storage

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests/support
    from tests.support.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS

    print(
        f"{'encoder':>9}  {'sites':>5}  {'MiB read':>8}  {'download s':>10}  {'aggregate s':>11}  "
        f"{'aggregate/download':>18}"
    )
    worst = (0.0, "", 0)
    with tempfile.TemporaryDirectory(prefix="mfed-bench-s3-") as tmp:
        server = SeaweedFS(Path(tmp) / "weed")
        try:
            server.start()
            server.create_bucket("bench")
            settings = S3Settings(endpoint=server.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
            storage = Storage(settings)
            for encoder, shapes in (("small_cnn", small_cnn_shapes()), ("resnet", resnet_shapes())):
                base, tensors = make_base(shapes)
                for count in counts:
                    folder = Path(tmp) / f"{encoder}-{count}"
                    folder.mkdir()
                    manifests = write_contributions(base, shapes, count, folder, dtype)
                    prefixes = {m.site: f"s3://bench/{encoder}/{count}/r1/sites/{m.site}" for m in manifests}
                    objects = []
                    for m in manifests:
                        prefix = prefixes[m.site]
                        for name, data in (
                            (DELTA_FILE, (folder / f"{m.site}.delta").read_bytes()),
                            (DECODER_FILE, (folder / f"{m.site}.decoder").read_bytes()),
                            (MANIFEST_FILE, m.to_json().encode()),
                        ):
                            storage.write(join(prefix, name), data)
                            objects.append(join(prefix, name))
                    for path in folder.iterdir():
                        path.unlink()

                    def download(objects: list[str] = objects) -> int:
                        with ThreadPoolExecutor(max_workers=PREFETCH_THREADS) as pool:
                            return sum(len(b) for b in pool.map(storage.read, objects))

                    action = Aggregate(
                        sites=tuple(sorted(prefixes)),
                        site_prefixes=prefixes,
                        base_uri="(in memory)",
                        output=f"s3://bench/{encoder}/{count}/r1/global",
                        round_number=1,
                        min_sites=count,
                        settings=AggregationSettings(),
                    )
                    model = GlobalModel(manifest=base, tensors=tensors)
                    down_times, agg_times = [], []
                    read = 0
                    for _ in range(repeats):  # interleaved, so drift on the machine hits both alike
                        started = time.perf_counter()
                        read = download()
                        down_times.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        result = aggregate_round(CountingStorage(storage), model, action)
                        agg_times.append(time.perf_counter() - started)
                        assert isinstance(result, Aggregated) and not result.rejected, result
                    down, agg = min(down_times), min(agg_times)
                    worst = max(worst, (agg / down, encoder, count))
                    print(
                        f"{encoder:>9}  {count:>5}  {read / 2**20:>8.0f}  {down:>10.2f}  {agg:>11.2f}  "
                        f"{agg / down:>18.2f}",
                        flush=True,
                    )
        finally:
            server.stop()
    print(f"worst_aggregation_over_download={worst[0]:.2f} encoder={worst[1]} sites={worst[2]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="2,4,8,16,32,64")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--all-paths", action="store_true", help="every level-2 path, tensor by tensor")
    parser.add_argument("--groups", default="2,4,16", help="task-group counts for --all-paths")
    parser.add_argument("--paths", help=f"comma-separated subset of --all-paths ({','.join(PATHS)})")
    parser.add_argument(
        "--vs-download", action="store_true", help="aggregation time over download time, real S3 (--sites)"
    )
    args = parser.parse_args()
    if args.vs_download:
        sites = "8,32" if args.sites == parser.get_default("sites") else args.sites
        vs_download([int(c) for c in sites.split(",")], StoredDtype.parse(args.dtype))
        return
    if args.all_paths:
        only = [p.strip() for p in args.paths.split(",")] if args.paths else None
        all_paths([int(g) for g in args.groups.split(",")], StoredDtype.parse(args.dtype), only)
        return
    counts = [int(c) for c in args.sites.split(",")]
    dtype = StoredDtype.parse(args.dtype)
    shapes = resnet_shapes()
    params = sum(int(np.prod(s)) for s in shapes.values())
    base, tensors = make_base(shapes)
    model_mb = params * 4 / 2**20
    print(f"encoder: resnet, {params / 1e6:.2f}M parameters ({model_mb:.0f} MiB as float32); deltas as {dtype.value}")
    print(
        f"{'sites':>5}  {'stream s':>9}  {'naive s':>8}  {'time x':>6}  "
        f"{'stream MiB':>10}  {'naive MiB':>9}  {'memory x':>8}  {'stream/model':>12}"
    )
    with tempfile.TemporaryDirectory(prefix="mfed-bench-") as tmp:
        folder = Path(tmp)
        for count in counts:
            manifests = write_contributions(base, shapes, count, folder, dtype)
            s_time, s_peak, s_out = measure(lambda m=manifests: streaming(base, tensors, m, folder))
            n_time, n_peak, n_out = measure(lambda m=manifests: naive(base, tensors, m, folder))
            worst = max(float(np.max(np.abs(s_out[k] - n_out[k]))) for k in n_out)
            assert worst < 1e-5, f"streaming and naive disagree by {worst}"
            print(
                f"{count:>5}  {s_time:>9.2f}  {n_time:>8.2f}  {s_time / n_time:>6.2f}  "
                f"{s_peak / 2**20:>10.0f}  {n_peak / 2**20:>9.0f}  {s_peak / n_peak:>8.2f}  "
                f"{s_peak / 2**20 / model_mb:>12.1f}"
            )
            for path in folder.iterdir():
                path.unlink()


if __name__ == "__main__":
    main()
