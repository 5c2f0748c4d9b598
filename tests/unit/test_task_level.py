"""Task-level copies of shared encoder parameters ("dual" layout): layout, views, aggregation."""

from __future__ import annotations

import numpy as np
import pytest

from mfed.aggregation.crosstask import Level2Rule
from mfed.aggregation.fedavg import AggregationSettings, ContributionSource, aggregate
from mfed.aggregation.ownership import dual_keys, shared_view, task_view
from mfed.aggregation.validate import RejectReason
from mfed.artifacts.manifest import ContributionManifest
from mfed.spec import SharingMode, SharingPolicy
from tests.unit.factories import DECODER_SHAPES, ENCODER_SHAPES, make_base, make_contribution

DUAL = SharingPolicy(mode=SharingMode.DEPTH, depth=1, task_level=True)
STAGE0 = ("encoder.stages.0.weight", "encoder.stages.0.bias")


def _source(manifest: ContributionManifest, delta: bytes, decoder: bytes) -> ContributionSource:
    return ContributionSource(
        site=manifest.site, read_manifest=lambda: manifest, read_files=lambda _m: (delta, decoder)
    )


def _filled(tensors, values):
    """Every encoder tensor set to a constant: E_G (shared) and each task's copy."""
    out = dict(tensors)
    for key, value in tensors.items():
        for prefix, constant in values.items():
            if key.startswith(prefix) and ".decoder." not in key:
                out[key] = np.full(value.shape, constant, dtype=np.float32)
    return out


def test_task_level_layout_keeps_a_shared_and_a_per_task_copy_of_shared_parameters():
    _, tensors, _ = make_base(DUAL)
    for key in STAGE0:
        assert key in tensors and f"tasks.a.{key}" in tensors and f"tasks.b.{key}" in tensors
    assert "encoder.stages.1.weight" not in tensors  # unshared: per task only, as before
    assert dual_keys(tensors, "a") == sorted(STAGE0)
    assert dual_keys(make_base(SharingPolicy())[1], "a") == []


def test_task_view_falls_back_to_the_task_level_copy_and_shared_view_takes_the_shared_one():
    _, tensors, _ = make_base(DUAL)
    tensors = _filled(tensors, {"encoder.": 1.0, "tasks.a.encoder.": 0.0})
    assert task_view(tensors, "a", "encoder")["encoder.stages.0.bias"][0] == 0.0
    assert shared_view(tensors, "a")["encoder.stages.0.bias"][0] == 1.0
    # Unshared parameters come from the task in both views.
    assert shared_view(tensors, "a")["encoder.stages.1.weight"][0, 0] == 0.0


def test_dual_parameters_follow_the_fedavg_of_the_models_each_site_actually_trained():
    # E_G = 1, E_a = 0, E_b = 3 for every encoder parameter.
    # a-1: n=10, started at alpha 1 (from 1.0), delta +0.5 -> trained 1.5
    # a-2: n=30, started at alpha 0 (from 0.0), delta +0.1 -> trained 0.1
    # b-1: n=20, started at alpha 0.5 (from 2.0), delta +1.0 -> trained 3.0
    # Task level: E_a' = (10 * 1.5 + 30 * 0.1) / 40 = 0.45 and E_b' = 3.0.
    # Shared (uniform mean of group mean deltas): 1 + 0.5 * (10*0.5 + 30*0.1)/40 + 0.5 * 1.0 = 1.6.
    base, tensors, _ = make_base(DUAL)
    tensors = _filled(tensors, {"encoder.": 1.0, "tasks.a.encoder.": 0.0, "tasks.b.encoder.": 3.0})
    rng = np.random.default_rng(0)
    sources = []
    for site, task, n, alpha, step in (
        ("a-1", "a", 10, 1.0, 0.5),
        ("a-2", "a", 30, 0.0, 0.1),
        ("b-1", "b", 20, 0.5, 1.0),
    ):
        delta = {k: np.full(s, step, dtype=np.float32) for k, s in ENCODER_SHAPES.items()}
        m, d, c, _, _ = make_contribution(base, site, task, n, rng, delta=delta, start_mix={"encoder.stages.0.": alpha})
        sources.append(_source(m, d, c))
    result = aggregate(base, tensors, 1, sources)
    for key in STAGE0:
        np.testing.assert_allclose(result.tensors[f"tasks.a.{key}"], 0.45, atol=1e-6)
        np.testing.assert_allclose(result.tensors[f"tasks.b.{key}"], 3.0, atol=1e-6)
        np.testing.assert_allclose(result.tensors[key], 1.6, atol=1e-6)
    # Unshared parameters: plain within-task FedAvg of deltas (startMix does not cover them).
    np.testing.assert_allclose(result.tensors["tasks.a.encoder.stages.1.weight"], 0.2, atol=1e-6)


def test_dual_layout_with_a_conflict_averse_rule_records_its_evidence():
    base, tensors, _ = make_base(DUAL)
    rng = np.random.default_rng(1)
    sources = [
        _source(*make_contribution(base, site, task, 10, rng, start_mix={"encoder.": 1.0})[:3])
        for site, task in (("a-1", "a"), ("b-1", "b"))
    ]
    result = aggregate(base, tensors, 1, sources, AggregationSettings(level2_rule=Level2Rule.CAGRAD))
    aggregation = result.manifest.aggregation
    assert aggregation["level2Rule"] == "cagrad" and set(aggregation["agreement"]) == {"a", "b"}
    assert sum(aggregation["level2Weights"].values()) > 0


def test_longest_start_mix_prefix_wins_and_uncovered_parameters_started_at_the_task_level():
    base, _, _ = make_base(DUAL)
    m = make_contribution(
        base, "a-1", "a", 5, np.random.default_rng(2), start_mix={"encoder.": 0.25, "encoder.stages.0.": 1.0}
    )[0]
    assert m.mix_for("encoder.stages.0.weight") == 1.0
    assert m.mix_for("encoder.stages.1.weight") == 0.25
    assert make_contribution(base, "a-1", "a", 5, np.random.default_rng(2))[0].mix_for("encoder.x") == 0.0
    assert ContributionManifest.from_json(m.to_json()).start_mix == {"encoder.": 0.25, "encoder.stages.0.": 1.0}
    plain = make_contribution(base, "a-1", "a", 5, np.random.default_rng(2))[0]
    assert "startMix" not in plain.to_json()


@pytest.mark.parametrize("mix", [{"encoder.": 1.5}, {"decoder.": 0.5}, {"encoder.": -0.1}])
def test_a_start_mix_outside_zero_one_or_not_on_the_encoder_is_rejected(mix):
    base, tensors, _ = make_base(DUAL)
    m, d, c, _, _ = make_contribution(base, "a-1", "a", 5, np.random.default_rng(3), start_mix=mix)
    ok, *_ = make_contribution(base, "b-1", "b", 5, np.random.default_rng(4))
    result = aggregate(
        base,
        tensors,
        1,
        [_source(m, d, c), _source(ok, *make_contribution(base, "b-1", "b", 5, np.random.default_rng(4))[1:3])],
    )
    assert [(r.site, r.reason) for r in result.manifest.rejected] == [("a-1", RejectReason.BAD_MIX.value)]


def _two_track(base, site, task, n, own_step, shared_step, rng, *, with_shared_decoder=True):
    delta = {k: np.full(s, own_step, dtype=np.float32) for k, s in ENCODER_SHAPES.items()}
    delta |= {f"shared.{k}": np.full(ENCODER_SHAPES[k], shared_step, dtype=np.float32) for k in STAGE0}
    decoder = {k: np.full(s, 1.0, dtype=np.float32) for k, s in DECODER_SHAPES[task].items()}
    if with_shared_decoder:
        decoder |= {f"shared.{k}": np.full(s, 9.0, dtype=np.float32) for k, s in DECODER_SHAPES[task].items()}
    return _source(*make_contribution(base, site, task, n, rng, delta=delta, decoder=decoder)[:3])


def test_two_track_uploads_move_the_shared_encoder_by_their_shared_track_and_the_task_level_by_their_own():
    # E_G = 1, E_a = 0, E_b = 3. a-1: own track +0.2 from E_a, shared track +0.5 from E_G;
    # b-1: own +0.3 from E_b, shared +1.0 from E_G. Uniform mean level 2:
    # E_G' = 1 + (0.5 + 1.0) / 2 = 1.75; E_a' = 0.2; E_b' = 3.3; decoders: own track only (1.0).
    base, tensors, _ = make_base(DUAL)
    tensors = _filled(tensors, {"encoder.": 1.0, "tasks.a.encoder.": 0.0, "tasks.b.encoder.": 3.0})
    rng = np.random.default_rng(5)
    sources = [_two_track(base, "a-1", "a", 10, 0.2, 0.5, rng), _two_track(base, "b-1", "b", 10, 0.3, 1.0, rng)]
    result = aggregate(base, tensors, 1, sources)
    assert not result.manifest.rejected
    for key in STAGE0:
        np.testing.assert_allclose(result.tensors[key], 1.75, atol=1e-6)
        np.testing.assert_allclose(result.tensors[f"tasks.a.{key}"], 0.2, atol=1e-6)
        np.testing.assert_allclose(result.tensors[f"tasks.b.{key}"], 3.3, atol=1e-6)
    np.testing.assert_allclose(result.tensors["tasks.a.encoder.stages.1.weight"], 0.2, atol=1e-6)
    np.testing.assert_allclose(result.tensors["tasks.a.decoder.0.weight"], 1.0, atol=1e-6)


def test_a_two_track_upload_without_its_shared_decoder_is_rejected():
    base, tensors, _ = make_base(DUAL)
    rng = np.random.default_rng(6)
    bad = _two_track(base, "a-1", "a", 10, 0.2, 0.5, rng, with_shared_decoder=False)
    result = aggregate(base, tensors, 1, [bad, _two_track(base, "b-1", "b", 10, 0.3, 1.0, rng)])
    assert [(r.site, r.reason) for r in result.manifest.rejected] == [("a-1", RejectReason.KEYS.value)]


def test_a_two_track_upload_to_a_model_without_task_level_copies_is_rejected():
    base, tensors, _ = make_base(SharingPolicy(mode=SharingMode.DEPTH, depth=1))
    rng = np.random.default_rng(7)
    result = aggregate(
        base,
        tensors,
        1,
        [_two_track(base, "a-1", "a", 10, 0.2, 0.5, rng), _source(*make_contribution(base, "b-1", "b", 5, rng)[:3])],
    )
    assert [(r.site, r.reason) for r in result.manifest.rejected] == [("a-1", RejectReason.KEYS.value)]
