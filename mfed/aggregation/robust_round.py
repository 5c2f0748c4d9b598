"""A round under a robust rule (robust.py): screen norms, then combine key by key.

Level 1 combines, per task group, the sites' encoder deltas and decoders with the rule; level 2
combines the groups' encoder updates with the same rule (each group counts the same under
median and trimmed-mean; the configured level-2 weighting applies under mean). Only the
literal layout (no task-level copies) with the mean level-2 rule is supported; settings check.

Contributions are read through `SiteTensors` (a ValidContribution in memory, or a
streaming.RangedContribution read by ranges) one slice of one tensor at a time: a median needs
every site's value of a coordinate, so each slice holds at most SLICE_BYTES of float64 values of
all sites together, and the result is written into one output buffer (streaming.OutputModel).
Memory on the streamed path: about 2 models (the buffer and its final bytes) + a few SLICE_BYTES,
whatever the number of sites or groups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

import numpy as np

from mfed.aggregation.crosstask import GroupUpdate, Level2Weighting, group_weights
from mfed.aggregation.ownership import owner_of
from mfed.aggregation.robust import (
    RobustRule,
    RobustSettings,
    combine,
    cosine,
    direction_outliers,
    l2_norm_of,
    leave_one_out_medians,
    norm_outliers,
)
from mfed.aggregation.streaming import OutputModel
from mfed.aggregation.validate import ContributionRejected, RejectReason, ValidContribution, check_tensors
from mfed.artifacts.manifest import ContributionManifest, GlobalManifest, Rejection


class FileSource(Protocol):
    def read_files(self, manifest: ContributionManifest) -> tuple[bytes, bytes]: ...


SLICE_BYTES = 16 * 2**20


class SiteTensors(Protocol):
    """A validated contribution whose tensors are read one at a time by site-model name."""

    @property
    def manifest(self) -> ContributionManifest: ...

    def tensor(self, site_key: str) -> np.ndarray: ...

    def read_flat(self, site_key: str, start: int, stop: int) -> np.ndarray: ...


def slices(size: int, sites: int) -> list[tuple[int, int]]:
    """[start, stop) runs of a flattened tensor such that `sites` float64 values of each fit SLICE_BYTES."""
    step = max(1, SLICE_BYTES // (8 * max(sites, 1)))
    return [(start, min(size, start + step)) for start in range(0, size, step)] or [(0, 0)]


C = TypeVar("C", bound=SiteTensors)


def delta_norm(c: SiteTensors, base_tensors: Mapping[str, np.ndarray]) -> float:
    """L2 norm of the site's encoder delta (shared keys and its own group's), key by key."""
    task = c.manifest.task
    keys = [k for k in sorted(base_tensors) if owner_of(k).part == "encoder" and owner_of(k).task in (None, task)]
    return l2_norm_of(c.tensor(owner_of(k).site_key) for k in keys)


def screen_norms(
    contributions: Sequence[C], factor: float, base_tensors: Mapping[str, np.ndarray]
) -> tuple[list[C], list[Rejection]]:
    """Refuse deltas whose encoder-update norm is far above the median of their task group; a
    group of fewer than 3 sites cannot judge its own (of two, the median is their mean), so its
    sites are judged against every site of the round."""
    norms = {c.manifest.site: delta_norm(c, base_tensors) for c in contributions}
    groups, _tasks = by_task(contributions)
    refused: dict[str, str] = {}
    everyone = norm_outliers(norms, factor, scope=f"all {len(norms)} sites of the round")
    for members in groups.values():
        sites = [c.manifest.site for c in members]
        if len(sites) >= 3:
            refused.update(norm_outliers({s: norms[s] for s in sites}, factor))
        else:
            refused.update({s: everyone[s] for s in sites if s in everyone})
    return _split(contributions, refused, RejectReason.NORM_OUTLIER)


def shared_encoder_keys(base_tensors: Mapping[str, np.ndarray]) -> list[str]:
    """The encoder keys every task shares (the cross-task average's), sorted."""
    return [k for k in sorted(base_tensors) if owner_of(k).task is None and owner_of(k).part == "encoder"]


def direction_cosines(contributions: Sequence[SiteTensors], base_tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each site's cosine between its shared-encoder delta and the coordinate-wise median of the
    other sites' (all task groups: the shared encoder is one model), streamed slice by slice;
    empty with fewer than 3 sites."""
    n = len(contributions)
    if n < 3:
        return {}
    dots, own, reference = np.zeros(n), np.zeros(n), np.zeros(n)
    for key in shared_encoder_keys(base_tensors):
        # the stacked values, their order and ranks, and the n medians: about 4 copies of the slice
        for start, stop in slices(base_tensors[key].size, 4 * n):
            stacked = np.stack([c.read_flat(key, start, stop).astype(np.float64) for c in contributions])
            medians = leave_one_out_medians(stacked)
            dots += np.einsum("ij,ij->i", stacked, medians)
            own += np.einsum("ij,ij->i", stacked, stacked)
            reference += np.einsum("ij,ij->i", medians, medians)
    return {
        c.manifest.site: cosine(float(d), float(np.sqrt(a)), float(np.sqrt(b)))
        for c, d, a, b in zip(contributions, dots, own, reference, strict=True)
    }


def screen_directions(
    contributions: Sequence[C], min_cosine: float, base_tensors: Mapping[str, np.ndarray]
) -> tuple[list[C], list[Rejection]]:
    """Refuse deltas pointing away from the other sites' median delta (a sign flip, a site
    trained toward another objective); nothing is judged with fewer than 3 sites."""
    refused = direction_outliers(direction_cosines(contributions, base_tensors), min_cosine)
    return _split(contributions, refused, RejectReason.DIRECTION_OUTLIER)


def _split(
    contributions: Sequence[C], refused: Mapping[str, str], reason: RejectReason
) -> tuple[list[C], list[Rejection]]:
    kept = [c for c in contributions if c.manifest.site not in refused]
    return kept, [Rejection(site=s, reason=reason.value, detail=d) for s, d in sorted(refused.items())]


def by_task(contributions: Sequence[C]) -> tuple[dict[str, list[C]], list[str]]:
    """The contributions per task group (sites sorted) and the sorted task names; raises
    ValueError when there are none."""
    groups: dict[str, list[C]] = {}
    for c in sorted(contributions, key=lambda c: c.manifest.site):
        groups.setdefault(c.manifest.task, []).append(c)
    if not groups:
        raise ValueError("no contribution was accepted; there is nothing to aggregate")
    return groups, sorted(groups)


def level2_weights(groups: Mapping[str, Sequence[SiteTensors]], weighting: Level2Weighting) -> dict[str, float]:
    """Each task group's level-2 weight (uniform, or by its sites' samples), by task."""
    tasks = sorted(groups)
    updates = [GroupUpdate(task=t, samples=sum(c.manifest.samples for c in groups[t]), mean_delta={}) for t in tasks]
    return dict(zip(tasks, group_weights(updates, weighting), strict=True))


def combine_round(
    base_tensors: Mapping[str, np.ndarray],
    contributions: Sequence[SiteTensors],
    robust: RobustSettings,
    weighting: Level2Weighting,
) -> tuple[bytes, dict[str, np.ndarray], dict[str, float]]:
    """The new global model (bytes and tensors) and the level-2 weights (nominal: equal under
    median/trimmed). Every rule is coordinate-wise, so combining slice by slice gives the values
    combining whole tensors would."""
    groups, tasks = by_task(contributions)
    weights = level2_weights(groups, weighting if robust.rule is RobustRule.MEAN else Level2Weighting.UNIFORM)
    level2 = [weights[t] for t in tasks]
    out = OutputModel(base_tensors)

    def group_value(task: str, site_key: str, start: int, stop: int) -> np.ndarray:
        members = groups[task]
        values = [c.read_flat(site_key, start, stop) for c in members]
        return combine(values, [c.manifest.samples for c in members], robust)

    for key in sorted(base_tensors):
        base = base_tensors[key].reshape(-1)
        owner = owner_of(key)
        if owner.task is not None and owner.task not in groups:
            out.put(key, base_tensors[key])  # group absent this round: unchanged
            continue
        members = len(contributions) if owner.task is None else len(groups[owner.task])
        for start, stop in slices(base.size, members):
            if owner.task is None:
                moved = combine([group_value(t, key, start, stop) for t in tasks], level2, robust)
                value = base[start:stop].astype(np.float64) + moved
            elif owner.part == "decoder":
                value = group_value(owner.task, owner.site_key, start, stop)
            else:
                value = base[start:stop].astype(np.float64) + group_value(owner.task, owner.site_key, start, stop)
            out.put(key, value.astype(np.float32), start)
    data, tensors = out.finish()
    return data, tensors, weights


def read_valid(
    base: GlobalManifest,
    base_tensors: Mapping[str, np.ndarray],
    kept: Sequence[tuple[str, ContributionManifest, FileSource]],
) -> tuple[list[ValidContribution], list[Rejection]]:
    valid: list[ValidContribution] = []
    rejected: list[Rejection] = []
    for _site, manifest, source in kept:
        try:
            delta_bytes, decoder_bytes = source.read_files(manifest)
            valid.append(check_tensors(manifest, delta_bytes, decoder_bytes, base, base_tensors))
        except ContributionRejected as exc:
            rejected.append(Rejection(site=exc.site, reason=exc.reason.value, detail=exc.detail))
    return valid, rejected
