"""End-to-end fixtures: a real S3 server per module; per test an emulated API, a test kubelet
running the real `mfed-trainer`, and the real `mfed-operator` process. Always torn down."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.oracle import Contribution, assert_models_equal, expected_global, tensors
from tests.support import manifests as m
from tests.support.images import Container
from tests.support.kubeapi import KubeAPI, KubeClient
from tests.support.kubelet import Kubelet
from tests.support.operator import OperatorProcess, operator_env
from tests.support.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS
from tests.support.tls import make_server_certificate
from tests.support.waiting import wait_for

BUCKET = "mfed"
SERVICE_ACCOUNT_TOKEN = "jwt-of-the-operators-service-account"
TEST_CLIENT_TOKEN = "test"  # what the tests' own KubeClient and the test kubelet send


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweed"))
    try:
        server.start()
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@dataclass
class Cluster:
    api: KubeAPI
    client: KubeClient
    kubelet: Kubelet
    operator: OperatorProcess
    s3: SeaweedFS
    namespace: str
    env: dict[str, str]

    def apply(self, *objects: dict[str, Any]) -> None:
        for obj in objects:
            self.client.create(obj)

    def secret(self) -> None:
        self.apply(m.secret(self.namespace, "s3-credentials", ACCESS_KEY, SECRET_KEY))

    def round(self, name: str) -> dict[str, Any]:
        body = self.client.get("mfed.dev/v1alpha1", "federationrounds", self.namespace, name)
        return dict(body or {})

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.round(name).get("status") or {})

    def wait_phase(self, name: str, *phases: str, timeout: float = 120) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("phase") in phases else None

        return wait_for(
            check,
            timeout=timeout,
            interval=0.1,
            what=f"round {name} to reach {phases}",
            describe=lambda: (
                json.dumps(self.status(name))[:3000]
                + "\n--- operator log tail:\n"
                + self.operator.output()[-4000:]
                + "\n--- kubelet errors: "
                + str(self.kubelet.errors)
            ),
        )

    def last_round(self, site: str, round_name: str) -> dict[str, Any]:
        """The SiteTask's status.lastRound once it names `round_name`: the operator reports it to
        the sites after the round has ended, so a test that read it at once would race."""

        def reported() -> dict[str, Any] | None:
            body = self.client.get("mfed.dev/v1alpha1", "sitetasks", self.namespace, site) or {}
            last = dict((body.get("status") or {}).get("lastRound") or {})
            return last if last.get("name") == round_name else None

        return wait_for(reported, timeout=60, what=f"SiteTask {site}'s status.lastRound to name {round_name}")

    def jobs(self) -> list[dict[str, Any]]:
        return self.client.list("batch/v1", "jobs", self.namespace)

    def events(self, name: str) -> list[dict[str, Any]]:
        events = self.client.list("v1", "events", self.namespace)
        return [e for e in events if (e.get("involvedObject") or {}).get("name") == name]

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.env['MFED_OPERATOR_METRICS_PORT']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def s3_object(self, uri: str) -> bytes:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return bytes(self.s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())

    def s3_put(self, uri: str, data: bytes) -> None:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        self.s3.client().put_object(Bucket=bucket, Key=key, Body=data)

    def s3_exists(self, uri: str) -> bool:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        listing = self.s3.client().list_objects_v2(Bucket=bucket, Prefix=key)
        return any(o["Key"] == key for o in listing.get("Contents") or [])


def as_a_pod(api: KubeAPI, tmp: Path, env: dict[str, str]) -> str:
    """Turn `env` (tests.support.operator's) into a Pod's: ServiceAccount token and CA files,
    KUBERNETES_SERVICE_*, no kubeconfig; the API (started with a certificate) accepts only the
    ServiceAccount's and the tests' tokens. Returns the module to run the operator with."""
    assert api.tls is not None, "in-cluster login needs an https API: KubeAPI(make_server_certificate(...))"
    account = tmp / "serviceaccount"
    account.mkdir(exist_ok=True)
    (account / "token").write_text(SERVICE_ACCOUNT_TOKEN)
    (account / "ca.crt").write_bytes(api.tls.ca_path.read_bytes())
    Path(env.pop("MFED_OPERATOR_KUBECONFIG")).unlink()  # no kubeconfig anywhere
    home = tmp / "home"  # nor ~/.kube/config, the client's fallback
    home.mkdir(exist_ok=True)
    env.update(
        KUBERNETES_SERVICE_HOST="127.0.0.1",
        KUBERNETES_SERVICE_PORT=str(api.port()),
        MFED_TEST_SERVICEACCOUNT_DIR=str(account),
        HOME=str(home),
    )
    api.accept_only(SERVICE_ACCOUNT_TOKEN, TEST_CLIENT_TOKEN)
    return "tests.support.incluster_operator"


@pytest.fixture
def make_cluster(seaweed: SeaweedFS, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Start the world for one test; operator settings can be overridden (MFED_OPERATOR_*=...)."""
    started: list[tuple[KubeAPI, Kubelet | None, OperatorProcess | None]] = []

    def make(*, in_cluster: bool = False, image: Container | None = None, **overrides: str) -> Cluster:
        """`in_cluster`: the API speaks https and the operator logs in from ServiceAccount files
        (token, CA) and KUBERNETES_SERVICE_* as in a Pod, with no kubeconfig at all. `image`: the
        kubelet runs every Job in this container of the built trainer image."""
        namespace = "mfed-demo"
        api = KubeAPI(make_server_certificate(tmp_path / "tls") if in_cluster else None).start()
        started.append((api, None, None))
        kubelet = Kubelet(api.client(), tmp_path / "kubelet", extra_env={"OMP_NUM_THREADS": "1"}, image=image).start()
        started[-1] = (api, kubelet, None)
        env = operator_env(api, tmp_path, MFED_OPERATOR_WATCH_NAMESPACES=namespace, **overrides)
        module = as_a_pod(api, tmp_path, env) if in_cluster else "mfed_operator.main"
        operator = OperatorProcess(env=env, log_path=tmp_path / "operator", module=module).start()
        started[-1] = (api, kubelet, operator)
        return Cluster(
            api=api, client=api.client(), kubelet=kubelet, operator=operator, s3=seaweed, namespace=namespace, env=env
        )

    try:
        yield make
    finally:
        for api, kubelet, operator in started:
            if operator is not None:
                operator.stop()
            if kubelet is not None:
                kubelet.stop()
            api.stop()
        if seaweed.process is None:  # a test took S3 down and failed before bringing it back
            seaweed.start()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    return make_cluster()


@dataclass(frozen=True)
class Upload:
    manifest: dict[str, Any]
    delta: dict[str, np.ndarray]
    decoder: dict[str, np.ndarray]


def uploads_from_s3(cluster: Cluster, status: Mapping[str, Any]) -> list[Upload]:
    """What the accepted sites uploaded, read straight from S3 (not through the operator)."""
    out = []
    model_prefix = status["globalModel"]["uri"].rsplit("/", 1)[0]
    for site in status["sites"]:
        if site["phase"] != "Accepted":
            continue
        prefix = f"{model_prefix}/sites/{site['site']}"
        out.append(
            Upload(
                manifest=json.loads(cluster.s3_object(f"{prefix}/manifest.json")),
                delta=tensors(cluster.s3_object(f"{prefix}/delta.safetensors")),
                decoder=tensors(cluster.s3_object(f"{prefix}/decoder.safetensors")),
            )
        )
    return out


def contributions_from_s3(cluster: Cluster, status: Mapping[str, Any]) -> list[Contribution]:
    return [
        Contribution(task=u.manifest["task"], samples=int(u.manifest["samples"]), delta=u.delta, decoder=u.decoder)
        for u in uploads_from_s3(cluster, status)
    ]


def check_global_model(cluster: Cluster, status: Mapping[str, Any], weighting: str = "uniform") -> bytes:
    """The global model in S3 equals the numpy recomputation from the base and the uploads."""
    base = tensors(cluster.s3_object(status["baseModel"]["uri"] + "/model.safetensors"))
    model_bytes = cluster.s3_object(status["globalModel"]["uri"] + "/model.safetensors")
    assert hashlib.sha256(model_bytes).hexdigest() == status["globalModel"]["sha256"]
    expected = expected_global(base, contributions_from_s3(cluster, status), weighting)
    assert_models_equal(tensors(model_bytes), expected)
    return model_bytes
