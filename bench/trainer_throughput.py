"""Local-training throughput of the site trainer, on CPU or CUDA.

Runs mfed's own `train_local` (the loop every site Job runs) for a fixed number of steps and
prints images per second. The trainer trains in float32 (on CUDA with cuDNN's TF32 convolutions,
PyTorch's default); on CUDA this also times the same loop under bf16 autocast, run in the same
process (ratio > 1 would mean bf16 is faster: measured 0.88-0.98 on an H100, which is why the
trainer does not use it; docs/results.md). On CPU only float32 runs.

    python bench/trainer_throughput.py [--device auto|cpu|cuda] [--steps 50]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from mfed.learning.data import Split
from mfed.learning.model import build_site_model
from mfed.learning.train import Objective, pick_device, train_local
from mfed.spec import ArchSpec, Regularizer, TaskSpec

CASES = [
    ("small_cnn 28x28 cls10", ArchSpec(name="small_cnn"), (1, 28, 28), 32),
    ("small_cnn 28x28 cls10", ArchSpec(name="small_cnn"), (1, 28, 28), 256),
    ("resnet-18 32x32 cls10", ArchSpec(name="resnet"), (3, 32, 32), 128),
]


def run(
    encoder: ArchSpec, shape: tuple[int, int, int], batch: int, steps: int, device: torch.device, *, bf16: bool
) -> float:
    torch.manual_seed(0)
    model, task = build_site_model(
        encoder, TaskSpec(name="cls10", type="classification"), ArchSpec(name="mlp", params={})
    )
    rng = np.random.default_rng(0)
    n = batch * 8
    split = Split(rng.random((n, *shape), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64))
    objective = Objective(regularizer=Regularizer.NONE, mu=0.0, global_decoder=None)
    kwargs = dict(epochs=10_000, batch_size=batch, learning_rate=1e-3, objective=objective, device=device, seed=0)
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with precision:
        train_local(model, task, split, max_steps=5, **kwargs)  # warm-up (cudnn autotune, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    with precision:
        stats = train_local(model, task, split, max_steps=steps, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return stats.examples / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}, torch {torch.__version__}")
    print(f"{'case':<24} {'batch':>5}  {'fp32 img/s':>11}  {'bf16 img/s':>11}  {'bf16/fp32':>9}")
    for label, encoder, shape, batch in CASES:
        fp32 = run(encoder, shape, batch, args.steps, device, bf16=False)
        if device.type == "cuda":
            bf16 = run(encoder, shape, batch, args.steps, device, bf16=True)
            print(f"{label:<24} {batch:>5}  {fp32:>11.0f}  {bf16:>11.0f}  {bf16 / fp32:>9.2f}")
        else:
            print(f"{label:<24} {batch:>5}  {fp32:>11.0f}  {'-':>11}  {'-':>9}")


if __name__ == "__main__":
    main()
