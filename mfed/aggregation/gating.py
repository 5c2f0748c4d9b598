"""Similarity-gated level 2: a task group shares across tasks only while its updates agree.

Each round, group i's agreement is the cosine between its mean encoder update g_i and the
weighted mean of the OTHER groups' updates (computed from the Gram matrix, never from the
parameters). Agreement is smoothed across rounds with an exponential moving average, whose
value is the gate's state: it is written into the global model's manifest
(`aggregation.gate.agreement`) and read back from the base model next round, so a restarted
aggregator (the operator keeps everything in S3) continues where the last round left off.

A group whose smoothed agreement is below the threshold is left out of the shared update for the
round (its weight is 0 and the others are renormalised). With task-level encoder copies in the
global model (SharingPolicy.task_level) it keeps learning on its own task-level encoder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GATE_KEY = "gate"


@dataclass(frozen=True)
class GateState:
    """Smoothed agreement per task group; groups never seen have no entry."""

    agreement: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"agreement": {t: self.agreement[t] for t in sorted(self.agreement)}}

    @classmethod
    def from_aggregation(cls, aggregation: Mapping[str, Any]) -> GateState:
        """Read the state a previous round wrote into its manifest's `aggregation` (or none)."""
        raw = aggregation.get(GATE_KEY)
        if not isinstance(raw, Mapping):
            return cls()
        values = raw.get("agreement")
        if not isinstance(values, Mapping):
            return cls()
        out: dict[str, float] = {}
        for task, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                out[str(task)] = float(value)
        return cls(agreement=out)


@dataclass(frozen=True)
class GateDecision:
    weights: list[float]  # level-2 weights, in the groups' (sorted) order; 0 for gated-out groups
    agreement_now: dict[str, float]  # this round's raw cosine per group
    state: GateState  # smoothed agreement to carry to the next round
    open: dict[str, bool]  # whether each group took part in the shared update


def agreement(gram: np.ndarray, base: Sequence[float]) -> list[float]:
    """cos(g_i, sum_{j != i} p_j g_j) for each group i; 1.0 when there is no other group, 0.0 for zero updates."""
    p = np.asarray(base, dtype=np.float64)
    out = []
    for i in range(len(p)):
        others = p.copy()
        others[i] = 0.0
        if others.sum() <= 0.0:
            out.append(1.0)
            continue
        dot = float(gram[i] @ others)
        norm_i = math.sqrt(max(float(gram[i, i]), 0.0))
        norm_o = math.sqrt(max(float(others @ gram @ others), 0.0))
        out.append(dot / (norm_i * norm_o) if norm_i > 0.0 and norm_o > 0.0 else 0.0)
    return out


def gate(
    gram: np.ndarray,
    tasks: Sequence[str],
    base: Sequence[float],
    previous: GateState,
    *,
    threshold: float,
    momentum: float,
) -> GateDecision:
    """Smooth each group's agreement, close the gate of groups below `threshold`, renormalise."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"gate momentum must be in [0, 1), got {momentum}")
    now = agreement(gram, base)
    smoothed: dict[str, float] = dict(previous.agreement)
    is_open: dict[str, bool] = {}
    for task, value in zip(tasks, now, strict=True):
        old = previous.agreement.get(task)
        smoothed[task] = value if old is None else momentum * old + (1.0 - momentum) * value
        is_open[task] = smoothed[task] >= threshold
    kept = [b if is_open[t] else 0.0 for t, b in zip(tasks, base, strict=True)]
    total = sum(kept)
    weights = [k / total for k in kept] if total > 0 else [0.0] * len(kept)
    return GateDecision(
        weights=weights,
        agreement_now=dict(zip(tasks, now, strict=True)),
        state=GateState(agreement=smoothed),
        open=is_open,
    )
