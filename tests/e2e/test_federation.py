"""A whole federation, end to end: the example manifests, the real operator process, the real
trainer run by the test kubelet, and a real S3 server."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.conftest import SERVICE_ACCOUNT_TOKEN, Cluster, check_global_model
from tests.images.test_trainer_image import constraints
from tests.support.images import TRAINER, container
from tests.support.manifests import EXAMPLES, load_kustomization
from tests.support.seaweed import ACCESS_KEY, SECRET_KEY

pytestmark = pytest.mark.slow
KEEP_TASKS = ("cls10", "rot4")  # 2 tasks x 2 sites of the example's 4 x 2


def scaled_down_example(cluster: Cluster, prefix: str | None = None) -> list[dict[str, Any]]:
    """The example federation, cut to 4 sites, 2 rounds and small shards, pointed at the test S3.

    `prefix`: its own storage prefix. The S3 server lives for the whole module and the trainer
    returns an existing complete upload for the same base model instead of training again (by
    design, for restarted Jobs), so a test that must see its own Jobs train needs its own prefix."""
    objects = []
    for obj in copy.deepcopy(load_kustomization(EXAMPLES / "fashion-mnist")):
        kind = obj["kind"]
        if kind == "Namespace":
            continue
        if kind == "Secret":
            obj["stringData"] = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        if kind == "SiteTask":
            if obj["spec"]["task"]["name"] not in KEEP_TASKS:
                continue
            obj["spec"]["data"]["demo"].update(samples=100, testSamples=200)
        if kind == "FederationRound":
            obj["spec"]["storage"]["endpoint"] = cluster.s3.endpoint
            if prefix is not None:
                obj["spec"]["storage"]["prefix"] = prefix
            obj["spec"]["siteSelector"]["matchExpressions"][0]["values"] = list(KEEP_TASKS)
            obj["spec"]["aggregation"]["minSites"] = 4
            obj["spec"]["followUpRounds"] = 1
        objects.append(obj)
    return objects


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', series))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"no series {name}{{{wanted}}} in the metrics")


def test_example_federation_trains_two_chained_rounds_to_a_verifiable_global_model(cluster: Cluster) -> None:
    cluster.apply(*scaled_down_example(cluster))

    first = cluster.wait_phase("fashion-mnist", "Succeeded", "Failed", timeout=150)
    assert first["phase"] == "Succeeded", first
    second = cluster.wait_phase("fashion-mnist-r2", "Succeeded", "Failed", timeout=150)
    assert second["phase"] == "Succeeded", second
    first = cluster.status("fashion-mnist")  # it went on (created round 2, reported to sites)

    sites = ["cls10-a", "cls10-b", "rot4-a", "rot4-b"]
    for status in (first, second):
        assert [s["site"] for s in status["sites"]] == sites
        assert {s["phase"] for s in status["sites"]} == {"Accepted"}
        assert all(s["samples"] > 0 and len(s["deltaSha256"]) == 64 for s in status["sites"])
        assert status["summary"]["sites"] == "4/4"
        assert sorted(status["tasks"]) == ["cls10", "rot4"]
        assert "cls10=" in status["summary"]["metrics"] and "rot4=" in status["summary"]["metrics"]
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Ready"]["status"] == "True"
        assert conditions["Progressing"]["status"] == "False"
        assert conditions["Degraded"]["status"] == "False"
        assert status["completedAt"] and status["trainingStartedAt"]
    assert first["round"] == 1 and second["round"] == 2
    assert first["observedGeneration"] == cluster.round("fashion-mnist")["metadata"]["generation"]

    # The chain: round 2 is its own object, owned by round 1, starting from round 1's model and
    # from each site's own decoder of round 1.
    assert first["nextRound"] == "fashion-mnist-r2"
    r2 = cluster.round("fashion-mnist-r2")
    owner = r2["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "FederationRound",
        "fashion-mnist",
        cluster.round("fashion-mnist")["metadata"]["uid"],
    )
    assert r2["spec"]["initialModel"] == {"fromRound": "fashion-mnist"}
    assert r2["spec"]["followUpRounds"] == 0
    assert second["baseModel"]["uri"] == first["globalModel"]["uri"]
    for site in second["sites"]:
        assert site["previousDecoder"] == (
            f"s3://mfed/federations/fashion-mnist/fashion-mnist/sites/{site['site']}/decoder.safetensors"
        )
    assert "nextRound" not in second

    # The global models in S3 are exactly what the uploaded deltas say they should be.
    check_global_model(cluster, first)
    check_global_model(cluster, second)

    # One Job per site per round plus the init Job, each started exactly once.
    names = sorted(j["metadata"]["name"] for j in cluster.jobs())
    assert names == sorted(
        ["fashion-mnist-init"] + [f"fashion-mnist-{s}" for s in sites] + [f"fashion-mnist-r2-{s}" for s in sites]
    )
    assert max(Counter(cluster.kubelet.started_jobs).values()) == 1

    # One Event per phase transition.
    for name in ("fashion-mnist", "fashion-mnist-r2"):
        reasons = [e["reason"] for e in cluster.events(name)]
        assert sorted(reasons) == ["Aggregating", "Succeeded", "Training"], reasons

    # The sites hear about their last round.
    assert cluster.last_round("rot4-b", "fashion-mnist-r2")["result"] == "Accepted"
    sitetask = cluster.client.get("mfed.dev/v1alpha1", "sitetasks", cluster.namespace, "rot4-b") or {}
    assert sitetask["status"]["samples"] > 0
    assert {c["type"]: c["status"] for c in sitetask["status"]["conditions"]}["Ready"] == "True"

    text = cluster.metrics()
    assert metric(text, "mfed_rounds", phase="Succeeded") == 2
    assert metric(text, "mfed_jobs_created_total", component="site") == 8
    assert metric(text, "mfed_storage_bytes_total", direction="write") > 0
    assert metric(text, "mfed_aggregation_seconds_count") == 2
    assert metric(text, "mfed_site_training_seconds_count", task="cls10") == 4

    # Credentials never leak into what the operator writes or logs.
    everything = str([cluster.status(n) for n in ("fashion-mnist", "fashion-mnist-r2")])
    everything += str(cluster.client.list("v1", "events", cluster.namespace)) + cluster.operator.output()
    assert SECRET_KEY not in everything and ACCESS_KEY not in everything


def test_the_federation_runs_with_the_operator_logged_in_as_a_pod(make_cluster: Callable[..., Cluster]) -> None:
    """In-cluster login end to end: https API, ServiceAccount token and CA files, no kubeconfig.
    The emulated API answers 401 to any token but the ServiceAccount's (and the tests' own)."""
    cluster = make_cluster(in_cluster=True)
    objects = scaled_down_example(cluster, prefix="in-cluster")
    for obj in objects:
        if obj["kind"] == "FederationRound":
            obj["spec"]["followUpRounds"] = 0
    cluster.apply(*objects)
    status = cluster.wait_phase("fashion-mnist", "Succeeded", "Failed", timeout=150)
    assert status["phase"] == "Succeeded", status
    check_global_model(cluster, status)
    operator_calls = [r for r in cluster.api.requests() if r.token == SERVICE_ACCOUNT_TOKEN]
    # kopf's calls, and the operator's own client's (the kubernetes client sends the scheme in
    # the case its in-cluster loader stores it; RFC 7235 makes it case-insensitive).
    assert {r.authorization for r in operator_calls} == {
        f"Bearer {SERVICE_ACCOUNT_TOKEN}",
        f"bearer {SERVICE_ACCOUNT_TOKEN}",
    }
    assert not [r for r in cluster.api.requests() if r.token is None], "a request without a valid bearer token"


def test_the_federation_runs_its_jobs_from_the_built_trainer_image(make_cluster: Callable[..., Cluster]) -> None:
    """Every Job's container runs inside the image `make images` built (buildah run), not the test
    venv: the image's entrypoint, Python, torch and demo data train a round the operator accepts."""
    with container(TRAINER) as trainer:
        cluster = make_cluster(image=trainer, MFED_OPERATOR_TRAINER_IMAGE=TRAINER)
        objects = scaled_down_example(cluster, prefix="from-the-image")
        for obj in objects:
            if obj["kind"] == "FederationRound":
                obj["spec"]["followUpRounds"] = 0
        cluster.apply(*objects)
        status = cluster.wait_phase("fashion-mnist", "Succeeded", "Failed", timeout=300)
        assert status["phase"] == "Succeeded", status
        check_global_model(cluster, status)
        jobs = cluster.jobs()
        assert {j["spec"]["template"]["spec"]["containers"][0]["image"] for j in jobs} == {TRAINER}
        prefix = status["globalModel"]["uri"].rsplit("/", 1)[0]
        probe = "import platform; print(platform.python_version())"
        image_python = trainer.run(["python", "-c", probe]).stdout.strip()
        for site in status["sites"]:
            manifest = json.loads(cluster.s3_object(f"{prefix}/sites/{site['site']}/manifest.json"))
            # trained by the image's torch (the constraints' CPU build), not the test venv's
            assert manifest["trainer"]["torch"] == f"{constraints()['torch']}+cpu"
            assert manifest["trainer"]["python"] == image_python  # Debian's 3.11.2 in CI, not the venv's
