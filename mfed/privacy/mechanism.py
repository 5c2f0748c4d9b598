"""The Gaussian mechanism on clipped site updates, pure numpy (no I/O, inputs never mutated).

A site's update is everything it sends that depends on its data, as one vector: its encoder
delta and the change of its decoder from the task's global decoder. Clipping scales the whole
vector, so the direction is kept and a single bound covers both parts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def clip_scale(norm: float, clip_norm: float) -> float:
    """The factor that brings an update of `norm` within `clip_norm` (1 when it already is)."""
    if not (math.isfinite(norm) and norm >= 0):
        raise ValueError(f"an update norm must be finite and >= 0, got {norm}")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def noisy_mean(clipped_sum: np.ndarray, members: int, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """(sum of the group's clipped updates + N(0, noise_std^2 I)) / members, float64."""
    if members < 1:
        raise ValueError("a task group without members has no mean")
    noise = rng.normal(0.0, noise_std, size=clipped_sum.shape)
    out: np.ndarray = (np.asarray(clipped_sum, dtype=np.float64) + noise) / members
    return out


def next_clip_norm(
    norms: Iterable[float],
    clip_norm: float,
    target_quantile: float,
    learning_rate: float,
    count_noise: float,
    rng: np.random.Generator,
) -> float:
    """Andrew et al. 2021's geometric update: C exp(-eta (b - gamma)), b the noisy share of the
    updates whose norm is within C (sum of indicators + N(0, count_noise^2), over the count)."""
    values = list(norms)
    if not values:
        raise ValueError("no update norms to adapt the clip norm to")
    within = sum(1.0 for n in values if n <= clip_norm) + float(rng.normal(0.0, count_noise))
    return clip_norm * math.exp(-learning_rate * (within / len(values) - target_quantile))
