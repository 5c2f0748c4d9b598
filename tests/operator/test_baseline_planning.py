"""spec.evaluation.baselines: parsed, handed to each site's RoundSpec, and summed up in status."""

from __future__ import annotations

import numpy as np
import pytest
from mfed_operator.domain.baselines import local_baseline_status

from mfed.resources.method_settings import round_spec
from mfed.resources.views import ResourceError
from tests.operator.builders import round_view, site


def test_a_round_without_baselines_trains_none() -> None:
    assert round_spec(round_view(), site("a"), 1, "s3://models/g", None).local_baseline is None


def test_the_first_round_starts_the_baseline_and_a_chained_round_continues_the_last_one() -> None:
    first = round_spec(round_view(evaluation={"baselines": ["local"]}), site("a"), 1, "s3://models/g", None)
    assert first.local_baseline is not None and first.local_baseline.previous_round is None
    # under the site's own name, outside the round's sites/ prefix the aggregator reads
    assert first.local_baseline.prefix == "s3://models/federations/fed/r1/baselines/a/local"
    assert not first.local_baseline.prefix.startswith(first.output)
    chained = round_view(evaluation={"baselines": ["local"]}, initialModel={"fromRound": "r0"}, round=4)
    spec = round_spec(chained, site("a"), 4, "s3://models/g", None)
    assert spec.local_baseline is not None and spec.local_baseline.previous_round == 3


def test_an_unknown_baseline_names_the_field_and_the_choices() -> None:
    with pytest.raises(
        ResourceError, match=r"spec.evaluation.baselines: 'fedavg' is not a baseline; sites can train local"
    ):
        round_view(evaluation={"baselines": ["fedavg"]})


def _site(task: str, samples: int, fed: float, local: float, sign: float = 1.0) -> tuple[str, int, dict[str, float]]:
    metrics = {"baseline_federated": fed, "baseline_local": local, "baseline_sign": sign}
    return task, samples, metrics | {"baseline_steps": 10.0, "baseline_seconds": 0.5}


def test_status_numbers_are_the_weighted_task_means_and_their_mean_relative_gain() -> None:
    sites = [
        _site("cls10", 30, 0.80, 0.70),
        _site("cls10", 10, 0.60, 0.70),
        _site("denoise", 50, 0.020, 0.025, sign=-1.0),  # a loss: lower is better
        ("rot4", 20, {"val_after": 0.5}),  # a site that trained no baseline is left out
    ]
    status = local_baseline_status(sites)
    assert status is not None
    fed_cls = np.average([0.80, 0.60], weights=[30, 10])
    gain_cls = (fed_cls - 0.70) / 0.70 * 100
    gain_denoise = -(0.020 - 0.025) / 0.025 * 100  # 20% better
    assert status["tasks"]["cls10"]["federated"] == pytest.approx(fed_cls)
    assert status["tasks"]["cls10"]["gainPercent"] == pytest.approx(gain_cls, abs=1e-4)
    assert status["tasks"]["denoise"]["gainPercent"] == pytest.approx(20.0) == pytest.approx(gain_denoise)
    assert sorted(status["tasks"]) == ["cls10", "denoise"]
    assert status["dmPercent"] == pytest.approx((gain_cls + gain_denoise) / 2, abs=1e-4)
    assert (status["steps"], status["seconds"], status["bytesUploaded"]) == (30, 1.5, 0)


def test_no_reported_baseline_means_no_status() -> None:
    assert local_baseline_status([("cls10", 5, {"val_after": 0.5})]) is None
