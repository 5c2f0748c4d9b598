"""The local pilot: a tiny end-to-end run, and the fairness rules every comparison obeys."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest

from mfed.cli import main
from mfed.methods import Method
from mfed.pilot.config import PILOT_TASKS, PilotConfig, PilotConfigError
from mfed.pilot.report import delta_m, final_metrics, format_table, human_bytes, summarize
from mfed.pilot.runner import (
    CurvePoint,
    MethodRun,
    SiteSelection,
    _select,
    curve_checkpoints,
    pilot_sites,
    steps_per_round,
)
from mfed.spec import ArchSpec


def test_quick_pilot_runs_every_method_and_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["pilot", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for label in ("Local", "Task-FedAvg", "Encoder-FedAvg", "M-Fed", "dm% vs Local", "steps/site"):
        assert label in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"local", "task_fedavg", "encoder_fedavg", "mfed"}
    for method in results["methods"].values():
        assert set(method["metrics"]) == {"cls10", "coarse4", "denoise", "rot4"}
        assert isinstance(method["delta_m"], float) and method["per_round"]
    assert results["methods"]["local"]["delta_m"] == 0.0
    assert results["config"]["rounds"] == 2
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Fairness, measured from what the trainer reported: every site of every method, Local
    # included, trained the budget's steps (--quick: 8), and the table says so for each method.
    budget = results["config"]["steps"]
    assert budget == 8
    for method in results["methods"].values():
        assert method["steps_per_site"] == budget
        for sites in method["site_steps"].values():
            assert sites and set(sites.values()) == {budget}, method["label"]
    table_rows = [line for line in printed.splitlines() if line.startswith(("Local", "Task-", "Encoder-", "M-Fed"))]
    assert len(table_rows) >= 4 and all(row.split()[-3] == "8" for row in table_rows[:4])
    # Traffic, against the models' own parameter counts: a federated site uploads its float32
    # encoder delta and decoder every round (plus two safetensors headers); Local uploads nothing.
    expected = statistics.fmean(4 * (_parameters("encoder", t) + _parameters("decoder", t)) for t in _QUICK_TASKS)
    for key, method in results["methods"].items():
        upload = method["upload_bytes_per_site_round"]
        if key == "local":
            assert upload == 0.0
        else:
            assert expected <= upload <= expected + 8192, (key, upload, expected)
    assert table_rows[0].endswith("0 B")
    assert table_rows[1].endswith(human_bytes(results["methods"]["task_fedavg"]["upload_bytes_per_site_round"]))


_QUICK_TASKS = ("cls10", "coarse4", "denoise", "rot4")


def _parameters(part: str, task: str) -> int:
    from mfed.learning.model import build_site_model

    spec, decoder = PILOT_TASKS[task]
    model, _ = build_site_model(ArchSpec(name="small_cnn"), spec, decoder)
    return sum(p.numel() for p in getattr(model, part).parameters())


def test_the_budget_gives_every_method_rounds_of_the_same_length():
    config = PilotConfig()  # 600 steps over 30 rounds
    assert config.round_steps == 20 and steps_per_round(config, 300) == 8  # not one epoch of 240 images
    for method in (Method.LOCAL, Method.TASK_FEDAVG, Method.ENCODER_FEDAVG, Method.MFED):
        assert config.track_steps(method) == (20, None)
    # Two tracks share the round: the shared one gets at most half (auto: at most its cap of 20).
    assert config.track_steps(Method.AUTO) == (10, 10) and config.track_steps(Method.FALLBACK) == (10, 10)
    long = PilotConfig(steps=1500)  # 50 steps a round
    assert long.track_steps(Method.AUTO) == (30, 20) and long.track_steps(Method.FALLBACK) == (25, 25)
    assert PilotConfig(steps=1500, shared_steps=5).track_steps(Method.FALLBACK) == (45, 5)
    odd = PilotConfig(steps=33, rounds=3, methods=(Method.LOCAL, Method.FALLBACK))  # 11 a round
    assert odd.track_steps(Method.FALLBACK) == (6, 5)


def test_a_budget_that_does_not_split_into_equal_rounds_is_refused_with_the_fix():
    with pytest.raises(PilotConfigError, match=r"--steps 610 is not a multiple of --rounds 30.*--steps 600"):
        PilotConfig(steps=610)
    with pytest.raises(PilotConfigError, match="two-track method needs at least 2"):
        PilotConfig(steps=30, methods=(Method.LOCAL, Method.AUTO))
    assert PilotConfig(steps=30).round_steps == 1  # one track: one step a round is enough


def test_the_numbers_do_not_depend_on_how_many_workers_train_the_sites(tmp_path):
    from mfed.pilot import run_pilot

    config = replace(
        PilotConfig(),
        rounds=2,
        steps=6,
        sites_per_task=1,
        samples_per_site=48,
        test_samples=64,
        tasks=("cls10", "denoise"),
        methods=(Method.LOCAL, Method.MFED),
    )
    one = run_pilot(config, tmp_path / "one", show_progress=False, workers=1)
    two = run_pilot(config, tmp_path / "two", show_progress=False, workers=2)
    for results in (one, two):
        results.pop("seconds"), results.pop("table")
    assert one == two
    assert one["methods"]["mfed"]["site_steps"] == {"0": {"cls10-0": 6, "denoise-0": 6}}


def test_curve_checkpoints_spread_evenly_and_end_on_the_last_round():
    assert curve_checkpoints(30, 30) == {r: r for r in range(1, 31)}
    long = curve_checkpoints(125, 30)
    assert len(long) == 30 and max(long) == 125 and long[125] == 30
    assert curve_checkpoints(3, 30) == {1: 1, 2: 2, 3: 3}


def test_each_site_reports_the_round_with_the_best_validation_score_not_the_best_test_score():
    run = MethodRun(method=Method.MFED, seed=0)
    for round_number, (val, test) in enumerate([(50.0, 90.0), (70.0, 60.0), (65.0, 95.0)], start=1):
        _select(run, "cls10-0", round_number, round_number * 8, {"val": val, "test": test}, higher_is_better=True)
    chosen = run.sites["cls10-0"]
    assert (chosen.round, chosen.test) == (2, 60.0)
    for round_number, (val, test) in enumerate([(0.5, 1.0), (0.2, 3.0)], start=1):
        _select(run, "mae-0", round_number, 0, {"val": val, "test": test}, higher_is_better=False)
    assert run.sites["mae-0"].round == 2


@pytest.mark.parametrize(("ties", "expected_round"), [("latest", 3), ("earliest", 1)])
def test_of_rounds_tied_for_the_best_validation_score_the_latest_is_reported_unless_asked_otherwise(
    ties, expected_round
):
    run = MethodRun(method=Method.LOCAL, seed=0)
    for round_number, val in enumerate([100.0, 90.0, 100.0], start=1):  # 10 of 10 images, twice
        _select(run, "coarse4-0", round_number, 8 * round_number, {"val": val}, True, ties)
    assert run.sites["coarse4-0"].round == expected_round
    assert PilotConfig().select_ties == "latest"
    with pytest.raises(PilotConfigError, match="--select-ties"):
        PilotConfig(select_ties="best")


def test_after_the_last_round_each_view_is_averaged_per_task_and_compared_with_locals_last_round():
    def run(method, test, tracks=None):
        point = CurvePoint(index=30, steps=dict.fromkeys(test, 240), test=test, tracks=tracks or {})
        early = CurvePoint(index=1, steps=dict.fromkeys(test, 8), test=dict.fromkeys(test, 10.0))
        selected = {site: SiteSelection(round=1, steps=8, val=1.0, test=50.0) for site in test}
        return MethodRun(method=method, seed=0, sites=selected, curve=[early, point], steps_per_site={"cls10-0": 8})

    local = run(Method.LOCAL, {"cls10-0": 50.0, "cls10-1": 70.0})
    auto = run(
        Method.AUTO,
        {"cls10-0": 66.0, "cls10-1": 54.0},
        {"cls10-0": {"task": 60.0, "shared": 66.0}, "cls10-1": {"task": 54.0, "shared": 48.0}},
    )
    assert final_metrics(local, "deployed") == {"cls10": 60.0}
    assert final_metrics(local, "shared") is None  # a one-track method has no tracks
    assert final_metrics(auto, "task") == {"cls10": 57.0} and final_metrics(auto, "shared") == {"cls10": 57.0}
    results = summarize([local, auto], {}, {"cls10": True}, {"cls10": "accuracy"}, 1.0)
    final = results["methods"]["auto"]["final_round"]
    assert set(final) == {"deployed", "task", "shared"}
    assert final["deployed"]["delta_m"] == pytest.approx(0.0)  # 60 against Local's 60
    assert final["task"]["delta_m"] == pytest.approx(-5.0)  # 57 against 60
    assert set(results["methods"]["local"]["final_round"]) == {"deployed"}
    assert "auto (recommended), shared track" in format_table(results)


def test_delta_m_follows_the_metric_direction():
    local = {"acc": 80.0, "mae": 2.0}
    better = {"acc": 88.0, "mae": 1.0}
    assert delta_m(better, local, {"acc": True, "mae": False}) == pytest.approx((10.0 + 50.0) / 2)


def test_pilot_sites_get_disjoint_shards_and_per_task_sample_counts():
    config = PilotConfig(sites_per_task=1, task_samples={"cls10": 50, "rot4": 3000})
    sites = pilot_sites(config, seed=0)
    assert [s.name for s in sites] == ["cls10-0", "coarse4-0", "denoise-0", "rot4-0"]
    assert len({s.data.shard_index for s in sites}) == 4
    assert {s.name: s.data.samples for s in sites}["rot4-0"] == 3000


def test_the_local_baseline_cannot_be_left_out():
    with pytest.raises(PilotConfigError, match="Local baseline is required"):
        replace(PilotConfig(), methods=(Method.MFED,))


def test_pilot_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["pilot", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--rounds",
        "--sites-per-task",
        "--samples-per-site",
        "--seeds",
        "--device",
        "--mu",
        "--shared-layers",
        "--quick",
        "--scenario",
        "--steps",
        "--workers",
    ):
        assert option in text
