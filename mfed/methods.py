"""Federation methods as presets over the same trainer and aggregator.

Each method is a choice of (what crosses task groups, where a site's decoder starts, the
decoder regulariser, level-2 weighting and rule, where a site starts and what it deploys, the
local steps per round). The pilot and the operator both resolve methods here, so
`method: task-fedavg` means the same thing in a FederationRound and in `mfed pilot`.
The cross-task strategies (docs/strategies.md) are presets too; `auto` composes them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from mfed.aggregation.crosstask import Level2Rule, Level2Weighting
from mfed.aggregation.fedavg import AggregationSettings
from mfed.aggregation.robust import RobustSettings
from mfed.privacy.settings import PrivacySettings
from mfed.spec import DecoderSource, Regularizer, SharingMode, SharingPolicy, SiteStrategy

# auto: every site trains at least this many steps a round (docs/strategies.md: a 40-image site
# otherwise makes 2 steps a round and federation cannot catch up with a converged Local).
AUTO_MIN_STEPS = 20


class Method(StrEnum):
    LOCAL = "local"  # no federation: each site alone (pilot baseline)
    TASK_FEDAVG = "task_fedavg"  # FedAvg within each task group only
    ENCODER_FEDAVG = "encoder_fedavg"  # encoder FedAvg over all sites, decoders stay local
    MFED = "mfed"  # M-Fed: level 1 + level 2 + decoder pulled toward the task's decoder
    CAGRAD = "cagrad"  # M-Fed with conflict-averse level 2
    GATED = "gated"  # M-Fed sharing only between task groups whose updates agree
    MIX = "mix"  # M-Fed where each site mixes shared and task-level encoder, chosen on validation
    FALLBACK = "fallback"  # M-Fed where each site trains both and deploys the better on validation
    AUTO = "auto"  # the recommended composition: fallback + conflict-averse level 2 + min steps
    # The pilot's ceiling: one multi-task model on every site's data pooled (mfed.pilot.centralized).
    # It moves data, so no FederationRound can ask for it.
    CENTRALIZED = "centralized"

    @classmethod
    def parse(cls, text: str) -> Method:
        key = text.strip().lower().replace("-", "_")
        aliases = {"m_fed": "mfed", "taskfedavg": "task_fedavg", "encoderfedavg": "encoder_fedavg"}
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            names = ", ".join(m.value.replace("_", "-") for m in cls)
            raise ValueError(f"unknown method {text!r}; use one of {names}") from None


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
    level2_rule: Level2Rule = Level2Rule.MEAN
    cagrad_c: float = 0.4
    gate_threshold: float = 0.0
    site_strategy: SiteStrategy = SiteStrategy.SHARED
    min_steps: int = 0
    shared_steps: int | None = None  # cap on a two-track site's shared-track steps per round
    robust: RobustSettings = RobustSettings()  # median / trimmed mean / norm screen
    privacy: PrivacySettings | None = None  # clipped updates + Gaussian noise (mfed.privacy)

    @property
    def aggregation(self) -> AggregationSettings:
        """What the aggregator needs (the operator passes this to `aggregate`)."""
        return AggregationSettings(
            level2_weighting=self.level2_weighting,
            level2_rule=self.level2_rule,
            cagrad_c=self.cagrad_c,
            gate_threshold=self.gate_threshold,
            robust=self.robust,
            privacy=self.privacy,
        )

    @property
    def tracks(self) -> int:
        """Models each site trains per round (2 for the fallback strategy)."""
        return 2 if self.site_strategy is SiteStrategy.FALLBACK else 1


def plan_method(
    method: Method,
    *,
    sharing: SharingPolicy = SharingPolicy(),
    mu: float = 0.01,
    regularizer: Regularizer = Regularizer.L2,
    level2_weighting: Level2Weighting = Level2Weighting.UNIFORM,
    level2_rule: Level2Rule | None = None,
    site_strategy: SiteStrategy | None = None,
    min_steps: int | None = None,
    cagrad_c: float = 0.4,
    gate_threshold: float = 0.0,
    shared_steps: int | None = None,
) -> MethodPlan:
    """Resolve a method. The other arguments apply to M-Fed and the cross-task presets; None means
    the preset's own choice (for `mfed`: mean rule, shared start, no minimum steps).

    The presets: `cagrad` = M-Fed + conflict-averse level 2; `gated` = task-level copies + the
    similarity gate (sites follow it); `mix` = task-level copies + per-site mixing chosen on
    validation; `fallback` = task-level copies + two tracks, the better deployed; `auto` = the
    whole encoder shared with task-level copies + fallback + CAGrad + at least AUTO_MIN_STEPS
    steps a round, the task-level track starting from the task's global decoder (so it is
    Task-FedAvg), the shared track capped at AUTO_MIN_STEPS steps a round, without the decoder
    regulariser (docs/strategies.md)."""
    none = SharingPolicy(mode=SharingMode.NONE)
    if method in (Method.LOCAL, Method.CENTRALIZED):
        # Local: each site is its own one-site federation, aggregation returns its own model.
        # Centralized trains outside the federation machinery; it shares nothing that aggregates.
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
            min_steps=min_steps or 0,  # a training setting: every federated method honours it
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
            min_steps=min_steps or 0,
        )
    rule, strategy, steps = {
        Method.MFED: (Level2Rule.MEAN, SiteStrategy.SHARED, 0),
        Method.CAGRAD: (Level2Rule.CAGRAD, SiteStrategy.SHARED, 0),
        Method.GATED: (Level2Rule.GATED, SiteStrategy.GATE, 0),
        Method.MIX: (Level2Rule.MEAN, SiteStrategy.MIX, 0),
        Method.FALLBACK: (Level2Rule.MEAN, SiteStrategy.FALLBACK, 0),
        Method.AUTO: (Level2Rule.CAGRAD, SiteStrategy.FALLBACK, AUTO_MIN_STEPS),
    }[method]
    strategy = site_strategy or strategy
    if method is Method.AUTO:
        sharing = SharingPolicy()  # the whole encoder may cross tasks: protection decides per site
    if strategy is not SiteStrategy.SHARED:  # every other start needs the task-level copies
        sharing = replace(sharing, task_level=True)
    decoder_source = DecoderSource.OWN
    if method is Method.AUTO and shared_steps is None:
        # A data-rich site spends its compute on the model it deploys: its shared track trains
        # no more than a small site does. Uncapped, a 3000-image site gave half its steps to a
        # track it never deployed and ended 1.7% below a Local given all those steps (denoise).
        shared_steps = AUTO_MIN_STEPS
    if method is Method.AUTO:
        # No decoder regulariser: with one site per task D_tau is the site's own last decoder and
        # the pull only slows it down (measured: denoise 17.65 dB with mu 0.01, 18.37 dB without).
        # The task-level track starts from D_tau instead, so with several sites per task it IS
        # Task-FedAvg (own decoders left it 0.8 dm-points behind Task-FedAvg at equal steps).
        regularizer, mu, decoder_source = Regularizer.NONE, 0.0, DecoderSource.GLOBAL
    return MethodPlan(
        method=method,
        federated=True,
        sharing=sharing,
        decoder_source=decoder_source,
        regularizer=regularizer,
        mu=mu,
        level2_weighting=level2_weighting,
        level2_rule=level2_rule or rule,
        cagrad_c=cagrad_c,
        gate_threshold=gate_threshold,
        site_strategy=strategy,
        min_steps=steps if min_steps is None else min_steps,
        shared_steps=shared_steps,
    )
