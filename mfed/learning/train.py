"""Local training with the M-Fed objective, and evaluation.

    L_k = mean task loss of D_k(E_k(x)) + (mu/2) * ||theta(D_k) - theta(D_tau)||^2      (l2)
    L_k = mean task loss + mu * d(D_k(E_k(x)), D_tau(E_k(x)))                             (distill)

D_tau, the task's global decoder from the last round, is frozen during the round. Losses are
accumulated on the device: the only host syncs are at the end of training. On CUDA training runs
in float32 (cuDNN convolutions in TF32, PyTorch's default), not under bf16 autocast: for these
small models autocast was slower, 0.88x on the default encoder and 0.98x on ResNet-18
(`bench/trainer_throughput.py` on an H100, docs/results.md), and it rounded what evaluation
measures (PSNR) to bf16.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mfed.learning.augment import augment as augment_batch
from mfed.learning.data import DataError, Examples, Split
from mfed.learning.model import SiteModel
from mfed.learning.tar_shards import TarShardSplit
from mfed.learning.tasks import Task
from mfed.seeding import derive_seed
from mfed.spec import AugmentSpec, Regularizer

ProgressCallback = Callable[[int, int], None]  # (steps done, steps total)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
    return device


@dataclass(frozen=True, kw_only=True)
class Objective:
    regularizer: Regularizer
    mu: float
    global_decoder: nn.Module | None  # D_tau, frozen; required unless regularizer is none

    def __post_init__(self) -> None:
        if self.regularizer is not Regularizer.NONE and self.mu > 0 and self.global_decoder is None:
            raise ValueError("the decoder regulariser needs the task's global decoder")

    @property
    def active(self) -> bool:
        return self.regularizer is not Regularizer.NONE and self.mu > 0


@dataclass(frozen=True, kw_only=True)
class TrainStats:
    steps: int
    examples: int
    task_loss: float
    regularizer_loss: float
    total_loss: float
    seconds: float


def decoder_distance(decoder: nn.Module, global_decoder: nn.Module) -> torch.Tensor:
    """||theta(D_k) - theta(D_tau)||^2 over all decoder parameters, in float32."""
    total = torch.zeros((), device=next(decoder.parameters()).device)
    for local, shared in zip(decoder.parameters(), global_decoder.parameters(), strict=True):
        total = total + (local.float() - shared.detach().float()).pow(2).sum()
    return total


def compute_losses(
    model: SiteModel, task: Task, inputs: torch.Tensor, targets: torch.Tensor, objective: Objective
) -> dict[str, torch.Tensor]:
    """Per-term losses and their total (the dict shape multi-task code bases use)."""
    features = model.encoder(inputs)
    prediction = model.decoder(features)
    task_loss = task.loss(prediction, targets)
    regularizer = torch.zeros((), device=task_loss.device)
    if objective.active:
        assert objective.global_decoder is not None
        if objective.regularizer is Regularizer.L2:
            regularizer = 0.5 * objective.mu * decoder_distance(model.decoder, objective.global_decoder)
        else:
            with torch.no_grad():
                teacher = objective.global_decoder(features.detach())
            regularizer = objective.mu * task.distill(prediction, teacher)
    return {"task": task_loss, "regularizer": regularizer, "total": task_loss + regularizer}


def planned_steps(
    samples: int, *, epochs: int, batch_size: int, min_steps: int = 0, max_steps: int | None = None
) -> int:
    """Optimizer steps a site takes in a round: `epochs` passes over its training split, at least
    `min_steps` (more passes for small sites), never more than `max_steps`."""
    steps = max(epochs * -(-samples // batch_size), min_steps)
    return steps if max_steps is None else min(steps, max_steps)


def shared_track_steps(task_steps: int, shared_steps: int | None) -> int:
    """Steps of a two-track site's shared track: its task track's, capped by `shared_steps`."""
    return task_steps if shared_steps is None else min(task_steps, shared_steps)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def train_local(
    model: SiteModel,
    task: Task,
    train: Examples,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    objective: Objective,
    device: torch.device,
    seed: int,
    max_steps: int | None = None,
    progress: ProgressCallback | None = None,
    augment: AugmentSpec | None = None,
) -> TrainStats:
    """Train `max_steps` (at most `epochs` passes); `augment` transforms each training batch
    (never validation or test data: evaluate() has no such argument)."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    if objective.global_decoder is not None:
        objective.global_decoder.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    steps_per_epoch = -(-len(train) // batch_size)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    sums = {"task": torch.zeros((), device=device), "regularizer": torch.zeros((), device=device)}
    steps = examples = 0
    pin = device.type == "cuda"
    while steps < total_steps:
        # the epoch's order is drawn before its batches' augmentations, whatever the source
        source: Iterator[tuple[torch.Tensor, torch.Tensor]]
        if isinstance(train, TarShardSplit):  # a stream: its own seeded shard order and buffer
            epoch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            source = itertools.islice(train.stream(batch_size, epoch_seed, pin), total_steps - steps)
        else:
            source = train.batches(_batches(len(train), batch_size, generator)[: total_steps - steps], pin=pin)
        for x, y in source:
            if augment is not None and augment.active:
                x = augment_batch(x, augment, generator)
            inputs, targets = task.train_pairs(x, y, generator)
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            losses = compute_losses(model, task, inputs, targets, objective)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            sums["task"] += losses["task"].detach() * len(x)
            sums["regularizer"] += losses["regularizer"].detach() * len(x)
            steps += 1
            examples += len(x)
            if progress is not None:
                progress(steps, total_steps)
        if steps == 0:
            raise DataError("no training batch was left: every record of the epoch was bad")
    task_loss = float(sums["task"]) / max(examples, 1)
    reg_loss = float(sums["regularizer"]) / max(examples, 1)
    return TrainStats(
        steps=steps,
        examples=examples,
        task_loss=task_loss,
        regularizer_loss=reg_loss,
        total_loss=task_loss + reg_loss,
        seconds=time.perf_counter() - started,
    )


@torch.no_grad()
def evaluate(
    model: SiteModel,
    task: Task,
    split: Examples,
    *,
    device: torch.device,
    seed: int,
    batch_size: int = 500,
) -> float:
    """The task metric over a split (deterministic: eval transforms are seeded)."""
    model.to(device).eval()
    if not isinstance(split, Split):  # decoded chunk by chunk, each chunk's transforms seeded
        total, count = torch.zeros((), device=device), 0
        if isinstance(split, TarShardSplit):
            stream = split.stream(batch_size, seed=None)  # in shard order, no shuffle
        else:
            stream = split.batches(
                [torch.arange(i, min(i + batch_size, len(split))) for i in range(0, len(split), batch_size)]
            )
        for number, (x, y) in enumerate(stream):
            inputs, targets = task.eval_pairs(x, y, derive_seed(seed, "chunk", number))
            total += task.metric_sum(model(inputs.to(device)), targets.to(device))
            count += len(x)
        return float(total) / max(count, 1)
    x_all, y_all = torch.from_numpy(split.x), torch.from_numpy(split.y)
    inputs_all, targets_all = task.eval_pairs(x_all, y_all, seed)
    total = torch.zeros((), device=device)
    for start in range(0, len(split), batch_size):
        inputs = inputs_all[start : start + batch_size].to(device, non_blocking=True)
        targets = targets_all[start : start + batch_size].to(device, non_blocking=True)
        prediction = model(inputs)
        total += task.metric_sum(prediction, targets)
    return float(total) / max(len(split), 1)


def metric_is_better(task: Task, candidate: float, incumbent: float | None) -> bool:
    if incumbent is None or not np.isfinite(incumbent):
        return True
    return candidate > incumbent if task.higher_is_better else candidate < incumbent
