"""The chart's RBAC is exactly what the operator uses: proven from the API requests of real runs.

The operator's end-to-end federation test (tests/e2e/test_federation.py: the example federation,
two chained rounds, real trainer processes, real S3) runs against the emulated API server the
way the chart's default install runs it: cluster-wide (no watchNamespaces), logged in as a Pod
(ServiceAccount token and CA, https). Then a short scenario, with a namespaced operator, takes
the paths that federation never takes (a Job name clash, a straggler whose Job is deleted, an S3
CA bundle). The emulator logs every request with its bearer token, so the operator's own calls
are told apart from the tests' and the test kubelet's. Then:
- sufficient: each call is granted by the rendered ClusterRole (cluster-wide install; with the
  cluster-scoped lists and watches a cluster-wide operator really makes) and by the Role in the
  watched namespace (namespaced install);
- minimal: each verb on each resource the role grants was used by some call.
The same runs also feed the Argo CD health checks and the kstatus fields real statuses.
What the emulator does not do here: authorize (it logs; this module is the authorizer) and
filter by label (the Jobs selector is asserted as sent).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.chart.argocd import health
from tests.chart.rbac import Need, Permission, allows, granted, needs
from tests.chart.tools import NAMESPACE, Helm, helm_binary
from tests.e2e import test_federation
from tests.e2e.conftest import (  # noqa: F401 (seaweed: the S3 fixture)
    BUCKET,
    SERVICE_ACCOUNT_TOKEN,
    TEST_CLIENT_TOKEN,
    Cluster,
    as_a_pod,
    seaweed,
)
from tests.e2e.test_failures import new_round, sites
from tests.support.kubeapi import KUBECONFIG_TOKEN, KubeAPI, LoggedRequest
from tests.support.kubelet import Kubelet
from tests.support.operator import OperatorProcess, operator_env
from tests.support.seaweed import SeaweedFS
from tests.support.tls import make_server_certificate

pytestmark = pytest.mark.slow
DEMO_NAMESPACE = "mfed-demo"  # where tests.e2e's clusters run, and the operator watches
SECRET_RULE = {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}


@dataclass(frozen=True)
class Run:
    """What the operator did in one scenario: its requests, and the final objects."""

    requests: list[LoggedRequest]
    rounds: dict[str, dict[str, Any]]
    sitetasks: dict[str, dict[str, Any]]
    cluster_wide: bool


@contextmanager
def cluster(s3: SeaweedFS, workdir: Path, *, cluster_wide: bool) -> Iterator[Cluster]:
    """The e2e world (emulated API, test kubelet, real operator process), like tests.e2e's make_cluster.

    `cluster_wide`: as the chart's default install runs it, no watchNamespaces and logged in as a
    Pod (tests.e2e.conftest.as_a_pod); otherwise namespaced, through a kubeconfig."""
    api = KubeAPI(make_server_certificate(workdir / "tls") if cluster_wide else None).start()
    kubelet = operator = None
    try:
        kubelet = Kubelet(api.client(), workdir / "kubelet", extra_env={"OMP_NUM_THREADS": "1"}).start()
        if cluster_wide:
            env = operator_env(api, workdir)
            module = as_a_pod(api, workdir, env)
        else:
            env = operator_env(api, workdir, MFED_OPERATOR_WATCH_NAMESPACES=DEMO_NAMESPACE)
            module = "mfed_operator.main"
        operator = OperatorProcess(env=env, log_path=workdir / "operator", module=module).start()
        yield Cluster(
            api=api,
            client=api.client(),
            kubelet=kubelet,
            operator=operator,
            s3=s3,
            namespace=DEMO_NAMESPACE,
            env=env,
        )
    finally:
        if operator is not None:
            operator.stop()
        if kubelet is not None:
            kubelet.stop()
        api.stop()


def finish(c: Cluster, cluster_wide: bool) -> Run:
    objects = {
        plural: {o["metadata"]["name"]: o for o in c.client.list("mfed.dev/v1alpha1", plural, c.namespace)}
        for plural in ("federationrounds", "sitetasks")
    }
    operator = SERVICE_ACCOUNT_TOKEN if cluster_wide else KUBECONFIG_TOKEN
    log = c.api.requests()
    assert {r.token for r in log} <= {operator, TEST_CLIENT_TOKEN}, "a request from an unknown identity"
    requests = [r for r in log if r.token == operator]
    return Run(
        requests=requests, rounds=objects["federationrounds"], sitetasks=objects["sitetasks"], cluster_wide=cluster_wide
    )


def federation(c: Cluster) -> None:
    """The operator's own end-to-end federation test, as it is."""
    test_federation.test_example_federation_trains_two_chained_rounds_to_a_verifiable_global_model(c)


def edge_paths(c: Cluster) -> None:
    """The paths the example never takes: a private CA bundle (ConfigMap get), a Job name that is
    taken (the operator reads the Job back), a site that never starts (its Job deleted at the deadline)."""
    c.secret()
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "s3-ca", "namespace": c.namespace},
            "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"},
        }
    )
    c.apply(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "edges-clash", "namespace": c.namespace},
            "spec": {
                "suspend": True,
                "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "x", "image": "x"}]}},
            },
        }
    )
    queued = {"labels": {"kueue.x-k8s.io/queue-name": "never-admitted"}}  # its Job stays suspended
    sites(
        c, "edges", [("queued", "cls10", "classification"), ("clash", "cls10", "classification")], **{"queued": queued}
    )
    storage = {
        "endpoint": c.s3.endpoint,
        "bucket": BUCKET,
        "prefix": "federations",
        "credentialsSecret": {"name": "s3-credentials"},
        "caBundle": {"configMapName": "s3-ca", "key": "ca.crt"},
    }
    # 20 s: the init Job (same activeDeadlineSeconds) must finish first, on a busy 2-core machine too.
    new_round(c, "edges", "edges", aggregation={"minSites": 1, "deadlineSeconds": 20}, storage=storage)
    status = c.wait_phase("edges", "Succeeded", "Failed", timeout=120)
    sites_by_name = {s["site"]: s for s in status["sites"]}
    assert (sites_by_name["clash"]["reason"], sites_by_name["queued"]["reason"]) == (
        "JobNameConflict",
        "DeadlineExceeded",
    )


@pytest.fixture(scope="module")
def runs(seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:  # noqa: F811
    out = {}
    for name, scenario, cluster_wide in (("federation", federation, True), ("edges", edge_paths, False)):
        with cluster(seaweed, tmp_path_factory.mktemp(name), cluster_wide=cluster_wide) as c:
            scenario(c)
            out[name] = finish(c, cluster_wide)
    assert threading.active_count() < 50  # nothing left running between scenarios
    return out


def operator_rules(helm: Helm, values: dict[str, Any] | None = None) -> dict[str | None, list[dict[str, Any]]]:
    """The rules of the roles bound to the operator's ServiceAccount, by namespace (None: cluster)."""
    docs = helm.template(values)
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    out: dict[str | None, list[dict[str, Any]]] = {}
    for binding in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        if not any(s["name"] == sa and s["namespace"] == NAMESPACE for s in binding["subjects"]):
            continue
        namespace = binding["metadata"].get("namespace")
        role = next(
            d
            for d in docs
            if d["kind"] == binding["roleRef"]["kind"]
            and d["metadata"]["name"] == binding["roleRef"]["name"]
            and d["metadata"].get("namespace") == namespace
        )
        out[namespace] = role["rules"]
    return out


def all_needs(runs: dict[str, Run], *, cluster_wide: bool | None = None) -> list[Need]:
    """The permissions the runs' requests need (only those of one mode, when `cluster_wide` is given)."""
    out = []
    for run in runs.values():
        if cluster_wide is not None and run.cluster_wide is not cluster_wide:
            continue
        found, discovery = needs(run.requests)
        assert discovery, "the operator did no discovery: were its requests logged at all?"
        out.extend(found)
    return out


def denied(need_list: list[Need], rules: list[dict[str, Any]]) -> list[str]:
    return sorted({f"{n.permission} (e.g. {n.request})" for n in need_list if not allows(rules, n)})


def test_the_runs_exercised_the_operator_against_the_api(runs: dict[str, Run]) -> None:
    # Guards the tests below against an empty log: both scenarios made plenty of calls.
    for name, run in runs.items():
        assert len(run.requests) > 20, f"{name}: only {len(run.requests)} operator requests logged"
    verbs = {n.permission.verb for n in all_needs(runs)}
    assert {"list", "watch", "create", "patch", "get", "delete", "update"} <= verbs


def test_every_api_call_of_the_operator_is_granted_by_the_cluster_role(runs: dict[str, Run]) -> None:
    helm = helm_binary(4)
    roles = operator_rules(helm)
    assert list(roles) == [None], "cluster-wide install: one ClusterRole bound to the operator"
    assert denied(all_needs(runs), roles[None]) == []


def test_the_cluster_wide_run_listed_and_watched_at_cluster_scope_and_jobs_by_label_only(runs: dict[str, Run]) -> None:
    # What a cluster-wide install really asks for (so the ClusterRole proof above covers it): the
    # three kinds listed and watched across namespaces, Jobs with the server-side label selector.
    scoped = [r for r in runs["federation"].requests if r.method == "GET" and r.plural and r.namespace is None]
    kinds = {(r.plural, "watch" if r.params.get("watch") == "true" else "list") for r in scoped}
    assert kinds == {(p, v) for p in ("federationrounds", "sitetasks", "jobs") for v in ("list", "watch")}
    jobs = {r.params.get("labelSelector") for r in scoped if r.plural == "jobs"}
    assert jobs == {"app.kubernetes.io/managed-by=mfed-operator"}
    # Everything else the cluster-wide operator did happened in the namespace of the federation.
    assert {r.namespace for r in runs["federation"].requests if r.plural and r not in scoped} == {DEMO_NAMESPACE}


def test_every_verb_the_cluster_role_grants_was_used(runs: dict[str, Run]) -> None:
    helm = helm_binary(4)
    used = {n.permission for n in all_needs(runs)}
    unused = sorted(str(p) for p in granted(operator_rules(helm)[None]) - used)
    assert unused == [], "granted but never used by the operator: remove from the chart's rules"


def test_a_namespaced_install_grants_every_call_through_the_role_in_the_watched_namespace(runs: dict[str, Run]) -> None:
    helm = helm_binary(4)
    roles = operator_rules(helm, {"watchNamespaces": [DEMO_NAMESPACE]})
    assert list(roles) == [DEMO_NAMESPACE]
    namespaced = all_needs(runs, cluster_wide=False)
    # A Role grants nothing outside its namespace: a namespaced operator must never call cluster-wide.
    assert sorted({n.request for n in namespaced if n.namespace != DEMO_NAMESPACE}) == []
    # The cluster-wide run's calls inside the namespace are the same a namespaced operator makes
    # (only the watches' scope differs), so they must be granted by the Role too.
    in_namespace = [n for n in all_needs(runs) if n.namespace is not None]
    assert denied(in_namespace, roles[DEMO_NAMESPACE]) == []
    assert denied(namespaced, roles[DEMO_NAMESPACE]) == []


def test_no_install_mode_lets_the_operator_read_every_secret() -> None:
    """Secrets are granted by name (rbac.secretNames, plus trainer.s3.credentialsSecret); only a
    namespaced install with no names reads any Secret, and only in the namespaces it serves."""
    helm = helm_binary(4)

    def secret_rules(values: dict[str, Any]) -> dict[str | None, list[dict[str, Any]]]:
        return {
            ns: [r for r in rules if "secrets" in r["resources"]] for ns, rules in operator_rules(helm, values).items()
        }

    assert secret_rules({}) == {None: [SECRET_RULE | {"resourceNames": ["s3-credentials"]}]}
    both = secret_rules({"trainer": {"s3": {"credentialsSecret": "team-s3"}}})
    assert both == {None: [SECRET_RULE | {"resourceNames": ["s3-credentials", "team-s3"]}]}
    assert secret_rules({"rbac": {"secretNames": []}}) == {None: []}  # cluster-wide: none at all
    served = secret_rules({"rbac": {"secretNames": []}, "watchNamespaces": ["team-a"]})
    assert served == {"team-a": [SECRET_RULE]}  # any Secret, in the served namespace only
    other = Need(Permission("get", "", "secrets"), "team-a", "GET .../secrets/other", "other")
    assert not allows(operator_rules(helm)[None], other)


def test_the_rbac_rules_are_the_same_for_helm_3(runs: dict[str, Run]) -> None:
    assert operator_rules(helm_binary(3)) == operator_rules(helm_binary(4))


def test_argocd_health_of_the_real_rounds_and_sites(runs: dict[str, Run]) -> None:
    fed, edges = runs["federation"], runs["edges"]
    for name in ("fashion-mnist", "fashion-mnist-r2"):
        result = health("FederationRound", fed.rounds[name])
        assert result.status == "Healthy", result
    for site in fed.sitetasks.values():
        result = health("SiteTask", site)
        assert result.status == "Healthy" and "Accepted" in result.message, result
    failed = health("FederationRound", edges.rounds["edges"])
    assert failed.status == "Degraded" and "quorum" in failed.message, failed
    assert health("SiteTask", edges.sitetasks["clash"]).status == "Healthy"  # its spec is fine


def test_real_statuses_carry_what_fluxs_kstatus_reads(runs: dict[str, Run]) -> None:
    # kstatus (Flux, kubectl wait, cli-utils) reads observedGeneration against generation, then
    # the Reconciling and Stalled conditions, then Ready: no health check needs configuring.
    def conditions(obj: dict[str, Any]) -> dict[str, str]:
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
        return {c["type"]: c["status"] for c in obj["status"]["conditions"]}

    done = conditions(runs["federation"].rounds["fashion-mnist"])
    assert (done["Ready"], done["Reconciling"], done["Stalled"]) == ("True", "False", "False")
    failed = conditions(runs["edges"].rounds["edges"])
    assert (failed["Ready"], failed["Reconciling"], failed["Stalled"]) == ("False", "False", "True")
    site = conditions(runs["federation"].sitetasks["rot4-a"])
    assert site["Ready"] == "True"


def test_the_request_mapping_follows_the_api_servers_authorizer() -> None:
    def req(method: str, path: str, **kw: Any) -> LoggedRequest:
        base: dict[str, Any] = dict(
            action=None,
            plural=None,
            namespace="ns",
            name=None,
            subresource=None,
            data=None,
            token=KUBECONFIG_TOKEN,
            group=None,
        )
        base.update(kw)
        return LoggedRequest(method=method, path=path, **base)

    owned = {
        "metadata": {
            "ownerReferences": [
                {
                    "apiVersion": "mfed.dev/v1alpha1",
                    "kind": "FederationRound",
                    "name": "r",
                    "uid": "u",
                    "blockOwnerDeletion": True,
                }
            ]
        }
    }
    found, discovery = needs(
        [
            req("GET", "/apis/batch/v1/namespaces/ns/jobs", plural="jobs", group="batch", params={"watch": "true"}),
            req("GET", "/apis/batch/v1/namespaces/ns/jobs", plural="jobs", group="batch"),
            req("GET", "/apis/batch/v1/namespaces/ns/jobs/j", plural="jobs", group="batch", name="j"),
            req("POST", "/apis/batch/v1/namespaces/ns/jobs", plural="jobs", group="batch", data=owned),
            req(
                "PATCH",
                "/apis/mfed.dev/v1alpha1/namespaces/ns/federationrounds/r/status",
                plural="federationrounds",
                group="mfed.dev",
                name="r",
                subresource="status",
            ),
            req("DELETE", "/api/v1/namespaces/ns/events", plural="events", group=""),
            req("GET", "/apis/mfed.dev/v1alpha1"),
        ]
    )
    assert [str(n.permission) for n in found] == [
        "watch batch/jobs",
        "list batch/jobs",
        "get batch/jobs",
        "create batch/jobs",
        "update mfed.dev/federationrounds/finalizers",
        "patch mfed.dev/federationrounds/status",
        "deletecollection core/events",
    ]
    assert discovery == ["/apis/mfed.dev/v1alpha1"]
    with pytest.raises(AssertionError, match="neither a resource nor discovery"):
        needs([req("GET", "/metrics")])
