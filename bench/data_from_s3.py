"""Training from tar shards in S3 through the bounded cache, against the same shards on a disk.

Generates (once, cached under --cache) --mb megabytes of tar shards of 128x128 grey PNGs, starts
a real S3 server (SeaweedFS, 127.0.0.1, a free port, stopped at the end), uploads them, and runs
in fresh processes, each training mfed's `train_local` (small_cnn at 128, one torch thread,
--workers loader processes) for --steps optimizer steps over every shard:

  dir  the shards read from the directory (a PVC's path);
  s3   the shards read from the S3 prefix with a --cache-mib cache, smaller than the data set,
       so shards are evicted and downloaded again as the epoch goes: images/s, the cache's
       largest size on disk (sampled every 50 ms, downloads in flight included), the seconds of
       the counting pass (the trainer plans its steps from the sample count, which for S3 means
       one download of every shard before training), and the trainer's peak PSS.

Ends with one line:

    dataset_mb=<x> cache_mib=<c> peak_cache_mb=<y> s3_throughput_ratio=<r> peak_rss_mb=<z>

    python bench/data_from_s3.py [--mb 320] [--cache-mib 128] [--steps 300] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_loading import tree_pss_mb

SIZE, CLASSES, PER_SHARD = 128, 10, 500
BUCKET = "bench"


def generate(root: Path, megabytes: float) -> tuple[int, int]:
    """The shards (reused when complete); returns (samples, bytes)."""
    import numpy as np
    from PIL import Image

    marker = root / "complete.json"
    if marker.exists() and json.loads(marker.read_text())["mb"] >= megabytes:
        done = json.loads(marker.read_text())
        return int(done["samples"]), int(done["bytes"])
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pattern = [np.roll(np.linspace(0, 120, SIZE), c * 12) for c in range(CLASSES)]
    samples, total, shard = 0, 0, 0
    while total < megabytes * 1e6:
        path = root / f"shard-{shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for _ in range(PER_SHARD):
                c = samples % CLASSES
                pixels = np.clip(pattern[c][None, :] + rng.integers(0, 136, (SIZE, SIZE)), 0, 255).astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(pixels, mode="L").save(png, format="PNG", compress_level=1)
                for name, data in ((f"{samples:08d}.png", png.getvalue()), (f"{samples:08d}.cls", str(c).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
                samples += 1
        total += path.stat().st_size
        shard += 1
    marker.write_text(json.dumps({"mb": megabytes, "samples": samples, "bytes": total}))
    return samples, total


def child(mode: str, args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch

    from mfed.learning.data_root import DataCache, DataRoot, LocalRoot, S3Root
    from mfed.learning.image_folder import BadRecords
    from mfed.learning.model import build_site_model
    from mfed.learning.tar_shards import TarShardSplit, list_shards
    from mfed.learning.train import Objective, train_local
    from mfed.spec import ArchSpec, Regularizer, TaskSpec

    torch.set_num_threads(1)
    cache = DataCache(Path(tempfile.mkdtemp(prefix="bench-cache-")), args.cache_mib * 2**20)
    root: DataRoot = LocalRoot(args.cache) if mode == "dir" else S3Root(f"s3://{BUCKET}/shards", cache)
    peak, peak_cache = [0.0], [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss_mb(os.getpid()))
            peak_cache[0] = max(peak_cache[0], cache.held_bytes())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    torch.manual_seed(0)
    model, task = build_site_model(
        ArchSpec(name="small_cnn", params={"image_size": SIZE}),
        TaskSpec(name="cls10", type="classification"),
        ArchSpec(name="mlp"),
    )
    started = time.perf_counter()
    train = TarShardSplit(root, list_shards(root), (1, SIZE, SIZE), CLASSES, BadRecords(), loader_workers=args.workers)
    counted = time.perf_counter() - started
    objective = Objective(regularizer=Regularizer.NONE, mu=0.0, global_decoder=None)
    common = dict(epochs=1, batch_size=32, learning_rate=1e-3, objective=objective, device=torch.device("cpu"))
    train_local(model, task, train, seed=0, max_steps=3, **common)  # warm-up
    started = time.perf_counter()
    stats = train_local(model, task, train, seed=1, max_steps=args.steps, **common)
    seconds = time.perf_counter() - started
    stop.set()
    result = {"images_per_s": stats.examples / seconds, "examples": stats.examples, "seconds": seconds}
    print(json.dumps({**result, "count_s": counted, "peak_rss_mb": peak[0], "peak_cache_mb": peak_cache[0] / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=320, help="size of the generated shards (default 320)")
    parser.add_argument("--cache-mib", type=int, default=128, help="the S3 run's cache (default 128)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-data/shards"))
    parser.add_argument("--child", choices=["dir", "s3"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return
    from tests.support.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS

    samples, size = generate(args.cache, args.mb)
    print(f"data set: {samples} samples in {len(list(args.cache.glob('*.tar')))} shards, {size / 1e6:.0f} MB")
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as work:
        server = SeaweedFS(Path(work)).start()
        try:
            server.create_bucket(BUCKET)
            client = server.client()
            for path in sorted(args.cache.glob("*.tar")):
                client.upload_file(str(path), BUCKET, f"shards/{path.name}")
            env = {
                **os.environ,
                "MFED_S3_ENDPOINT": server.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            }
            results = {}
            for mode in ("dir", "s3"):
                argv = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
                out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout
                results[mode] = r = json.loads(out.strip().splitlines()[-1])
                print(
                    f"{mode:>4}: {r['images_per_s']:7.1f} images/s over {r['examples']} images ({r['seconds']:.0f} s), "
                    f"counting {r['count_s']:.1f} s, peak PSS {r['peak_rss_mb']:.0f} MB, "
                    f"cache at most {r['peak_cache_mb']:.0f} MiB",
                    flush=True,
                )
        finally:
            server.stop()
    ratio = results["s3"]["images_per_s"] / results["dir"]["images_per_s"]
    print(
        f"dataset_mb={size / 1e6:.0f} cache_mib={args.cache_mib} peak_cache_mb={results['s3']['peak_cache_mb']:.0f} "
        f"s3_throughput_ratio={ratio:.2f} peak_rss_mb={results['s3']['peak_rss_mb']:.0f}"
    )


if __name__ == "__main__":
    main()
