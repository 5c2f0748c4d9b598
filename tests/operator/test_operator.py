"""The operator against the emulated Kubernetes API (kopf's KopfRunner, in a thread)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support import manifests as m
from tests.support.kubeapi import KubeAPI
from tests.support.operator import job_names, operator_env, operator_in_thread, round_status
from tests.support.waiting import wait_for

NS = "team-a"


def ready(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == "Ready")


def wait_failed(api: KubeAPI, name: str) -> dict[str, Any]:
    return wait_for(
        lambda: (s := round_status(api, NS, name)).get("phase") == "Failed" and s,
        timeout=30,
        what=f"round {name} to fail",
        describe=lambda: str(round_status(api, NS, name)),
    )


def test_invalid_resources_fail_with_a_condition_that_says_what_to_fix(kubeapi: KubeAPI, tmp_path: Path) -> None:
    c = kubeapi.client()
    c.create(m.secret(NS, "s3-credentials", "id", "key"))
    for name in ("a", "b"):
        c.create(m.sitetask(NS, name, federation="fed", task="cls10", task_type="classification", shard=0, shards=2))
    mixed = m.sitetask(NS, "mixed-b", federation="mixed", task="cls10", task_type="classification", shard=1, shards=2)
    mixed["spec"]["decoder"] = {"name": "mlp", "params": {"hidden": [32]}}
    c.create(m.sitetask(NS, "mixed-a", federation="mixed", task="cls10", task_type="classification", shard=0, shards=2))
    c.create(mixed)
    broken = m.sitetask(NS, "broken", federation="other", task="cls10", task_type="classification", shard=0, shards=1)
    broken["spec"]["data"]["s3"] = {"uri": "s3://b/k.npz"}  # two data sources
    c.create(broken)

    common = {"bucket": "models", "endpoint": "http://127.0.0.1:9"}
    c.create(m.federation_round(NS, "too-few", federation="fed", aggregation={"minSites": 5}, **common))
    c.create(m.federation_round(NS, "no-secret", federation="fed", secret_name="missing", **common))
    c.create(m.federation_round(NS, "mixed", federation="mixed", **common))
    bad = m.federation_round(NS, "bad-spec", federation="fed", **common)
    del bad["spec"]["storage"]
    c.create(bad)

    with operator_in_thread(operator_env(kubeapi, tmp_path), NS):
        bad_status = wait_failed(kubeapi, "bad-spec")
        too_few = wait_failed(kubeapi, "too-few")
        no_secret = wait_failed(kubeapi, "no-secret")
        mixed_status = wait_failed(kubeapi, "mixed")
        broken_status = wait_for(
            lambda: (c.get("mfed.dev/v1alpha1", "sitetasks", NS, "broken") or {}).get("status"),
            timeout=20,
            what="the broken SiteTask's status",
        )

    assert ready(bad_status)["reason"] == "InvalidSpec"
    assert "spec.storage: is required" in ready(bad_status)["message"]
    assert ready(too_few)["reason"] == "NotEnoughSites"
    assert "lower minSites or add SiteTasks" in ready(too_few)["message"]
    assert ready(no_secret)["reason"] == "SecretNotFound"
    assert "Secret missing" in ready(no_secret)["message"] and "create it" in ready(no_secret)["message"]
    assert ready(mixed_status)["reason"] == "DecoderMismatch"
    assert "use the same spec.decoder for every site of a task" in ready(mixed_status)["message"]
    for status in (bad_status, too_few, no_secret, mixed_status):
        conditions = {x["type"]: x["status"] for x in status["conditions"]}
        assert conditions == {
            "Ready": "False",
            "Progressing": "False",
            "Degraded": "True",
            "Reconciling": "False",
            "Stalled": "True",
        }
        assert status["observedGeneration"] == 1
    broken_ready = next(x for x in broken_status["conditions"] if x["type"] == "Ready")
    assert (broken_ready["status"], broken_ready["reason"]) == ("False", "InvalidSpec")
    assert "set exactly one of demo, s3 or pvc" in broken_ready["message"]
    assert job_names(kubeapi, NS) == []  # nothing was started for invalid rounds
    events = [e for e in c.list("v1", "events", NS) if e["involvedObject"]["name"] == "too-few"]
    assert [(e["type"], e["reason"]) for e in events] == [("Warning", "Failed")]


def test_a_valid_round_adopts_its_init_job_without_copying_the_rounds_labels(kubeapi: KubeAPI, tmp_path: Path) -> None:
    c = kubeapi.client()
    c.create(m.secret(NS, "s3-credentials", "id", "key"))
    c.create(m.sitetask(NS, "a", federation="fed", task="cls10", task_type="classification", shard=0, shards=1))
    body = m.federation_round(NS, "good", federation="fed", bucket="models", endpoint="http://127.0.0.1:9")
    body["metadata"]["labels"] = {"app.kubernetes.io/instance": "argocd-app"}
    c.create(body)
    with operator_in_thread(operator_env(kubeapi, tmp_path), NS):
        job = wait_for(lambda: c.get("batch/v1", "jobs", NS, "good-init"), timeout=20, what="the init Job")
        status = wait_for(
            lambda: (s := round_status(kubeapi, NS, "good")).get("initJob") and s,
            timeout=20,
            what="the round to record its init Job",
        )
    owner = job["metadata"]["ownerReferences"]
    assert owner == [
        {
            "apiVersion": "mfed.dev/v1alpha1",
            "kind": "FederationRound",
            "name": "good",
            "uid": c.get("mfed.dev/v1alpha1", "federationrounds", NS, "good")["metadata"]["uid"],  # type: ignore[index]
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert "app.kubernetes.io/instance" not in job["metadata"]["labels"]
    assert status["phase"] == "Pending" and ready(status)["reason"] == "Initializing"
    # The create went to the API once per reconciliation at most, and never as a duplicate object.
    assert job_names(kubeapi, NS) == ["good-init"]


def test_jobs_are_listed_and_watched_with_a_server_side_label_selector(kubeapi: KubeAPI, tmp_path: Path) -> None:
    """The selector must reach the API: the emulator filters nothing (it ignores selectors), so
    this asserts the query the operator sent, which a real API server would apply."""
    c = kubeapi.client()
    c.create(m.secret(NS, "s3-credentials", "id", "key"))
    c.create(m.sitetask(NS, "a", federation="fed", task="cls10", task_type="classification", shard=0, shards=1))
    c.create(m.federation_round(NS, "good", federation="fed", bucket="models", endpoint="http://127.0.0.1:9"))
    with operator_in_thread(operator_env(kubeapi, tmp_path), NS):
        wait_for(lambda: c.get("batch/v1", "jobs", NS, "good-init"), timeout=20, what="the init Job")
    reads = [r for r in kubeapi.requests() if r.plural == "jobs" and r.method == "GET" and r.name is None]
    assert {"list", "watch"} <= {"watch" if r.params.get("watch") == "true" else "list" for r in reads}
    assert {r.params.get("labelSelector") for r in reads} == {"app.kubernetes.io/managed-by=mfed-operator"}
