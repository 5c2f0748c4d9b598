"""Plugins end to end: the example plugin pip-installed into the test venv, two federations
through the real operator process, the real trainer (run by the test kubelet) and SeaweedFS.

- `plugin`: the example's encoder without `stages` (sharing by prefix), its decoder and its
  task type beside a built-in task on the same encoder, two chained rounds;
- `flat`: the deliberately different encoder (an MLP over flattened inputs), started with
  `initialModel.uri` from weights `mfed import-weights` took from a plain torch.nn model.
Then `mfed export` reproduces each site's test metric as the round's status reports it.

What the emulation leaves out (see tests/support/kubelet.py): images (the trainer runs from
this venv, where the plugin is installed, as it would be in the image examples/plugin/Dockerfile
builds), volumes, resources and scheduling."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mfed import storage as storage_module
from mfed.artifacts.tensorfile import decode_tensors
from mfed.cli import main
from mfed.learning.train import evaluate
from mfed.rounds.site_round import load_site_splits, prepare_start
from mfed.seeding import derive_seed
from mfed.spec import ArchSpec, DataSpec, RoundSpec, TaskSpec, TrainingSpec
from mfed.storage import Storage
from mfed.weights.export import load_site_bundle
from tests.e2e.conftest import BUCKET, Cluster, check_global_model
from tests.support import manifests as m
from tests.support.plugin import install_example_plugin
from tests.support.seaweed import ACCESS_KEY, SECRET_KEY

pytestmark = pytest.mark.slow
PATCH = {
    "name": "patch_net",
    "params": {"width": 8, "depth": 1},
    "sharing": {"mode": "prefixes", "prefixes": ["embed."]},
}
FLAT = {"name": "flat_mlp", "params": {"input_shape": [1, 28, 28], "hidden": [32]}, "sharing": {"mode": "all"}}
INSET = {"name": "inset", "type": "membership", "params": {"positives": [5, 7, 9]}}
# site -> (federation, task, decoder, shard of 8)
SITES: dict[str, tuple[str, dict[str, Any], str, int]] = {
    "inset-a": ("plugin", INSET, "pooled_head", 0),
    "inset-b": ("plugin", INSET, "pooled_head", 1),
    "denoise-a": ("plugin", {"name": "denoise", "type": "denoise", "params": {}}, "upsample", 2),
    "cls10-a": ("flat", {"name": "cls10", "type": "classification", "params": {}}, "mlp", 3),
    "cls10-b": ("flat", {"name": "cls10", "type": "classification", "params": {}}, "mlp", 4),
}
SAMPLES, TEST_SAMPLES = 100, 200


@pytest.fixture(scope="module", autouse=True)
def example_plugin() -> Iterator[None]:
    install_example_plugin()
    yield


@pytest.fixture
def s3_env(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The `mfed` CLI's S3 settings, as a user's shell would have them."""
    for key, value in {
        "MFED_S3_ENDPOINT": cluster.s3.endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "MFED_S3_MAX_ATTEMPTS": "2",
    }.items():
        monkeypatch.setenv(key, value)
    storage_module.s3_client.cache_clear()
    yield
    storage_module.s3_client.cache_clear()


def _sitetask(cluster: Cluster, site: str) -> dict[str, Any]:
    federation, task, decoder, shard = SITES[site]
    body = m.sitetask(
        cluster.namespace,
        site,
        federation=federation,
        task=task["name"],
        task_type=task["type"],
        shard=shard,
        shards=8,
        samples=SAMPLES,
        test_samples=TEST_SAMPLES,
        params=task["params"],
    )
    body["spec"]["decoder"] = {"name": decoder, "params": {}}
    return body


def _round(cluster: Cluster, name: str, encoder: dict[str, Any], initial: dict[str, Any], sites: int) -> dict[str, Any]:
    return m.federation_round(
        cluster.namespace,
        name,
        federation=name,
        bucket=BUCKET,
        endpoint=cluster.s3.endpoint,
        encoder=encoder,
        initialModel=initial,
        followUpRounds=1,
        aggregation={"deadlineSeconds": 300, "minSites": sites},
    )


def _import_plain_weights(tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """A plain torch.nn model's first layer, imported as the `flat` federation's encoder."""
    torch.manual_seed(21)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())
    state = {k: v.contiguous() for k, v in plain.state_dict().items()}
    torch.save(state, tmp_path / "plain.pt")
    config = {
        "federation": "flat",
        "method": "m-fed",
        "encoder": FLAT,
        "tasks": [{"task": SITES["cls10-a"][1], "decoder": {"name": "mlp"}}],
    }
    (tmp_path / "flat.yaml").write_text(json.dumps(config))
    uri = f"s3://{BUCKET}/imported/flat"
    args = ["import-weights", str(tmp_path / "plain.pt"), "--config", str(tmp_path / "flat.yaml"), "--out", uri]
    assert main([*args, "--map", "1.=encoder.net.1."]) == 0
    return uri, state


def _site_spec(site: str, round_number: int, global_uri: str) -> RoundSpec:
    """What the trainer's spec for `site` holds that scoring needs (its task, data, encoder)."""
    federation, task, decoder, shard = SITES[site]
    encoder = PATCH if federation == "plugin" else FLAT
    return RoundSpec(
        federation=federation,
        round=round_number,
        site=site,
        task=TaskSpec(name=task["name"], type=task["type"], params=task["params"]),
        encoder=ArchSpec(name=encoder["name"], params=encoder["params"]),
        decoder=ArchSpec(name=decoder),
        training=TrainingSpec(device="cpu"),
        data=DataSpec(shard_index=shard, shard_count=8, samples=SAMPLES, test_samples=TEST_SAMPLES),
        global_model=global_uri,
        previous_decoder=f"{global_uri.removesuffix('/global')}/sites/{site}/decoder.safetensors",
        output="s3://unused/unused",
    )


def _test_metric(path: Path, spec: RoundSpec) -> float:
    """The exported model scored the way the trainer scores a site: its test split, the task's
    seeded evaluation transforms, one thread like the Jobs (OMP_NUM_THREADS=1)."""
    bundle = load_site_bundle(path)
    data = load_site_splits(spec.data, spec.site, spec.training.val_fraction, Storage())
    assert data.test is not None and len(data.test) == TEST_SAMPLES
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate(
            bundle.model, bundle.task, data.test, device=torch.device("cpu"), seed=derive_seed("test", spec.task.name)
        )
    finally:
        torch.set_num_threads(threads)


def test_plugin_federations_train_through_the_operator_and_exports_reproduce_the_sites_metrics(
    cluster: Cluster, s3_env: None, tmp_path: Path
) -> None:
    imported_uri, plain_state = _import_plain_weights(tmp_path)
    cluster.secret()
    cluster.apply(*[_sitetask(cluster, site) for site in SITES])
    cluster.apply(
        _round(cluster, "plugin", PATCH, {"seed": 3}, sites=3),
        _round(cluster, "flat", FLAT, {"uri": imported_uri}, sites=2),
    )
    statuses = {}
    for name in ("plugin", "plugin-r2", "flat", "flat-r2"):
        statuses[name] = cluster.wait_phase(name, "Succeeded", "Failed", timeout=300)
        assert statuses[name]["phase"] == "Succeeded", statuses[name]
    for name in statuses:  # final statuses (the first rounds went on to report and chain)
        statuses[name] = cluster.status(name)
        check_global_model(cluster, statuses[name])  # the numpy oracle of the uploads
        assert {s["phase"] for s in statuses[name]["sites"]} == {"Accepted"}

    # The encoder without stages shares by prefix: the patch embedding across tasks, the rest per task.
    plugin_model = statuses["plugin-r2"]["globalModel"]["uri"]
    keys = set(decode_tensors(cluster.s3_object(f"{plugin_model}/model.safetensors")).tensors)
    assert {"encoder.embed.weight", "tasks.inset.encoder.blocks.0.spatial.weight"} <= keys
    assert "tasks.denoise.encoder.blocks.0.spatial.weight" in keys and not any("stages" in k for k in keys)
    manifest = json.loads(cluster.s3_object(f"{plugin_model}/manifest.json"))
    assert manifest["plugins"]["encoder/patch_net"] == "mfed-example-plugin==0.1.0"

    # The flat federation started from the imported weights, bit for bit.
    assert statuses["flat"]["baseModel"]["uri"] == imported_uri
    base = decode_tensors(cluster.s3_object(f"{imported_uri}/model.safetensors")).tensors
    assert base["encoder.net.1.weight"].tobytes() == plain_state["1.weight"].numpy().tobytes()

    # Round 1's export is what each site started round 2 from: round 2's trainer Job scored it on
    # the site's test data (test_before, in the status, rounded to 6 decimals).
    for first, second in (("plugin", "plugin-r2"), ("flat", "flat-r2")):
        out = tmp_path / "export" / first
        assert main(["export", statuses[first]["globalModel"]["uri"], "--all-sites", "--out", str(out)]) == 0
        reported = {s["site"]: s["metrics"]["test_before"] for s in statuses[second]["sites"]}
        assert sorted(reported) == sorted(s for s, v in SITES.items() if v[0] == first)
        for site, expected in reported.items():
            spec = _site_spec(site, 2, statuses[first]["globalModel"]["uri"])
            assert _test_metric(out / f"{site}.json", spec) == pytest.approx(expected, abs=1e-5), site

    # The last round's export predicts what the trainer would start a third round from.
    out = tmp_path / "export" / "final"
    final = statuses["plugin-r2"]["globalModel"]["uri"]
    assert main(["export", final, "--site", "inset-a", "--site", "denoise-a", "--out", str(out)]) == 0
    x = torch.from_numpy(np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32))
    for site in ("inset-a", "denoise-a"):
        start = prepare_start(_site_spec(site, 3, final), Storage())
        with torch.no_grad():
            assert torch.equal(load_site_bundle(out / site).model(x), start.model.eval()(x)), site
