"""The ceiling: one multi-task model trained on every site's data pooled. Not deployable.

It moves data, which is what a federation exists not to do; it answers how much cross-task
transfer the setting holds at all, so a federated method's gain can be read as a share of what
was possible (mfed.pilot.report: "share of the oracle's gain"). Same rules as every method:

- one encoder (the pilot's), one decoder per task (each task's decoder spec);
- the same compute: a round is `config.round_steps` optimizer steps for every site, so the
  pooled model takes (sites x round_steps) steps a round, each on a batch of one task's pooled
  training data, the tasks interleaved site by site (a task with more sites gets more steps);
- one Adam optimizer over the whole model, kept across rounds (a central run never restarts);
- every site picks its round on its OWN validation split (the same selection rule as the
  federations) and reports that round's score on its own test split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mfed.learning.data import SiteData, Split
from mfed.learning.model import SiteModel, build_site_model
from mfed.learning.tasks import Task
from mfed.learning.train import evaluate, pick_device
from mfed.methods import Method
from mfed.pilot.config import PilotConfig
from mfed.pilot.records import CurvePoint, MethodRun
from mfed.seeding import derive_seed


@dataclass(frozen=True)
class PooledTask:
    task: Task
    model: SiteModel  # the shared encoder + this task's decoder
    train: Split  # every site's training split of this task, concatenated in site order


def pooled_schedule(site_tasks: Sequence[str], round_steps: int) -> list[str]:
    """The task of each step of one round: sites in turn, `round_steps` times, so task t gets
    (its sites x round_steps) steps, spread evenly through the round."""
    return [task for _ in range(round_steps) for task in site_tasks]


def pool_by_task(sites: Sequence[tuple[str, str]], data: Mapping[str, SiteData]) -> dict[str, Split]:
    """(site, task) in order -> each task's training splits concatenated (site order kept)."""
    parts: dict[str, list[Split]] = {}
    for site, task in sites:
        train = data[site].train
        if not isinstance(train, Split):
            raise ValueError(f"site {site}: the centralized reference pools data held in memory (the pilot's)")
        parts.setdefault(task, []).append(train)
    return {
        task: Split(x=np.concatenate([p.x for p in splits]), y=np.concatenate([p.y for p in splits]))
        for task, splits in parts.items()
    }


class _Batches:
    """Endless seeded epochs over one split, `batch_size` indices at a time."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator) -> None:
        self.size, self.batch_size, self.generator = size, batch_size, generator

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            order = torch.randperm(self.size, generator=self.generator)
            for start in range(0, self.size, self.batch_size):
                yield order[start : start + self.batch_size]


def run_centralized(
    config: PilotConfig,
    seed: int,
    data: Mapping[str, SiteData],
    higher_is_better: Mapping[str, bool],
    sites: Sequence[tuple[str, str]],
    select: Callable[[MethodRun, str, int, int, dict[str, float], bool, str], bool],
    checkpoints: Mapping[int, int],
    on_site_round: Callable[[], None],
) -> MethodRun:
    """Train the pooled model round by round and score every site on it (see the module)."""
    device = pick_device(config.device)
    torch.manual_seed(derive_seed(seed, "centralized-init"))
    generator = torch.Generator().manual_seed(derive_seed(seed, "centralized"))
    pooled = pool_by_task(sites, data)
    encoder = None
    tasks: dict[str, PooledTask] = {}
    for name in pooled:
        task_spec, decoder_spec = config.task_definition(name)
        model, task = build_site_model(config.encoder, task_spec, decoder_spec)
        if encoder is None:
            encoder = model.encoder
        tasks[name] = PooledTask(task=task, model=SiteModel(encoder, model.decoder).to(device), train=pooled[name])
    assert encoder is not None  # the pilot has at least one task
    parameters = list(encoder.parameters()) + [p for t in tasks.values() for p in t.model.decoder.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    batches = {name: iter(_Batches(len(t.train), config.batch_size, generator)) for name, t in tasks.items()}
    inputs_all = {name: (torch.from_numpy(t.train.x), torch.from_numpy(t.train.y)) for name, t in tasks.items()}
    schedule = pooled_schedule([task for _site, task in sites], config.round_steps)

    run = MethodRun(method=Method.CENTRALIZED, seed=seed, site_tasks=dict(sites))
    points: dict[int, CurvePoint] = {}
    for r in range(1, config.rounds + 1):
        for t in tasks.values():
            t.model.train()
        for name in schedule:
            pooled_task = tasks[name]
            index = next(batches[name])
            x, y = inputs_all[name]
            inputs, targets = pooled_task.task.train_pairs(x[index], y[index], generator)
            prediction = pooled_task.model(inputs.to(device))
            loss = pooled_task.task.loss(prediction, targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        checkpoint = checkpoints.get(r)
        for site, name in sites:
            pooled_task = tasks[name]
            steps = run.steps_per_site[site] = run.steps_per_site.get(site, 0) + config.round_steps
            run.site_rounds[site] = run.site_rounds.get(site, 0) + 1
            run.uploaded_bytes.setdefault(site, 0)  # it moves data, not updates: nothing to count
            val = evaluate(
                pooled_task.model, pooled_task.task, data[site].val, device=device, seed=derive_seed("eval", site)
            )
            scores = {"val": val}
            chosen = select(run, site, r, steps, scores, higher_is_better[name], config.select_ties)
            test_split = data[site].test
            if test_split is not None and (chosen or checkpoint is not None):
                test = evaluate(
                    pooled_task.model, pooled_task.task, test_split, device=device, seed=derive_seed("test", name)
                )
                if chosen:
                    run.sites[site].test = test
                if checkpoint is not None:
                    point = points.setdefault(checkpoint, CurvePoint(index=checkpoint, steps={}, test={}))
                    point.steps[site], point.test[site] = steps, test
            on_site_round()
    run.curve = [points[k] for k in sorted(points)]
    return run
