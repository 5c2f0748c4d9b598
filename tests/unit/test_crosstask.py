"""Level-2 rules (mean, CAGrad, similarity gate) against small hand-computed examples."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mfed.aggregation.conflict import cagrad_weights, gram_matrix, project_to_simplex
from mfed.aggregation.crosstask import GroupUpdate, Level2Rule, Level2Weighting, level2, weighted_mean
from mfed.aggregation.gating import GateState, agreement, gate


def _updates(*vectors: tuple[float, ...], samples: tuple[int, ...] | None = None) -> list[GroupUpdate]:
    counts = samples or tuple(10 for _ in vectors)
    return [
        GroupUpdate(task=f"t{i}", samples=n, mean_delta={"encoder.w": np.array(v, dtype=np.float64)})
        for i, (v, n) in enumerate(zip(vectors, counts, strict=True))
    ]


def _level2(updates, rule, previous=None, **kwargs):
    settings = {"cagrad_c": 0.5, "gate_threshold": 0.0, "gate_momentum": 0.5} | kwargs
    return level2(
        updates,
        ["encoder.w"],
        weighting=Level2Weighting.UNIFORM,
        rule=rule,
        previous=previous or {},
        **settings,
    )


def test_gram_matrix_sums_inner_products_over_every_key():
    deltas = [{"a": np.array([1.0, 2.0]), "b": np.array([[1.0]])}, {"a": np.array([3.0, -1.0]), "b": np.array([[2.0]])}]
    # <d0, d1> = 1*3 + 2*(-1) + 1*2 = 3; |d0|^2 = 1 + 4 + 1 = 6; |d1|^2 = 9 + 1 + 4 = 14
    np.testing.assert_array_equal(gram_matrix(deltas, ["a", "b"]), [[6.0, 3.0], [3.0, 14.0]])


def test_simplex_projection_matches_hand_computed_points():
    np.testing.assert_allclose(project_to_simplex(np.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])
    np.testing.assert_allclose(project_to_simplex(np.array([2.0, 0.0])), [1.0, 0.0])
    np.testing.assert_allclose(project_to_simplex(np.array([1.0, 1.0, -3.0])), [0.5, 0.5, 0.0])


def test_cagrad_on_orthogonal_updates_scales_the_mean_by_one_plus_c_over_one_plus_c_squared():
    # g1 = (1, 0), g2 = (0, 1): by symmetry w* = (1/2, 1/2), g_w = g0, lambda = c, and
    # d = g0 (1 + c) / (1 + c^2) = 1.2 g0 for c = 0.5: coefficients 0.6 each.
    gram = gram_matrix([{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 1.0])}], ["w"])
    assert cagrad_weights(gram, [0.5, 0.5], 0.5) == pytest.approx([0.6, 0.6], abs=1e-9)


def test_cagrad_on_conflicting_updates_equalises_both_groups_improvement():
    # g1 = (1, 0), g2 = (-1, 1), c = 1. G = [[1, -1], [-1, 2]], g0 = (0, 0.5), |g0| = 0.5.
    # Dual: F(t) = 0.5 t + 0.5 sqrt(5t^2 - 4t + 1) with w = (1 - t, t); F'(t) = 0 at t = 0.3,
    # so w* = (0.7, 0.3), g_w = (0.4, 0.3), |g_w| = 0.5, lambda = 1 * 0.5 / 0.5 = 1 and
    # d = (g0 + g_w) / 2 = (0.2, 0.4) = 0.6 g1 + 0.4 g2. Both groups improve by exactly 0.2,
    # where the plain mean gave g1 nothing (<g1, g0> = 0).
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])
    weights = cagrad_weights(gram_matrix([{"w": g1}, {"w": g2}], ["w"]), [0.5, 0.5], 1.0)
    assert weights == pytest.approx([0.6, 0.4], abs=1e-6)
    d = weights[0] * g1 + weights[1] * g2
    assert float(g1 @ d) == pytest.approx(0.2, abs=1e-6) and float(g2 @ d) == pytest.approx(0.2, abs=1e-6)


def test_cagrad_finds_the_minimum_of_its_dual_on_a_three_group_example():
    # Oracle: a fine grid over the simplex; the solver's dual value must be at least as low.
    vectors = [np.array([3.0, 0.0, 1.0]), np.array([-1.0, 1.0, 0.0]), np.array([0.0, -2.0, 1.0])]
    gram = gram_matrix([{"w": v} for v in vectors], ["w"])
    p, c = np.full(3, 1 / 3), 0.5
    radius = c * math.sqrt(p @ gram @ p)

    def dual(w: np.ndarray) -> float:
        return float(w @ gram @ p + radius * math.sqrt(w @ gram @ w))

    grid = [np.array([i, j, 60 - i - j]) / 60 for i, j in itertools.product(range(61), repeat=2) if i + j <= 60]
    best = min(grid, key=dual)
    weights = np.array(cagrad_weights(gram, p, c))
    # Recover w* from the coefficients: a = (p + lambda w) / (1 + c^2) and sum w = 1.
    lam_w = weights * (1 + c * c) - p
    w = lam_w / lam_w.sum()
    assert dual(w) <= dual(best) + 1e-6


def test_cagrad_with_zero_radius_or_zero_updates_is_the_plain_mean():
    gram = gram_matrix([{"w": np.array([1.0, 0.0])}, {"w": np.array([-1.0, 1.0])}], ["w"])
    assert cagrad_weights(gram, [0.25, 0.75], 0.0) == [0.25, 0.75]
    assert cagrad_weights(np.zeros((2, 2)), [0.5, 0.5], 0.5) == [0.5, 0.5]
    # Exactly opposite updates: the zero update is in their hull, no direction helps both.
    opposite = gram_matrix([{"w": np.array([1.0, 0.0])}, {"w": np.array([-1.0, 0.0])}], ["w"])
    assert cagrad_weights(opposite, [0.5, 0.5], 0.5) == [0.5, 0.5]


def test_agreement_is_each_groups_cosine_with_the_others_mean():
    # g0 = (1, 0), g1 = (1, 1), g2 = (-1, 0), uniform weights.
    # others of g0: (g1 + g2) / 2 = (0, 0.5) -> cos 0; others of g1: (g0 + g2) / 2 = 0 -> 0;
    # others of g2: (g0 + g1) / 2 = (1, 0.5) -> cos = -1 / sqrt(1.25) = -0.894427...
    gram = gram_matrix([{"w": np.array(v)} for v in ([1.0, 0.0], [1.0, 1.0], [-1.0, 0.0])], ["w"])
    assert agreement(gram, [1 / 3] * 3) == pytest.approx([0.0, 0.0, -1 / math.sqrt(1.25)])
    assert agreement(gram[:1, :1], [1.0]) == [1.0]  # a lone group has nobody to disagree with


def test_gate_smooths_agreement_across_rounds_and_closes_below_the_threshold():
    gram = gram_matrix([{"w": np.array(v)} for v in ([1.0, 0.0], [1.0, 0.2], [-1.0, 0.0])], ["w"])
    now = agreement(gram, [1 / 3] * 3)
    first = gate(gram, ["a", "b", "c"], [1 / 3] * 3, GateState(), threshold=0.0, momentum=0.5)
    assert first.agreement_now == pytest.approx(dict(zip("abc", now, strict=True)))
    assert first.open == {"a": True, "b": True, "c": False}
    assert first.weights == pytest.approx([0.5, 0.5, 0.0])
    # Next round c agrees (raw 0.5) but its smoothed value 0.5 * old + 0.5 * 0.5 stays below 0.
    previous = GateState(agreement={"a": 0.9, "b": 0.9, "c": -0.8})
    second = gate(np.eye(3), ["a", "b", "c"], [1 / 3] * 3, previous, threshold=0.0, momentum=0.5)
    assert second.state.agreement == pytest.approx({"a": 0.45, "b": 0.45, "c": -0.4})
    assert second.open["c"] is False


def test_gate_with_every_group_closed_leaves_the_shared_encoder_unchanged():
    gram = gram_matrix([{"w": np.array([1.0])}, {"w": np.array([-1.0])}], ["w"])
    decision = gate(gram, ["a", "b"], [0.5, 0.5], GateState(), threshold=0.0, momentum=0.0)
    assert decision.weights == [0.0, 0.0]


def test_gate_state_round_trips_through_a_manifest_aggregation_mapping():
    state = GateState(agreement={"b": -0.25, "a": 0.5})
    assert GateState.from_aggregation({"gate": state.to_dict()}) == state
    assert GateState.from_aggregation({}) == GateState()
    assert GateState.from_aggregation({"gate": {"agreement": {"a": "x", "b": float("nan")}}}) == GateState()


def test_level2_mean_rule_keeps_the_literal_weights_and_reports_agreement():
    updates = _updates((1.0, 0.0), (0.0, 2.0))
    outcome = _level2(updates, Level2Rule.MEAN)
    assert outcome.weights == [0.5, 0.5]
    assert outcome.evidence["agreement"] == {"t0": 0.0, "t1": 0.0}
    shared = weighted_mean(updates, outcome.weights, ["encoder.w"])
    np.testing.assert_allclose(shared["encoder.w"], [0.5, 1.0])


def test_level2_cagrad_and_gate_rules_produce_their_hand_computed_weights():
    updates = _updates((1.0, 0.0), (-1.0, 1.0))
    assert _level2(updates, Level2Rule.CAGRAD, cagrad_c=1.0).weights == pytest.approx([0.6, 0.4], abs=1e-6)
    opposed = _updates((1.0, 0.0), (1.0, 0.1), (-0.5, 1.0))  # t2 . (t0 + t1) = -0.9 < 0
    gated = _level2(opposed, Level2Rule.GATED)
    assert gated.weights == pytest.approx([0.5, 0.5, 0.0])
    assert gated.evidence["gateOpen"] == {"t0": True, "t1": True, "t2": False}
    assert set(gated.evidence["gate"]["agreement"]) == {"t0", "t1", "t2"}


def test_level2_gate_reads_its_state_from_the_previous_manifest():
    updates = _updates((1.0, 0.0), (1.0, 0.0))  # they agree perfectly now (cosine 1)...
    previous = {"gate": {"agreement": {"t0": -1.0, "t1": 1.0}}}  # ...but t0 disagreed before
    outcome = _level2(updates, Level2Rule.GATED, previous=previous, gate_momentum=0.75)
    # t0: 0.75 * -1 + 0.25 * 1 = -0.5 < 0: closed; t1: 1.0: open.
    assert outcome.evidence["gate"]["agreement"] == pytest.approx({"t0": -0.5, "t1": 1.0})
    assert outcome.weights == [0.0, 1.0]
