"""A SiteTask's status after a round says what THAT round reported, nothing left from earlier ones.

Through the operator's own `Kube` client (the real kubernetes library and its JSON/merge patch
encoding) against the emulated API. What the emulator does not check: the status subresource's
RBAC and a real API server's pruning; kmock applies JSON patches with its own implementation, so
the JSON patch is asserted as sent, and a SiteTask without a status yet takes the merge-patch fallback
"""

from __future__ import annotations

from typing import Any

from kubernetes import client
from mfed_operator.adapters.kube import Kube

from tests.support import manifests as m
from tests.support.kubeapi import KUBECONFIG_TOKEN, KubeAPI

NAMESPACE = "team-a"


def _kube(api: KubeAPI) -> Kube:
    configuration = client.Configuration()
    configuration.host = api.url
    configuration.api_key = {"authorization": f"Bearer {KUBECONFIG_TOKEN}"}
    return Kube(client.ApiClient(configuration), timeout_seconds=10)


def _sitetask(api: KubeAPI, name: str) -> dict[str, Any]:
    api.client().create(
        m.sitetask(NAMESPACE, name, federation="fed", task="cls10", task_type="classification", shard=0, shards=2)
    )
    return api.client().get("mfed.dev/v1alpha1", "sitetasks", NAMESPACE, name) or {}


def _status(api: KubeAPI, name: str) -> dict[str, Any]:
    body = api.client().get("mfed.dev/v1alpha1", "sitetasks", NAMESPACE, name) or {}
    return dict(body.get("status") or {})


def test_a_rounds_metrics_replace_the_last_ones_when_the_metric_names_change(kubeapi: KubeAPI) -> None:
    _sitetask(kubeapi, "site-a")
    # An earlier round, e.g. of a two-track strategy, reported metrics this round's task does not.
    earlier = {"val_after": 0.5, "val_after_shared": 0.6, "deploy_shared": 1.0}
    kubeapi.client().patch(
        "mfed.dev/v1alpha1",
        "sitetasks",
        NAMESPACE,
        "site-a",
        {"status": {"conditions": [{"type": "Ready", "status": "True"}], "lastMetrics": earlier, "samples": 300}},
        subresource="status",
    )
    _kube(kubeapi).replace_sitetask_status_fields(
        NAMESPACE,
        "site-a",
        {
            "lastRound": {"name": "r2", "round": 2, "result": "Accepted"},
            "lastMetrics": {"val_after": 0.7},
            "samples": 280,
        },
    )
    status = _status(kubeapi, "site-a")
    assert status["lastMetrics"] == {"val_after": 0.7}  # no val_after_shared / deploy_shared left over
    assert status["lastRound"] == {"name": "r2", "round": 2, "result": "Accepted"}
    assert status["samples"] == 280
    assert status["conditions"] == [{"type": "Ready", "status": "True"}]  # fields not reported are kept


def test_a_last_round_without_a_reason_drops_the_reason_of_the_round_before(kubeapi: KubeAPI) -> None:
    _sitetask(kubeapi, "site-b")
    kube = _kube(kubeapi)
    kube.replace_sitetask_status_fields(
        NAMESPACE, "site-b", {"lastRound": {"name": "r1", "result": "Rejected", "reason": "NonFinite"}}
    )
    kube.replace_sitetask_status_fields(NAMESPACE, "site-b", {"lastRound": {"name": "r2", "result": "Accepted"}})
    assert _status(kubeapi, "site-b")["lastRound"] == {"name": "r2", "result": "Accepted"}


def test_the_status_is_replaced_by_a_json_patch_per_field(kubeapi: KubeAPI) -> None:
    _sitetask(kubeapi, "site-c")
    kubeapi.client().patch(
        "mfed.dev/v1alpha1", "sitetasks", NAMESPACE, "site-c", {"status": {"samples": 1}}, subresource="status"
    )
    _kube(kubeapi).replace_sitetask_status_fields(NAMESPACE, "site-c", {"lastMetrics": {"loss": 1.0}, "samples": 2})
    patches = [
        r.data
        for r in kubeapi.requests()
        if r.method == "PATCH" and r.name == "site-c" and r.token == KUBECONFIG_TOKEN and r.subresource == "status"
    ]
    # add replaces an object member whole (RFC 6902 4.1); the emulator appends its own resourceVersion ops.
    assert [op for op in patches[-1] if not op["path"].startswith("/metadata")] == [
        {"op": "add", "path": "/status/lastMetrics", "value": {"loss": 1.0}},
        {"op": "add", "path": "/status/samples", "value": 2},
    ]
