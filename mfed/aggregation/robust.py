"""Robust combination rules, pure per-tensor functions (no I/O, inputs never mutated).

Each rule takes the per-site (or per-group) values of ONE parameter and returns the combined
value, so a caller that streams the model key by key holds only that key's values of every
site. `mean` is the sample-weighted mean (plain FedAvg); `median` is the coordinate-wise
median; `trimmed-mean` drops, coordinate by coordinate, the `trim` fraction of the largest and
of the smallest values and averages the rest (unweighted, as in Yin et al. 2018).

`norm_outliers` and `direction_outliers` screen whole contributions before any value is
combined: a delta whose L2 norm exceeds `factor` times the median norm of its reference set, or
whose cosine to the coordinate-wise median of the OTHER sites' deltas is below `min_cosine`, is
refused. Leaving the site out of its own reference matters: with 8 sites, a sign-flipped delta's
cosine to a median that includes it was measured near 0, to the median of the other 7 clearly
negative (docs/results.md section 9).
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
    delta whose norm is above norm_factor x the median norm of its group (NormOutlier);
    `min_cosine`, when set, refuses a delta pointing away from the other sites' median delta
    (DirectionOutlier). Both screens then leave the rule to combine the sites they kept."""

    rule: RobustRule = RobustRule.MEAN
    trim: float = 0.2
    norm_factor: float | None = None
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"trim is the share cut at each end and must be in [0, 0.5), got {self.trim}")
        if self.norm_factor is not None and not (math.isfinite(self.norm_factor) and self.norm_factor >= 1.0):
            raise ValueError(f"norm_factor must be a finite number >= 1 (x the median norm), got {self.norm_factor}")
        if self.min_cosine is not None and not -1.0 < self.min_cosine < 1.0:
            raise ValueError(f"min_cosine must be a cosine strictly between -1 and 1, got {self.min_cosine}")

    @property
    def is_default(self) -> bool:
        return self.rule is RobustRule.MEAN and self.norm_factor is None and self.min_cosine is None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule.value}
        if self.rule is RobustRule.TRIMMED_MEAN:
            out["trim"] = self.trim
        if self.norm_factor is not None:
            out["normFactor"] = self.norm_factor
        if self.min_cosine is not None:
            out["minCosine"] = self.min_cosine
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


def norm_outliers(norms: Mapping[str, float], factor: float, scope: str = "its group") -> dict[str, str]:
    """Sites whose norm exceeds factor x the median norm of `norms`, with the reason as text
    (`scope` names the reference set in it).

    With fewer than three values the median cannot tell an outlier from an honest site (of two,
    the median is their mean), so nothing is refused."""
    if len(norms) < 3:
        return {}
    median = float(np.median(np.array([norms[s] for s in sorted(norms)], dtype=np.float64)))
    bound = factor * median
    return {
        site: f"update norm {norm:.4g} is above {factor:g} x the median norm {median:.4g} of {scope}"
        for site, norm in sorted(norms.items())
        if norm > bound
    }


def leave_one_out_medians(stacked: np.ndarray) -> np.ndarray:
    """Row i: the coordinate-wise median of every row but i (rows are sites; at least 3).

    One sort serves every site: with the values of a coordinate in order s[0] <= ... <= s[n-1]
    and site i's value at rank r, the remaining n-1 values in order are s[j] for j < r and
    s[j+1] for j >= r, so their median sits at known positions. Equal to np.median of
    np.delete(stacked, i, 0) (tests/unit/test_direction_screen.py), at one sort instead of n."""
    n = stacked.shape[0]
    if n < 3:
        raise ValueError(f"a leave-one-out median needs at least 3 sites, got {n}")
    order = np.argsort(stacked, axis=0, kind="stable")
    ordered = np.take_along_axis(stacked, order, axis=0)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n)[:, None].repeat(stacked.shape[1], axis=1), axis=0)
    low, high = (n - 2) // 2, (n - 1) // 2  # the middle positions among n-1 values

    def remaining(position: int) -> np.ndarray:
        # value at `position` of the n-1 values left when each row's own value is removed
        value: np.ndarray = np.where(ranks > position, ordered[position][None, :], ordered[position + 1][None, :])
        return value

    out: np.ndarray = 0.5 * (remaining(low) + remaining(high))
    return out


def cosine(dot: float, norm_a: float, norm_b: float) -> float:
    """dot / (|a| |b|); 0 when either vector is zero (no direction to compare)."""
    return dot / (norm_a * norm_b) if norm_a > 0 and norm_b > 0 else 0.0


def direction_outliers(cosines: Mapping[str, float], min_cosine: float) -> dict[str, str]:
    """Sites whose cosine to the other sites' median delta is below `min_cosine`, with the reason."""
    return {
        site: (
            f"update direction has cosine {value:.3f} to the coordinate-wise median of the other sites' "
            f"encoder updates, below minCosine {min_cosine:g}"
        )
        for site, value in sorted(cosines.items())
        if value < min_cosine
    }
