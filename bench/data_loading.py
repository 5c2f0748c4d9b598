"""Training from an image folder larger than the trainer's memory, against the in-memory .npz path.

Generates (once, cached under --cache) a class-folder data set of --gb gigabytes of 128x128
grey PNGs (noise over a class pattern: PNG cannot compress it much, so the bytes on disk are
real), then runs, each in a fresh process so neither inflates the other's memory:

  npz     the in-memory path on a subset that fits (--subset images, read whole, as today's
          .npz sites are), `--steps` optimizer steps: images/s;
  folder  the streaming path (mfed.learning.image_folder, --workers decoding processes) over
          the WHOLE folder (every file listed and shuffled in; `--steps` batches drawn from all
          of them, --epoch for a full pass): images/s, and the peak memory of the trainer and
          its loader workers together, sampled from /proc every 50 ms as the sum of their PSS
          (proportional set size: a page the forked workers share with the trainer counts once
          in total, as a container's memory cgroup counts it; summing RSS would count torch's
          pages once per process).

Both train mfed's own `train_local` on the default encoder (small_cnn, at image_size 128) with
the same batch size on one CPU thread for the model. Ends with one line:

    dataset_gb=<x> peak_rss_mb=<y> bound_mb=<z> throughput_ratio=<r>

    python bench/data_loading.py [--gb 4.2] [--bound-mb 1024] [--workers 2] [--cache runs/bench-data]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = 128
CLASSES = 10
ENCODER = {"name": "small_cnn", "params": {"image_size": SIZE}}


def generate(root: Path, gigabytes: float) -> tuple[int, float]:
    """The folder (reused when its marker says it is complete); returns (files, bytes on disk / 1e9)."""
    import numpy as np
    from PIL import Image

    marker = root / "complete.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done["gb"] >= gigabytes:
            return int(done["files"]), float(done["bytes"]) / 1e9
    rng = np.random.default_rng(0)
    total, files = 0, 0
    for c in range(CLASSES):
        (root / f"class-{c}").mkdir(parents=True, exist_ok=True)
    pattern = [np.roll(np.linspace(0, 120, SIZE), c * 12) for c in range(CLASSES)]
    started = time.perf_counter()
    while total < gigabytes * 1e9:
        c = files % CLASSES
        pixels = np.clip(pattern[c][None, :] + rng.integers(0, 136, (SIZE, SIZE)), 0, 255).astype(np.uint8)
        path = root / f"class-{c}" / f"{files:08d}.png"
        Image.fromarray(pixels, mode="L").save(path, compress_level=1)
        total += path.stat().st_size
        files += 1
        if files % 20000 == 0:
            print(f"generated {files} files, {total / 1e9:.2f} GB ({time.perf_counter() - started:.0f} s)", flush=True)
    marker.write_text(json.dumps({"gb": gigabytes, "files": files, "bytes": total}))
    return files, total / 1e9


def tree_pss_mb(pid: int) -> float:
    """PSS of `pid` and its children (the loader workers) summed, in MB."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(p) for p in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def child(mode: str, args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import numpy as np
    import torch

    from mfed.learning.data import Split, as_images
    from mfed.learning.data_root import LocalRoot
    from mfed.learning.image_folder import BadRecords, ImageFolderSplit, list_class_folders
    from mfed.learning.model import build_site_model
    from mfed.learning.train import Objective, train_local
    from mfed.spec import ArchSpec, Regularizer, TaskSpec

    torch.set_num_threads(1)
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_pss_mb(os.getpid()))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    torch.manual_seed(0)
    model, task = build_site_model(
        ArchSpec(name=ENCODER["name"], params=ENCODER["params"]),
        TaskSpec(name="cls10", type="classification"),
        ArchSpec(name="mlp"),
    )
    root = LocalRoot(args.cache)
    records, _ = list_class_folders(root, BadRecords())
    files = len(records)
    objective = Objective(regularizer=Regularizer.NONE, mu=0.0, global_decoder=None)
    common = dict(epochs=1, batch_size=args.batch, learning_rate=1e-3, objective=objective, device=torch.device("cpu"))
    if mode == "npz":
        from PIL import Image

        chosen = records[: args.subset]
        x = np.stack([np.asarray(Image.open(args.cache / r.key)) for r in chosen])
        y = np.array([r.target for r in chosen], dtype=np.int64)
        train: Split | ImageFolderSplit = Split(as_images(x, "subset"), y)
        del x
        steps = args.steps
    else:
        train = ImageFolderSplit(root, records, (1, SIZE, SIZE), BadRecords(), loader_workers=args.workers)
        steps = -(-files // args.batch) if args.epoch else args.steps  # --epoch: every file, once
    del records  # what the streaming path keeps is in the split's arrays
    train_local(model, task, train, seed=0, max_steps=3, **common)  # warm-up
    started = time.perf_counter()
    stats = train_local(model, task, train, seed=1, max_steps=steps, **common)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    result = {"images_per_s": stats.examples / seconds, "examples": stats.examples, "seconds": seconds}
    print(json.dumps({**result, "peak_rss_mb": peak[0], "files": files}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=4.2, help="size of the generated folder (default 4.2)")
    parser.add_argument("--bound-mb", type=float, default=1024, help="the trainer's memory limit to stay under")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of the streaming path")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--subset", type=int, default=6000, help="images of the in-memory run")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    parser.add_argument("--epoch", action="store_true", help="the folder run reads every file once")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-data/images"))
    parser.add_argument("--child", choices=["npz", "folder"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return
    files, gigabytes = generate(args.cache, args.gb)
    print(f"data set: {files} PNG files, {gigabytes:.2f} GB under {args.cache}", flush=True)
    results = {}
    for mode in ("npz", "folder"):
        argv = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[mode] = json.loads(out)
        r = results[mode]
        print(
            f"{mode:>6}: {r['images_per_s']:8.1f} images/s over {r['examples']} images ({r['seconds']:.0f} s), "
            f"peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    ratio = results["folder"]["images_per_s"] / results["npz"]["images_per_s"]
    print(
        f"dataset_gb={gigabytes:.2f} peak_rss_mb={results['folder']['peak_rss_mb']:.0f} "
        f"bound_mb={args.bound_mb:.0f} throughput_ratio={ratio:.2f}"
    )


if __name__ == "__main__":
    main()
