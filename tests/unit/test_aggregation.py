"""Streaming two-level aggregation against an independent numpy oracle (np.average)."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest

from mfed.aggregation.crosstask import Level2Rule, Level2Weighting
from mfed.aggregation.fedavg import AggregationSettings, ContributionSource, RoundAggregator, aggregate
from mfed.aggregation.validate import RejectReason
from mfed.artifacts.manifest import ContributionManifest
from mfed.spec import SharingMode, SharingPolicy
from tests.unit.factories import ENCODER_SHAPES, make_base, make_contribution


def _source(manifest: ContributionManifest, delta: bytes, decoder: bytes) -> ContributionSource:
    return ContributionSource(
        site=manifest.site, read_manifest=lambda: manifest, read_files=lambda _m: (delta, decoder)
    )


def _three_sites(base, rng):
    return [
        make_contribution(base, site, task, n, rng)
        for site, task, n in (("a-1", "a", 10), ("a-2", "a", 30), ("b-1", "b", 20))
    ]


def test_level1_and_uniform_level2_match_numpy_average():
    base, tensors, _ = make_base()
    rng = np.random.default_rng(1)
    contribs = _three_sites(base, rng)
    result = aggregate(base, tensors, 1, [_source(m, d, c) for m, d, c, _, _ in contribs])

    (_, _, _, da1, ca1), (_, _, _, da2, ca2), (_, _, _, db1, cb1) = contribs
    for key in ENCODER_SHAPES:
        mean_a = np.average(np.stack([da1[key], da2[key]]).astype(np.float64), axis=0, weights=[10, 30])
        mean_b = db1[key].astype(np.float64)
        expected = tensors[key].astype(np.float64) + np.average(np.stack([mean_a, mean_b]), axis=0, weights=[1, 1])
        np.testing.assert_allclose(result.tensors[key], expected, rtol=0, atol=1e-6)
    expected_dec_a = np.average(np.stack([ca1["decoder.0.weight"], ca2["decoder.0.weight"]]), axis=0, weights=[10, 30])
    np.testing.assert_allclose(result.tensors["tasks.a.decoder.0.weight"], expected_dec_a, atol=1e-6)
    np.testing.assert_allclose(result.tensors["tasks.b.decoder.0.bias"], cb1["decoder.0.bias"], atol=1e-7)
    assert result.manifest.tasks["a"].samples == 40 and result.manifest.tasks["a"].sites == ("a-1", "a-2")
    assert result.manifest.parent_digest == base.digest
    assert result.manifest.aggregation["level2Weights"] == {"a": 0.5, "b": 0.5}


def test_sample_weighted_level2_equals_fedavg_over_all_sites():
    base, tensors, _ = make_base()
    contribs = _three_sites(base, np.random.default_rng(2))
    result = aggregate(
        base,
        tensors,
        1,
        [_source(m, d, c) for m, d, c, _, _ in contribs],
        AggregationSettings(level2_weighting=Level2Weighting.SAMPLES),
    )
    for key in ENCODER_SHAPES:
        deltas = np.stack([c[3][key] for c in contribs]).astype(np.float64)
        expected = tensors[key] + np.average(deltas, axis=0, weights=[10, 30, 20])
        np.testing.assert_allclose(result.tensors[key], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("settings", "recorded"),
    [
        (AggregationSettings(), {"level2Weighting": "uniform"}),
        (
            AggregationSettings(level2_rule=Level2Rule.CAGRAD, cagrad_c=0.7),
            {"level2Weighting": "uniform", "level2Rule": "cagrad", "cagradC": 0.7},
        ),
        (
            AggregationSettings(level2_rule=Level2Rule.GATED, gate_threshold=0.25, gate_momentum=0.8),
            {"level2Weighting": "uniform", "level2Rule": "gated", "gateThreshold": 0.25, "gateMomentum": 0.8},
        ),
    ],
)
def test_the_models_provenance_records_every_setting_of_its_level2_rule(settings, recorded):
    base, tensors, _ = make_base()
    contribs = _three_sites(base, np.random.default_rng(4))
    result = aggregate(base, tensors, 1, [_source(m, d, c) for m, d, c, _, _ in contribs], settings)
    assert {k: result.manifest.aggregation.get(k) for k in recorded} == recorded
    other = {"level2Rule", "cagradC", "gateThreshold", "gateMomentum"} - set(recorded)
    assert not other & set(result.manifest.aggregation)


def test_unshared_encoder_parameters_stay_within_their_task_group():
    base, tensors, _ = make_base(SharingPolicy(mode=SharingMode.NONE))
    assert not any(k.startswith("encoder.") for k in tensors)
    contribs = _three_sites(base, np.random.default_rng(3))
    result = aggregate(base, tensors, 1, [_source(m, d, c) for m, d, c, _, _ in contribs])
    key = "encoder.stages.1.weight"
    mean_a = np.average(np.stack([contribs[0][3][key], contribs[1][3][key]]), axis=0, weights=[10, 30])
    np.testing.assert_allclose(result.tensors[f"tasks.a.{key}"], tensors[f"tasks.a.{key}"] + mean_a, atol=1e-6)
    np.testing.assert_allclose(
        result.tensors[f"tasks.b.{key}"], tensors[f"tasks.b.{key}"] + contribs[2][3][key], atol=1e-6
    )


def test_depth_sharing_averages_lower_stages_across_tasks_and_keeps_upper_stages_per_task():
    base, tensors, _ = make_base(SharingPolicy(mode=SharingMode.DEPTH, depth=1))
    assert "encoder.stages.0.weight" in tensors and "encoder.stages.1.weight" not in tensors
    assert "tasks.a.encoder.stages.1.weight" in tensors
    contribs = _three_sites(base, np.random.default_rng(4))
    result = aggregate(base, tensors, 1, [_source(m, d, c) for m, d, c, _, _ in contribs])
    key = "encoder.stages.0.weight"
    mean_a = np.average(np.stack([contribs[0][3][key], contribs[1][3][key]]), axis=0, weights=[10, 30])
    np.testing.assert_allclose(result.tensors[key], tensors[key] + 0.5 * mean_a + 0.5 * contribs[2][3][key], atol=1e-6)


def test_a_task_group_without_contributions_keeps_its_parameters():
    base, tensors, _ = make_base(SharingPolicy(mode=SharingMode.NONE))
    m, d, c, _, _ = make_contribution(base, "a-1", "a", 5, np.random.default_rng(5))
    result = aggregate(base, tensors, 1, [_source(m, d, c)])
    for key in tensors:
        if key.startswith("tasks.b."):
            np.testing.assert_array_equal(result.tensors[key], tensors[key])
    assert result.manifest.tasks["b"].samples == 0


def test_rerun_in_any_arrival_order_gives_identical_bytes():
    base, tensors, _ = make_base()
    rng = np.random.default_rng(6)
    contribs = [make_contribution(base, f"s-{i:02d}", "ab"[i % 2], 1 + i, rng) for i in range(9)]
    sources = [_source(m, d, c) for m, d, c, _, _ in contribs]
    first = aggregate(base, tensors, 1, sources)
    shuffled = list(sources)
    random.Random(0).shuffle(shuffled)
    second = aggregate(base, tensors, 1, shuffled)
    assert first.model_bytes == second.model_bytes
    assert first.manifest.model.sha256 == second.manifest.model.sha256


def test_adding_sites_out_of_sorted_order_is_refused():
    base, tensors, _ = make_base()
    rng = np.random.default_rng(7)
    aggregator = RoundAggregator(base, tensors, 1)
    for site in ("b-site", "a-site"):
        m, d, c, _, _ = make_contribution(base, site, "a", 3, rng)
        valid = aggregator.validate(m, d, c)
        if site == "a-site":
            with pytest.raises(ValueError, match="sorted order"):
                aggregator.add(valid)
        else:
            aggregator.add(valid)


def test_aggregation_never_mutates_the_base_model():
    base, tensors, _ = make_base()
    snapshot = {k: v.copy() for k, v in tensors.items()}
    contribs = _three_sites(base, np.random.default_rng(8))
    aggregate(base, tensors, 1, [_source(m, d, c) for m, d, c, _, _ in contribs])
    for key, value in snapshot.items():
        np.testing.assert_array_equal(tensors[key], value)


def test_streaming_memory_stays_flat_as_sites_grow():
    """Peak traced memory with 32 sites stays close to that with 4 (contributions are read lazily)."""
    shapes = {"encoder.stages.0.weight": (512, 512), "encoder.stages.0.bias": (512,), "encoder.stages.1.weight": (8, 8)}
    import tests.unit.factories as factories

    original = factories.ENCODER_SHAPES
    factories.ENCODER_SHAPES = shapes
    try:
        base, tensors, _ = make_base()

        def lazy(i: int) -> ContributionSource:
            site, task = f"s-{i:03d}", "ab"[i % 2]

            def files(_m):
                _, d, c, _, _ = make_contribution(base, site, task, 10, np.random.default_rng(i))
                return d, c

            manifest = make_contribution(base, site, task, 10, np.random.default_rng(i))[0]
            return ContributionSource(site=site, read_manifest=lambda: manifest, read_files=files)

        peaks = {}
        for count in (4, 32):
            sources = [lazy(i) for i in range(count)]
            tracemalloc.start()
            aggregate(base, tensors, 1, sources)
            peaks[count] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    finally:
        factories.ENCODER_SHAPES = original
    one_model = 512 * 512 * 4
    assert peaks[32] < peaks[4] * 1.25, peaks
    assert peaks[32] < 20 * one_model, peaks  # a naive stack of 32 contributions would need > 32 models


BAD_CASES = [
    ("wrong federation", RejectReason.WRONG_FEDERATION),
    ("wrong round", RejectReason.WRONG_ROUND),
    ("unknown task", RejectReason.UNKNOWN_TASK),
    ("duplicate site", RejectReason.DUPLICATE_SITE),
    ("wrong base", RejectReason.WRONG_BASE),
    ("zero samples", RejectReason.BAD_SAMPLES),
    ("tampered delta", RejectReason.CHECKSUM),
    ("garbage bytes", RejectReason.MALFORMED),
    ("missing key", RejectReason.KEYS),
    ("extra key", RejectReason.KEYS),
    ("wrong shape", RejectReason.SHAPE),
    ("wrong dtype", RejectReason.DTYPE),
    ("nan", RejectReason.NON_FINITE),
    ("inf in decoder", RejectReason.NON_FINITE),
]


@pytest.mark.parametrize(("case", "reason"), BAD_CASES, ids=[c for c, _ in BAD_CASES])
def test_each_kind_of_bad_contribution_is_rejected_with_its_reason_and_never_aggregated(case, reason):
    import dataclasses

    from mfed.artifacts.tensorfile import StoredDtype, encode_tensors, sha256_hex

    base, tensors, _ = make_base()
    rng = np.random.default_rng(9)
    good = [make_contribution(base, "a-1", "a", 10, rng), make_contribution(base, "b-1", "b", 10, rng)]
    m, d, c, delta, decoder = make_contribution(base, "z-bad", "a", 10, rng)
    if case == "wrong federation":
        m = dataclasses.replace(m, federation="other")
    elif case == "wrong round":
        m = dataclasses.replace(m, round=7)
    elif case == "unknown task":
        m = dataclasses.replace(m, task="nope")
    elif case == "duplicate site":
        m = dataclasses.replace(m, site="a-1")
    elif case == "wrong base":
        m = dataclasses.replace(m, base_digest="0" * 64)
    elif case == "zero samples":
        m = dataclasses.replace(m, samples=0)
    elif case == "tampered delta":
        d = d[:-4] + b"\x00\x00\x80\x3f"
    elif case == "garbage bytes":
        d = b"\x08\x00\x00\x00\x00\x00\x00\x00not json"
        m = dataclasses.replace(m, delta=dataclasses.replace(m.delta, sha256=sha256_hex(d)))
    else:
        if case == "missing key":
            delta.pop("encoder.stages.0.bias")
        elif case == "extra key":
            delta["encoder.stages.9.weight"] = np.zeros(2, np.float32)
        elif case == "wrong shape":
            delta["encoder.stages.0.weight"] = np.zeros((4, 3), np.float32)
        elif case == "nan":
            delta["encoder.stages.0.bias"][1] = np.nan
        elif case == "inf in decoder":
            decoder["decoder.0.weight"][0, 0] = np.inf
        d = encode_tensors(delta, float_dtype=StoredDtype.F16 if case == "wrong dtype" else StoredDtype.F32)
        c = encode_tensors(decoder)
        m = dataclasses.replace(
            m,
            delta=dataclasses.replace(m.delta, sha256=sha256_hex(d)),
            decoder=dataclasses.replace(m.decoder, sha256=sha256_hex(c)),
        )

    sources = [_source(gm, gd, gc) for gm, gd, gc, _, _ in good]
    clean = aggregate(base, tensors, 1, sources)
    with_bad = aggregate(
        base,
        tensors,
        1,
        [
            *sources,
            ContributionSource(
                site=m.site if case != "duplicate site" else "a-1",
                read_manifest=lambda: m,
                read_files=lambda _m: (d, c),
            ),
        ],
    )
    assert [(r.site, r.reason) for r in with_bad.manifest.rejected] == [(m.site, reason.value)]
    assert with_bad.model_bytes == clean.model_bytes  # nothing of it was added
    assert with_bad.manifest.rejected[0].detail  # says why


def test_validate_raises_a_typed_error_naming_the_site_and_reason():
    from mfed.aggregation.validate import ContributionRejected

    base, tensors, _ = make_base()
    m, d, c, _, _ = make_contribution(base, "site-x", "a", 10, np.random.default_rng(10), round_number=3)
    with pytest.raises(ContributionRejected) as info:
        RoundAggregator(base, tensors, 1).validate(m, d, c)
    assert info.value.site == "site-x" and info.value.reason is RejectReason.WRONG_ROUND
    assert "site-x" in str(info.value) and "round 3" in str(info.value)


def test_half_precision_deltas_are_accepted_when_the_manifest_declares_them():
    from mfed.artifacts.tensorfile import StoredDtype

    base, tensors, _ = make_base()
    rng = np.random.default_rng(11)
    m, d, c, delta, _ = make_contribution(base, "a-1", "a", 10, rng, delta_dtype=StoredDtype.BF16)
    result = aggregate(base, tensors, 1, [_source(m, d, c)])
    assert not result.manifest.rejected
    key = "encoder.stages.0.weight"
    # bf16 keeps ~3 significant digits; the update lands within that precision.
    np.testing.assert_allclose(result.tensors[key] - tensors[key], delta[key], rtol=1e-2, atol=1e-2)


def test_single_accumulator_streaming_agrees_with_per_group_aggregation():
    """The linear fast path (coefficients from manifests) and the per-group path give the same model."""
    base, tensors, _ = make_base(SharingPolicy(mode=SharingMode.DEPTH, depth=1))
    contribs = _three_sites(base, np.random.default_rng(12))
    streamed = aggregate(base, tensors, 1, [_source(m, d, c) for m, d, c, _, _ in contribs])
    per_group = RoundAggregator(base, tensors, 1)
    for m, d, c, _, _ in contribs:
        assert per_group.offer(m, d, c)
    reference = per_group.finish()
    assert set(streamed.tensors) == set(reference.tensors)
    for key in reference.tensors:
        np.testing.assert_allclose(streamed.tensors[key], reference.tensors[key], rtol=1e-6, atol=1e-7)
    assert streamed.manifest.contributors == reference.manifest.contributors
    assert streamed.manifest.tasks == reference.manifest.tasks
