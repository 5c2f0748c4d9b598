"""The Local baseline trained inside a site round: same steps, own state, never in the upload."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mfed.artifacts.layout import MANIFEST_FILE
from mfed.artifacts.tensorfile import decode_tensors
from mfed.learning.model import build_site_model, load_part
from mfed.learning.train import evaluate
from mfed.model_store import write_global_model
from mfed.rounds.baseline import state_uri
from mfed.rounds.initial import init_global_model
from mfed.rounds.site_round import BadInput, load_site_splits, run_site_round
from mfed.seeding import derive_seed
from mfed.spec import ArchSpec, BaselineSpec, DataSpec, InitSpec, RoundSpec, SharingPolicy, SpecError, TrainingSpec
from mfed.storage import Storage
from tests.unit.factories import CLS, DENOISE, site_round_spec


def _setup(root: Path) -> None:
    init = InitSpec(
        federation="fed",
        encoder=ArchSpec(name="small_cnn"),
        groups=(CLS, DENOISE),
        sharing=SharingPolicy(),
        seed=7,
        output=str(root / "r0" / "global"),
    )
    write_global_model(Storage(), init.output, *init_global_model(init))


def _round(root: Path, round_number: int = 1, previous: int | None = None, baseline: bool = True) -> RoundSpec:
    spec = site_round_spec(
        root,
        site="site-a",
        group=CLS,
        round_number=round_number,
        training=TrainingSpec(min_steps=6, max_steps=6),
        data=DataSpec(shard_index=0, shard_count=8, samples=64, test_samples=0),
    )
    local = BaselineSpec(prefix=str(root / "baselines" / "site-a" / "local"), previous_round=previous)
    return replace(spec, local_baseline=local if baseline else None)


def _copy_global(root: Path, frm: int, to: int) -> None:
    (root / f"r{to}" / "global").mkdir(parents=True)
    for name in ("model.safetensors", MANIFEST_FILE):
        (root / f"r{to}" / "global" / name).write_bytes((root / f"r{frm}" / "global" / name).read_bytes())


def test_the_baseline_trains_the_same_steps_is_scored_from_its_stored_state_and_uploads_nothing(tmp_path):
    _setup(tmp_path)
    storage = Storage()
    spec = _round(tmp_path)
    metrics = run_site_round(spec, storage).manifest.metrics
    assert metrics["baseline_steps"] == metrics["steps"] == 6
    # no test split here: both are scored on validation, so the federated number is val_after
    assert metrics["baseline_federated"] == metrics["val_after"]
    gain = (metrics["baseline_federated"] - metrics["baseline_local"]) / metrics["baseline_local"] * 100
    assert metrics["baseline_gain"] == pytest.approx(gain)

    # The stored state is the model that was scored: rebuild it and score it again.
    assert spec.local_baseline is not None
    state = decode_tensors((Path(state_uri(spec.local_baseline.prefix, 1))).read_bytes()).tensors
    model, task = build_site_model(spec.encoder, spec.task, spec.decoder)
    load_part(model, "encoder", state)
    load_part(model, "decoder", state)
    data = load_site_splits(spec.data, spec.site, spec.training.val_fraction, storage)
    again = evaluate(model, task, data.val, device=torch.device("cpu"), seed=derive_seed("eval", spec.site))
    assert again == metrics["baseline_local"]

    # The contribution is byte for byte what the site uploads without a baseline.
    alone = replace(_round(tmp_path, baseline=False), output=str(tmp_path / "alone"))
    run_site_round(alone, storage)
    for name in ("delta.safetensors", "decoder.safetensors"):
        assert (Path(spec.output) / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()
    assert sorted(p.name for p in Path(spec.output).iterdir()) == sorted(p.name for p in (tmp_path / "alone").iterdir())


def test_round_two_continues_the_stored_baseline_and_fails_with_a_reason_when_it_is_gone(tmp_path):
    _setup(tmp_path)
    storage = Storage()
    run_site_round(_round(tmp_path), storage)
    _copy_global(tmp_path, 0, 1)
    continued = run_site_round(_round(tmp_path, 2, previous=1), storage).manifest.metrics
    restarted_spec = replace(
        _round(tmp_path, 2, previous=None),
        output=str(tmp_path / "r2b"),
        local_baseline=BaselineSpec(prefix=str(tmp_path / "other")),
    )
    restarted = run_site_round(restarted_spec, storage).manifest.metrics
    # continuing from round 1's state is not the same as starting over (12 steps, not 6)
    assert continued["baseline_local"] != restarted["baseline_local"]

    missing = _round(tmp_path, 3, previous=2)
    _copy_global(tmp_path, 0, 2)
    Path(state_uri(str(tmp_path / "baselines" / "site-a" / "local"), 2)).unlink()
    with pytest.raises(BadInput, match=r"Local baseline state of round 2 .* is missing"):
        run_site_round(missing, storage)
    assert not (Path(missing.output) / MANIFEST_FILE).exists()  # no contribution, no wrong number


def test_a_baseline_cannot_continue_a_later_round():
    with pytest.raises(SpecError, match="previousRound"):
        replace(_round(Path("/tmp/x"), 2), local_baseline=BaselineSpec(prefix="/tmp/x", previous_round=2))


def test_the_spec_round_trips_with_a_baseline():
    spec = _round(Path("/tmp/x"), 2, previous=1)
    assert RoundSpec.parse(copy.deepcopy(spec.to_dict())) == spec
