"""The direction screen (minCosine) and the round-wide norm reference, against numpy oracles:
np.median of np.delete for the leave-one-out median, cosines from flattened arrays here."""

from __future__ import annotations

import numpy as np
import pytest

from mfed.aggregation.fedavg import AggregationSettings, ContributionSource, aggregate
from mfed.aggregation.robust import RobustSettings, direction_outliers, leave_one_out_medians
from mfed.aggregation.validate import NothingAccepted, RejectReason
from mfed.artifacts.manifest import ContributionManifest
from tests.unit.factories import ENCODER_SHAPES, make_base, make_contribution


def _source(manifest: ContributionManifest, delta: bytes, decoder: bytes) -> ContributionSource:
    return ContributionSource(
        site=manifest.site, read_manifest=lambda: manifest, read_files=lambda _m: (delta, decoder)
    )


@pytest.mark.parametrize("n", [3, 4, 5, 8, 9])
def test_leave_one_out_medians_match_numpy_without_each_row(n):
    rng = np.random.default_rng(n)
    stacked = np.round(rng.standard_normal((n, 40)), 1)  # rounded: ties between sites occur
    expected = np.stack([np.median(np.delete(stacked, i, axis=0), axis=0) for i in range(n)])
    np.testing.assert_allclose(leave_one_out_medians(stacked), expected, rtol=0, atol=1e-12)


def test_leave_one_out_medians_need_three_sites():
    with pytest.raises(ValueError, match="at least 3"):
        leave_one_out_medians(np.zeros((2, 4)))


def _round(rng, *, flipped: set[str], scaled: set[str] = frozenset(), per_task: int = 4):
    """Honest sites share one direction plus noise; a flipped site sends minus its update."""
    base, tensors, _ = make_base()
    common = {k: rng.standard_normal(s).astype(np.float32) for k, s in ENCODER_SHAPES.items()}
    contribs = []
    for task in "ab":
        for i in range(per_task):
            site = f"{task}-{i}"
            delta = {k: common[k] + 0.7 * rng.standard_normal(v.shape).astype(np.float32) for k, v in common.items()}
            if site in flipped:
                delta = {k: -v for k, v in delta.items()}
            if site in scaled:
                delta = {k: 100 * v for k, v in delta.items()}
            contribs.append(make_contribution(base, site, task, 10 + i, rng, delta=delta))
    return base, tensors, contribs


def _oracle_cosines(contribs) -> dict[str, float]:
    flat = np.stack(
        [
            np.concatenate([d[k].astype(np.float64).ravel() for k in sorted(ENCODER_SHAPES)])
            for _, _, _, d, _ in contribs
        ]
    )
    out = {}
    for i, (m, *_rest) in enumerate(contribs):
        median = np.median(np.delete(flat, i, axis=0), axis=0)
        out[m.site] = float(flat[i] @ median / (np.linalg.norm(flat[i]) * np.linalg.norm(median)))
    return out


def _aggregate(base, tensors, contribs, settings):
    return aggregate(base, tensors, 1, [_source(m, d, c) for m, d, c, _, _ in contribs], settings)


def test_a_sign_flipped_site_is_refused_with_its_cosine_and_the_rest_are_averaged():
    base, tensors, contribs = _round(np.random.default_rng(1), flipped={"a-0"})
    cosines = _oracle_cosines(contribs)
    assert cosines["a-0"] < 0 < min(v for s, v in cosines.items() if s != "a-0")  # the setting holds
    result = _aggregate(base, tensors, contribs, AggregationSettings(robust=RobustSettings(min_cosine=0.0)))
    assert [(r.site, r.reason) for r in result.manifest.rejected] == [("a-0", RejectReason.DIRECTION_OUTLIER.value)]
    assert f"cosine {cosines['a-0']:.3f}" in result.manifest.rejected[0].detail
    assert "a-0" not in result.manifest.tasks["a"].sites
    # what is left is combined by the rule (mean) exactly as a round without the refused site
    without = _aggregate(base, tensors, contribs[1:], AggregationSettings())
    for key in tensors:
        np.testing.assert_array_equal(result.tensors[key], without.tensors[key])


def test_honest_sites_pass_the_screen_and_the_model_is_the_plain_mean():
    base, tensors, contribs = _round(np.random.default_rng(2), flipped=set())
    screened = _aggregate(base, tensors, contribs, AggregationSettings(robust=RobustSettings(min_cosine=0.0)))
    plain = _aggregate(base, tensors, contribs, AggregationSettings())
    assert screened.manifest.rejected == ()
    assert screened.manifest.aggregation["robust"] == {"rule": "mean", "minCosine": 0.0}
    for key in tensors:
        np.testing.assert_array_equal(screened.tensors[key], plain.tensors[key])


def test_with_fewer_than_three_sites_nothing_is_judged():
    base, tensors, contribs = _round(np.random.default_rng(3), flipped={"a-0"}, per_task=1)
    result = _aggregate(base, tensors, contribs, AggregationSettings(robust=RobustSettings(min_cosine=0.9)))
    assert result.manifest.rejected == ()


def test_a_scaled_site_in_a_two_site_group_is_judged_against_every_site_of_the_round():
    base, tensors, contribs = _round(np.random.default_rng(4), flipped=set(), scaled={"a-0"}, per_task=2)
    result = _aggregate(base, tensors, contribs, AggregationSettings(robust=RobustSettings(norm_factor=3.0)))
    assert [(r.site, r.reason) for r in result.manifest.rejected] == [("a-0", RejectReason.NORM_OUTLIER.value)]
    assert "all 4 sites of the round" in result.manifest.rejected[0].detail


def test_direction_outliers_refuse_below_the_threshold_only():
    refused = direction_outliers({"a": 0.3, "b": -0.2, "c": 0.05}, 0.1)
    assert list(refused) == ["b", "c"] and "minCosine 0.1" in refused["b"]


@pytest.mark.parametrize("value", [1.0, -1.0, float("nan"), 2.0])
def test_a_cosine_outside_minus_one_to_one_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match="min_cosine"):
        RobustSettings(min_cosine=value)


def test_a_screen_that_refuses_every_site_says_so_for_each_site():
    base, tensors, contribs = _round(np.random.default_rng(5), flipped=set())
    with pytest.raises(NothingAccepted) as caught:
        _aggregate(base, tensors, contribs, AggregationSettings(robust=RobustSettings(min_cosine=0.999)))
    assert [(r.site, r.reason) for r in caught.value.rejected] == [
        (m.site, RejectReason.DIRECTION_OUTLIER.value) for m, *_ in contribs
    ]
