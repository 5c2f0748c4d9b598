"""Aggregation time and peak memory, streaming vs. "load everything, then average".

A ResNet-18-sized encoder (~11M parameters, built by mfed's own `resnet` encoder) and two task
groups; 2..64 sites, each contribution a real safetensors file on disk with its manifest. Both
methods read the same files in the same process; the naive baseline decodes every contribution
into memory and averages with numpy, the streaming one is `mfed.aggregation.fedavg.aggregate`.
Peak memory is traced with tracemalloc (numpy reports its buffers to it) in a separate pass
from the timing pass, so tracing does not slow the timed run.

    python bench/aggregation_memory.py [--sites 2,4,8,16,32,64] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mfed.aggregation.fedavg import ContributionSource, aggregate
from mfed.aggregation.ownership import layout_global
from mfed.artifacts.layout import DECODER_FILE, DELTA_FILE, MODEL_FILE
from mfed.artifacts.manifest import ContributionManifest, FileRef, GlobalManifest, TaskGroupInfo
from mfed.artifacts.signature import Signature
from mfed.artifacts.tensorfile import StoredDtype, decode_tensors, encode_tensors, sha256_hex
from mfed.spec import ArchSpec, SharingPolicy

TASKS = ("cls", "seg")


def resnet_shapes() -> dict[str, tuple[int, ...]]:
    from mfed.learning.encoders import build_encoder

    encoder = build_encoder(ArchSpec(name="resnet"))
    return {f"encoder.{k}": tuple(v.shape) for k, v in encoder.state_dict().items()}


def make_base(shapes: dict[str, tuple[int, ...]]) -> tuple[GlobalManifest, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    encoder = {k: rng.standard_normal(s, dtype=np.float32) * 0.01 for k, s in shapes.items()}
    decoders = {t: {"decoder.0.weight": rng.standard_normal((10, 512), dtype=np.float32)} for t in TASKS}
    tensors = layout_global(encoder, decoders, SharingPolicy())
    data = encode_tensors(tensors)
    manifest = GlobalManifest(
        federation="bench",
        round=0,
        model=FileRef(name=MODEL_FILE, sha256=sha256_hex(data), size=len(data)),
        encoder=ArchSpec(name="resnet"),
        encoder_signature=Signature.of_arrays(encoder),
        sharing=SharingPolicy(),
        tasks={
            t: TaskGroupInfo(
                type="classification",
                params={},
                decoder=ArchSpec(name="mlp"),
                decoder_signature=Signature.of_arrays(decoders[t]),
            )
            for t in TASKS
        },
    )
    return manifest, dict(decode_tensors(data).tensors)


def write_contributions(
    base: GlobalManifest, shapes: dict[str, tuple[int, ...]], count: int, folder: Path, dtype: StoredDtype
) -> list[ContributionManifest]:
    manifests = []
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        site, task = f"site-{i:03d}", TASKS[i % len(TASKS)]
        delta = encode_tensors(
            {k: rng.standard_normal(s, dtype=np.float32) * 1e-3 for k, s in shapes.items()}, float_dtype=dtype
        )
        decoder = encode_tensors({"decoder.0.weight": rng.standard_normal((10, 512), dtype=np.float32)})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="2,4,8,16,32,64")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
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
