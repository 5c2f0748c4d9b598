"""Streaming two-level aggregation (M-Fed server side), pure numpy.

Level 1, within each task group tau: E_tau = E_base + sum_k n_k d_k / N_tau and
D_tau = sum_k n_k D_k / N_tau, where d_k is site k's encoder delta and D_k its decoder.
Level 2, across groups: the shared encoder parameters get base + combine(mean deltas), the
combination chosen by AggregationSettings.level2_rule (crosstask.py).

With task-level copies of the shared parameters (SharingPolicy.task_level, "dual" parameters),
site k of group tau started from S_k = a_k E_G + (1 - a_k) E_tau (a_k from its manifest's
startMix) and its delta d_k is relative to S_k. Level 1 keeps the task-level copy equal to the
FedAvg of the models the group's sites actually trained,
    E_tau' = sum_k n_k (S_k + d_k) / N_tau = E_tau + a_tau (E_G - E_tau) + mean_tau(d),
with a_tau the sample-weighted mean start mix; level 2 moves E_G by the combined deltas.

`aggregate` streams the literal layout with the mean rule through one accumulator (linear.py);
rules whose weights depend on the updates, and dual layouts, go through RoundAggregator.
Memory: one float64 running sum per task group (encoder + decoder) plus the contribution
being added; it does not grow with the number of sites. Sites must be added in sorted order
and groups are combined in sorted order, so a re-run produces identical bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mfed.aggregation.crosstask import GroupUpdate, Level2Rule, Level2Weighting, level2, weighted_mean
from mfed.aggregation.fused import aggregate_fused_linear
from mfed.aggregation.linear import Candidate, aggregate_linear, screen_manifests
from mfed.aggregation.ownership import SHARED_TRACK, dual_keys, owner_of
from mfed.aggregation.private_round import combine_private, site_norms
from mfed.aggregation.robust import RobustSettings
from mfed.aggregation.robust_round import SiteTensors, combine_round, read_valid, screen_directions, screen_norms
from mfed.aggregation.streaming import (
    PARALLEL_READS,
    RangedContribution,
    ReadPlan,
    StreamedRound,
    aggregate_streamed_groups,
    aggregate_streamed_linear,
    validate_all,
)
from mfed.aggregation.validate import (
    ContributionRejected,
    NothingAccepted,
    RejectReason,
    ValidContribution,
    check_manifest,
    check_tensors,
)
from mfed.artifacts.layout import MODEL_FILE
from mfed.artifacts.manifest import (
    ContributionManifest,
    Contributor,
    FileRef,
    GlobalManifest,
    Rejection,
)
from mfed.artifacts.ranged import ByteRange
from mfed.artifacts.tensorfile import encode_tensors, sha256_hex
from mfed.privacy.ledger import PrivacyLedger
from mfed.privacy.mechanism import next_clip_norm
from mfed.privacy.settings import PrivacySettings


@dataclass(frozen=True, kw_only=True)
class AggregationSettings:
    """How level 2 combines the task groups' updates of the shared encoder (docs/strategies.md).

    `level2_rule` mean is the literal reading; cagrad is conflict-averse (radius `cagrad_c`);
    gated leaves out groups whose smoothed update agreement is below `gate_threshold`.
    """

    level2_weighting: Level2Weighting = Level2Weighting.UNIFORM
    level2_rule: Level2Rule = Level2Rule.MEAN
    cagrad_c: float = 0.4
    gate_threshold: float = 0.0
    gate_momentum: float = 0.5
    robust: RobustSettings = RobustSettings()  # median / trimmed-mean / norm screen (robust.py)
    privacy: PrivacySettings | None = None  # clipped updates + Gaussian noise (private_round.py)

    def __post_init__(self) -> None:
        if self.privacy is not None and (self.level2_rule is not Level2Rule.MEAN or not self.robust.is_default):
            raise ValueError(
                "differential privacy combines with the mean rule only (level2Rule mean, rule mean, no normFactor)"
            )
        if not self.robust.is_default and self.level2_rule is not Level2Rule.MEAN:
            raise ValueError(f"a robust rule combines with level2_rule mean only, got {self.level2_rule.value}")
        if not (math.isfinite(self.cagrad_c) and self.cagrad_c >= 0):
            raise ValueError(f"cagrad_c must be a finite number >= 0, got {self.cagrad_c}")
        if not -1.0 <= self.gate_threshold <= 1.0:
            raise ValueError(f"gate_threshold is a cosine similarity in [-1, 1], got {self.gate_threshold}")
        if not 0.0 <= self.gate_momentum < 1.0:
            raise ValueError(f"gate_momentum must be in [0, 1), got {self.gate_momentum}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as the model's provenance (its manifest) records them: every value that
        shaped the result, the rule's own parameters included. The mean rule has none, and its
        record stays as it always was, so existing models keep their digests."""
        out: dict[str, Any] = {"level2Weighting": self.level2_weighting.value}
        if self.level2_rule is Level2Rule.CAGRAD:
            out.update(level2Rule=self.level2_rule.value, cagradC=self.cagrad_c)
        elif self.level2_rule is Level2Rule.GATED:
            out.update(
                level2Rule=self.level2_rule.value, gateThreshold=self.gate_threshold, gateMomentum=self.gate_momentum
            )
        if not self.robust.is_default:
            out["robust"] = self.robust.to_dict()
        return out  # the privacy settings go into the manifest with the ledger (privacy_record)


def round_clip_norm(base: GlobalManifest, privacy: PrivacySettings) -> float:
    """This round's clip norm: the base model's `nextClipNorm` under adaptive clipping (the chain
    carries it from round to round), else the configured one."""
    record = base.aggregation.get("privacy")
    carried = record.get("nextClipNorm") if isinstance(record, Mapping) else None
    if privacy.adaptive and isinstance(carried, (int, float)) and math.isfinite(carried) and carried > 0:
        return float(carried)
    return privacy.clip_norm


def privacy_record(
    base: GlobalManifest, settings: AggregationSettings, clipping: Mapping[str, float] | None = None
) -> dict[str, Any] | None:
    """The chain's privacy ledger after this round, for the new model's manifest; None when
    neither this round nor any before it was private (those manifests keep their bytes).
    `clipping`: the clip norm this round used and, adaptive, the next round's."""
    if settings.privacy is None and "privacy" not in base.aggregation:
        return None
    ledger = PrivacyLedger.of_model(base.aggregation, base.round)
    after = ledger.after(settings.privacy.mechanisms if settings.privacy else None)
    if settings.privacy is not None:
        return {**settings.privacy.to_dict(), **after.to_dict(settings.privacy.delta), **(clipping or {})}
    earlier = base.aggregation["privacy"]
    delta = float(earlier.get("delta", 1e-5)) if isinstance(earlier, Mapping) else 1e-5
    return after.to_dict(delta)


@dataclass
class _GroupSum:
    samples: int = 0
    encoder: dict[str, np.ndarray] = field(default_factory=dict)
    decoder: dict[str, np.ndarray] = field(default_factory=dict)
    manifests: list[ContributionManifest] = field(default_factory=list)
    mix: dict[str, float] = field(default_factory=dict)  # dual parameter -> sum of n_k * a_k
    level2: dict[str, np.ndarray] = field(default_factory=dict)  # what level 2 sees: shared-track deltas


@dataclass(frozen=True)
class AggregationResult:
    model_bytes: bytes
    manifest: GlobalManifest
    tensors: Mapping[str, np.ndarray]


def _accumulate(into: dict[str, np.ndarray], values: Mapping[str, np.ndarray], weight: int) -> None:
    for key, value in values.items():
        if key in into:
            into[key] += weight * value.astype(np.float64)
        else:
            into[key] = weight * value.astype(np.float64)


class RoundAggregator:
    """Add validated contributions one at a time (sorted by site), then `finish`."""

    def __init__(
        self,
        base: GlobalManifest,
        base_tensors: Mapping[str, np.ndarray],
        round_number: int,
        settings: AggregationSettings = AggregationSettings(),
    ) -> None:
        self.base = base
        self.base_tensors = base_tensors
        self.round_number = round_number
        self.settings = settings
        self._groups: dict[str, _GroupSum] = {}
        self._shared_keys = sorted(k for k in base_tensors if owner_of(k).task is None)
        self._last_site: str | None = None
        self._accepted: set[str] = set()
        self._rejected: list[Rejection] = []

    @property
    def accepted_sites(self) -> list[str]:
        return sorted(self._accepted)

    @property
    def rejections(self) -> list[Rejection]:
        return list(self._rejected)

    def validate(self, manifest: ContributionManifest, delta_bytes: bytes, decoder_bytes: bytes) -> ValidContribution:
        check_manifest(manifest, self.base, self.round_number, self._accepted)
        return check_tensors(manifest, delta_bytes, decoder_bytes, self.base, self.base_tensors)

    def add(self, contribution: ValidContribution) -> None:
        site = contribution.manifest.site
        if self._last_site is not None and site <= self._last_site:
            raise ValueError(f"sites must be added in sorted order: {site!r} after {self._last_site!r}")
        self._last_site = site
        manifest = contribution.manifest
        group = self._groups.setdefault(manifest.task, _GroupSum())
        # A two-track site's shared-track delta (from E_G) feeds level 2, its task-level track
        # (from E_tau) feeds the task-level copy; a one-track site's delta feeds both.
        two_track = any(k.startswith(SHARED_TRACK) for k in contribution.delta)
        source = SHARED_TRACK if two_track else ""
        _accumulate(group.level2, {k: contribution.delta[source + k] for k in self._shared_keys}, manifest.samples)
        own = {k: v for k, v in contribution.delta.items() if not k.startswith(SHARED_TRACK)}
        _accumulate(group.encoder, own, manifest.samples)
        _accumulate(
            group.decoder,
            {k: v for k, v in contribution.decoder.items() if not k.startswith(SHARED_TRACK)},
            manifest.samples,
        )
        group.samples += manifest.samples
        group.manifests.append(manifest)
        for key in dual_keys(self.base_tensors, manifest.task):
            group.mix[key] = group.mix.get(key, 0.0) + manifest.samples * manifest.mix_for(key)
        self._accepted.add(site)

    def offer(self, manifest: ContributionManifest, delta_bytes: bytes, decoder_bytes: bytes) -> bool:
        """Validate and add; a rejection is recorded (and returned as False), never raised."""
        try:
            valid = self.validate(manifest, delta_bytes, decoder_bytes)
        except ContributionRejected as exc:
            self.reject(exc.site, exc.reason, exc.detail)
            return False
        self.add(valid)
        return True

    def reject(self, site: str, reason: RejectReason, detail: str) -> None:
        self._rejected.append(Rejection(site=site, reason=reason.value, detail=detail))

    def finish(self) -> AggregationResult:
        if not self._groups:
            raise NothingAccepted(self._rejected)
        tasks = sorted(self._groups)
        updates = []
        task_means: dict[str, dict[str, np.ndarray]] = {}
        for task in tasks:
            group = self._groups[task]
            task_means[task] = {k: v / group.samples for k, v in group.encoder.items()}
            mean = {k: v / group.samples for k, v in group.level2.items()}
            updates.append(GroupUpdate(task=task, samples=group.samples, mean_delta=mean))

        shared_keys = self._shared_keys
        outcome = level2(
            updates,
            shared_keys,
            weighting=self.settings.level2_weighting,
            rule=self.settings.level2_rule,
            cagrad_c=self.settings.cagrad_c,
            gate_threshold=self.settings.gate_threshold,
            gate_momentum=self.settings.gate_momentum,
            previous=self.base.aggregation,
        )
        weights = outcome.weights
        shared_delta = weighted_mean(updates, weights, shared_keys)
        by_task = {u.task: u for u in updates}

        new: dict[str, np.ndarray] = {}
        for key in sorted(self.base_tensors):
            base_value = self.base_tensors[key]
            owner = owner_of(key)
            if owner.task is None:
                new[key] = (base_value.astype(np.float64) + shared_delta[key]).astype(np.float32)
            elif owner.task not in by_task:
                new[key] = np.array(base_value, dtype=np.float32)  # group absent: unchanged
            elif owner.part == "encoder":
                delta = task_means[owner.task][owner.site_key]
                start = base_value.astype(np.float64)
                if owner.site_key in self.base_tensors:  # dual: the group started from a mix
                    group = self._groups[owner.task]
                    alpha = group.mix[owner.site_key] / group.samples
                    start = start + alpha * (self.base_tensors[owner.site_key].astype(np.float64) - start)
                new[key] = (start + delta).astype(np.float32)
            else:
                group = self._groups[owner.task]
                new[key] = (group.decoder[owner.site_key] / group.samples).astype(np.float32)

        model_bytes = encode_tensors(new)
        manifest = self._global_manifest(model_bytes, weights, tasks, outcome.evidence)
        return AggregationResult(model_bytes=model_bytes, manifest=manifest, tensors=new)

    def _global_manifest(
        self, model_bytes: bytes, weights: list[float], tasks: list[str], evidence: Mapping[str, Any]
    ) -> GlobalManifest:
        accepted = [m for group in self._groups.values() for m in group.manifests]
        return build_global_manifest(
            self.base,
            self.round_number,
            model_bytes,
            accepted,
            self._rejected,
            self.settings,
            dict(zip(tasks, weights, strict=True)),
            evidence,
        )


def build_global_manifest(
    base: GlobalManifest,
    round_number: int,
    model_bytes: bytes,
    accepted: list[ContributionManifest],
    rejected: list[Rejection],
    settings: AggregationSettings,
    level2_weights: Mapping[str, float],
    evidence: Mapping[str, Any] | None = None,
    clipping: Mapping[str, float] | None = None,
) -> GlobalManifest:
    """Provenance of a new global model: who contributed, who was refused, per-task metrics."""
    accepted = sorted(accepted, key=lambda m: m.site)
    infos = {}
    for name, info in base.tasks.items():
        members = [m for m in accepted if m.task == name]
        samples = sum(m.samples for m in members)
        metric_names = sorted({k for m in members for k in m.metrics})
        metrics = {
            k: sum(m.samples * m.metrics[k] for m in members if k in m.metrics)
            / sum(m.samples for m in members if k in m.metrics)
            for k in metric_names
        }
        infos[name] = replace(info, sites=tuple(m.site for m in members), samples=samples, metrics=metrics)
    return GlobalManifest(
        federation=base.federation,
        round=round_number,
        model=FileRef(name=MODEL_FILE, sha256=sha256_hex(model_bytes), size=len(model_bytes)),
        encoder=base.encoder,
        encoder_signature=base.encoder_signature,
        sharing=base.sharing,
        tasks=infos,
        parent_digest=base.digest,
        contributors=tuple(
            Contributor(site=m.site, task=m.task, samples=m.samples, delta_sha256=m.delta.sha256) for m in accepted
        ),
        rejected=tuple(sorted(rejected, key=lambda r: r.site)),
        plugins=base.plugins,
        aggregation={
            **settings.to_dict(),
            **(evidence or {}),
            "level2Weights": dict(sorted(level2_weights.items())),
            **({"privacy": record} if (record := privacy_record(base, settings, clipping)) is not None else {}),
        },
    )


@dataclass(frozen=True)
class ContributionSource:
    """Lazily readable contribution: reading may fail (missing object, network error)."""

    site: str
    read_manifest: Callable[[], ContributionManifest]
    read_files: Callable[[ContributionManifest], tuple[bytes, bytes]]
    # Random access to the same two files (delta, decoder). When every source has it, the
    # round is aggregated tensor by tensor (streaming.py): memory ~2 models whatever the rule,
    # the number of sites or of task groups. Without it, whole contributions are read.
    open_files: Callable[[ContributionManifest], tuple[ByteRange, ByteRange]] | None = None


def aggregate(
    base: GlobalManifest,
    base_tensors: Mapping[str, np.ndarray],
    round_number: int,
    sources: Iterable[ContributionSource],
    settings: AggregationSettings = AggregationSettings(),
    noise_rng: np.random.Generator | None = None,
) -> AggregationResult:
    """Stream every source (sorted by site) through validation into one accumulator.

    Unreadable or invalid contributions are recorded in the result's `rejected`; errors other
    than bad data (e.g. storage outages) propagate so the caller can retry the whole round.
    Raises ValueError when no contribution is accepted. Under settings.privacy the noise comes
    from `noise_rng`, by default fresh OS entropy: noise anyone could regenerate protects nothing.
    """
    rejected: list[Rejection] = []
    readable: list[tuple[ContributionSource, ContributionManifest]] = []
    for source in sorted(sources, key=lambda s: s.site):
        try:
            readable.append((source, source.read_manifest()))
        except ContributionRejected as exc:
            rejected.append(Rejection(site=exc.site, reason=exc.reason.value, detail=exc.detail))
    kept, refused = screen_manifests(base, round_number, [(s.site, m, s) for s, m in readable])
    rejected += refused
    if settings.privacy is not None or not settings.robust.is_default:
        rng = noise_rng if noise_rng is not None else np.random.default_rng()
        return _aggregate_per_key(base, base_tensors, round_number, kept, rejected, settings, rng)
    if all(s.open_files is not None for _, _, s in kept):
        return _aggregate_streamed(base, base_tensors, round_number, kept, rejected, settings)
    if settings.level2_rule is not Level2Rule.MEAN or base.sharing.task_level:
        return _aggregate_by_group(base, base_tensors, round_number, kept, rejected, settings)
    candidates = [Candidate(site=site, manifest=m, read_files=s.read_files) for site, m, s in kept]
    try:
        outcome = aggregate_linear(base, base_tensors, round_number, candidates, settings.level2_weighting)
    except NothingAccepted as exc:
        raise NothingAccepted([*rejected, *exc.rejected]) from None
    rejected += outcome.rejected
    model_bytes = encode_tensors(outcome.tensors)
    manifest = build_global_manifest(
        base, round_number, model_bytes, outcome.accepted, rejected, settings, outcome.level2_weights
    )
    return AggregationResult(model_bytes=model_bytes, manifest=manifest, tensors=outcome.tensors)


def _validate_ranged(
    base_tensors: Mapping[str, np.ndarray],
    kept: list[tuple[str, ContributionManifest, ContributionSource]],
    pool: ThreadPoolExecutor,
    rejected: Sequence[Rejection],
) -> tuple[ReadPlan, list[RangedContribution], list[Rejection]]:
    """Every ranged source checked by streaming.validate_all, with the round's read plan; raises
    NothingAccepted (with `rejected` and its own refusals) when none passes."""
    opened = [(m, s.open_files) for _site, m, s in kept if s.open_files is not None]
    plan = ReadPlan.for_round(sum(int(v.size) * 4 for v in base_tensors.values()), len(opened))
    accepted, refused = validate_all(base_tensors, opened, pool, plan.scan_workers)
    if not accepted:
        raise NothingAccepted([*rejected, *refused])
    return plan, accepted, refused


def _aggregate_streamed(
    base: GlobalManifest,
    base_tensors: Mapping[str, np.ndarray],
    round_number: int,
    kept: list[tuple[str, ContributionManifest, ContributionSource]],
    rejected: list[Rejection],
    settings: AggregationSettings,
) -> AggregationResult:
    """The same result as the whole-contribution paths, read tensor by tensor (streaming.py)."""
    # The pool only waits on reads (S3 round trips): the arithmetic stays in this thread, in
    # the same order as without it.
    linear = settings.level2_rule is Level2Rule.MEAN and not base.sharing.task_level
    with ThreadPoolExecutor(max_workers=PARALLEL_READS, thread_name_prefix="mfed-read") as pool:
        # The mean rule first tries one read per file, checked as it is aggregated (fused.py); a
        # site that would be refused sends the round down the two-pass path, which records why.
        opened = [(m, s.open_files) for _site, m, s in kept if s.open_files is not None]
        plan = ReadPlan.for_round(sum(int(v.size) * 4 for v in base_tensors.values()), len(opened))
        fused = aggregate_fused_linear(base_tensors, opened, settings.level2_weighting, pool, plan) if linear else None
        if fused is not None:
            outcome = fused
        else:
            plan, accepted, refused = _validate_ranged(base_tensors, kept, pool, rejected)
            rejected = rejected + refused
            if all(c.in_memory for c in accepted):  # nothing to wait for: no threads, no read-ahead
                round_ = StreamedRound(base_tensors, accepted)
            else:
                round_ = StreamedRound(base_tensors, accepted, pool, plan)
            if linear:
                outcome = aggregate_streamed_linear(base_tensors, round_, settings.level2_weighting)
            else:
                outcome = aggregate_streamed_groups(base, base_tensors, round_, settings)
    manifest = build_global_manifest(
        base,
        round_number,
        outcome.model_bytes,
        outcome.accepted,
        rejected,
        settings,
        outcome.level2_weights,
        outcome.evidence,
    )
    return AggregationResult(model_bytes=outcome.model_bytes, manifest=manifest, tensors=outcome.tensors)


def _aggregate_per_key(
    base: GlobalManifest,
    base_tensors: Mapping[str, np.ndarray],
    round_number: int,
    kept: list[tuple[str, ContributionManifest, ContributionSource]],
    rejected: list[Rejection],
    settings: AggregationSettings,
    rng: np.random.Generator,
) -> AggregationResult:
    """Median / trimmed mean / norm screen (robust_round.py) or clipped + noised means
    (private_round.py); literal layout only. With ranged sources the files are validated and then
    read one tensor of every site at a time (streaming.py); otherwise whole contributions."""
    if base.sharing.task_level:
        what = "differential privacy" if settings.privacy is not None else "robust rules"
        raise ValueError(f"{what} do not support task-level copies of the shared encoder")
    if all(s.open_files is not None for _, _, s in kept):
        with ThreadPoolExecutor(max_workers=PARALLEL_READS, thread_name_prefix="mfed-read") as pool:
            plan, ranged, refused = _validate_ranged(base_tensors, kept, pool, rejected)
        rejected = rejected + refused
        reads = StreamedRound(base_tensors, ranged, None, plan)  # files through a read-ahead block
        return _combine_per_key(base, base_tensors, round_number, reads.contributions, rejected, settings, rng)
    valid, unreadable = read_valid(base, base_tensors, kept)
    return _combine_per_key(base, base_tensors, round_number, valid, rejected + unreadable, settings, rng)


def _combine_per_key(
    base: GlobalManifest,
    base_tensors: Mapping[str, np.ndarray],
    round_number: int,
    contributions: Sequence[SiteTensors],
    rejected: list[Rejection],
    settings: AggregationSettings,
    rng: np.random.Generator,
) -> AggregationResult:
    if settings.robust.norm_factor is not None and contributions:
        contributions, outliers = screen_norms(contributions, settings.robust.norm_factor, base_tensors)
        rejected = rejected + outliers
    if settings.robust.min_cosine is not None:
        contributions, outliers = screen_directions(contributions, settings.robust.min_cosine, base_tensors)
        rejected = rejected + outliers
    if not contributions:  # every site invalid, or refused by a screen: the status says which and why
        raise NothingAccepted(rejected)
    weighting = settings.level2_weighting
    clipping: dict[str, float] | None = None
    privacy = settings.privacy
    if privacy is not None:
        clip = round_clip_norm(base, privacy)
        norms = site_norms(contributions, base_tensors)
        clipping = {"clipNorm": clip}
        if privacy.adaptive:
            assert privacy.target_quantile is not None
            # the count's noise is drawn first, then the model's (a fixed, documented order)
            clipping["nextClipNorm"] = next_clip_norm(
                [norms[s] for s in sorted(norms)],
                clip,
                privacy.target_quantile,
                privacy.clip_learning_rate,
                privacy.count_noise,
                rng,
            )
        model_bytes, tensors, weights = combine_private(
            base_tensors, contributions, privacy, weighting, rng, clip_norm=clip, norms=norms
        )
    else:
        model_bytes, tensors, weights = combine_round(base_tensors, contributions, settings.robust, weighting)
    accepted = [c.manifest for c in contributions]
    manifest = build_global_manifest(
        base, round_number, model_bytes, accepted, rejected, settings, weights, clipping=clipping
    )
    return AggregationResult(model_bytes=model_bytes, manifest=manifest, tensors=tensors)


def _aggregate_by_group(
    base: GlobalManifest,
    base_tensors: Mapping[str, np.ndarray],
    round_number: int,
    kept: list[tuple[str, ContributionManifest, ContributionSource]],
    rejected: list[Rejection],
    settings: AggregationSettings,
) -> AggregationResult:
    """Rules whose level-2 weights depend on the updates themselves (CAGrad, the gate) and layouts
    with task-level copies need every group's mean delta before combining: one float64 running sum
    per task group (RoundAggregator), still independent of the number of sites."""
    aggregator = RoundAggregator(base, base_tensors, round_number, settings)
    for item in rejected:
        aggregator.reject(item.site, RejectReason(item.reason), item.detail)
    for _site, manifest, source in kept:
        try:
            delta_bytes, decoder_bytes = source.read_files(manifest)
        except ContributionRejected as exc:
            aggregator.reject(exc.site, exc.reason, exc.detail)
            continue
        aggregator.offer(manifest, delta_bytes, decoder_bytes)
    return aggregator.finish()
