"""The round spec: the contract between scheduler and trainer, with errors that name fields."""

from __future__ import annotations

import json

import pytest

from mfed.aggregation.ownership import is_shared_across_tasks, owner_of
from mfed.spec import (
    ArchSpec,
    DataSpec,
    RoundSpec,
    SharingMode,
    SharingPolicy,
    SpecError,
    TaskSpec,
    TrainingSpec,
    parse_spec,
)


def _spec(**changes) -> dict:
    spec = RoundSpec(
        federation="fed",
        round=1,
        site="site-a",
        task=TaskSpec(name="cls10", type="classification"),
        encoder=ArchSpec(name="small_cnn"),
        decoder=ArchSpec(name="mlp"),
        training=TrainingSpec(),
        data=DataSpec(shard_index=1, shard_count=4, samples=100),
        global_model="s3://b/fed/r0/global",
        previous_decoder=None,
        output="s3://b/fed/r1/sites/site-a",
    ).to_dict()
    spec.update(changes)
    return spec


def test_round_spec_round_trips_through_json():
    text = json.dumps(_spec())
    spec = parse_spec(text)
    assert isinstance(spec, RoundSpec)
    assert parse_spec(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"training": {"batchSize": 0}}, "training.batchSize"),
        ({"training": {"learningRate": -1}}, "training.learningRate"),
        ({"training": {"regularizer": "l3"}}, "training.regularizer"),
        ({"training": {"bogus": 1}}, "training.bogus"),
        ({"task": {"name": "Bad Name!", "type": "classification"}}, "task.name"),
        ({"site": "UPPER"}, "site"),
        ({"round": 0}, "round"),
        ({"version": 7}, "version"),
        ({"data": {"source": "npz"}}, "data.uri"),
        ({"data": {"shardIndex": 4, "shardCount": 4}}, "data.shard"),
        ({"globalModel": None}, "globalModel"),
    ],
)
def test_invalid_specs_fail_with_the_field_named(changes, path):
    with pytest.raises(SpecError) as info:
        parse_spec(json.dumps(_spec(**changes)))
    assert info.value.path == path


def test_not_json_is_a_spec_error():
    with pytest.raises(SpecError, match="not valid JSON"):
        parse_spec("{nope")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", SharingPolicy()),
        ("none", SharingPolicy(mode=SharingMode.NONE)),
        ("2", SharingPolicy(mode=SharingMode.DEPTH, depth=2)),
        ("depth:1", SharingPolicy(mode=SharingMode.DEPTH, depth=1)),
        (
            "prefix:stages.0.,encoder.stages.1.",
            SharingPolicy(mode=SharingMode.PREFIXES, prefixes=("stages.0.", "encoder.stages.1.")),
        ),
    ],
)
def test_sharing_policies_parse_from_command_line_text(text, expected):
    assert SharingPolicy.from_text(text) == expected


def test_unknown_sharing_text_explains_the_choices():
    with pytest.raises(SpecError, match="all, none, N"):
        SharingPolicy.from_text("some")


@pytest.mark.parametrize(
    ("policy", "key", "shared"),
    [
        (SharingPolicy(), "encoder.stages.3.weight", True),
        (SharingPolicy(mode=SharingMode.NONE), "encoder.stages.0.weight", False),
        (SharingPolicy(mode=SharingMode.DEPTH, depth=2), "encoder.stages.1.0.weight", True),
        (SharingPolicy(mode=SharingMode.DEPTH, depth=2), "encoder.stages.2.1.weight", False),
        (SharingPolicy(mode=SharingMode.PREFIXES, prefixes=("stages.0.",)), "encoder.stages.0.0.bias", True),
        (SharingPolicy(mode=SharingMode.PREFIXES, prefixes=("stages.0.",)), "encoder.stages.10.bias", False),
    ],
)
def test_sharing_policy_decides_which_encoder_parameters_cross_tasks(policy, key, shared):
    assert is_shared_across_tasks(key, policy) is shared


def test_one_function_decides_the_owner_of_every_global_key():
    assert owner_of("encoder.stages.0.weight").task is None
    owner = owner_of("tasks.coarse4.decoder.0.weight")
    assert (owner.task, owner.part, owner.site_key) == ("coarse4", "decoder", "decoder.0.weight")
    assert owner_of("tasks.rot4.encoder.stages.2.1.bias").site_key == "encoder.stages.2.1.bias"
    with pytest.raises(KeyError):
        owner_of("optimizer.state")
