"""The Local baseline end to end: the example federation with `evaluation.baselines: [local]`,
the real operator and trainer, and a real S3 server.

The oracle re-scores every site's Local model from its stored state in S3 on the site's own test
split (rebuilt here from the SiteTask's data spec), takes each federated score from the site's
uploaded contribution manifest, and recomputes the status's per-task means, gains and dm% in
the test. What it does not re-check: the federated score itself (the trainer scores the model
it deploys; rebuilding that model from base + delta is what check_global_model's oracle covers
for the aggregate), and kmock does not run kube-apiserver's printer-column rendering, so the
column is checked by its jsonPath on the stored status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mfed.artifacts.tensorfile import decode_tensors
from mfed.cli import main
from mfed.learning.model import build_site_model, load_part
from mfed.learning.train import evaluate
from mfed.resources.method_settings import data_spec
from mfed.resources.views import parse_sitetask
from mfed.rounds.site_round import load_site_splits
from mfed.seeding import derive_seed
from mfed.spec import ArchSpec, TaskSpec
from mfed.storage import Storage
from tests.e2e.conftest import Cluster, check_global_model
from tests.e2e.test_federation import scaled_down_example
from tests.support.manifests import REPO
from tests.support.seaweed import ACCESS_KEY, SECRET_KEY

pytestmark = pytest.mark.slow
ENCODER = {"name": "small_cnn", "params": {}}


def _baseline_prefix(objects: list[dict[str, Any]], site: str) -> str:
    fr = next(o for o in objects if o["kind"] == "FederationRound")
    storage = fr["spec"]["storage"]
    return f"s3://{storage['bucket']}/{storage['prefix']}/fashion-mnist/fashion-mnist/baselines/{site}/local"


def _local_score(cluster: Cluster, sitetask: dict[str, Any], state: bytes) -> float:
    view = parse_sitetask({**sitetask, "metadata": {**sitetask["metadata"], "namespace": cluster.namespace}})
    task = TaskSpec(name=view.task_name, type=view.task_type, params=dict(view.task_params))
    model, plugin = build_site_model(
        ArchSpec(**ENCODER), task, ArchSpec(name=view.decoder.name, params=dict(view.decoder.params))
    )
    tensors = decode_tensors(state).tensors
    load_part(model, "encoder", tensors)
    load_part(model, "decoder", tensors)
    data = load_site_splits(data_spec(view), view.name, 0.2, Storage())
    assert data.test is not None
    return evaluate(model, plugin, data.test, device=torch.device("cpu"), seed=derive_seed("test", view.task_name))


def test_the_status_reports_the_gain_over_local_that_the_artifacts_and_the_data_give(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    objects = scaled_down_example(cluster, prefix="baselines")
    fr = next(o for o in objects if o["kind"] == "FederationRound")
    assert fr["spec"]["evaluation"] == {"baselines": ["local"]}  # the example asks for it
    cluster.apply(*objects)
    assert cluster.wait_phase("fashion-mnist", "Succeeded", "Failed", timeout=200)["phase"] == "Succeeded"
    status = cluster.wait_phase("fashion-mnist-r2", "Succeeded", "Failed", timeout=200)
    assert status["phase"] == "Succeeded", status
    check_global_model(cluster, status)

    sitetasks = {o["metadata"]["name"]: o for o in objects if o["kind"] == "SiteTask"}
    model_prefix = status["globalModel"]["uri"].rsplit("/", 1)[0]
    per_task: dict[str, list[tuple[int, float, float, float]]] = {}
    steps = 0
    for site in status["sites"]:
        name = site["site"]
        manifest = json.loads(cluster.s3_object(f"{model_prefix}/sites/{name}/manifest.json"))
        # the contribution names only the delta and the decoder: nothing of the baseline
        assert {manifest["delta"]["name"], manifest["decoder"]["name"]} == {"delta.safetensors", "decoder.safetensors"}
        # the baseline trained as many steps as the federated model, both rounds
        assert manifest["metrics"]["baseline_steps"] == manifest["metrics"]["steps"]
        steps += int(manifest["metrics"]["baseline_steps"])
        prefix = _baseline_prefix(objects, name)
        assert cluster.s3_exists(f"{prefix}/round-00001.safetensors")
        local = _local_score(cluster, sitetasks[name], cluster.s3_object(f"{prefix}/round-00002.safetensors"))
        assert local == pytest.approx(manifest["metrics"]["baseline_local"], abs=1e-6)
        sign = 1.0 if manifest["trainer"]["higherIsBetter"] == "true" else -1.0
        per_task.setdefault(manifest["task"], []).append(
            (manifest["samples"], manifest["metrics"]["baseline_federated"], local, sign)
        )

    local_status = status["baselines"]["local"]
    gains = []
    for task, rows in sorted(per_task.items()):
        weights = [r[0] for r in rows]
        fed = float(np.average([r[1] for r in rows], weights=weights))
        base = float(np.average([r[2] for r in rows], weights=weights))
        gain = rows[0][3] * (fed - base) / abs(base) * 100
        gains.append(gain)
        reported = local_status["tasks"][task]
        assert reported["federated"] == pytest.approx(fed, abs=1e-5)
        assert reported["baseline"] == pytest.approx(base, abs=1e-5)
        assert reported["gainPercent"] == pytest.approx(gain, abs=1e-3)
        assert reported["sites"] == len(rows)
    assert local_status["dmPercent"] == pytest.approx(sum(gains) / len(gains), abs=1e-3)
    assert (local_status["steps"], local_status["bytesUploaded"]) == (steps, 0)
    assert status["summary"]["dmLocal"] == f"{local_status['dmPercent']:+.2f}"

    # Each SiteTask shows its own gain of its last round.
    for site in status["sites"]:
        own = cluster.client.get("mfed.dev/v1alpha1", "sitetasks", cluster.namespace, site["site"]) or {}
        assert own["status"]["lastMetrics"]["baseline_gain"] == pytest.approx(site["metrics"]["baseline_gain"])

    # The CRD's printer column `kubectl get fr` shows reads exactly that field.
    crd = yaml.safe_load((REPO / "crds" / "mfed.dev_federationrounds.yaml").read_text())
    columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["dm% vs Local"] == ".status.summary.dmLocal"

    _check_the_report(cluster, objects, status, tmp_path, monkeypatch, capsys)


def _check_the_report(
    cluster: Cluster,
    objects: list[dict[str, Any]],
    last: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`mfed report` on the chain, through the API (a kubeconfig, as from a laptop) and from
    the artifacts in S3: the pilot's table and JSON, whose numbers are the status's (checked
    above against the oracle) and whose traffic is the sizes of the files the sites uploaded.
    What it does not check: kmock stands in for kube-apiserver (the client's GET of a custom
    object is the only call the report makes)."""
    fr = next(o for o in objects if o["kind"] == "FederationRound")
    storage = fr["spec"]["storage"]
    root = f"s3://{storage['bucket']}/{storage['prefix']}/fashion-mnist"
    rounds = ["fashion-mnist", "fashion-mnist-r2"]
    uploads: list[int] = []
    steps: dict[str, int] = {}
    for name in rounds:
        for site in cluster.status(name)["sites"]:
            manifest = json.loads(cluster.s3_object(f"{root}/{name}/sites/{site['site']}/manifest.json"))
            uploads.append(manifest["delta"]["size"] + manifest["decoder"]["size"])
            steps[site["site"]] = steps.get(site["site"], 0) + int(manifest["metrics"]["steps"])

    api_out, s3_out = tmp_path / "report-api", tmp_path / "report-s3"
    kubeconfig = cluster.env["MFED_OPERATOR_KUBECONFIG"]
    through_api = ["report", "fashion-mnist", "-n", cluster.namespace, "--kubeconfig", kubeconfig]
    assert main([*through_api, "--out", str(api_out)]) == 0
    printed = capsys.readouterr().out
    assert "dm% vs Local" in printed and "upload/site/round" in printed and "M-Fed" in printed
    monkeypatch.setenv("MFED_S3_ENDPOINT", cluster.s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    assert main(["report", "fashion-mnist", "--artifacts", root, "--method", "m-fed", "--out", str(s3_out)]) == 0

    local_status = last["baselines"]["local"]
    for out in (api_out, s3_out):
        report = json.loads((out / "results.json").read_text())
        assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert report["config"]["rounds"] == rounds
        local, fed = report["methods"]["local"], report["methods"]["mfed"]
        for task, numbers in local_status["tasks"].items():
            assert fed["metrics"][task] == pytest.approx(numbers["federated"], abs=1e-4)
            assert local["metrics"][task] == pytest.approx(numbers["baseline"], abs=1e-4)
        assert fed["delta_m"] == pytest.approx(local_status["dmPercent"], abs=1e-3)
        assert local["delta_m"] == 0.0
        assert fed["upload_bytes_per_site_round"] == pytest.approx(sum(uploads) / len(uploads))
        assert local["upload_bytes_per_site_round"] == 0.0
        assert fed["steps_per_site"] == local["steps_per_site"] == max(steps.values())
        assert len(fed["per_round"]) == len(rounds)


def test_a_deleted_baseline_state_fails_the_site_with_its_reason_and_reports_no_number(cluster: Cluster) -> None:
    objects = scaled_down_example(cluster, prefix="baseline-gone")
    for obj in objects:
        if obj["kind"] == "FederationRound":
            obj["spec"]["followUpRounds"] = 0
    cluster.apply(*objects)
    first = cluster.wait_phase("fashion-mnist", "Succeeded", "Failed", timeout=200)
    assert first["phase"] == "Succeeded", first
    assert "dmLocal" in first["summary"]

    gone = f"{_baseline_prefix(objects, 'cls10-a')}/round-00001.safetensors"
    bucket, _, key = gone.removeprefix("s3://").partition("/")
    cluster.s3.client().delete_object(Bucket=bucket, Key=key)
    assert not cluster.s3_exists(gone)

    # Round 2 of the same chain (the chain label is what a generated round carries).
    fr = next(o for o in objects if o["kind"] == "FederationRound")
    second = json.loads(json.dumps(fr))
    second["metadata"] = {
        **{k: v for k, v in fr["metadata"].items() if k in ("namespace",)},
        "name": "fashion-mnist-r2",
        "labels": {"mfed.dev/chain": "fashion-mnist"},
    }
    second["spec"].update(round=2, initialModel={"fromRound": "fashion-mnist"})
    second["spec"]["aggregation"]["minSites"] = 3  # the other three still make the round
    cluster.apply(second)
    status = cluster.wait_phase("fashion-mnist-r2", "Succeeded", "Failed", timeout=200)
    assert status["phase"] == "Succeeded", status
    sites = {s["site"]: s for s in status["sites"]}
    assert sites["cls10-a"]["phase"] == "Failed", sites["cls10-a"]
    # exit code 2 is bad input (no retry); the trainer's reason, written beside its output, is the
    # site's message (and its log has it too)
    message = sites["cls10-a"]["message"]
    assert sites["cls10-a"]["reason"] == "BadInput", sites["cls10-a"]
    assert "Local baseline state of round 1" in message and "is missing" in message, message
    log = cluster.kubelet.logs(cluster.namespace, "fashion-mnist-r2-cls10-a")
    assert "Local baseline state of round 1" in log and "is missing" in log, log
    # The site without its baseline is in no number: cls10's comes from cls10-b alone.
    local = status["baselines"]["local"]
    assert local["tasks"]["cls10"]["sites"] == 1 and local["tasks"]["rot4"]["sites"] == 2
    assert local["tasks"]["cls10"]["baseline"] == pytest.approx(sites["cls10-b"]["metrics"]["baseline_local"], abs=1e-6)
