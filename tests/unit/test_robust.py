"""Robust rules against numpy oracles: np.median, and a trimmed mean computed here by sorting
each coordinate's values in plain Python (no scipy)."""

from __future__ import annotations

import numpy as np
import pytest

from mfed.aggregation.crosstask import Level2Rule
from mfed.aggregation.fedavg import AggregationSettings, ContributionSource, aggregate
from mfed.aggregation.robust import (
    RobustRule,
    RobustSettings,
    coordinate_median,
    norm_outliers,
    trimmed_mean,
)
from mfed.aggregation.validate import RejectReason
from mfed.artifacts.manifest import ContributionManifest
from mfed.spec import SharingPolicy
from tests.unit.factories import ENCODER_SHAPES, make_base, make_contribution


def _source(manifest: ContributionManifest, delta: bytes, decoder: bytes) -> ContributionSource:
    return ContributionSource(
        site=manifest.site, read_manifest=lambda: manifest, read_files=lambda _m: (delta, decoder)
    )


def _oracle_trimmed(values: list[np.ndarray], cut: int) -> np.ndarray:
    flat = [v.astype(np.float64).ravel().tolist() for v in values]
    out = []
    for i in range(len(flat[0])):
        column = sorted(row[i] for row in flat)
        kept = column[cut : len(column) - cut]
        out.append(sum(kept) / len(kept))
    return np.array(out).reshape(values[0].shape)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_coordinate_median_matches_numpy(n):
    rng = np.random.default_rng(n)
    values = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(n)]
    np.testing.assert_allclose(coordinate_median(values), np.median(np.stack(values).astype(np.float64), axis=0))


@pytest.mark.parametrize(("n", "trim", "cut"), [(5, 0.2, 1), (10, 0.2, 2), (4, 0.1, 0), (3, 0.45, 1), (2, 0.4, 0)])
def test_trimmed_mean_matches_an_independent_sort(n, trim, cut):
    rng = np.random.default_rng(10 + n)
    values = [rng.standard_normal((2, 3)) for _ in range(n)]
    np.testing.assert_allclose(trimmed_mean(values, trim), _oracle_trimmed(values, cut), rtol=0, atol=1e-12)


def test_rules_never_mutate_their_inputs():
    values = [np.array([3.0, 1.0]), np.array([1.0, 2.0]), np.array([2.0, 0.0])]
    copies = [v.copy() for v in values]
    coordinate_median(values)
    trimmed_mean(values, 0.34)
    for v, c in zip(values, copies, strict=True):
        np.testing.assert_array_equal(v, c)


def test_norm_outliers_refuses_only_the_far_one_and_says_why():
    refused = norm_outliers({"a": 1.0, "b": 1.2, "c": 0.9, "d": 100.0}, factor=3.0)
    assert list(refused) == ["d"] and "median norm" in refused["d"]
    assert norm_outliers({"a": 1.0, "b": 100.0}, factor=3.0) == {}  # two values: no majority to trust


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"trim": 0.5}, "trim"), ({"trim": -0.1}, "trim"), ({"norm_factor": 0.5}, "norm_factor")]
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RobustSettings(**kwargs)


def test_a_robust_rule_with_a_non_mean_level2_rule_is_refused():
    with pytest.raises(ValueError, match="level2_rule"):
        AggregationSettings(level2_rule=Level2Rule.CAGRAD, robust=RobustSettings(rule=RobustRule.MEDIAN))


def _round(rng, attacked: bool):
    base, tensors, _ = make_base()
    sites = [(f"a-{i}", "a", 10 + i) for i in range(5)] + [(f"b-{i}", "b", 20) for i in range(3)]
    contribs = []
    for site, task, n in sites:
        delta = {k: rng.standard_normal(s).astype(np.float32) for k, s in ENCODER_SHAPES.items()}
        if attacked and site == "a-0":
            delta = {k: -100.0 * v for k, v in delta.items()}
        contribs.append(make_contribution(base, site, task, n, rng, delta=delta))
    return base, tensors, contribs


def test_median_round_matches_the_two_level_numpy_oracle():
    base, tensors, contribs = _round(np.random.default_rng(3), attacked=False)
    settings = AggregationSettings(robust=RobustSettings(rule=RobustRule.MEDIAN))
    result = aggregate(base, tensors, 1, [_source(m, d, c) for m, d, c, _, _ in contribs], settings)
    by_task: dict[str, list] = {}
    for m, _, _, delta, decoder in contribs:
        by_task.setdefault(m.task, []).append((delta, decoder))
    for key in ENCODER_SHAPES:
        group_medians = [np.median(np.stack([d[key] for d, _ in by_task[t]]).astype(np.float64), axis=0) for t in "ab"]
        expected = tensors[key].astype(np.float64) + np.median(np.stack(group_medians), axis=0)
        np.testing.assert_allclose(result.tensors[key], expected, rtol=0, atol=1e-6)
    dec_a = np.median(np.stack([c["decoder.0.weight"] for _, c in by_task["a"]]), axis=0)
    np.testing.assert_allclose(result.tensors["tasks.a.decoder.0.weight"], dec_a, atol=1e-6)
    assert result.manifest.aggregation["robust"] == {"rule": "median"}


def test_a_scaled_site_is_refused_by_the_norm_screen_with_its_reason():
    base, tensors, contribs = _round(np.random.default_rng(4), attacked=True)
    settings = AggregationSettings(robust=RobustSettings(rule=RobustRule.MEAN, norm_factor=3.0))
    result = aggregate(base, tensors, 1, [_source(m, d, c) for m, d, c, _, _ in contribs], settings)
    assert [(r.site, r.reason) for r in result.manifest.rejected] == [("a-0", RejectReason.NORM_OUTLIER.value)]
    assert "a-0" not in result.manifest.tasks["a"].sites


def test_trimmed_mean_bounds_the_damage_of_one_scaled_site_where_the_mean_does_not():
    rng = np.random.default_rng(5)
    base, tensors, clean = _round(rng, attacked=False)
    attacked = [c if c[0].site != "a-0" else None for c in clean]
    m0, _, _, d0, c0 = clean[0]
    attacked[0] = make_contribution(
        base, m0.site, m0.task, m0.samples, rng, delta={k: -100 * v for k, v in d0.items()}, decoder=c0
    )

    def run(contribs, settings):
        return aggregate(base, tensors, 1, [_source(m, d, c) for m, d, c, _, _ in contribs], settings).tensors

    trimmed = AggregationSettings(robust=RobustSettings(rule=RobustRule.TRIMMED_MEAN, trim=0.2))
    key = sorted(ENCODER_SHAPES)[0]
    robust_shift = np.abs(run(attacked, trimmed)[key] - run(clean, trimmed)[key]).max()
    mean_shift = np.abs(run(attacked, AggregationSettings())[key] - run(clean, AggregationSettings())[key]).max()
    assert mean_shift > 10 * robust_shift


def test_robust_rules_refuse_task_level_copies():
    base, tensors, _ = make_base(SharingPolicy(task_level=True))
    with pytest.raises(ValueError, match="task-level"):
        aggregate(base, tensors, 1, [], AggregationSettings(robust=RobustSettings(rule=RobustRule.MEDIAN)))
