"""A round under site-level differential privacy (mfed.privacy): clip, sum, add noise, average.

Level 1: in each task group tau of m sites, every site's update u_k (encoder delta and decoder
change, one vector) is scaled to L2 norm <= C, and the group's new parameters are
    base + (sum_k clip(u_k) + N(0, (z C)^2 I)) / m.
Each site counts once whatever its sample count: with sample weights a large site's update
would carry more than C into the mean and the noise would no longer cover it. Level 2 combines
the groups' noisy encoder updates with the configured weighting (uniform, or by the groups'
sample counts, which the manifest publishes anyway) — post-processing, no further noise.

Only the literal layout with the mean rule (no task-level copies, no CAGrad, no gate, no robust
rule: settings check); the decoded contributions of the round are held while combining, like
the robust rules (robust_round.py). Draws come from `rng` in sorted key then sorted task order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mfed.aggregation.crosstask import GroupUpdate, Level2Weighting, group_weights
from mfed.aggregation.ownership import owner_of
from mfed.aggregation.validate import ValidContribution
from mfed.privacy.mechanism import clip_scale, noisy_mean, update_norm
from mfed.privacy.settings import PrivacySettings


def _change(c: ValidContribution, key: str, base_tensors: Mapping[str, np.ndarray]) -> np.ndarray:
    """What the site's data moved at one global key (its own group's keys and the shared ones)."""
    owner = owner_of(key)
    if owner.part == "decoder":
        change: np.ndarray = np.asarray(c.decoder[owner.site_key], dtype=np.float64) - base_tensors[key]
        return change
    return np.asarray(c.delta[owner.site_key], dtype=np.float64)


def _own_keys(task: str, base_tensors: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k in sorted(base_tensors) if owner_of(k).task in (None, task)]


def clip_scales(
    contributions: Sequence[ValidContribution], base_tensors: Mapping[str, np.ndarray], clip_norm: float
) -> dict[str, float]:
    """Per site, the factor that clips its whole update (encoder delta + decoder change) to `clip_norm`."""
    return {
        c.manifest.site: clip_scale(
            update_norm(_change(c, k, base_tensors) for k in _own_keys(c.manifest.task, base_tensors)), clip_norm
        )
        for c in contributions
    }


def combine_private(
    base_tensors: Mapping[str, np.ndarray],
    contributions: Sequence[ValidContribution],
    privacy: PrivacySettings,
    weighting: Level2Weighting,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The new global tensors and the level-2 weights."""
    groups: dict[str, list[ValidContribution]] = {}
    for c in sorted(contributions, key=lambda c: c.manifest.site):
        groups.setdefault(c.manifest.task, []).append(c)
    if not groups:
        raise ValueError("no contribution was accepted; there is nothing to aggregate")
    tasks = sorted(groups)
    level2 = group_weights(
        [GroupUpdate(task=t, samples=sum(c.manifest.samples for c in groups[t]), mean_delta={}) for t in tasks],
        weighting,
    )
    scales = clip_scales(contributions, base_tensors, privacy.clip_norm)

    def group_mean(task: str, key: str) -> np.ndarray:
        clipped_sum = np.zeros(base_tensors[key].shape, dtype=np.float64)
        for c in groups[task]:
            clipped_sum += scales[c.manifest.site] * _change(c, key, base_tensors)
        return noisy_mean(clipped_sum, len(groups[task]), privacy.noise_std, rng)

    new: dict[str, np.ndarray] = {}
    for key in sorted(base_tensors):
        base = np.asarray(base_tensors[key], dtype=np.float64)
        owner = owner_of(key)
        if owner.task is None:
            update = np.zeros(base.shape, dtype=np.float64)
            for task, weight in zip(tasks, level2, strict=True):
                update += weight * group_mean(task, key)
            new[key] = (base + update).astype(np.float32)
        elif owner.task not in groups:
            new[key] = np.array(base_tensors[key], dtype=np.float32)  # group absent this round: unchanged
        else:
            new[key] = (base + group_mean(owner.task, key)).astype(np.float32)
    return new, dict(zip(tasks, level2, strict=True))
