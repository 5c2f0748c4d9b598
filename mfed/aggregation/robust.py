"""Robust combination rules, pure per-tensor functions (no I/O, inputs never mutated).

Each rule takes the per-site (or per-group) values of ONE parameter and returns the combined
value, so a caller that streams the model key by key holds only that key's values of every
site. `mean` is the sample-weighted mean (plain FedAvg); `median` is the coordinate-wise
median; `trimmed-mean` drops, coordinate by coordinate, the `trim` fraction of the largest and
of the smallest values and averages the rest (unweighted, as in Yin et al. 2018).

`norm_outliers` screens whole contributions before any value is combined: a delta whose L2
norm exceeds `factor` times the median norm of its reference set is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np


class RobustRule(StrEnum):
    MEAN = "mean"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed-mean"


@dataclass(frozen=True, kw_only=True)
class RobustSettings:
    """`rule` combines the sites of a task group (level 1) and the groups (level 2).

    `trim` is the share trimmed at EACH end by trimmed-mean; `norm_factor`, when set, refuses a
    delta whose norm is above norm_factor x the median norm of its group (NormOutlier)."""

    rule: RobustRule = RobustRule.MEAN
    trim: float = 0.2
    norm_factor: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"trim is the share cut at each end and must be in [0, 0.5), got {self.trim}")
        if self.norm_factor is not None and not (math.isfinite(self.norm_factor) and self.norm_factor >= 1.0):
            raise ValueError(f"norm_factor must be a finite number >= 1 (x the median norm), got {self.norm_factor}")

    @property
    def is_default(self) -> bool:
        return self.rule is RobustRule.MEAN and self.norm_factor is None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule.value}
        if self.rule is RobustRule.TRIMMED_MEAN:
            out["trim"] = self.trim
        if self.norm_factor is not None:
            out["normFactor"] = self.norm_factor
        return out


def _stack(values: Sequence[np.ndarray]) -> np.ndarray:
    if not values:
        raise ValueError("nothing to combine: no values given")
    shapes = {v.shape for v in values}
    if len(shapes) != 1:
        raise ValueError(f"values to combine differ in shape: {sorted(shapes)}")
    return np.stack([np.asarray(v, dtype=np.float64) for v in values])


def weighted_mean(values: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    if len(weights) != len(values):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("weights must sum to a positive number")
    out = np.zeros(_stack(values[:1]).shape[1:], dtype=np.float64)
    for value, weight in zip(values, weights, strict=True):
        out += (weight / total) * np.asarray(value, dtype=np.float64)
    return out


def coordinate_median(values: Sequence[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    median: np.ndarray = np.median(_stack(values), axis=0)
    return median


def trimmed_count(n: int, trim: float) -> int:
    """Values cut at each end; at least one value always remains."""
    return min(math.floor(trim * n), (n - 1) // 2)


def trimmed_mean(values: Sequence[np.ndarray], trim: float) -> np.ndarray:
    stacked = _stack(values)
    cut = trimmed_count(stacked.shape[0], trim)
    ordered = np.sort(stacked, axis=0)
    kept: np.ndarray = ordered[cut : stacked.shape[0] - cut].mean(axis=0)
    return kept


def combine(values: Sequence[np.ndarray], weights: Sequence[float], settings: RobustSettings) -> np.ndarray:
    """One parameter's combined value under the settings' rule (weights only used by mean)."""
    if settings.rule is RobustRule.MEDIAN:
        return coordinate_median(values)
    if settings.rule is RobustRule.TRIMMED_MEAN:
        return trimmed_mean(values, settings.trim)
    return weighted_mean(values, weights)


def l2_norm_of(parts: Iterable[np.ndarray]) -> float:
    """L2 norm of the parts taken as one vector (float64, summed in the order given)."""
    return math.sqrt(sum(float(np.sum(np.square(p, dtype=np.float64))) for p in parts))


def norm_outliers(norms: Mapping[str, float], factor: float) -> dict[str, str]:
    """Sites whose norm exceeds factor x the median norm of `norms`, with the reason as text.

    With fewer than three values the median cannot tell an outlier from an honest site (of two,
    the median is their mean), so nothing is refused."""
    if len(norms) < 3:
        return {}
    median = float(np.median(np.array([norms[s] for s in sorted(norms)], dtype=np.float64)))
    bound = factor * median
    return {
        site: f"update norm {norm:.4g} is above {factor:g} x the median norm {median:.4g} of its group"
        for site, norm in sorted(norms.items())
        if norm > bound
    }
