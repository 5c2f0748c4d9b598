"""Per-site protection: how much of the shared encoder a site uses, decided on its own validation split.

Two ways (SiteStrategy in mfed.spec, docs/strategies.md):

- mix: the site starts from alpha * E_G + (1 - alpha) * E_tau, alpha from MIX_GRID. Scoring the
  candidates with the site's current decoder is biased towards the encoder that decoder was
  trained with (measured: it collapses to alpha 0), so each candidate first gets a short
  decoder-only refit on the training split (a "probe"), then is scored on validation.
- fallback: the site trains two tracks, its task-level one and the shared one, and deploys the
  one that scores better on validation (ties: the task level; under MIN_CHOICE_SAMPLES
  validation examples: always the task level). Costs two trainings per round,
  and is the one that guarantees the site never ends below not sharing.

Only the site's own validation split is ever used to decide; test data never is.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mfed.learning.data import SiteData
from mfed.learning.model import SiteModel, load_part
from mfed.learning.tasks import Task
from mfed.learning.train import Objective, evaluate, train_local
from mfed.spec import Regularizer

MIX_GRID = (0.0, 0.5, 1.0)
PROBE_STEPS = 5
# A site validating on fewer examples than this never chooses the shared encoder (it keeps its
# task-level one): on 4 images a choice is a coin flip, and one such flip cost a 20-image site
# 23 test points against Local (docs/results.md, section 4).
MIN_CHOICE_SAMPLES = 10


def mix_encoders(
    shared: Mapping[str, np.ndarray], task_level: Mapping[str, np.ndarray], alpha: float, dual: Sequence[str]
) -> dict[str, np.ndarray]:
    """alpha * shared + (1 - alpha) * task level on the dual parameters; the rest from the task level."""
    out = {key: np.asarray(value, dtype=np.float32) for key, value in task_level.items()}
    for key in dual:
        mixed = alpha * shared[key].astype(np.float64) + (1.0 - alpha) * task_level[key].astype(np.float64)
        out[key] = mixed.astype(np.float32)
    return out


def is_better(task: Task, candidate: float, incumbent: float) -> bool:
    """Strictly better in the task's direction (ties keep the incumbent)."""
    return candidate > incumbent if task.higher_is_better else candidate < incumbent


def prefers_shared(task: Task, shared_score: float, task_level_score: float, validation_samples: int) -> bool:
    """Deploy the shared track: strictly better on validation, on enough validation examples."""
    return validation_samples >= MIN_CHOICE_SAMPLES and is_better(task, shared_score, task_level_score)


@dataclass(frozen=True)
class MixChoice:
    alpha: float
    scores: dict[float, float]  # validation score after the probe, per candidate alpha


def probe_score(
    model: SiteModel,
    task: Task,
    data: SiteData,
    encoder: Mapping[str, np.ndarray],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    device: torch.device,
    seed: int,
    eval_seed: int,
) -> float:
    """Validation score of `encoder` after `steps` decoder-only steps on the training split.

    Works on a copy: the site's model and decoder are left as they are."""
    candidate = copy.deepcopy(model)
    load_part(candidate, "encoder", encoder)
    if steps > 0:
        candidate.encoder.requires_grad_(False)
        train_local(
            candidate,
            task,
            data.train,
            epochs=-(-steps // max(1, -(-len(data.train) // batch_size))),
            batch_size=batch_size,
            learning_rate=learning_rate,
            objective=Objective(regularizer=Regularizer.NONE, mu=0.0, global_decoder=None),
            device=device,
            seed=seed,
            max_steps=steps,
        )
    return evaluate(candidate, task, data.val, device=device, seed=eval_seed)


def choose_mix(
    model: SiteModel,
    task: Task,
    data: SiteData,
    shared: Mapping[str, np.ndarray],
    task_level: Mapping[str, np.ndarray],
    dual: Sequence[str],
    *,
    batch_size: int,
    learning_rate: float,
    device: torch.device,
    seed: int,
    eval_seed: int,
    grid: Sequence[float] = MIX_GRID,
    steps: int = PROBE_STEPS,
) -> MixChoice:
    """The alpha whose probed validation score is best; ties go to the smaller alpha (less sharing).
    Too small a validation split (MIN_CHOICE_SAMPLES) decides nothing: the smallest alpha, unprobed."""
    if len(data.val) < MIN_CHOICE_SAMPLES:
        return MixChoice(alpha=min(grid), scores={})
    scores: dict[float, float] = {}
    best: float | None = None
    for alpha in sorted(grid):
        encoder = mix_encoders(shared, task_level, alpha, dual)
        scores[alpha] = probe_score(
            model,
            task,
            data,
            encoder,
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            device=device,
            seed=seed,
            eval_seed=eval_seed,
        )
        if best is None or is_better(task, scores[alpha], scores[best]):
            best = alpha
    assert best is not None  # the grid is never empty
    return MixChoice(alpha=best, scores=scores)
