"""A FederationRound's method fields become the same trainer and aggregation settings as the
pilot's flags (docs/strategies.md), and bad combinations fail naming the field."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mfed.aggregation.crosstask import Level2Rule, Level2Weighting
from mfed.methods import AUTO_MIN_STEPS, Method, plan_method
from mfed.resources.method_settings import aggregation_settings, check_settings, init_spec, training_spec
from mfed.resources.views import ResourceError, parse_round
from mfed.spec import DecoderSource, Regularizer, SharingMode, SiteStrategy
from tests.operator.builders import round_body, round_view, site


def test_auto_means_what_the_pilot_means() -> None:
    r = round_view(training={"method": "auto"})
    training, settings = training_spec(r), aggregation_settings(r)
    pilot = plan_method(Method.AUTO)
    assert training.site_strategy is SiteStrategy.FALLBACK is pilot.site_strategy
    assert training.min_steps == AUTO_MIN_STEPS == training.shared_steps
    assert training.decoder_source is DecoderSource.GLOBAL  # the task-level track is Task-FedAvg
    assert training.regularizer is Regularizer.NONE and training.mu == 0.0
    assert settings == pilot.aggregation and settings.level2_rule is Level2Rule.CAGRAD
    # auto shares the whole encoder with task-level copies, whatever sharing the round names
    sharing = init_spec(r, [site("a"), site("b", "rot4")]).sharing
    assert sharing.mode is SharingMode.ALL and sharing.task_level


@pytest.mark.parametrize(
    ("method", "rule", "strategy"),
    [
        ("m-fed", Level2Rule.MEAN, SiteStrategy.SHARED),
        ("cagrad", Level2Rule.CAGRAD, SiteStrategy.SHARED),
        ("gated", Level2Rule.GATED, SiteStrategy.GATE),
        ("mix", Level2Rule.MEAN, SiteStrategy.MIX),
        ("fallback", Level2Rule.MEAN, SiteStrategy.FALLBACK),
    ],
)
def test_each_strategy_method_resolves_to_its_rule_and_site_strategy(
    method: str, rule: Level2Rule, strategy: SiteStrategy
) -> None:
    r = round_view(training={"method": method})
    assert aggregation_settings(r).level2_rule is rule
    assert training_spec(r).site_strategy is strategy
    # every start other than the shared encoder needs the task-level copies in the model
    assert init_spec(r, [site("a")]).sharing.task_level is (strategy is not SiteStrategy.SHARED)
    assert init_spec(r, [site("a")]).sharing.depth == 1  # the round's layer-wise sharing is kept


def test_single_fields_override_the_method() -> None:
    r = round_view(
        training={"method": "auto", "minSteps": 5, "siteStrategy": "mix", "sharedSteps": 3},
        aggregation={"weighting": "samples", "level2Rule": "gated", "cagradC": 0.8, "gateThreshold": 0.25},
    )
    training, settings = training_spec(r), aggregation_settings(r)
    assert (training.min_steps, training.site_strategy, training.shared_steps) == (5, SiteStrategy.MIX, 3)
    assert settings.level2_rule is Level2Rule.GATED
    assert (settings.cagrad_c, settings.gate_threshold) == (0.8, 0.25)
    assert settings.level2_weighting is Level2Weighting.SAMPLES
    # and the trainer receives them
    assert training.to_dict()["minSteps"] == 5 and training.to_dict()["siteStrategy"] == "mix"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"aggregation": {"level2Rule": "median"}}, "spec.aggregation.level2Rule"),
        ({"aggregation": {"cagradC": -1}}, "spec.aggregation.cagradC"),
        ({"aggregation": {"gateThreshold": 1.5}}, "spec.aggregation.gateThreshold"),
        ({"training": {"method": "auto", "siteStrategy": "both"}}, "spec.training.siteStrategy"),
        ({"training": {"method": "auto", "minSteps": -2}}, "spec.training.minSteps"),
        ({"training": {"method": "auto", "sharedSteps": 0}}, "spec.training.sharedSteps"),
        ({"training": {"method": "local"}}, "spec.training.method"),
        ({"training": {"method": "centralized"}}, "spec.training.method"),  # pools data: pilot only
    ],
)
def test_invalid_fields_are_rejected_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ResourceError, match=field.replace(".", r"\.")):
        round_view(**spec)


def test_a_combination_the_trainer_refuses_fails_the_round_naming_the_field() -> None:
    # auto asks for at least 20 steps a round; a cap of 10 cannot be met
    r = round_view(training={"method": "auto", "maxSteps": 10})
    with pytest.raises(ResourceError, match=r"spec\.training\.minSteps.*maxSteps 10"):
        check_settings(r)
    check_settings(round_view(training={"method": "auto", "maxSteps": 10, "minSteps": 0}))


def test_rule_fields_are_fixed_once_a_round_runs_but_old_digests_are_unchanged() -> None:
    plain = round_body()
    # the digest formula of operators before the rule fields: a running round must not look edited
    fixed = {k: v for k, v in plain["spec"].items() if k not in ("aggregation", "followUpRounds")}
    before = json.dumps({"spec": fixed, "weighting": None}, sort_keys=True, separators=(",", ":"))
    assert parse_round(plain).digest == hashlib.sha256(before.encode()).hexdigest()[:16]
    ruled = round_view(aggregation={"deadlineSeconds": 300, "level2Rule": "cagrad"})
    assert ruled.digest != parse_round(plain).digest
    # quorum and deadline may still change mid-round
    assert round_view(aggregation={"deadlineSeconds": 999}).digest == parse_round(plain).digest


def test_the_documented_auto_round_is_a_valid_round() -> None:
    text = (Path(__file__).parents[2] / "docs" / "strategies.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    rounds = [b for b in blocks if b.get("kind") == "FederationRound"]
    assert rounds, "docs/strategies.md shows a FederationRound"
    for body in rounds:
        body["metadata"].update(namespace="team-a", uid="u", generation=1)
        r = parse_round(body)
        check_settings(r)
        assert r.training.method is Method.AUTO


@pytest.mark.parametrize("method", ["m-fed", "task-fedavg", "encoder-fedavg", "auto"])
def test_min_steps_is_a_training_setting_every_method_honours(method: str) -> None:
    assert training_spec(round_view(training={"method": method, "minSteps": 7})).min_steps == 7


def test_privacy_and_robust_fields_reach_the_aggregator() -> None:
    r = round_view(
        aggregation={"rule": "trimmed-mean", "trim": 0.3, "normFactor": 4, "minCosine": 0},
        privacy=None,
    )
    settings = aggregation_settings(r)
    assert settings.robust.to_dict() == {"rule": "trimmed-mean", "trim": 0.3, "normFactor": 4.0, "minCosine": 0.0}
    private = aggregation_settings(
        round_view(privacy={"clipNorm": 0.5, "noiseMultiplier": 1.2, "epsilonBudget": 8})
    ).privacy
    assert private is not None
    assert (private.clip_norm, private.noise_multiplier, private.delta, private.epsilon_budget) == (0.5, 1.2, 1e-5, 8)
    assert not private.adaptive
    adaptive = aggregation_settings(
        round_view(privacy={"clipNorm": 0.5, "noiseMultiplier": 1.2, "targetQuantile": 0.7, "countNoise": 2})
    ).privacy
    assert adaptive is not None and adaptive.mechanisms == (1.2, 2.0)
    assert (adaptive.target_quantile, adaptive.clip_learning_rate) == (0.7, 0.2)


DP = {"clipNorm": 1.0, "noiseMultiplier": 1.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"privacy": DP, "training": {"method": "auto"}}, r"spec\.privacy:.*task-level"),
        ({"privacy": DP, "training": {"method": "cagrad"}}, r"spec\.privacy:.*level2Rule cagrad"),
        ({"aggregation": {"rule": "median"}, "training": {"method": "mix"}}, r"spec\.aggregation\.rule:.*task-level"),
        ({"aggregation": {"rule": "median", "level2Rule": "gated"}}, r"spec\.aggregation\.rule:.*mean"),
    ],
)  # fmt: skip
def test_a_method_that_cannot_take_privacy_or_a_robust_rule_fails_naming_the_field(
    spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ResourceError, match=message):
        check_settings(round_view(**spec))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"privacy": {"clipNorm": 0, "noiseMultiplier": 1.0}}, "spec.privacy.clipNorm"),
        ({"privacy": {"clipNorm": 1.0}}, "spec.privacy.noiseMultiplier"),
        ({"privacy": {"clipNorm": 1.0, "noiseMultiplier": 1.0, "delta": 2}}, "spec.privacy.delta"),
        ({"privacy": {**DP, "targetQuantile": 1.0}}, "spec.privacy.targetQuantile"),
        ({"privacy": {**DP, "targetQuantile": 0.5, "countNoise": 0}}, "spec.privacy.countNoise"),
        ({"aggregation": {"rule": "median", "trim": 0.1}}, "spec.aggregation.trim"),
        ({"aggregation": {"rule": "trimmed-mean", "trim": 0.5}}, "spec.aggregation.trim"),
        ({"aggregation": {"normFactor": 0.5}}, "spec.aggregation.normFactor"),
        ({"aggregation": {"minCosine": -1}}, "spec.aggregation.minCosine"),
    ],
)
def test_invalid_privacy_and_robust_fields_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ResourceError, match=field.replace(".", r"\.")):
        round_view(**spec)
