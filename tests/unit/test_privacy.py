"""Site-level DP aggregation against an independent numpy oracle, and epsilon against the
accountant library called here directly (RDP), with Google's PLD accountant as a cross-check.

What this does not check: that the noise is secret. The operator draws it from OS entropy
(default_rng() without a seed); the tests pass seeded generators to compare bytes.
"""

from __future__ import annotations

import math
from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from mfed.aggregation.crosstask import Level2Rule, Level2Weighting
from mfed.aggregation.fedavg import AggregationSettings, ContributionSource, aggregate
from mfed.aggregation.robust import RobustRule, RobustSettings
from mfed.artifacts.manifest import ContributionManifest
from mfed.privacy.ledger import PrivacyLedger, chain_epsilon
from mfed.privacy.settings import PrivacySettingError, PrivacySettings
from mfed.spec import SharingPolicy
from tests.unit.factories import ENCODER_SHAPES, make_base, make_contribution

SITES = [("a-0", "a", 10), ("a-1", "a", 400), ("a-2", "a", 25), ("b-0", "b", 50), ("b-1", "b", 7)]


def _source(manifest: ContributionManifest, delta: bytes, decoder: bytes) -> ContributionSource:
    return ContributionSource(
        site=manifest.site, read_manifest=lambda: manifest, read_files=lambda _m: (delta, decoder)
    )


def _round(seed: int = 0, samples: dict[str, int] | None = None, scale: float = 1.0):
    base, tensors, _ = make_base()
    rng = np.random.default_rng(seed)
    contribs = []
    for site, task, n in SITES:
        delta = {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in ENCODER_SHAPES.items()}
        contribs.append(make_contribution(base, site, task, (samples or {}).get(site, n), rng, delta=delta))
    return base, tensors, contribs


def _oracle(tensors, contribs, clip: float, z: float, noise_seed: int | None):
    """base + (sum of clipped updates + N(0, (zC)^2)) / m per group; level 2 uniform over groups.
    Noise drawn per global key in sorted order, per task in sorted order (the documented order)."""
    groups: dict[str, list] = {}
    for m, _d, _c, delta, decoder in sorted(contribs, key=lambda c: c[0].site):
        change = {k: delta[k].astype(np.float64) for k in delta}
        for k, v in decoder.items():
            change[f"tasks.{m.task}.{k}"] = v.astype(np.float64) - tensors[f"tasks.{m.task}.{k}"].astype(np.float64)
        norm = np.sqrt(sum(np.sum(v**2) for v in change.values()))
        groups.setdefault(m.task, []).append({k: v * min(1.0, clip / norm) for k, v in change.items()})
    rng = np.random.default_rng(noise_seed) if noise_seed is not None else None

    def noisy(task, key):
        total = sum(u[key] for u in groups[task])
        noise = rng.normal(0.0, z * clip, size=total.shape) if rng is not None else 0.0
        return (total + noise) / len(groups[task])

    expected = {}
    for key in sorted(tensors):
        base = tensors[key].astype(np.float64)
        if key.startswith("encoder."):
            expected[key] = base + sum(noisy(t, key) for t in sorted(groups)) / len(groups)
        else:
            expected[key] = base + noisy(key.split(".")[1], key)
    return expected


def _run(base, tensors, contribs, privacy, seed, weighting=Level2Weighting.UNIFORM):
    settings = AggregationSettings(level2_weighting=weighting, privacy=privacy)
    sources = [_source(m, d, c) for m, d, c, _, _ in contribs]
    return aggregate(base, tensors, 1, sources, settings, noise_rng=np.random.default_rng(seed))


@pytest.mark.parametrize(("clip", "scale"), [(0.5, 1.0), (100.0, 1.0), (2.0, 0.3)])
def test_private_round_matches_the_numpy_oracle(clip, scale):
    base, tensors, contribs = _round(1, scale=scale)
    privacy = PrivacySettings(clip_norm=clip, noise_multiplier=0.8)
    result = _run(base, tensors, contribs, privacy, seed=7)
    expected = _oracle(tensors, contribs, clip, 0.8, noise_seed=7)
    assert sorted(result.tensors) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(result.tensors[key], value, rtol=0, atol=2e-6, err_msg=key)


def test_each_site_counts_once_whatever_its_sample_count():
    privacy = PrivacySettings(clip_norm=1.0, noise_multiplier=1.0)
    base, tensors, small = _round(2)
    _, _, large = _round(2, samples={"a-1": 100000})
    one, other = _run(base, tensors, small, privacy, 3), _run(base, tensors, large, privacy, 3)
    for key in tensors:
        np.testing.assert_array_equal(one.tensors[key], other.tensors[key])


def test_the_noise_has_the_calibrated_spread_around_the_clipped_mean():
    """Over 300 draws, per coordinate: mean -> clipped mean, std -> z C / m (chi-square bounds)."""
    clip, z = 0.5, 1.5
    base, tensors, contribs = _round(4)
    privacy = PrivacySettings(clip_norm=clip, noise_multiplier=z)
    clean = _oracle(tensors, contribs, clip, z, noise_seed=None)
    key = "tasks.a.decoder.0.weight"  # 3 sites in group a: std z C / 3
    draws = np.stack([_run(base, tensors, contribs, privacy, seed).tensors[key] for seed in range(300)]).astype(
        np.float64
    )
    residual = (draws - clean[key]).ravel()
    expected_std = z * clip / 3
    # 300 x 10 coordinates: the sample std is within 5% of the truth with overwhelming probability
    assert abs(residual.std() / expected_std - 1) < 0.05
    assert abs(residual.mean()) < 4 * expected_std / math.sqrt(residual.size)


def test_epsilon_in_the_manifest_is_the_accountants_and_the_chain_composes():
    z, delta = 1.1, 1e-5
    privacy = PrivacySettings(clip_norm=1.0, noise_multiplier=z, delta=delta)
    base, tensors, contribs = _round(5)
    first = _run(base, tensors, contribs, privacy, 0).manifest
    record = first.aggregation["privacy"]
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), 1)
    assert record["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-6)
    assert record["releases"] == [[z, 1]] and record["unprotectedRounds"] == 0 and record["rounds"] == 1
    assert record["clipNorm"] == 1.0 and "nextClipNorm" not in record
    # three more rounds continue the ledger from the model, a round with another multiplier too
    ledger = PrivacyLedger.of_model(first.aggregation, first.round).after((z,)).after((z,)).after((2.0,))
    independent = rdp.RdpAccountant()
    independent.compose(dp_accounting.GaussianDpEvent(z), 3)
    independent.compose(dp_accounting.GaussianDpEvent(2.0), 1)
    assert ledger.releases == ((z, 3), (2.0, 1)) and ledger.rounds == 4
    assert ledger.epsilon(delta) == pytest.approx(independent.get_epsilon(delta), rel=1e-6)
    # RDP is an upper bound: the (tighter) PLD accountant never says more
    tight = pld.PLDAccountant()
    tight.compose(dp_accounting.GaussianDpEvent(z), 3)
    tight.compose(dp_accounting.GaussianDpEvent(2.0), 1)
    assert tight.get_epsilon(delta) <= ledger.epsilon(delta) < 1.5 * tight.get_epsilon(delta)


def test_a_round_without_noise_leaves_no_finite_epsilon():
    privacy = PrivacySettings(clip_norm=1.0, noise_multiplier=1.0)
    base, tensors, contribs = _round(6)
    private = _run(base, tensors, contribs, privacy, 0).manifest
    # the next round of the same chain aggregates without spec.privacy: its model says so
    second_base = replace(base, round=1, aggregation=private.aggregation)
    second = [
        make_contribution(second_base, m.site, m.task, m.samples, np.random.default_rng(1), round_number=2)
        for m, *_ in contribs
    ]
    plain = aggregate(second_base, tensors, 2, [_source(m, d, c) for m, d, c, _, _ in second], AggregationSettings())
    record = plain.manifest.aggregation["privacy"]
    assert record["releases"] == [[1.0, 1]] and record["unprotectedRounds"] == 1 and record["epsilon"] is None
    assert math.isinf(PrivacyLedger.of_model(plain.manifest.aggregation, 2).after((1.0,)).epsilon(1e-5))
    # a model from plain rounds carries them all: DP from round 4 on cannot undo rounds 1-3
    assert PrivacyLedger.of_model({}, 3).after((1.0,)).unprotected_rounds == 3
    assert PrivacyLedger.of_model({}, 0).after((1.0,)).unprotected_rounds == 0  # the initial model saw no data


def test_plain_rounds_keep_their_manifests_as_they_were():
    base, tensors, contribs = _round(7)
    plain = aggregate(base, tensors, 1, [_source(m, d, c) for m, d, c, _, _ in contribs], AggregationSettings())
    assert "privacy" not in plain.manifest.aggregation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clipNorm"),
        ({"clip_norm": math.inf, "noise_multiplier": 1.0}, "clipNorm"),
        ({"clip_norm": 1.0, "noise_multiplier": 0.0}, "noiseMultiplier"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "delta"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "epsilon_budget": -1.0}, "epsilonBudget"),
    ],
)
def test_bad_privacy_settings_name_the_field(kwargs, field):
    with pytest.raises(PrivacySettingError, match=field) as caught:
        PrivacySettings(**kwargs)
    assert caught.value.field == field


def test_privacy_refuses_rules_it_cannot_account_for():
    privacy = PrivacySettings(clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="mean rule only"):
        AggregationSettings(level2_rule=Level2Rule.CAGRAD, privacy=privacy)
    with pytest.raises(ValueError, match="mean rule only"):
        AggregationSettings(robust=RobustSettings(rule=RobustRule.MEDIAN), privacy=privacy)
    base, tensors, _ = make_base(SharingPolicy(task_level=True))
    with pytest.raises(ValueError, match="task-level"):
        aggregate(base, tensors, 1, [], AggregationSettings(privacy=privacy))


def test_chain_epsilon_of_nothing_is_zero():
    assert chain_epsilon((), 1e-5) == 0.0


def test_adaptive_clipping_moves_the_clip_norm_toward_the_target_quantile_and_accounts_the_count():
    """Andrew et al. 2021, recomputed here: C' = C exp(-eta (b - gamma)), b = (within + N(0, s^2)) / n,
    the count's noise drawn first from the round's generator; the next round clips at C'."""
    z, s_count, eta, gamma, clip = 1.0, 0.5, 0.2, 0.5, 0.05
    privacy = PrivacySettings(
        clip_norm=clip, noise_multiplier=z, target_quantile=gamma, clip_learning_rate=eta, count_noise=s_count
    )
    base, tensors, contribs = _round(9)
    first = _run(base, tensors, contribs, privacy, seed=4).manifest.aggregation["privacy"]
    norms = []
    for m, _d, _c, delta, decoder in contribs:
        change = [v.astype(np.float64) for v in delta.values()]
        change += [v - tensors[f"tasks.{m.task}.{k}"] for k, v in decoder.items()]
        norms.append(math.sqrt(sum(float(np.sum(c**2)) for c in change)))
    within = sum(n <= clip for n in norms) + np.random.default_rng(4).normal(0.0, s_count)
    expected = clip * math.exp(-eta * (within / len(norms) - gamma))
    assert first["clipNorm"] == clip and first["nextClipNorm"] == pytest.approx(expected, rel=1e-12)
    assert min(norms) > clip and first["nextClipNorm"] > clip  # every update was clipped: C grows
    # two Gaussian mechanisms a round, composed by the accountant called directly
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), 1)
    accountant.compose(dp_accounting.GaussianDpEvent(s_count), 1)
    assert first["releases"] == [[s_count, 1], [z, 1]] and first["rounds"] == 1
    assert first["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    # the next round of the chain clips at the carried norm
    second_base = replace(base, round=1, aggregation={"privacy": first})
    second = [
        make_contribution(second_base, m.site, m.task, m.samples, np.random.default_rng(2), round_number=2)
        for m, *_ in contribs
    ]
    sources = [_source(m, d, c) for m, d, c, _, _ in second]
    settings = AggregationSettings(privacy=privacy)
    record = aggregate(second_base, tensors, 2, sources, settings, noise_rng=np.random.default_rng(0)).manifest
    assert record.aggregation["privacy"]["clipNorm"] == first["nextClipNorm"]
    assert record.aggregation["privacy"]["rounds"] == 2
