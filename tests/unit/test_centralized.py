"""The pilot's centralized ceiling: its step schedule and pooling, the share-of-the-oracle formula
against hand-computed values, and a small pilot run with the same compute as every method."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mfed.learning.data import SiteData, Split
from mfed.methods import Method
from mfed.pilot.centralized import pool_by_task, pooled_schedule
from mfed.pilot.config import PilotConfig, PilotConfigError
from mfed.pilot.report import oracle_share
from tests.unit.factories import tiny_pilot


def test_every_site_brings_its_round_steps_to_its_task_spread_through_the_round():
    schedule = pooled_schedule(["a", "a", "b"], round_steps=4)
    assert Counter(schedule) == {"a": 8, "b": 4}
    assert schedule[:3] == ["a", "a", "b"]  # site by site, not task a first then task b


def test_pooling_concatenates_the_training_splits_of_a_task_in_site_order():
    def site(value: int, n: int) -> SiteData:
        split = Split(x=np.full((n, 1, 2, 2), value, dtype=np.float32), y=np.full(n, value))
        return SiteData(train=split, val=split, test=None)

    data = {"a-0": site(0, 3), "a-1": site(1, 2), "b-0": site(2, 4)}
    pooled = pool_by_task([("a-0", "a"), ("a-1", "a"), ("b-0", "b")], data)
    assert pooled["a"].y.tolist() == [0, 0, 0, 1, 1] and len(pooled["b"]) == 4


def test_the_share_of_the_oracle_gain_reads_the_same_for_both_directions_of_metric():
    share = oracle_share(
        method={"acc": 75.0, "mse": 0.30, "flat": 50.0, "worse": 60.0},
        local={"acc": 70.0, "mse": 0.40, "flat": 50.0, "worse": 60.0},
        oracle={"acc": 80.0, "mse": 0.20, "flat": 50.0, "worse": 59.0},
        higher_is_better={"acc": True, "mse": False, "flat": True, "worse": True},
    )
    assert share["acc"] == pytest.approx(0.5) and share["mse"] == pytest.approx(0.5)
    assert share["flat"] is None and share["worse"] is None  # the oracle gained nothing to share


def test_a_centralized_pilot_takes_every_sites_steps_and_reports_the_share_of_its_gain(tmp_path):
    from mfed.pilot import run_pilot

    config = tiny_pilot(methods=(Method.LOCAL, Method.MFED, Method.CENTRALIZED))
    one = run_pilot(config, tmp_path / "one", show_progress=False, workers=0)
    two = run_pilot(config, tmp_path / "two", show_progress=False, workers=0)
    central = one["methods"]["centralized"]
    assert central["site_steps"] == one["methods"]["local"]["site_steps"]  # equal compute per site
    assert central["upload_bytes_per_site_round"] == 0
    assert "not deployable" in one["table"] and "share of the centralized gain" in one["table"]
    assert set(one["methods"]["mfed"]["share_of_oracle_gain"]) == {"cls10", "denoise"}
    for results in (one, two):
        results.pop("seconds"), results.pop("table")
    assert one == two  # seeded: the same numbers again


def test_centralized_refuses_an_attack():
    from mfed.pilot.attacks import Attack, AttackKind

    with pytest.raises(PilotConfigError, match="centralized"):
        PilotConfig(methods=(Method.LOCAL, Method.CENTRALIZED), attack=Attack(kind=AttackKind.SCALE, site="cls10-0"))
