"""The Gaussian mechanism on clipped site updates, pure numpy (no I/O, inputs never mutated).

A site's update is everything it sends that depends on its data, as one vector: its encoder
delta and the change of its decoder from the task's global decoder. Clipping scales the whole
vector, so the direction is kept and a single bound covers both parts.
"""

from __future__ import annotations

import math

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
