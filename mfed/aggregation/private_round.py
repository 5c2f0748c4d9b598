"""A round under site-level differential privacy (mfed.privacy): clip, sum, add noise, average.

Level 1: in each task group tau of m sites, every site's update u_k (encoder delta and decoder
change, one vector) is scaled to L2 norm <= C, and the group's new parameters are
    base + (sum_k clip(u_k) + N(0, (z C)^2 I)) / m.
Each site counts once whatever its sample count: with sample weights a large site's update
would carry more than C into the mean and the noise would no longer cover it. Level 2 combines
the groups' noisy encoder updates with the configured weighting (uniform, or by the groups'
sample counts, which the manifest publishes anyway) — post-processing, no further noise.

Only the literal layout with the mean rule (no task-level copies, no CAGrad, no gate, no robust
rule: settings check). Tensors are read one key at a time (robust_round.SiteTensors), twice: once
for each site's norm, once to combine. Draws come from `rng` in sorted key then sorted task order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mfed.aggregation.crosstask import Level2Weighting
from mfed.aggregation.ownership import owner_of
from mfed.aggregation.robust import l2_norm_of
from mfed.aggregation.robust_round import SiteTensors, by_task, level2_weights, slices
from mfed.aggregation.streaming import OutputModel
from mfed.privacy.mechanism import clip_scale, noisy_mean
from mfed.privacy.settings import PrivacySettings


def _change(c: SiteTensors, key: str, base_tensors: Mapping[str, np.ndarray], start: int, stop: int) -> np.ndarray:
    """What the site's data moved at elements [start, stop) of one global key (flattened)."""
    owner = owner_of(key)
    value = np.asarray(c.read_flat(owner.site_key, start, stop), dtype=np.float64)
    if owner.part == "decoder":
        change: np.ndarray = value - base_tensors[key].reshape(-1)[start:stop]
        return change
    return value


def _own_keys(task: str, base_tensors: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k in sorted(base_tensors) if owner_of(k).task in (None, task)]


def site_norms(contributions: Sequence[SiteTensors], base_tensors: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per site, the L2 norm of its whole update (encoder delta + decoder change), slice by slice."""
    return {
        c.manifest.site: l2_norm_of(
            _change(c, k, base_tensors, start, stop)
            for k in _own_keys(c.manifest.task, base_tensors)
            for start, stop in slices(base_tensors[k].size, 1)
        )
        for c in contributions
    }


def combine_private(
    base_tensors: Mapping[str, np.ndarray],
    contributions: Sequence[SiteTensors],
    privacy: PrivacySettings,
    weighting: Level2Weighting,
    rng: np.random.Generator,
    clip_norm: float,
    norms: Mapping[str, float],
) -> tuple[bytes, dict[str, np.ndarray], dict[str, float]]:
    """The new global model (bytes and tensors) and the level-2 weights, clipping at `clip_norm`
    the updates whose norms are `norms` (site_norms). Per key, each group's noise is drawn slice
    after slice, which is the same stream as one draw of the whole key."""
    groups, tasks = by_task(contributions)
    level2 = level2_weights(groups, weighting)
    scales = {site: clip_scale(norm, clip_norm) for site, norm in norms.items()}
    noise_std = privacy.noise_multiplier * clip_norm
    out = OutputModel(base_tensors)
    for key in sorted(base_tensors):
        owner = owner_of(key)
        if owner.task is not None and owner.task not in groups:
            out.put(key, base_tensors[key])  # group absent this round: unchanged
            continue
        # the shared encoder moves by the weighted groups' noisy means; a group's own keys by its own
        contributing = tasks if owner.task is None else [owner.task]
        weights = {t: level2[t] for t in tasks} if owner.task is None else {owner.task: 1.0}
        value = base_tensors[key].reshape(-1).astype(np.float64)
        for task in contributing:
            members = groups[task]
            for start, stop in slices(value.size, len(members)):
                clipped_sum = np.zeros(stop - start, dtype=np.float64)
                for c in members:
                    clipped_sum += scales[c.manifest.site] * _change(c, key, base_tensors, start, stop)
                value[start:stop] += weights[task] * noisy_mean(clipped_sum, len(members), noise_std, rng)
        out.put(key, value.astype(np.float32))
    data, tensors = out.finish()
    return data, tensors, level2
