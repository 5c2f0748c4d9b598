"""Level 2 of M-Fed: combining task-level encoder updates into the shared encoder update.

Inputs are the task groups' mean deltas (level 1 already done) restricted to the parameters
shared across tasks. Groups arrive sorted by task name so the summation order, and therefore
the bytes of the result, never depend on arrival order.

Every rule yields level-2 WEIGHTS (the shared update is sum_g w_g * delta_g): the plain weighted
mean, CAGrad's conflict-averse combination (conflict.py) and the similarity gate (gating.py)
differ only in how the weights are chosen, from the groups' Gram matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from mfed.aggregation.conflict import cagrad_weights, gram_matrix
from mfed.aggregation.gating import GATE_KEY, GateState, agreement, gate


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


class Level2Rule(StrEnum):
    """How the task groups' updates of the shared encoder parameters are combined."""

    MEAN = "mean"  # the weighted mean (the literal M-Fed reading)
    CAGRAD = "cagrad"  # conflict-averse: best worst-group improvement near the mean (conflict.py)
    GATED = "gated"  # groups whose updates disagree with the others sit the round out (gating.py)


@dataclass(frozen=True)
class Level2Outcome:
    """The level-2 weights actually applied, and the evidence that goes into the manifest."""

    weights: list[float]
    evidence: dict[str, Any]


def level2(
    updates: Sequence[GroupUpdate],
    keys: Sequence[str],
    *,
    weighting: Level2Weighting,
    rule: Level2Rule,
    cagrad_c: float,
    gate_threshold: float,
    gate_momentum: float,
    previous: Mapping[str, Any],
) -> Level2Outcome:
    """Level-2 weights for `updates` (sorted by task) under `rule`.

    `previous` is the base model's manifest `aggregation` mapping: the only place a rule's
    cross-round state is read from (the gate's smoothed agreement). Every rule reports each
    group's agreement (cosine with the others' mean update) as evidence.
    """
    gram = gram_matrix([u.mean_delta for u in updates], keys)
    return level2_from_gram(
        gram,
        updates,
        weighting=weighting,
        rule=rule,
        cagrad_c=cagrad_c,
        gate_threshold=gate_threshold,
        gate_momentum=gate_momentum,
        previous=previous,
    )


def level2_from_gram(
    gram: np.ndarray,
    updates: Sequence[GroupUpdate],
    *,
    weighting: Level2Weighting,
    rule: Level2Rule,
    cagrad_c: float,
    gate_threshold: float,
    gate_momentum: float,
    previous: Mapping[str, Any],
) -> Level2Outcome:
    """`level2` once the Gram matrix of the groups' mean deltas is known (only the updates'
    task names and sample counts are read): the tensor-by-tensor aggregator builds the Gram
    matrix one parameter at a time and never holds a whole mean delta."""
    tasks = [u.task for u in updates]
    base = group_weights(updates, weighting)
    evidence: dict[str, Any] = {
        "level2Rule": rule.value,
        "agreement": dict(zip(tasks, agreement(gram, base), strict=True)),
    }
    if rule is Level2Rule.MEAN:
        weights = base
    elif rule is Level2Rule.CAGRAD:
        weights = cagrad_weights(gram, base, cagrad_c)
        evidence["cagradC"] = cagrad_c
    else:
        decision = gate(
            gram,
            tasks,
            base,
            GateState.from_aggregation(previous),
            threshold=gate_threshold,
            momentum=gate_momentum,
        )
        weights = decision.weights
        evidence[GATE_KEY] = decision.state.to_dict()
        evidence["gateOpen"] = decision.open
        evidence["gateThreshold"] = gate_threshold
        evidence["gateMomentum"] = gate_momentum
    return Level2Outcome(weights=weights, evidence=evidence)
