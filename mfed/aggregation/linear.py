"""Single-accumulator streaming for linear level-2 rules (uniform or sample-weighted means).

With a linear level 2, the new value of every parameter is a fixed weighted sum of the sites'
contributions:

    shared encoder key:   base + sum_k  w_tau(k) * n_k / N_tau(k) * d_k
    task encoder key:     base + sum_{k in tau} n_k / N_tau * d_k
    task decoder key:            sum_{k in tau} n_k / N_tau * D_k

The coefficients depend only on the manifests (sample counts and task groups), which are read
first. So one float64 accumulator laid out like the global model is enough, plus the one
contribution being read: memory does not depend on the number of sites or of task groups.
A contribution that fails its tensor checks changes the coefficients; the pass then restarts
without it (bounded by the number of sites), so a round with a bad site costs a second read
of the good ones, never a wrong result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from mfed.aggregation.crosstask import GroupUpdate, Level2Weighting, group_weights
from mfed.aggregation.ownership import owner_of
from mfed.aggregation.validate import (
    ContributionRejected,
    NothingAccepted,
    RejectReason,
    ValidContribution,
    check_manifest,
    check_tensors,
)
from mfed.artifacts.manifest import ContributionManifest, GlobalManifest, Rejection

T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """A source whose manifest passed the metadata checks; its tensors are read later."""

    site: str
    manifest: ContributionManifest
    read_files: Callable[[ContributionManifest], tuple[bytes, bytes]]


@dataclass(frozen=True)
class Coefficients:
    shared: float  # weight of the site's delta in the cross-task shared encoder
    task: float  # weight within its task group (n_k / N_tau)


def plan_coefficients(
    manifests: Sequence[ContributionManifest], weighting: Level2Weighting
) -> tuple[dict[str, Coefficients], dict[str, float]]:
    """Per-site coefficients and per-group level-2 weights, from sample counts alone."""
    totals: dict[str, int] = {}
    for m in manifests:
        totals[m.task] = totals.get(m.task, 0) + m.samples
    tasks = sorted(totals)
    # group_weights only reads .task and .samples: the mean deltas are not needed to weigh groups.
    weights = group_weights([GroupUpdate(task=t, samples=totals[t], mean_delta={}) for t in tasks], weighting)
    by_task = dict(zip(tasks, weights, strict=True))
    coefficients = {
        m.site: Coefficients(shared=by_task[m.task] * m.samples / totals[m.task], task=m.samples / totals[m.task])
        for m in manifests
    }
    return coefficients, by_task


class LinearAccumulator:
    """One float64 running sum per key of the new global model."""

    def __init__(self, base_tensors: Mapping[str, np.ndarray], tasks: Iterable[str]) -> None:
        present = set(tasks)
        self.sums: dict[str, np.ndarray] = {}
        for key, value in base_tensors.items():
            owner = owner_of(key)
            if owner.task is None or owner.task in present:
                self.sums[key] = np.zeros(value.shape, dtype=np.float64)

    def add(self, contribution: ValidContribution, coefficients: Coefficients) -> None:
        task = contribution.manifest.task
        for site_key, delta in contribution.delta.items():
            shared = site_key in self.sums
            key = site_key if shared else f"tasks.{task}.{site_key}"
            self.sums[key] += (coefficients.shared if shared else coefficients.task) * delta.astype(np.float64)
        for site_key, value in contribution.decoder.items():
            self.sums[f"tasks.{task}.{site_key}"] += coefficients.task * value.astype(np.float64)

    def finish(self, base_tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        new: dict[str, np.ndarray] = {}
        for key in sorted(base_tensors):
            base = base_tensors[key]
            total = self.sums.pop(key, None)
            if total is None:
                new[key] = np.array(base, dtype=np.float32)  # task group absent this round: unchanged
            elif owner_of(key).part == "decoder":
                new[key] = total.astype(np.float32)
            else:
                total += base
                new[key] = total.astype(np.float32)
        return new


@dataclass(frozen=True)
class LinearOutcome:
    tensors: dict[str, np.ndarray]
    accepted: list[ContributionManifest]
    level2_weights: dict[str, float]
    rejected: list[Rejection]


def aggregate_linear(
    base: GlobalManifest,
    base_tensors: Mapping[str, np.ndarray],
    round_number: int,
    candidates: list[Candidate],
    weighting: Level2Weighting,
) -> LinearOutcome:
    """Stream candidates (sorted by site) into one accumulator; restart without any that fail."""
    rejected: list[Rejection] = []
    remaining = sorted(candidates, key=lambda c: c.site)
    while True:
        if not remaining:
            raise NothingAccepted(rejected)
        coefficients, level2 = plan_coefficients([c.manifest for c in remaining], weighting)
        accumulator = LinearAccumulator(base_tensors, level2)
        accepted: list[ContributionManifest] = []
        failed: Candidate | None = None
        for candidate in remaining:
            try:
                delta_bytes, decoder_bytes = candidate.read_files(candidate.manifest)
                valid = check_tensors(candidate.manifest, delta_bytes, decoder_bytes, base, base_tensors)
            except ContributionRejected as exc:
                rejected.append(Rejection(site=exc.site, reason=exc.reason.value, detail=exc.detail))
                failed = candidate
                break
            accumulator.add(valid, coefficients[candidate.site])
            accepted.append(valid.manifest)  # the tensors are dropped: memory stays one contribution
        if failed is None:
            return LinearOutcome(
                tensors=accumulator.finish(base_tensors), accepted=accepted, level2_weights=level2, rejected=rejected
            )
        remaining = [c for c in remaining if c is not failed]


def screen_manifests(
    base: GlobalManifest, round_number: int, items: Iterable[tuple[str, ContributionManifest, T]]
) -> tuple[list[tuple[str, ContributionManifest, T]], list[Rejection]]:
    """Metadata checks in the given (sorted) order; the first of two same-named sites wins.

    Each item is (site the source claims, its manifest, anything the caller wants carried along)."""
    kept: list[tuple[str, ContributionManifest, T]] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    for site, manifest, extra in items:
        try:
            if manifest.site != site:
                raise ContributionRejected(site, RejectReason.UNREADABLE, f"manifest names site {manifest.site!r}")
            check_manifest(manifest, base, round_number, seen)
        except ContributionRejected as exc:
            rejected.append(Rejection(site=exc.site, reason=exc.reason.value, detail=exc.detail))
            continue
        seen.add(site)
        kept.append((site, manifest, extra))
    return kept, rejected
