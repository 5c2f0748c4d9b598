"""Failure scenarios end to end; each asserts the final status and what is (not) in S3."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from tests.e2e.conftest import BUCKET, Cluster, check_global_model
from tests.support import manifests as m
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def sites(cluster: Cluster, federation: str, spec: list[tuple[str, str, str]], shards: int = 8, **extra: Any) -> None:
    """SiteTasks from (name, task, type) triples on disjoint demo shards."""
    for index, (name, task, task_type) in enumerate(spec):
        body = m.sitetask(
            cluster.namespace,
            name,
            federation=federation,
            task=task,
            task_type=task_type,
            shard=index,
            shards=shards,
            **extra.get(name, {}),
        )
        cluster.apply(body)


def new_round(cluster: Cluster, name: str, federation: str, **spec: Any) -> None:
    cluster.apply(
        m.federation_round(
            cluster.namespace, name, federation=federation, bucket=BUCKET, endpoint=cluster.s3.endpoint, **spec
        )
    )


def by_site(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["site"]: s for s in status["sites"]}


MISSING_DATA = {"data": {"s3": {"uri": f"s3://{BUCKET}/no-such-site-data.npz"}}}


def test_a_failed_site_job_is_left_out_when_quorum_is_met_and_fails_the_round_when_not(cluster: Cluster) -> None:
    cluster.secret()
    # Two federations side by side; in each, one site's data does not exist, so its trainer exits
    # with code 2 and the podFailurePolicy fails its Job at once.
    sites(
        cluster,
        "quorum-met",
        [
            ("met-a", "cls10", "classification"),
            ("met-b", "cls10", "classification"),
            ("met-c", "rot4", "rotation"),
            ("met-bad", "rot4", "rotation"),
        ],
        **{"met-bad": MISSING_DATA},
    )
    sites(
        cluster,
        "quorum-missed",
        [
            ("missed-a", "cls10", "classification"),
            ("missed-b", "cls10", "classification"),
            ("missed-bad", "cls10", "classification"),
        ],
        **{"missed-bad": MISSING_DATA},
    )
    new_round(cluster, "met", "quorum-met", aggregation={"minSites": 3, "deadlineSeconds": 300})
    new_round(cluster, "missed", "quorum-missed", aggregation={"minSites": 3, "deadlineSeconds": 300})

    met = cluster.wait_phase("met", "Succeeded", "Failed", timeout=150)
    missed = cluster.wait_phase("missed", "Succeeded", "Failed", timeout=150)

    assert met["phase"] == "Succeeded"
    bad = by_site(met)["met-bad"]
    # the Job failed on its exit code (podFailurePolicy); the trainer's own words say why
    assert (bad["phase"], bad["reason"]) == ("Failed", "BadInput")
    assert "no-such-site-data.npz" in bad["message"], bad
    last = cluster.last_round("met-bad", "met")
    assert (last["result"], last["reason"]) == ("Failed", "BadInput") and "no-such-site-data.npz" in last["message"]
    assert {by_site(met)[s]["phase"] for s in ("met-a", "met-b", "met-c")} == {"Accepted"}
    assert met["summary"]["sites"] == "3/4"
    degraded = {c["type"]: c for c in met["conditions"]}["Degraded"]
    assert degraded["status"] == "True" and "met-bad (Failed" in degraded["message"]
    check_global_model(cluster, met)

    assert missed["phase"] == "Failed"
    ready = {c["type"]: c for c in missed["conditions"]}["Ready"]
    assert ready["reason"] == "QuorumNotMet"
    assert "minSites) is 3" in ready["message"] and "missed-bad (Failed: BadInput)" in ready["message"]
    assert {c["type"]: c for c in missed["conditions"]}["Stalled"]["status"] == "True"
    assert "globalModel" not in missed
    assert not cluster.s3_exists(f"s3://{BUCKET}/federations/quorum-missed/missed/global/model.safetensors")
    assert [e["reason"] for e in cluster.events("missed")] == ["Training", "Failed"]
    assert by_site(missed)["missed-a"]["phase"] == "Accepted"


def test_a_straggler_past_the_deadline_has_its_job_deleted_and_is_recorded(cluster: Cluster) -> None:
    cluster.secret()
    # slow-c waits in a Kueue queue that never admits it: its Job is created suspended and stays so.
    queued = {"labels": {"kueue.x-k8s.io/queue-name": "never-admitted"}}
    sites(
        cluster,
        "stragglers",
        [
            ("fast-a", "cls10", "classification"),
            ("fast-b", "cls10", "classification"),
            ("slow-c", "cls10", "classification"),
        ],
        **{"slow-c": queued},
    )
    new_round(cluster, "deadline", "stragglers", aggregation={"minSites": 2, "deadlineSeconds": 25})

    job = wait_for(
        lambda: cluster.client.get("batch/v1", "jobs", cluster.namespace, "deadline-slow-c"),
        timeout=60,
        what="the queued site's Job",
    )
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "never-admitted"
    wait_for(
        lambda: by_site(cluster.status("deadline")).get("slow-c", {}).get("phase") == "Queued",
        timeout=30,
        what="the suspended Job to show as Queued",
    )

    status = cluster.wait_phase("deadline", "Succeeded", "Failed", timeout=120)
    assert status["phase"] == "Succeeded"
    slow = by_site(status)["slow-c"]
    assert (slow["phase"], slow["reason"]) == ("Straggler", "DeadlineExceeded")
    assert "deadline of 25s" in slow["message"]
    assert cluster.client.get("batch/v1", "jobs", cluster.namespace, "deadline-slow-c") is None
    deletes = [r for r in cluster.api.requests() if r.method == "DELETE" and r.plural == "jobs"]
    assert [r.name for r in deletes] == ["deadline-slow-c"]
    assert status["summary"]["sites"] == "2/3"
    assert not cluster.s3_exists(f"s3://{BUCKET}/federations/stragglers/deadline/sites/slow-c/manifest.json")
    check_global_model(cluster, status)


def _rewrite_delta(cluster: Cluster, prefix: str, change: Any) -> None:
    """Re-encode a site's delta with `change` applied and re-sign it in the manifest (a site
    that uploads garbage, but consistently), so only the content checks can catch it."""
    tensors = dict(load_safetensors(cluster.s3_object(f"{prefix}/delta.safetensors")))
    data = save_safetensors(change(tensors))
    cluster.s3_put(f"{prefix}/delta.safetensors", data)
    manifest = json.loads(cluster.s3_object(f"{prefix}/manifest.json"))
    manifest["delta"].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    cluster.s3_put(f"{prefix}/manifest.json", json.dumps(manifest).encode())


def test_corrupted_deltas_are_rejected_with_their_reason_and_left_out_of_the_model(cluster: Cluster) -> None:
    cluster.secret()
    sites(
        cluster,
        "corrupt",
        [
            ("bad-checksum", "cls10", "classification"),
            ("bad-nan", "cls10", "classification"),
            ("bad-shape", "rot4", "rotation"),
            ("good", "rot4", "rotation"),
        ],
    )
    root = f"s3://{BUCKET}/federations/corrupt/tampered/sites"

    def nan(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = sorted(t)[0]
        t[key] = t[key].copy()
        t[key].flat[0] = np.nan
        return t

    def shape(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = sorted(t)[0]
        t[key] = np.zeros((3, 3), dtype=np.float32)
        return t

    def corrupt(job: dict[str, Any], code: int) -> None:
        site = job["metadata"]["labels"].get("mfed.dev/site")
        if code != 0 or site is None:
            return
        prefix = f"{root}/{site}"
        if site == "bad-checksum":
            data = bytearray(cluster.s3_object(f"{prefix}/delta.safetensors"))
            data[-1] ^= 0xFF
            cluster.s3_put(f"{prefix}/delta.safetensors", bytes(data))
        elif site == "bad-nan":
            _rewrite_delta(cluster, prefix, nan)
        elif site == "bad-shape":
            _rewrite_delta(cluster, prefix, shape)

    cluster.kubelet.on_exit = corrupt
    new_round(cluster, "tampered", "corrupt", aggregation={"minSites": 1, "deadlineSeconds": 300})
    status = cluster.wait_phase("tampered", "Succeeded", "Failed", timeout=150)

    assert status["phase"] == "Succeeded"
    reasons = {s["site"]: (s["phase"], s.get("reason")) for s in status["sites"]}
    assert reasons == {
        "bad-checksum": ("Rejected", "ChecksumMismatch"),
        "bad-nan": ("Rejected", "NonFiniteValues"),
        "bad-shape": ("Rejected", "ShapeMismatch"),
        "good": ("Accepted", None),
    }
    assert "does not match the manifest" in by_site(status)["bad-checksum"]["message"]
    assert sorted(status["tasks"]) == ["rot4"]  # the cls10 group had no valid contribution
    manifest = json.loads(cluster.s3_object(status["globalModel"]["uri"] + "/manifest.json"))
    assert [c["site"] for c in manifest["contributors"]] == ["good"]
    check_global_model(cluster, status)


def test_an_operator_killed_mid_training_and_mid_aggregation_resumes_without_duplicates(
    make_cluster: Any,
) -> None:
    # A slower resync leaves a window between "Aggregating" being recorded and the aggregation.
    cluster = make_cluster(MFED_OPERATOR_RESYNC_SECONDS="1.5", MFED_OPERATOR_S3_READ_TIMEOUT_SECONDS="20")
    cluster.secret()
    sites(
        cluster,
        "restarts",
        [
            ("r-a", "cls10", "classification"),
            ("r-b", "cls10", "classification"),
            ("r-c", "rot4", "rotation"),
            ("r-d", "rot4", "rotation"),
        ],
    )
    new_round(cluster, "resilient", "restarts", aggregation={"minSites": 4, "deadlineSeconds": 300})

    # Kill 1: while the sites train.
    wait_for(
        lambda: any(s.get("phase") == "Running" for s in cluster.status("resilient").get("sites") or []),
        timeout=90,
        what="a site to be training",
    )
    cluster.operator.kill()
    time.sleep(2)
    cluster.operator.start()

    # Kill 2: while it aggregates, with S3 frozen so the aggregation is stuck reading deltas.
    cluster.wait_phase("resilient", "Aggregating", "Succeeded", "Failed", timeout=150)
    cluster.s3.pause()
    try:
        time.sleep(3)  # the next reconciliation has started aggregating and hangs on S3
        assert cluster.status("resilient")["phase"] == "Aggregating"
        cluster.operator.kill()
    finally:
        cluster.s3.resume()
    cluster.operator.start()

    status = cluster.wait_phase("resilient", "Succeeded", "Failed", timeout=120)
    assert status["phase"] == "Succeeded", status
    assert cluster.operator.starts == 3
    # No duplicate Job: one per site plus the init Job, each started once by the kubelet.
    names = sorted(j["metadata"]["name"] for j in cluster.jobs())
    assert names == ["resilient-init", "resilient-r-a", "resilient-r-b", "resilient-r-c", "resilient-r-d"]
    assert max(Counter(cluster.kubelet.started_jobs).values()) == 1
    # No lost delta, and the same bytes an uninterrupted run produces (the recomputation).
    assert {s["phase"] for s in status["sites"]} == {"Accepted"}
    check_global_model(cluster, status)
    assert sorted(e["reason"] for e in cluster.events("resilient")) == ["Aggregating", "Succeeded", "Training"]


def test_a_round_rides_out_an_s3_outage_and_then_succeeds(make_cluster: Any) -> None:
    cluster = make_cluster(MFED_OPERATOR_RESYNC_SECONDS="1")
    cluster.secret()
    sites(cluster, "outage", [("o-a", "cls10", "classification"), ("o-b", "cls10", "classification")])
    new_round(cluster, "weathered", "outage", aggregation={"minSites": 2, "deadlineSeconds": 300})

    # The outage starts the moment both sites have uploaded, before the operator has read their
    # contributions (verifying them, then aggregating, needs S3). Waiting for the Aggregating
    # phase instead raced the aggregation itself, which takes a fraction of a second: the round
    # could succeed before S3 went away. Frozen (SIGSTOP), S3 accepts connections and answers
    # none: the operator's reads time out, as against a hung server.
    uploads = [f"s3://{BUCKET}/federations/outage/weathered/sites/{site}/manifest.json" for site in ("o-a", "o-b")]
    wait_for(lambda: all(cluster.s3_exists(u) for u in uploads), timeout=120, interval=0.02, what="both uploads")
    cluster.s3.pause()
    try:
        degraded = wait_for(
            lambda: (s := cluster.status("weathered")).get("retry") and s,
            timeout=30,
            what="the round to report the storage outage",
        )
        assert degraded["phase"] in ("Training", "Aggregating")
        conditions = {c["type"]: c for c in degraded["conditions"]}
        assert conditions["Degraded"]["status"] == "True"
        assert conditions["Degraded"]["reason"] == "StorageUnavailable"
        assert degraded["retry"]["operation"] in ("VerifySite", "Aggregate")
        time.sleep(3)
        assert cluster.status("weathered")["phase"] in ("Training", "Aggregating")  # waiting, not failed
    finally:
        cluster.s3.resume()

    status = cluster.wait_phase("weathered", "Succeeded", "Failed", timeout=60)
    assert status["phase"] == "Succeeded"
    assert "retry" not in status
    assert {c["type"]: c for c in status["conditions"]}["Degraded"]["status"] == "False"
    check_global_model(cluster, status)
