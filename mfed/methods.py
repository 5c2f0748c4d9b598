"""Federation methods as presets over the same trainer and aggregator.

Each method is a choice of (what crosses task groups, where a site's decoder starts, the
decoder regulariser, level-2 weighting). The pilot and the operator both resolve methods
here, so `method: task-fedavg` means the same thing in a FederationRound and in `mfed pilot`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from mfed.aggregation.crosstask import Level2Weighting
from mfed.spec import DecoderSource, Regularizer, SharingMode, SharingPolicy


class Method(StrEnum):
    LOCAL = "local"  # no federation: each site alone (pilot baseline)
    TASK_FEDAVG = "task_fedavg"  # FedAvg within each task group only
    ENCODER_FEDAVG = "encoder_fedavg"  # encoder FedAvg over all sites, decoders stay local
    MFED = "mfed"  # M-Fed: level 1 + level 2 + decoder pulled toward the task's decoder

    @classmethod
    def parse(cls, text: str) -> Method:
        key = text.strip().lower().replace("-", "_")
        aliases = {"m_fed": "mfed", "taskfedavg": "task_fedavg", "encoderfedavg": "encoder_fedavg"}
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            raise ValueError(f"unknown method {text!r}; use one of local, task-fedavg, encoder-fedavg, m-fed") from None


@dataclass(frozen=True, kw_only=True)
class MethodPlan:
    """Everything a method decides; `federated` is False only for Local."""

    method: Method
    federated: bool
    sharing: SharingPolicy
    decoder_source: DecoderSource
    regularizer: Regularizer
    mu: float
    level2_weighting: Level2Weighting


def plan_method(
    method: Method,
    *,
    sharing: SharingPolicy = SharingPolicy(),
    mu: float = 0.01,
    regularizer: Regularizer = Regularizer.L2,
    level2_weighting: Level2Weighting = Level2Weighting.UNIFORM,
) -> MethodPlan:
    """Resolve a method; `sharing`, `mu`, `regularizer`, `level2_weighting` apply to M-Fed."""
    none = SharingPolicy(mode=SharingMode.NONE)
    if method is Method.LOCAL:
        # Each site is its own one-site federation: aggregation returns its own model.
        return MethodPlan(
            method=method,
            federated=False,
            sharing=none,
            decoder_source=DecoderSource.GLOBAL,
            regularizer=Regularizer.NONE,
            mu=0.0,
            level2_weighting=Level2Weighting.UNIFORM,
        )
    if method is Method.TASK_FEDAVG:
        return MethodPlan(
            method=method,
            federated=True,
            sharing=none,
            decoder_source=DecoderSource.GLOBAL,
            regularizer=Regularizer.NONE,
            mu=0.0,
            level2_weighting=Level2Weighting.UNIFORM,
        )
    if method is Method.ENCODER_FEDAVG:
        return MethodPlan(
            method=method,
            federated=True,
            sharing=SharingPolicy(),
            decoder_source=DecoderSource.OWN,
            regularizer=Regularizer.NONE,
            mu=0.0,
            level2_weighting=Level2Weighting.SAMPLES,
        )
    return MethodPlan(
        method=method,
        federated=True,
        sharing=sharing,
        decoder_source=DecoderSource.OWN,
        regularizer=regularizer,
        mu=mu,
        level2_weighting=level2_weighting,
    )
