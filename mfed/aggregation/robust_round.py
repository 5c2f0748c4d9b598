"""A round under a robust rule (robust.py): screen norms, then combine key by key.

Level 1 combines, per task group, the sites' encoder deltas and decoders with the rule; level 2
combines the groups' encoder updates with the same rule (each group counts the same under
median and trimmed-mean; the configured level-2 weighting applies under mean). Only the
literal layout (no task-level copies) with the mean level-2 rule is supported; settings check.

Memory: the decoded contributions of the round's accepted sites are held while combining (a
median needs every site's value of a coordinate). The combination itself is per key, so a
reader that fetches one key of every site at a time can bound memory to one key x sites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from mfed.aggregation.crosstask import GroupUpdate, Level2Weighting, group_weights
from mfed.aggregation.ownership import owner_of
from mfed.aggregation.robust import RobustRule, RobustSettings, combine, l2_norm, norm_outliers
from mfed.aggregation.validate import ContributionRejected, RejectReason, ValidContribution, check_tensors
from mfed.artifacts.manifest import ContributionManifest, GlobalManifest, Rejection


class FileSource(Protocol):
    def read_files(self, manifest: ContributionManifest) -> tuple[bytes, bytes]: ...


def screen_norms(
    contributions: Sequence[ValidContribution], factor: float
) -> tuple[list[ValidContribution], list[Rejection]]:
    """Refuse deltas whose encoder-update norm is far above their task group's median."""
    by_task: dict[str, dict[str, float]] = {}
    for c in contributions:
        by_task.setdefault(c.manifest.task, {})[c.manifest.site] = l2_norm(c.delta)
    refused: dict[str, str] = {}
    for norms in by_task.values():
        refused.update(norm_outliers(norms, factor))
    kept = [c for c in contributions if c.manifest.site not in refused]
    rejected = [Rejection(site=s, reason=RejectReason.NORM_OUTLIER.value, detail=d) for s, d in sorted(refused.items())]
    return kept, rejected


def combine_round(
    base_tensors: Mapping[str, np.ndarray],
    contributions: Sequence[ValidContribution],
    robust: RobustSettings,
    weighting: Level2Weighting,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The new global tensors and the level-2 weights (nominal: equal under median/trimmed)."""
    groups: dict[str, list[ValidContribution]] = {}
    for c in sorted(contributions, key=lambda c: c.manifest.site):
        groups.setdefault(c.manifest.task, []).append(c)
    if not groups:
        raise ValueError("no contribution was accepted; there is nothing to aggregate")
    tasks = sorted(groups)
    level2 = group_weights(
        [GroupUpdate(task=t, samples=sum(c.manifest.samples for c in groups[t]), mean_delta={}) for t in tasks],
        weighting if robust.rule is RobustRule.MEAN else Level2Weighting.UNIFORM,
    )
    new: dict[str, np.ndarray] = {}
    for key in sorted(base_tensors):
        base = base_tensors[key]
        owner = owner_of(key)
        if owner.task is None:
            group_values = []
            for task in tasks:
                members = groups[task]
                group_values.append(
                    combine([c.delta[key] for c in members], [c.manifest.samples for c in members], robust)
                )
            new[key] = (base.astype(np.float64) + combine(group_values, level2, robust)).astype(np.float32)
        elif owner.task not in groups:
            new[key] = np.array(base, dtype=np.float32)  # group absent this round: unchanged
        else:
            members = groups[owner.task]
            samples = [c.manifest.samples for c in members]
            if owner.part == "decoder":
                new[key] = combine([c.decoder[owner.site_key] for c in members], samples, robust).astype(np.float32)
            else:
                delta = combine([c.delta[owner.site_key] for c in members], samples, robust)
                new[key] = (base.astype(np.float64) + delta).astype(np.float32)
    return new, dict(zip(tasks, level2, strict=True))


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
