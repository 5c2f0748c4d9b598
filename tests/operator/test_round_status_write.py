"""A round's status is written only over the version it was planned on.

Through the operator's own `Kube` client (the real kubernetes library and its merge-patch
encoding) against the emulated API, which answers 409 to a patch naming an old resourceVersion
as the API server does (kmock itself ignores it; tests/support/kubeapi.py adds the check).
"""

from __future__ import annotations

import pytest
from mfed_operator.adapters.kube import Conflict

from tests.operator.test_sitetask_status import NAMESPACE, _kube
from tests.support import manifests as m
from tests.support.kubeapi import KubeAPI


def _round(api: KubeAPI) -> str:
    api.client().create(m.federation_round(NAMESPACE, "r", federation="fed", bucket="b", endpoint="http://127.0.0.1:1"))
    body = api.client().get("mfed.dev/v1alpha1", "federationrounds", NAMESPACE, "r") or {}
    return str(body["metadata"]["resourceVersion"])


def test_a_status_planned_on_the_current_version_is_written_and_none_values_remove_fields(kubeapi: KubeAPI) -> None:
    kube = _kube(kubeapi)
    version = _round(kubeapi)
    kube.patch_round_status(NAMESPACE, "r", version, {"phase": "Training", "initJob": "r-init"})
    fresh = kube.get_round(NAMESPACE, "r")
    assert fresh is not None and fresh["status"] == {"phase": "Training", "initJob": "r-init"}
    kube.patch_round_status(NAMESPACE, "r", fresh["metadata"]["resourceVersion"], {"initJob": None})
    again = kube.get_round(NAMESPACE, "r")
    assert again is not None and again["status"] == {"phase": "Training"}


def test_a_status_planned_on_an_older_version_is_refused_and_changes_nothing(kubeapi: KubeAPI) -> None:
    kube = _kube(kubeapi)
    old = _round(kubeapi)
    kube.patch_round_status(NAMESPACE, "r", old, {"phase": "Training"})
    with pytest.raises(Conflict):
        kube.patch_round_status(NAMESPACE, "r", old, {"phase": "Aggregating"})
    fresh = kube.get_round(NAMESPACE, "r")
    assert fresh is not None and fresh["status"] == {"phase": "Training"}


def test_a_round_that_does_not_exist_reads_as_none(kubeapi: KubeAPI) -> None:
    assert _kube(kubeapi).get_round(NAMESPACE, "missing") is None
