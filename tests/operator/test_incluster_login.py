"""The operator logs in as a Pod does: ServiceAccount token and CA files, KUBERNETES_SERVICE_* env.

No kubeconfig anywhere: the real `connect()` (kubernetes' in-cluster loader) and real kopf, over
https to the emulated API with a certificate signed by the "cluster" CA. The emulator is given
an allow-list of tokens so that, like a real API server, it answers 401 to a token it does not
accept, including a malformed `Bearer bearer <jwt>` header. What it does not check: token
signatures, audiences and expiry (a real API server validates the JWT; here the token is an
opaque string), and RBAC (tests/chart/test_rbac.py proves that from the request log).
"""

from __future__ import annotations

import datetime
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.config import incluster_config, kube_config
from mfed_operator.adapters.kube import Kube, KubeUnavailable
from mfed_operator.adapters.login import LoginError, bearer_token, connect

from tests.support import manifests as m
from tests.support.kubeapi import KubeAPI, LoggedRequest, running_kubeapi
from tests.support.operator import operator_env, operator_in_thread
from tests.support.tls import make_server_certificate
from tests.support.waiting import wait_for

NS = "team-a"
TEST_CLIENT_TOKEN = "test"  # what the test's own KubeClient sends (not the operator)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[KubeAPI, Path]]:
    """An https API and a ServiceAccount folder, wired the way a Pod sees them."""
    certificate = make_server_certificate(tmp_path / "tls")
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("jwt-first")
    (account / "ca.crt").write_bytes(certificate.ca_path.read_bytes())
    with running_kubeapi(tls=certificate) as api:
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(account / "token"))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(account / "ca.crt"))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port()))
        monkeypatch.delenv("KUBECONFIG", raising=False)
        # Nor the client's fallback, ~/.kube/config: a stray one would hide a broken in-cluster path.
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "home" / ".kube" / "config"))
        api.accept_only("jwt-first", TEST_CLIENT_TOKEN)
        yield api, account


def _in_cluster_env(api: KubeAPI, tmp: Path) -> dict[str, str]:
    env = operator_env(api, tmp)
    del env["MFED_OPERATOR_KUBECONFIG"]  # nothing but the ServiceAccount files
    return env


def _operators(api: KubeAPI) -> list[LoggedRequest]:
    return [r for r in api.requests() if r.token != TEST_CLIENT_TOKEN]


def _sitetask_ready(api: KubeAPI, name: str) -> bool:
    body = api.client().get("mfed.dev/v1alpha1", "sitetasks", NS, name) or {}
    return any(c.get("type") == "Ready" for c in (body.get("status") or {}).get("conditions") or [])


def test_in_cluster_login_sends_one_bearer_scheme_and_follows_a_rotated_token(
    cluster: tuple[KubeAPI, Path], tmp_path: Path
) -> None:
    api, account = cluster
    c = api.client()
    c.create(m.sitetask(NS, "a", federation="fed", task="cls10", task_type="classification", shard=0, shards=2))
    with operator_in_thread(_in_cluster_env(api, tmp_path), NS):
        wait_for(lambda: _sitetask_ready(api, "a"), timeout=30, what="kopf to validate SiteTask a")
        before = _operators(api)
        assert before and {r.authorization for r in before} == {"Bearer jwt-first"}

        # The kubelet rotates the token; the API server stops accepting the old one.
        (account / "token").write_text("jwt-second")
        api.accept_only("jwt-second", TEST_CLIENT_TOKEN)
        rotated_at = len(api.requests())
        # kopf's next call (validating this SiteTask) gets 401, re-logs in and retries; then the
        # round makes the operator's own client read the Secret and create the init Job.
        c.create(m.sitetask(NS, "b", federation="fed", task="cls10", task_type="classification", shard=1, shards=2))
        wait_for(lambda: _sitetask_ready(api, "b"), timeout=60, what="kopf to validate SiteTask b after rotation")
        c.create(m.secret(NS, "s3-credentials", "id", "key"))
        c.create(m.federation_round(NS, "r1", federation="fed", bucket="models", endpoint="http://127.0.0.1:9"))
        wait_for(lambda: c.get("batch/v1", "jobs", NS, "r1-init"), timeout=60, what="the init Job after rotation")

    after = [r for r in api.requests()[rotated_at:] if r.token != TEST_CLIENT_TOKEN]
    # kopf sends "Bearer <token>"; the kubernetes client, the operator's own, sends the header its
    # in-cluster loader stores, "bearer <token>" (the scheme is case-insensitive, RFC 7235 2.1).
    kopf_new, client_new = "Bearer jwt-second", "bearer jwt-second"
    assert any(r.authorization == "Bearer jwt-first" for r in after), "kopf never met the 401 that makes it log in"
    assert {r.authorization for r in after} <= {"Bearer jwt-first", kopf_new, client_new}
    assert any(
        r.plural == "sitetasks" and r.name == "b" and r.method == "PATCH" and r.authorization == kopf_new for r in after
    )
    assert any(r.plural == "secrets" and r.method == "GET" and r.authorization == client_new for r in after)
    assert any(r.plural == "jobs" and r.method == "POST" and r.authorization == client_new for r in after)
    # Once a call carried the new token, none carries the old one again.
    first_new = next(i for i, r in enumerate(after) if r.authorization in (kopf_new, client_new))
    assert all(r.authorization in (kopf_new, client_new) for r in after[first_new:])


def test_the_operators_own_client_reads_a_rotated_token_within_a_minute_without_a_new_login(
    cluster: tuple[KubeAPI, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two kopf logins (kopf logs in again only on a 401 of its own calls), the ApiClient
    that connect() built follows the token file by itself: the in-cluster loader's refresh hook,
    kept on that Configuration, re-reads the file once its copy is a minute old."""
    api, account = cluster
    api.client().create(m.secret(NS, "s3-credentials", "id", "key"))
    api_client, _ = connect(None)
    kube = Kube(api_client, timeout_seconds=10)
    try:
        assert kube.secret_keys(NS, "s3-credentials")
        (account / "token").write_text("jwt-second")
        api.accept_only("jwt-second", TEST_CLIENT_TOKEN)
        with pytest.raises(KubeUnavailable, match="401"):  # within the minute: the old copy
            kube.secret_keys(NS, "s3-credentials")

        real = datetime.datetime

        class MinuteLater(real):
            @classmethod
            def now(cls, tz: datetime.tzinfo | None = None) -> MinuteLater:
                return real.now(tz) + datetime.timedelta(seconds=61)  # type: ignore[return-value]

        # Only the loader's clock moves on (its module's `datetime`), not the test's or the server's.
        clock = types.SimpleNamespace(datetime=MinuteLater, timedelta=datetime.timedelta)
        monkeypatch.setattr(incluster_config, "datetime", clock)
        assert kube.secret_keys(NS, "s3-credentials")
    finally:
        api_client.close()
    reads = [r.authorization for r in api.requests() if r.plural == "secrets" and r.method == "GET"]
    assert reads == ["bearer jwt-first", "bearer jwt-first", "bearer jwt-second"]


@pytest.mark.parametrize(
    ("stored", "token"),
    [
        ({"BearerToken": "bearer jwt-x"}, "jwt-x"),  # the in-cluster loader
        ({"BearerToken": "Bearer jwt-x"}, "jwt-x"),  # the kubeconfig loader
        ({"authorization": "Bearer jwt-x"}, "jwt-x"),  # kubernetes clients before 36
        ({"BearerToken": "BEARER  jwt-x\n"}, "jwt-x"),
        ({"BearerToken": "jwt-x"}, "jwt-x"),  # a bare token
        ({}, None),
    ],
)
def test_the_token_is_taken_without_its_scheme_whatever_its_case(stored: dict[str, str], token: str | None) -> None:
    configuration = client.Configuration()
    configuration.api_key = dict(stored)
    assert bearer_token(configuration) == token


def test_an_authorization_scheme_other_than_bearer_is_refused_by_name() -> None:
    configuration = client.Configuration()
    configuration.api_key = {"authorization": "Basic dXNlcjpwdw=="}
    with pytest.raises(LoginError, match="unsupported authorization scheme 'Basic'"):
        bearer_token(configuration)
