"""The operator's plugin checks against the emulated API, with the example plugin installed in
this venv: names come from entry-point metadata (the operator never imports a plugin), and a
round naming an unknown architecture fails in its conditions before any Job exists.

kmock does not validate resources (the CRD's schema and CEL rules are tested in test_crds), so
what is checked here is the operator's own pre-flight check, exactly as it runs in its Pod."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import manifests as m
from tests.support.kubeapi import KubeAPI
from tests.support.operator import job_names, operator_env, operator_in_thread, round_status
from tests.support.plugin import install_example_plugin
from tests.support.waiting import wait_for

NS = "team-a"
COMMON = {"bucket": "models", "endpoint": "http://127.0.0.1:9"}


@pytest.fixture(scope="module", autouse=True)
def example_plugin() -> Iterator[None]:
    install_example_plugin()
    yield


def _site(name: str, federation: str, decoder: str, task_type: str, params: dict[str, Any]) -> dict[str, Any]:
    body = m.sitetask(NS, name, federation=federation, task="inset", task_type=task_type, shard=0, shards=1)
    body["spec"]["task"]["params"] = params
    body["spec"]["decoder"] = {"name": decoder}
    return body


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status.get("conditions") or [] if c["type"] == "Ready")


def test_plugin_names_are_checked_before_any_job_and_installed_or_declared_ones_go_ahead(
    kubeapi: KubeAPI, tmp_path: Path
) -> None:
    c = kubeapi.client()
    c.create(m.secret(NS, "s3-credentials", "id", "key"))
    patch_net = {"name": "patch_net", "params": {}, "sharing": {"mode": "prefixes", "prefixes": ["embed."]}}
    membership = {"positives": [5, 7, 9]}
    # A typo in the encoder, and a decoder no package provides: both must fail at once.
    c.create(_site("typo-a", "typo", "pooled_head", "membership", membership))
    c.create(m.federation_round(NS, "typo", federation="typo", encoder={**patch_net, "name": "patch_nett"}, **COMMON))
    c.create(_site("nohead-a", "nohead", "acme_head", "membership", membership))
    c.create(m.federation_round(NS, "nohead", federation="nohead", encoder=patch_net, **COMMON))
    # The installed plugin's names, and a name declared to the operator, are accepted.
    c.create(_site("good-a", "good", "pooled_head", "membership", membership))
    c.create(m.federation_round(NS, "good", federation="good", encoder=patch_net, **COMMON))
    c.create(_site("declared-a", "declared", "remote_head", "membership", membership))
    c.create(m.federation_round(NS, "declared", federation="declared", encoder=patch_net, **COMMON))

    env = operator_env(kubeapi, tmp_path, MFED_OPERATOR_PLUGINS="decoder:remote_head")
    with operator_in_thread(env, NS):
        failed = {
            name: wait_for(
                lambda name=name: (s := round_status(kubeapi, NS, name)).get("phase") == "Failed" and s,
                timeout=30,
                what=f"round {name} to fail",
                describe=lambda name=name: str(round_status(kubeapi, NS, name)),
            )
            for name in ("typo", "nohead")
        }
        for name in ("good", "declared"):
            wait_for(lambda name=name: c.get("batch/v1", "jobs", NS, f"{name}-init"), timeout=30, what=f"{name}-init")

    typo = _ready(failed["typo"])
    assert typo["reason"] == "UnknownEncoder"
    assert "spec.encoder.name: no encoder 'patch_nett' here" in typo["message"]
    assert typo["message"].endswith("known: flat_mlp, patch_net, resnet, small_cnn")  # installed ones, by metadata
    nohead = _ready(failed["nohead"])
    assert nohead["reason"] == "UnknownDecoder"
    assert "SiteTask nohead-a spec.decoder.name: no decoder 'acme_head' here" in nohead["message"]
    assert "MFED_OPERATOR_PLUGINS=decoder:acme_head" in nohead["message"]
    assert job_names(kubeapi, NS) == ["declared-init", "good-init"]  # none for the failed rounds
