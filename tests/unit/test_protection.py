"""Per-site protection (mix, fallback, gate) in the trainer, and strategy state kept in artifacts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mfed.aggregation.crosstask import Level2Rule
from mfed.aggregation.fedavg import AggregationSettings, ContributionSource, aggregate
from mfed.artifacts.layout import MANIFEST_FILE, join
from mfed.artifacts.manifest import ContributionManifest, GlobalManifest
from mfed.artifacts.tensorfile import decode_tensors, encode_tensors, sha256_hex
from mfed.learning import protection
from mfed.learning.protection import choose_mix, mix_encoders
from mfed.learning.train import planned_steps, shared_track_steps
from mfed.model_store import read_global_model, write_global_model
from mfed.rounds import site_round
from mfed.rounds.initial import init_global_model
from mfed.rounds.site_round import BadInput, evaluate_start, load_site_splits, prepare_start, run_site_round
from mfed.spec import (
    ArchSpec,
    BaselineSpec,
    DataSpec,
    DecoderSource,
    InitSpec,
    RoundSpec,
    SharingMode,
    SharingPolicy,
    SiteStrategy,
    TrainingSpec,
)
from mfed.storage import Storage
from tests.unit.factories import CLS, DENOISE, make_base, make_contribution, site_round_spec

DUAL = SharingPolicy(task_level=True)


def _init(root: Path, sharing: SharingPolicy = DUAL) -> None:
    spec = InitSpec(
        federation="fed",
        encoder=ArchSpec(name="small_cnn"),
        groups=(CLS, DENOISE),
        sharing=sharing,
        seed=7,
        output=str(root / "r0" / "global"),
    )
    write_global_model(Storage(), spec.output, *init_global_model(spec))


def _round(root: Path, strategy: SiteStrategy, site="cls-a", group=CLS, round_number=1, **training) -> RoundSpec:
    return site_round_spec(
        root,
        site=site,
        group=group,
        round_number=round_number,
        training=TrainingSpec(site_strategy=strategy, device="cpu", **training),
        data=DataSpec(shard_index=0 if group is CLS else 1, shard_count=8, samples=64, test_samples=20),
    )


def _source(storage: Storage, prefix: str, site: str) -> ContributionSource:
    return ContributionSource(
        site=site,
        read_manifest=lambda: ContributionManifest.from_json(storage.read(join(prefix, MANIFEST_FILE))),
        read_files=lambda m: (storage.read(join(prefix, m.delta.name)), storage.read(join(prefix, m.decoder.name))),
    )


def _rewrite_global(root: Path, round_dir: str, change) -> None:
    """Write a copy of round 0's global model under `round_dir`, its tensors and manifest changed."""
    storage = Storage()
    stored = read_global_model(storage, str(root / "r0" / "global"))
    manifest, tensors = stored.manifest, stored.tensors
    tensors, aggregation = change(dict(tensors), dict(manifest.aggregation))
    data = encode_tensors(tensors)
    model = type(manifest.model)(name=manifest.model.name, sha256=sha256_hex(data), size=len(data))
    fields = {**manifest.__dict__, "model": model, "aggregation": aggregation}
    write_global_model(storage, str(root / round_dir / "global"), data, GlobalManifest(**fields))


def test_mix_encoders_interpolates_only_the_parameters_held_both_shared_and_per_task():
    shared = {"encoder.a": np.array([1.0, 3.0]), "encoder.b": np.array([5.0])}
    task = {"encoder.a": np.array([0.0, 1.0]), "encoder.b": np.array([7.0])}
    mixed = mix_encoders(shared, task, 0.25, ["encoder.a"])
    np.testing.assert_allclose(mixed["encoder.a"], [0.25, 1.5])  # 0.25 * shared + 0.75 * task
    np.testing.assert_allclose(mixed["encoder.b"], [7.0])  # not dual: the task level's own


class _Task:
    def __init__(self, higher_is_better: bool) -> None:
        self.higher_is_better = higher_is_better


class _Data:
    """A site's splits as choose_mix sees them: only the validation split's size matters."""

    def __init__(self, validation_samples: int) -> None:
        self.val = [None] * validation_samples


def _choose_mix(task: _Task, validation_samples: int) -> protection.MixChoice:
    return choose_mix(
        None,  # type: ignore[arg-type]
        task,  # type: ignore[arg-type]
        _Data(validation_samples),  # type: ignore[arg-type]
        {"encoder.w": np.ones(1)},
        {"encoder.w": np.zeros(1)},
        ["encoder.w"],
        batch_size=32,
        learning_rate=1e-3,
        device=None,  # type: ignore[arg-type]
        seed=0,
        eval_seed=0,
    )


@pytest.mark.parametrize(
    ("scores", "higher_is_better", "expected"),
    [
        ({0.0: 50.0, 0.5: 60.0, 1.0: 55.0}, True, 0.5),
        ({0.0: 60.0, 0.5: 60.0, 1.0: 60.0}, True, 0.0),  # ties: the least sharing
        ({0.0: 0.30, 0.5: 0.20, 1.0: 0.10}, False, 1.0),  # lower is better (e.g. an error)
    ],
)
def test_mix_choice_takes_the_best_probed_validation_score(monkeypatch, scores, higher_is_better, expected):
    # The fake probe reads alpha back from the mixed encoder: shared = 1, task level = 0.
    monkeypatch.setattr(protection, "probe_score", lambda _m, _t, _d, enc, **_kw: scores[float(enc["encoder.w"][0])])
    choice = _choose_mix(_Task(higher_is_better), protection.MIN_CHOICE_SAMPLES)
    assert choice.alpha == expected and choice.scores == scores


def test_too_small_a_validation_split_chooses_nothing_and_keeps_the_task_level(monkeypatch):
    def probe(*_args, **_kw):
        raise AssertionError("no probe on too few validation examples")

    monkeypatch.setattr(protection, "probe_score", probe)
    choice = _choose_mix(_Task(True), protection.MIN_CHOICE_SAMPLES - 1)
    assert (choice.alpha, choice.scores) == (0.0, {})
    task = _Task(True)
    assert protection.prefers_shared(task, 75.0, 50.0, validation_samples=10)  # type: ignore[arg-type]
    assert not protection.prefers_shared(task, 75.0, 50.0, validation_samples=9)  # type: ignore[arg-type]
    assert not protection.prefers_shared(task, 50.0, 50.0, validation_samples=100)  # type: ignore[arg-type]


def test_planned_steps_give_small_sites_more_passes_and_respect_the_cap():
    assert planned_steps(40, epochs=1, batch_size=32) == 2
    assert planned_steps(40, epochs=1, batch_size=32, min_steps=20) == 20
    assert planned_steps(2400, epochs=1, batch_size=32, min_steps=20) == 75  # large sites: unchanged
    assert planned_steps(40, epochs=1, batch_size=32, min_steps=20, max_steps=5) == 5


def _fake_evaluate(monkeypatch):
    """Score = mean of the first encoder weight, so a test controls which track scores better."""
    monkeypatch.setattr(
        site_round,
        "evaluate",
        lambda model, _task, _split, **_kw: float(next(model.encoder.parameters()).detach().mean()),
    )


@pytest.mark.parametrize(
    ("shared_value", "task_value", "val_fraction", "deployed"),
    [
        (0.5, 1.0, 0.2, 0.0),
        (1.0, 0.5, 0.2, 1.0),
        (0.7, 0.7, 0.2, 0.0),  # ties keep the task level
        (1.0, 0.5, 0.1, 0.0),  # 6 validation images (under MIN_CHOICE_SAMPLES): no choice
    ],
)
def test_a_two_track_site_deploys_the_track_that_scores_better_on_its_own_validation(
    tmp_path, monkeypatch, shared_value, task_value, val_fraction, deployed
):
    _init(tmp_path)

    def change(tensors, aggregation):
        for key in list(tensors):
            if key.startswith("encoder."):
                tensors[key] = np.full_like(tensors[key], shared_value)
            elif key.startswith("tasks.cls10.encoder."):
                tensors[key] = np.full_like(tensors[key], task_value)
        return tensors, aggregation

    _rewrite_global(tmp_path, "r5", change)
    _fake_evaluate(monkeypatch)
    spec = _round(tmp_path, SiteStrategy.FALLBACK, round_number=6, val_fraction=val_fraction)
    data = load_site_splits(spec.data, spec.site, spec.training.val_fraction, Storage())
    assert (len(data.val) < protection.MIN_CHOICE_SAMPLES) == (val_fraction == 0.1)
    scores = evaluate_start(spec, Storage(), data)
    assert scores["shared"] == deployed
    assert scores["val"] == pytest.approx(shared_value if deployed else task_value)
    assert (scores["val_task_track"], scores["val_shared_track"]) == pytest.approx((task_value, shared_value))
    # Both tracks are scored on the test split too; "test" is the deployed track's.
    assert (scores["test_task_track"], scores["test_shared_track"]) == pytest.approx((task_value, shared_value))
    assert scores["test"] == pytest.approx(shared_value if deployed else task_value)


def test_a_two_track_round_uploads_both_tracks_and_its_evidence_and_the_aggregator_accepts_it(tmp_path):
    _init(tmp_path)
    storage = Storage()
    specs = [_round(tmp_path, SiteStrategy.FALLBACK), _round(tmp_path, SiteStrategy.FALLBACK, "den-a", DENOISE)]
    for spec in specs:
        manifest = run_site_round(spec, storage).manifest
        assert manifest.start_mix == {}  # the task-level track starts from the task level
        assert {"val_after", "val_after_shared", "deploy_shared", "start_alpha"} <= set(manifest.metrics)
        assert manifest.metrics["steps"] == 4  # two tracks of 2 steps (51 images, batch 32)
        delta = decode_tensors(storage.read(join(spec.output, "delta.safetensors"))).tensors
        assert any(k.startswith("shared.encoder.") for k in delta) and any(k.startswith("encoder.") for k in delta)
    stored = read_global_model(storage, specs[0].global_model)
    base, tensors = stored.manifest, stored.tensors
    result = aggregate(base, tensors, 1, [_source(storage, s.output, s.site) for s in specs])
    assert not result.manifest.rejected
    # One site per task: the task-level copy is exactly the site's task-level track.
    own = decode_tensors(storage.read(join(specs[0].output, "delta.safetensors"))).tensors
    key = "encoder.stages.0.0.weight"
    np.testing.assert_allclose(
        result.tensors[f"tasks.cls10.{key}"], tensors[f"tasks.cls10.{key}"] + own[key], atol=1e-6
    )


def test_the_shared_track_decoder_persists_in_the_sites_own_decoder_file(tmp_path):
    _init(tmp_path)
    storage = Storage()
    run_site_round(_round(tmp_path, SiteStrategy.FALLBACK), storage)
    _rewrite_global(tmp_path, "r1", lambda t, a: (t, a))
    uploaded = decode_tensors(storage.read(str(tmp_path / "r1" / "sites" / "cls-a" / "decoder.safetensors"))).tensors
    state = prepare_start(_round(tmp_path, SiteStrategy.FALLBACK, round_number=2), storage)
    assert state.shared is not None
    for name, value in state.shared.model.decoder.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), uploaded[f"shared.decoder.{name}"])
    for name, value in state.model.decoder.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), uploaded[f"decoder.{name}"])


def test_with_the_global_decoder_source_only_the_task_track_starts_from_the_tasks_decoder(tmp_path):
    # auto: the task-level track is Task-FedAvg (D_tau), the shared track keeps its own decoder
    _init(tmp_path)
    storage = Storage()
    run_site_round(_round(tmp_path, SiteStrategy.FALLBACK, decoder_source=DecoderSource.GLOBAL), storage)
    _rewrite_global(tmp_path, "r1", lambda t, a: (t, a))
    uploaded = decode_tensors(storage.read(str(tmp_path / "r1" / "sites" / "cls-a" / "decoder.safetensors"))).tensors
    global_tensors = read_global_model(storage, str(tmp_path / "r1" / "global")).tensors
    spec = _round(tmp_path, SiteStrategy.FALLBACK, round_number=2, decoder_source=DecoderSource.GLOBAL)
    state = prepare_start(spec, storage)
    assert state.shared is not None and state.decoder_origin == "global"
    for name, value in state.shared.model.decoder.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), uploaded[f"shared.decoder.{name}"])
    for name, value in state.model.decoder.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), global_tensors[f"tasks.cls10.decoder.{name}"])
        assert not np.array_equal(value.numpy(), uploaded[f"decoder.{name}"])


def test_a_mix_round_records_its_probe_and_start_and_scoring_makes_the_same_choice(tmp_path):
    _init(tmp_path)
    storage = Storage()
    spec = _round(tmp_path, SiteStrategy.MIX)
    data = load_site_splits(spec.data, spec.site, spec.training.val_fraction, storage)
    manifest = run_site_round(spec, storage, data=data).manifest
    alpha = manifest.metrics["start_alpha"]
    assert alpha in (0.0, 0.5, 1.0) and manifest.start_mix == ({"encoder.": alpha} if alpha else {})
    assert {"probe_val_a000", "probe_val_a050", "probe_val_a100"} <= set(manifest.metrics)
    assert evaluate_start(spec, storage, data)["start_alpha"] == alpha  # deterministic: same artifacts, same choice


@pytest.mark.parametrize(("gate_open", "expected_mix"), [(True, {"encoder.": 1.0}), (False, {})])
def test_a_gate_site_shares_only_while_the_aggregator_kept_its_task_in(tmp_path, gate_open, expected_mix):
    _init(tmp_path)
    _rewrite_global(tmp_path, "r1", lambda t, a: (t, {**a, "gateOpen": {"cls10": gate_open}}))
    state = prepare_start(_round(tmp_path, SiteStrategy.GATE, round_number=2), Storage())
    assert state.start_mix == expected_mix and state.evidence["gate_open"] == float(gate_open)


def test_a_protection_strategy_on_a_model_without_task_level_copies_is_bad_input(tmp_path):
    _init(tmp_path, SharingPolicy())
    with pytest.raises(BadInput, match="taskLevel"):
        prepare_start(_round(tmp_path, SiteStrategy.FALLBACK), Storage())


def test_the_gate_state_survives_a_restart_because_it_travels_in_the_global_manifest():
    # Round 1: a and b disagree (cosine -1): both gates close, agreement -1 each.
    # Round 2 (after a JSON round trip of the manifest, as the operator reads it from S3):
    # they agree (cosine 1); with momentum 0.5 the smoothed agreement is 0.5 * -1 + 0.5 * 1 = 0.
    base, tensors, _ = make_base(SharingPolicy(mode=SharingMode.DEPTH, depth=1, task_level=True))
    settings = AggregationSettings(level2_rule=Level2Rule.GATED, gate_momentum=0.5)
    rng = np.random.default_rng(0)

    def run(base, tensors, round_number, sign):
        sources = []
        for site, task, value in (("a-1", "a", 1.0), ("b-1", "b", sign)):
            delta = {
                k: np.full(v.shape, value, dtype=np.float32) for k, v in tensors.items() if k.startswith("encoder.")
            }
            delta |= {
                k.removeprefix("tasks.a.").removeprefix("tasks.b."): np.zeros(v.shape, np.float32)
                for k, v in tensors.items()
                if k.startswith(f"tasks.{task}.encoder.") and k.removeprefix(f"tasks.{task}.") not in delta
            }
            m, d, c, _, _ = make_contribution(base, site, task, 10, rng, round_number=round_number, delta=delta)
            sources.append(
                ContributionSource(site=site, read_manifest=lambda m=m: m, read_files=lambda _m, d=d, c=c: (d, c))
            )
        return aggregate(base, tensors, round_number, sources, settings)

    first = run(base, tensors, 1, -1.0)
    assert first.manifest.aggregation["gate"]["agreement"] == pytest.approx({"a": -1.0, "b": -1.0})
    assert first.manifest.aggregation["level2Weights"] == {"a": 0.0, "b": 0.0}
    restarted = GlobalManifest.from_json(first.manifest.to_json())
    second = run(restarted, dict(first.tensors), 2, 1.0)
    assert second.manifest.aggregation["gate"]["agreement"] == pytest.approx({"a": 0.0, "b": 0.0})
    assert second.manifest.aggregation["gateOpen"] == {"a": True, "b": True}  # 0.0 >= threshold 0.0


def test_shared_steps_cap_only_the_shared_track_of_a_two_track_site(tmp_path):
    _init(tmp_path)
    # 51 training images, batch 32: 2 steps an epoch, raised to 6 by minSteps; the shared track
    # is capped at 1 step, so the site trains 6 + 1 steps
    spec = _round(tmp_path, SiteStrategy.FALLBACK, min_steps=6, shared_steps=1)
    manifest = run_site_round(spec, Storage()).manifest
    assert manifest.metrics["steps"] == 7
    assert shared_track_steps(6, 1) == 1 and shared_track_steps(6, None) == 6 and shared_track_steps(6, 9) == 6


def test_a_two_track_site_gives_its_local_baseline_the_steps_of_both_tracks(tmp_path):
    """Equal compute on a cluster as in the pilot: a site that trains two models a round spends
    both tracks' steps, and its Local baseline gets as many (not only the task track's)."""
    _init(tmp_path)
    spec = _round(tmp_path, SiteStrategy.FALLBACK, min_steps=6, max_steps=6, shared_steps=4)
    local = BaselineSpec(prefix=str(tmp_path / "baselines" / "cls-a" / "local"))
    metrics = run_site_round(replace(spec, local_baseline=local), Storage()).manifest.metrics
    assert metrics["steps"] == 6 + 4
    assert metrics["baseline_steps"] == metrics["steps"]
