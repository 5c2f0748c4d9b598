"""Streaming two-level aggregation (M-Fed server side), pure numpy.

Level 1, within each task group tau: E_tau = E_base + sum_k n_k d_k / N_tau and
D_tau = sum_k n_k D_k / N_tau, where d_k is site k's encoder delta and D_k its decoder.
Level 2, across groups: the shared encoder parameters get base + combine(mean deltas).

Memory: one float64 running sum per task group (encoder + decoder) plus the contribution
being added; it does not grow with the number of sites. Sites must be added in sorted order
and groups are combined in sorted order, so a re-run produces identical bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mfed.aggregation.crosstask import GroupUpdate, Level2Weighting, group_weights, weighted_mean
from mfed.aggregation.linear import Candidate, aggregate_linear, screen_manifests
from mfed.aggregation.ownership import owner_of
from mfed.aggregation.validate import (
    ContributionRejected,
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
from mfed.artifacts.tensorfile import encode_tensors, sha256_hex


@dataclass(frozen=True, kw_only=True)
class AggregationSettings:
    level2_weighting: Level2Weighting = Level2Weighting.UNIFORM

    def to_dict(self) -> dict[str, Any]:
        return {"level2Weighting": self.level2_weighting.value}


@dataclass
class _GroupSum:
    samples: int = 0
    encoder: dict[str, np.ndarray] = field(default_factory=dict)
    decoder: dict[str, np.ndarray] = field(default_factory=dict)
    manifests: list[ContributionManifest] = field(default_factory=list)


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
        _accumulate(group.encoder, contribution.delta, manifest.samples)
        _accumulate(group.decoder, contribution.decoder, manifest.samples)
        group.samples += manifest.samples
        group.manifests.append(manifest)
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
            raise ValueError("no contribution was accepted; there is nothing to aggregate")
        tasks = sorted(self._groups)
        updates = []
        for task in tasks:
            group = self._groups[task]
            mean = {k: v / group.samples for k, v in group.encoder.items()}
            updates.append(GroupUpdate(task=task, samples=group.samples, mean_delta=mean))

        shared_keys = sorted(k for k in self.base_tensors if owner_of(k).task is None)
        weights = group_weights(updates, self.settings.level2_weighting)
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
                delta = by_task[owner.task].mean_delta[owner.site_key]
                new[key] = (base_value.astype(np.float64) + delta).astype(np.float32)
            else:
                group = self._groups[owner.task]
                new[key] = (group.decoder[owner.site_key] / group.samples).astype(np.float32)

        model_bytes = encode_tensors(new)
        manifest = self._global_manifest(model_bytes, weights, tasks)
        return AggregationResult(model_bytes=model_bytes, manifest=manifest, tensors=new)

    def _global_manifest(self, model_bytes: bytes, weights: list[float], tasks: list[str]) -> GlobalManifest:
        accepted = [m for group in self._groups.values() for m in group.manifests]
        return build_global_manifest(
            self.base,
            self.round_number,
            model_bytes,
            accepted,
            self._rejected,
            self.settings,
            dict(zip(tasks, weights, strict=True)),
        )


def build_global_manifest(
    base: GlobalManifest,
    round_number: int,
    model_bytes: bytes,
    accepted: list[ContributionManifest],
    rejected: list[Rejection],
    settings: AggregationSettings,
    level2_weights: Mapping[str, float],
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
        aggregation={**settings.to_dict(), "level2Weights": dict(sorted(level2_weights.items()))},
    )


@dataclass(frozen=True)
class ContributionSource:
    """Lazily readable contribution: reading may fail (missing object, network error)."""

    site: str
    read_manifest: Callable[[], ContributionManifest]
    read_files: Callable[[ContributionManifest], tuple[bytes, bytes]]


def aggregate(
    base: GlobalManifest,
    base_tensors: Mapping[str, np.ndarray],
    round_number: int,
    sources: Iterable[ContributionSource],
    settings: AggregationSettings = AggregationSettings(),
) -> AggregationResult:
    """Stream every source (sorted by site) through validation into one accumulator.

    Unreadable or invalid contributions are recorded in the result's `rejected`; errors other
    than bad data (e.g. storage outages) propagate so the caller can retry the whole round.
    Raises ValueError when no contribution is accepted.
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
    candidates = [Candidate(site=site, manifest=m, read_files=s.read_files) for site, m, s in kept]
    outcome = aggregate_linear(base, base_tensors, round_number, candidates, settings.level2_weighting)
    rejected += outcome.rejected
    model_bytes = encode_tensors(outcome.tensors)
    manifest = build_global_manifest(
        base, round_number, model_bytes, outcome.accepted, rejected, settings, outcome.level2_weights
    )
    return AggregationResult(model_bytes=model_bytes, manifest=manifest, tensors=outcome.tensors)
