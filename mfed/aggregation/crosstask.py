"""Level 2 of M-Fed: combining task-level encoder updates into the shared encoder update.

Inputs are the task groups' mean deltas (level 1 already done) restricted to the parameters
shared across tasks. Groups arrive sorted by task name so the summation order, and therefore
the bytes of the result, never depend on arrival order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class Level2Weighting(StrEnum):
    UNIFORM = "uniform"  # every task group counts the same (the paper's "average of tasks")
    SAMPLES = "samples"  # groups weighted by their sample counts (= FedAvg over all sites)


@dataclass(frozen=True)
class GroupUpdate:
    """One task group's level-1 result: its mean encoder delta (float64) and sample count."""

    task: str
    samples: int
    mean_delta: Mapping[str, np.ndarray]


def group_weights(updates: Sequence[GroupUpdate], weighting: Level2Weighting) -> list[float]:
    if not updates:
        return []
    if weighting is Level2Weighting.UNIFORM:
        return [1.0 / len(updates)] * len(updates)
    total = sum(u.samples for u in updates)
    return [u.samples / total for u in updates]


def weighted_mean(
    updates: Sequence[GroupUpdate], weights: Sequence[float], keys: Sequence[str]
) -> dict[str, np.ndarray]:
    """sum_g w_g * delta_g for each key, summed in the given (sorted) group order."""
    out: dict[str, np.ndarray] = {}
    for key in keys:
        acc = np.zeros_like(updates[0].mean_delta[key], dtype=np.float64)
        for update, weight in zip(updates, weights, strict=True):
            acc += weight * update.mean_delta[key]
        out[key] = acc
    return out
