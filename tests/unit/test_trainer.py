"""The site trainer: one round end to end on local files, exit codes, idempotent re-runs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mfed_trainer import main as trainer_main

from mfed.artifacts.layout import MANIFEST_FILE
from mfed.artifacts.manifest import ContributionManifest
from mfed.artifacts.tensorfile import decode_tensors
from mfed.model_store import read_global_model
from mfed.rounds.site_round import BadInput, run_site_round
from mfed.spec import (
    ArchSpec,
    DataSpec,
    DecoderSource,
    InitSpec,
    RoundSpec,
    SharingPolicy,
    TaskSpec,
    TrainingSpec,
)
from mfed.storage import Storage
from tests.unit.factories import CLS, DENOISE, site_round_spec


def _init(root: Path) -> InitSpec:
    return InitSpec(
        federation="fed",
        encoder=ArchSpec(name="small_cnn"),
        groups=(CLS, DENOISE),
        sharing=SharingPolicy(),
        seed=7,
        output=str(root / "r0" / "global"),
    )


def _round(root: Path, site="site-a", group=CLS, round_number=1, **training) -> RoundSpec:
    return site_round_spec(
        root,
        site=site,
        group=group,
        round_number=round_number,
        training=TrainingSpec(**training),
        data=DataSpec(shard_index=0, shard_count=8, samples=64, test_samples=0),
    )


def _run_main(spec, monkeypatch, capsys) -> tuple[int, list[dict]]:
    monkeypatch.setenv("MFED_SPEC", json.dumps(spec.to_dict()))
    code = trainer_main.main([])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return code, events


def test_init_then_a_round_uploads_a_delta_a_decoder_and_a_manifest(tmp_path, monkeypatch, capsys):
    assert _run_main(_init(tmp_path), monkeypatch, capsys)[0] == 0
    code, events = _run_main(_round(tmp_path), monkeypatch, capsys)
    assert code == 0 and events[-1]["event"] == "uploaded"
    out = tmp_path / "r1" / "sites" / "site-a"
    manifest = ContributionManifest.from_json((out / MANIFEST_FILE).read_bytes())
    stored = read_global_model(Storage(), str(tmp_path / "r0" / "global"))
    base, tensors = stored.manifest, stored.tensors
    assert manifest.base_digest == base.digest and manifest.samples == 51  # 64 minus 13 validation
    delta = decode_tensors((out / "delta.safetensors").read_bytes()).tensors
    assert set(delta) == {k for k in tensors if k.startswith("encoder.")}
    assert any(np.abs(v).max() > 0 for v in delta.values())  # it trained


def test_a_rerun_of_the_same_job_returns_the_existing_upload_without_training(tmp_path, monkeypatch, capsys):
    _run_main(_init(tmp_path), monkeypatch, capsys)
    _run_main(_round(tmp_path), monkeypatch, capsys)
    before = (tmp_path / "r1" / "sites" / "site-a" / "delta.safetensors").stat().st_mtime_ns
    code, events = _run_main(_round(tmp_path), monkeypatch, capsys)
    assert code == 0 and events[-1]["event"] == "already-uploaded"
    assert (tmp_path / "r1" / "sites" / "site-a" / "delta.safetensors").stat().st_mtime_ns == before


def test_low_precision_deltas_are_half_the_size(tmp_path, monkeypatch, capsys):
    _run_main(_init(tmp_path), monkeypatch, capsys)
    storage = Storage()
    full = run_site_round(_round(tmp_path, site="site-a"), storage).manifest
    half = run_site_round(_round(tmp_path, site="site-b", delta_dtype="bfloat16"), storage).manifest
    assert half.delta_dtype == "BF16" and half.delta.size < 0.51 * full.delta.size


def test_bad_input_exits_with_code_2_and_says_why(tmp_path, monkeypatch, capsys):
    _run_main(_init(tmp_path), monkeypatch, capsys)
    wrong = replace(_round(tmp_path), task=TaskSpec(name="cls10", type="classification", params={"num_classes": 5}))
    code, events = _run_main(wrong, monkeypatch, capsys)
    assert code == trainer_main.EXIT_BAD_INPUT
    assert events[-1]["kind"] == "bad-input" and "sites of one task must agree" in events[-1]["error"]
    body = _round(tmp_path).to_dict()
    body["round"] = "one"
    monkeypatch.setenv("MFED_SPEC", json.dumps(body))
    assert trainer_main.main([]) == trainer_main.EXIT_BAD_INPUT
    assert "round: must be an integer" in capsys.readouterr().out


def test_an_encoder_that_does_not_match_the_federation_is_bad_input_naming_the_parameter(tmp_path, monkeypatch, capsys):
    _run_main(_init(tmp_path), monkeypatch, capsys)
    wide = replace(_round(tmp_path), encoder=ArchSpec(name="small_cnn", params={"feature_dim": 64}))
    with pytest.raises(BadInput, match=r"encoder\.stages\.2\.1\.bias"):
        run_site_round(wide, Storage())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_storage_exits_with_the_transient_code_75(tmp_path, monkeypatch, capsys):
    from mfed import storage as storage_module

    storage_module.s3_client.cache_clear()
    monkeypatch.setenv("MFED_S3_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MFED_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-value")
    spec = replace(_round(tmp_path), global_model="s3://bucket/fed/r0/global")
    code, events = _run_main(spec, monkeypatch, capsys)
    storage_module.s3_client.cache_clear()
    assert code == trainer_main.EXIT_TRANSIENT and events[-1]["kind"] == "transient"
    assert "secret-value" not in json.dumps(events)


def test_the_site_decoder_persists_across_rounds_unless_the_method_resets_it(tmp_path, monkeypatch, capsys):
    _run_main(_init(tmp_path), monkeypatch, capsys)
    storage = Storage()
    run_site_round(_round(tmp_path), storage)
    # Round 2 needs a round-1 global model; reuse round 0's by copying it (the base is what matters here).
    (tmp_path / "r1" / "global").mkdir(parents=True)
    for name in ("model.safetensors", MANIFEST_FILE):
        (tmp_path / "r1" / "global" / name).write_bytes((tmp_path / "r0" / "global" / name).read_bytes())
    own = run_site_round(_round(tmp_path, round_number=2), storage).manifest
    assert own.trainer["decoderStart"] == "own"
    reset_spec = replace(
        _round(tmp_path, round_number=2),
        output=str(tmp_path / "r2b"),
        training=TrainingSpec(decoder_source=DecoderSource.GLOBAL),
    )
    reset = run_site_round(reset_spec, storage).manifest
    assert reset.trainer["decoderStart"] == "global"


def test_the_console_script_runs_as_a_job_would(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_init(tmp_path).to_dict()))
    done = subprocess.run(
        [sys.executable, "-m", "mfed_trainer.main", "--spec", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["event"] == "initialised"
    assert (tmp_path / "r0" / "global" / "model.safetensors").exists()
