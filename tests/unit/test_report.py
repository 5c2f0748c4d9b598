"""`mfed report` from FederationRound objects: the numbers are the sites' own, arranged as the
pilot's report (sample-weighted per task, dm% as in MFED.md), checked against numpy here. The
real API and S3 paths run in tests/e2e/test_baselines.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mfed.cli import main
from mfed.pilot.report import format_table
from mfed.report.chain import ReportError, chain_results
from mfed.report.sources import chain_from_objects

# (site, task, samples, federated, local, sign, steps, upload) per round
ROUNDS = [
    [
        ("hospital-a", "seg", 100, 0.70, 0.60, 1.0, 20, 5000),
        ("hospital-b", "seg", 300, 0.80, 0.75, 1.0, 20, 5000),
        ("plant-x", "depth", 50, 0.40, 0.50, -1.0, 20, 7000),
    ],
    [
        ("hospital-a", "seg", 100, 0.74, 0.62, 1.0, 20, 5000),
        ("hospital-b", "seg", 300, 0.82, 0.78, 1.0, 20, 5000),
        ("plant-x", "depth", 50, 0.35, 0.45, -1.0, 20, 7000),
    ],
]


def _site(site, task, samples, fed, local, sign, steps, upload, phase="Accepted", baseline=True):
    metrics = {"steps": steps, "upload_bytes": upload, "val_after": fed}
    if baseline:
        metrics |= {"baseline_federated": fed, "baseline_local": local, "baseline_sign": sign, "baseline_steps": steps}
    return {"site": site, "task": task, "phase": phase, "samples": samples, "metrics": metrics}


def _objects(baseline: bool = True) -> dict[str, dict[str, Any]]:
    names = ["chain", "chain-r2", "chain-r3"]
    objects = {}
    for i, rows in enumerate(ROUNDS):
        sites = [_site(*row, baseline=baseline) for row in rows]
        sites.append(_site("late", "seg", 999, 0.0, 0.9, 1.0, 20, 5000, phase="Rejected"))  # never counted
        objects[names[i]] = {
            "spec": {"training": {"method": "task-fedavg"}},
            "status": {"phase": "Succeeded", "sites": sites, "nextRound": names[i + 1]},
        }
    objects["chain-r3"] = {"status": {"phase": "Running", "sites": []}}  # not finished: not reported
    return objects


def test_the_report_of_a_chain_is_the_sites_numbers_sample_weighted_per_task_with_dm_and_traffic():
    objects = _objects()
    chain = chain_from_objects("chain", objects.get)
    assert [r.name for r in chain.rounds] == ["chain", "chain-r2"]
    results = chain_results(chain)
    last = ROUNDS[-1]
    expected: dict[str, dict[str, float]] = {}
    gains = []
    for task in ("depth", "seg"):
        rows = [r for r in last if r[1] == task]
        weights = [r[2] for r in rows]
        fed = float(np.average([r[3] for r in rows], weights=weights))
        local = float(np.average([r[4] for r in rows], weights=weights))
        expected[task] = {"fed": fed, "local": local}
        gains.append(rows[0][5] * (fed - local) / local * 100)
    fed_run, local_run = results["methods"]["task_fedavg"], results["methods"]["local"]
    for task, numbers in expected.items():
        assert fed_run["metrics"][task] == pytest.approx(numbers["fed"])
        assert local_run["metrics"][task] == pytest.approx(numbers["local"])
    assert fed_run["delta_m"] == pytest.approx(np.mean(gains))
    assert local_run["delta_m"] == 0.0
    # depth is lower-is-better: 0.35 vs 0.45 is a gain
    assert results["tasks"]["depth"]["higher_is_better"] is False
    assert fed_run["upload_bytes_per_site_round"] == pytest.approx(np.mean([5000, 5000, 7000]))
    assert local_run["upload_bytes_per_site_round"] == 0.0
    assert fed_run["steps_per_site"] == local_run["steps_per_site"] == 40
    # the learning curve: one point per round, steps so far, the round's weighted means
    first = fed_run["per_round"][0]
    assert first["steps"] == {"depth": 20, "seg": 20}
    assert first["metrics"]["seg"] == pytest.approx(np.average([0.70, 0.80], weights=[100, 300]))
    assert fed_run["per_round"][-1]["metrics"] == pytest.approx(fed_run["metrics"])  # ends where the table is
    table = format_table(results)
    assert "Task-FedAvg" in table and "upload/site/round" in table and "5.67 kB" in table
    assert "chain chain (2 rounds, source: kubernetes)" in table
    assert "after the last round  " not in table  # the table already is the last round


def test_a_chain_without_the_local_baseline_or_not_finished_gets_a_reason_not_numbers():
    with pytest.raises(ReportError, match=r"spec.evaluation.baselines: \[local\]"):
        chain_results(chain_from_objects("chain", _objects(baseline=False).get))
    running = {"chain": {"spec": {}, "status": {"phase": "Training", "sites": []}}}
    with pytest.raises(ReportError, match="Training, not Succeeded yet"):
        chain_from_objects("chain", running.get)
    with pytest.raises(ReportError, match="not found"):
        chain_from_objects("nope", {}.get)


def test_the_command_says_what_is_missing(capsys):
    assert main(["report", "chain", "--artifacts", "s3://bucket/prefix/fed"]) == 2
    assert "--method" in capsys.readouterr().err
