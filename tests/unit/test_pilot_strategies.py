"""Cross-task presets (auto, mix, gated, fallback, cagrad) in methods, the pilot's budgets and CLI."""

from __future__ import annotations

import argparse
import json

import pytest

from mfed.aggregation.crosstask import Level2Rule, Level2Weighting
from mfed.cli import _pilot_parser, config_from_args, main
from mfed.methods import AUTO_MIN_STEPS, Method, plan_method
from mfed.pilot.config import SCENARIOS, PilotConfig
from mfed.pilot.runner import plan_for
from mfed.spec import Regularizer, SharingMode, SharingPolicy, SiteStrategy


def test_auto_composes_fallback_conflict_averse_level2_min_steps_and_task_level_copies():
    plan = plan_method(Method.AUTO, sharing=SharingPolicy(mode=SharingMode.DEPTH, depth=1))
    assert plan.sharing == SharingPolicy(task_level=True)  # the whole encoder: protection decides
    assert (plan.site_strategy, plan.level2_rule, plan.min_steps) == (
        SiteStrategy.FALLBACK,
        Level2Rule.CAGRAD,
        AUTO_MIN_STEPS,
    )
    assert (plan.regularizer, plan.mu, plan.tracks) == (Regularizer.NONE, 0.0, 2)
    assert plan.aggregation.level2_rule is Level2Rule.CAGRAD
    assert plan.aggregation.level2_weighting is Level2Weighting.UNIFORM


@pytest.mark.parametrize(
    ("method", "strategy", "rule"),
    [
        (Method.MIX, SiteStrategy.MIX, Level2Rule.MEAN),
        (Method.GATED, SiteStrategy.GATE, Level2Rule.GATED),
        (Method.FALLBACK, SiteStrategy.FALLBACK, Level2Rule.MEAN),
        (Method.CAGRAD, SiteStrategy.SHARED, Level2Rule.CAGRAD),
    ],
)
def test_each_preset_picks_its_site_strategy_and_rule_and_task_level_copies_when_it_needs_them(method, strategy, rule):
    plan = plan_method(method, sharing=SharingPolicy(mode=SharingMode.DEPTH, depth=2))
    assert (plan.site_strategy, plan.level2_rule) == (strategy, rule)
    assert plan.sharing.depth == 2  # the given layers stay the ones that cross tasks
    assert plan.sharing.task_level is (strategy is not SiteStrategy.SHARED)


def test_plain_mfed_keeps_the_literal_reading_unless_a_strategy_is_asked_for():
    literal = plan_method(Method.MFED)
    assert (literal.sharing, literal.site_strategy, literal.level2_rule, literal.min_steps) == (
        SharingPolicy(),
        SiteStrategy.SHARED,
        Level2Rule.MEAN,
        0,
    )
    assert literal.regularizer is Regularizer.L2
    mixed = plan_method(Method.MFED, site_strategy=SiteStrategy.MIX, level2_rule=Level2Rule.GATED, min_steps=5)
    assert mixed.sharing.task_level and mixed.level2_rule is Level2Rule.GATED and mixed.min_steps == 5


def test_method_names_parse_with_dashes_and_unknown_names_list_the_choices():
    assert Method.parse("Auto") is Method.AUTO and Method.parse("task-fedavg") is Method.TASK_FEDAVG
    with pytest.raises(ValueError, match="auto"):
        Method.parse("magic")


def test_the_scarce_scenario_gives_small_and_large_sites_the_same_steps():
    # A 50-image site (2 steps an epoch) and a 3000-image one (75) both train 100 steps a round
    # (3000 over 30 rounds): auto's two tracks 80 + 20 (its shared track is capped at 20).
    scarce = PilotConfig(**SCENARIOS["scarce"], methods=(Method.LOCAL, Method.AUTO))
    assert scarce.steps == 3000
    assert scarce.track_steps(Method.LOCAL) == (100, None) and scarce.track_steps(Method.AUTO) == (80, 20)
    assert plan_for(scarce, Method.LOCAL).min_steps == 100 == plan_for(scarce, Method.AUTO).min_steps


def _config(*argv: str) -> PilotConfig:
    parser = argparse.ArgumentParser()
    _pilot_parser(parser.add_subparsers(dest="command"))
    return config_from_args(parser.parse_args(["pilot", *argv]))


def test_pilot_flags_reach_the_configuration():
    config = _config(
        "--methods=local,mfed",
        "--level2-rule=gated",
        "--site-strategy=mix",
        "--rounds=10",
        "--steps=70",
        "--cagrad-c=0.2",
        "--shared-layers=1+task",
        "--shared-steps=4",
        "--select-ties=earliest",
    )
    assert (config.level2_rule, config.site_strategy, config.round_steps, config.cagrad_c) == (
        Level2Rule.GATED,
        SiteStrategy.MIX,
        7,
        0.2,
    )
    assert config.sharing == SharingPolicy(mode=SharingMode.DEPTH, depth=1, task_level=True)
    assert config.shared_steps == 4 and config.select_ties == "earliest"
    assert _config().level2_rule is None and _config().steps == 600  # presets decide by default


def test_quick_pilot_of_auto_reports_each_sites_protection_choice(tmp_path, capsys):
    # --quick: 8 steps over 2 rounds, auto's two tracks 2 + 2 a round.
    out = tmp_path / "auto"
    assert main(["pilot", "--quick", "--methods", "local,auto", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "auto (recommended)" in printed and "selected models on the shared track" in printed
    results = json.loads((out / "results.json").read_text())
    auto = results["methods"]["auto"]
    assert set(auto["protection"]) == {"cls10", "coarse4", "denoise", "rot4"}
    assert all(0.0 <= v["shared"] <= 1.0 for v in auto["protection"].values())
    evidence = auto["selected"]["0"]["cls10-0"]["evidence"]
    assert {"shared", "val_shared_track", "val_task_track"} <= set(evidence)
    assert not any(key.startswith("test") for key in evidence)  # test scores never sit beside the choice
    # After the last round: the deployed models, and each track alone (both scored on test).
    assert set(auto["final_round"]) == {"deployed", "task", "shared"}
    assert "after the last round" in printed and "auto (recommended), task-level track" in printed
    # Fairness: Local trains exactly the steps auto's sites train on both tracks together.
    assert results["methods"]["local"]["site_steps"] == auto["site_steps"]
    assert set(auto["site_steps"]["0"].values()) == {8}
