"""The chart, rendered by real helm 4 and helm 3 with the default and several non-default value sets:
lint-clean, valid Kubernetes objects, and the settings the operator actually accepts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from typing import Any

import pytest
from mfed_operator.config import OperatorConfig

from tests.chart.tools import (
    CHART,
    NAMESPACE,
    NEWEST_KUBERNETES,
    OLDEST_KUBERNETES,
    RELEASE,
    Helm,
    by_kind,
    env_of,
    one,
    validate_kubernetes,
)

DIGEST_OPERATOR = "sha256:" + "a1" * 32
DIGEST_TRAINER = "sha256:" + "b2" * 32

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced-rbac": {"watchNamespaces": ["team-a", "team-b"]},
    "private-registry-with-digests": {
        "global": {"imageRegistry": "registry.internal:5000"},
        "image": {"repository": "mirror/mfed-operator", "digest": DIGEST_OPERATOR, "pullPolicy": "Always"},
        "trainer": {"image": {"repository": "mirror/mfed-trainer", "tag": "0.1.0-cuda12.8", "digest": DIGEST_TRAINER}},
        "imagePullSecrets": ["regcred", "mirror-credentials"],
    },
    "service-monitor": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}
    },
    "metrics-off": {"metrics": {"enabled": False}},
    "trainer-defaults-and-tuning": {
        "trainer": {
            "image": {"registry": "ghcr.io", "repository": "example/mfed-trainer", "tag": "0.1.0"},
            "s3": {
                "endpoint": "https://minio.storage.svc:9000",
                "region": "eu-west-1",
                "credentialsSecret": "s3-credentials",
            },
        },
        "operator": {"logFormat": "json", "jobTtlSecondsAfterFinished": 86400, "defaultDeadlineSeconds": 1209600},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/mfed"}},
        "securityContext": {"runAsUser": None, "runAsGroup": None},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 1,
                        "preference": {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["cpu"]}]},
                    }
                ]
            }
        },
        "podAnnotations": {"example.com/team": "ml-platform"},
        "extraEnv": {"HTTPS_PROXY": "http://proxy.internal:3128", "NO_PROXY": "10.0.0.0/8,.svc"},
        "rbac": {"aggregateToDefaultRoles": False},
    },
}
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)


def render(helm: Helm, name: str) -> list[dict[str, Any]]:
    return helm.template(VALUE_SETS[name])


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")


def operator_roles(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The (Cluster)Roles bound to the operator's ServiceAccount (not the aggregated user roles)."""
    sa = deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"]
    bound = set()
    for binding in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding"):
        if any(
            s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == NAMESPACE
            for s in binding["subjects"]
        ):
            ref = binding["roleRef"]
            bound.add((ref["kind"], ref["name"], binding["metadata"].get("namespace")))
    roles = []
    for doc in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        namespace = doc["metadata"].get("namespace")
        if (doc["kind"], doc["metadata"]["name"], namespace) in bound:
            roles.append(doc)
    return roles


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_the_chart_lints_cleanly(helm: Helm, values: str) -> None:
    result = helm.lint(VALUE_SETS[values])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[WARNING]" not in output and "[ERROR]" not in output, output


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_every_rendered_manifest_is_a_valid_kubernetes_object_old_and_new(helm: Helm, values: str) -> None:
    docs = render(helm, values)
    assert docs
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # prometheus-operator's kind: checked in its own test
            continue
        for version in (OLDEST_KUBERNETES, NEWEST_KUBERNETES):
            validate_kubernetes(doc, version)


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_every_resource_carries_the_standard_labels(helm: Helm, values: str) -> None:
    for doc in render(helm, values):
        labels = doc["metadata"].get("labels") or {}
        missing = [k for k in STANDARD_LABELS if not labels.get(k)]
        assert not missing, f"{doc['kind']}/{doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "mfed-operator-0.1.0"


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_the_operator_accepts_the_environment_the_chart_gives_it(helm: Helm, values: str) -> None:
    env = env_of(deployment(render(helm, values)))
    config = OperatorConfig.from_env(env)  # raises on an unknown MFED_OPERATOR_* name or a bad value
    assert config.health_port == 8080
    assert config.kubeconfig is None  # in a Pod: the ServiceAccount


def test_default_settings_are_the_operators_own_defaults(helm: Helm) -> None:
    config = OperatorConfig.from_env(env_of(deployment(render(helm, "default"))))
    # The trainer image is the one setting the chart must decide (registry, tag from appVersion).
    assert config.trainer_image == "mfed-trainer:0.1.0"
    assert dataclasses.replace(config, trainer_image=OperatorConfig.trainer_image) == OperatorConfig()


def test_trainer_defaults_and_tuning_reach_the_operator(helm: Helm) -> None:
    docs = render(helm, "trainer-defaults-and-tuning")
    env = env_of(deployment(docs))
    config = OperatorConfig.from_env(env)
    assert config.trainer_image == "ghcr.io/example/mfed-trainer:0.1.0"
    assert config.default_s3_endpoint == "https://minio.storage.svc:9000"
    assert config.default_s3_secret == "s3-credentials"
    assert config.default_s3_region == "eu-west-1"
    assert config.log_format == "json"
    assert config.job_ttl_seconds_after_finished == 86400
    # 14 days: helm holds numbers as floats; printed naively this would be 1.2096e+06.
    assert env["MFED_OPERATOR_DEFAULT_DEADLINE_SECONDS"] == "1209600"
    assert env["HTTPS_PROXY"] == "http://proxy.internal:3128"
    pod = deployment(docs)["spec"]["template"]["spec"]
    assert "runAsUser" not in pod["securityContext"] and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/mfed"}
    assert {d["metadata"]["name"] for d in by_kind(docs, "ClusterRole")} == {RELEASE}


def test_the_operator_deployment_is_one_hardened_replica_probed_on_kopfs_health_endpoint(helm: Helm) -> None:
    docs = render(helm, "default")
    d = deployment(docs)
    assert d["metadata"]["namespace"] == NAMESPACE
    assert d["spec"]["replicas"] == 1
    assert d["spec"]["strategy"] == {"type": "Recreate"}
    pod = d["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(d)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": int(env["MFED_OPERATOR_HEALTH_PORT"]), "metrics": int(env["MFED_OPERATOR_METRICS_PORT"])}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": OperatorConfig.health_path, "port": "health"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user (operator/Dockerfile)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert set(container["resources"]["requests"]) == {"cpu", "memory"}
    # The only writable path is /tmp (CA bundles), an emptyDir with a size limit; nothing from the host.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    # The selector is a subset of the Pod's labels, and stays stable (no version in it).
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "mfed-operator", "app.kubernetes.io/instance": RELEASE}
    assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()


def test_cluster_wide_by_default_with_one_cluster_role_bound_to_the_operator(helm: Helm) -> None:
    docs = render(helm, "default")
    roles = operator_roles(docs)
    assert [(r["kind"], r["metadata"]["name"]) for r in roles] == [("ClusterRole", RELEASE)]
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    assert "MFED_OPERATOR_WATCH_NAMESPACES" not in env_of(deployment(docs))


def test_watch_namespaces_gives_a_role_per_namespace_with_the_same_rules_and_no_cluster_role(helm: Helm) -> None:
    docs = render(helm, "namespaced-rbac")
    roles = operator_roles(docs)
    assert sorted((r["kind"], r["metadata"]["namespace"]) for r in roles) == [("Role", "team-a"), ("Role", "team-b")]
    cluster_rules = operator_roles(render(helm, "default"))[0]["rules"]
    assert all(r["rules"] == cluster_rules for r in roles)
    assert RELEASE not in {d["metadata"]["name"] for d in by_kind(docs, "ClusterRole")}
    assert not by_kind(docs, "ClusterRoleBinding")
    config = OperatorConfig.from_env(env_of(deployment(docs)))
    assert config.watch_namespaces == ("team-a", "team-b")


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_no_role_grants_a_wildcard_or_anything_cluster_scoped_to_the_operator(helm: Helm, values: str) -> None:
    docs = render(helm, values)
    for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), f"{role['metadata']['name']}: {rule}"
            assert "nonResourceURLs" not in rule
            # resourceNames only narrow a rule: the one the chart writes names the credentials Secrets
            assert "resourceNames" not in rule or rule["resources"] == ["secrets"], rule
            # Nothing that escalates: no RBAC objects, no impersonation, no Pods/exec, no nodes.
            assert not {"roles", "clusterroles", "rolebindings", "clusterrolebindings", "pods", "nodes"} & set(
                rule["resources"]
            )
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])


def test_images_come_from_the_private_registry_pinned_by_digest_with_pull_secrets(helm: Helm) -> None:
    docs = render(helm, "private-registry-with-digests")
    pod = deployment(docs)["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == f"registry.internal:5000/mirror/mfed-operator:0.1.0@{DIGEST_OPERATOR}"
    assert pod["containers"][0]["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror-credentials"}]
    config = OperatorConfig.from_env(env_of(deployment(docs)))
    assert config.trainer_image == f"registry.internal:5000/mirror/mfed-trainer:0.1.0-cuda12.8@{DIGEST_TRAINER}"


def test_default_images_are_the_ones_the_dockerfiles_build_tagged_with_the_app_version(helm: Helm) -> None:
    docs = render(helm, "default")
    assert deployment(docs)["spec"]["template"]["spec"]["containers"][0]["image"] == "mfed-operator:0.1.0"
    assert "imagePullSecrets" not in deployment(docs)["spec"]["template"]["spec"]


def test_the_service_monitor_scrapes_the_metrics_service_port(helm: Helm) -> None:
    docs = render(helm, "service-monitor")
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # The Service reaches the Pod's metrics port, and only the operator's Pod.
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"] for p in deployment(docs)["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert port["targetPort"] in container_ports
    assert service["spec"]["selector"] == deployment(docs)["spec"]["selector"]["matchLabels"]


def test_the_service_monitor_is_off_by_default(helm: Helm) -> None:
    assert not by_kind(render(helm, "default"), "ServiceMonitor")


def test_metrics_off_turns_off_the_endpoint_and_its_service(helm: Helm) -> None:
    docs = render(helm, "metrics-off")
    assert not by_kind(docs, "Service") and not by_kind(docs, "ServiceMonitor")
    container = deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in container["ports"]] == ["health"]
    assert OperatorConfig.from_env(env_of(deployment(docs))).metrics_port == 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
            "metrics.serviceMonitor.enabled needs metrics.enabled",
        ),
        ({"metrics": {"port": 8080}}, "metrics.port and health.port must differ"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required when serviceAccount.create is false"),
    ],
    ids=["service-monitor-without-metrics", "same-ports", "existing-account-without-name"],
)
def test_inconsistent_values_fail_with_a_message_that_says_what_to_fix(
    helm: Helm, values: dict[str, Any], message: str
) -> None:
    result = helm.run("template", RELEASE, str(CHART), "--values", _write(values), check=False)
    assert result.returncode != 0
    assert message in result.stderr


def test_helm_3_and_helm_4_render_the_same_manifests(helm4: Helm) -> None:
    from tests.chart.tools import helm_binary

    helm3 = helm_binary(3)
    for name, values in VALUE_SETS.items():
        assert helm4.template_text(values) == helm3.template_text(values), name


def test_install_notes_tell_the_next_command(helm4: Helm) -> None:
    # helm 4 renders NOTES in a client-only dry run; helm 3.17 insists on reaching a cluster.
    result = helm4.run(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--dry-run=client",
        "--set",
        "watchNamespaces={team-a}",
    )
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} rollout status deployment/{RELEASE}" in notes
    assert "serving namespaces: team-a" in notes
    assert "does not serve: add it to" in notes  # the example's namespace is not watched
    assert "kubectl apply --server-side --force-conflicts -f" in notes


@pytest.mark.parametrize("skip_crds", [True, False])
def test_install_notes_never_claim_crds_the_cluster_does_not_have(helm4: Helm, skip_crds: bool) -> None:
    """Helm tells templates nothing of --skip-crds; the note looks the CRDs up in the cluster.
    A client-only dry run has no cluster, so this takes the branch `--skip-crds` takes on a real
    install where nobody applied the CRDs (the other branch needs a real API server's lookup)."""
    args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    result = helm4.run(*args, *(["--skip-crds"] if skip_crds else []))
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "helm installed them" not in notes and "both are in the cluster" not in notes
    assert "CRDs: not found in the cluster (installed with --skip-crds" in notes
    assert "kubectl apply --server-side --force-conflicts -f <chart>/crds/" in notes
    assert "`helm upgrade`, which never updates CRDs" in notes


def _write(values: dict[str, Any]) -> str:
    from tests.chart.tools import _values_file

    return str(_values_file(values))


def test_templates_hold_one_kind_of_resource_each(helm: Helm) -> None:
    kinds: dict[str, set[str]] = {}
    for values in VALUE_SETS.values():
        text = helm.template_text(values)
        for chunk in text.split("\n---\n"):
            source = next((line for line in chunk.splitlines() if line.startswith("# Source: ")), None)
            kind = next(
                (line.split(":", 1)[1].strip() for line in chunk.splitlines() if line.startswith("kind:")), None
            )
            if source and kind:
                kinds.setdefault(source.removeprefix("# Source: "), set()).add(kind)
    assert kinds
    assert {path: k for path, k in kinds.items() if len(k) != 1} == {}
    templates = {p.name for p in (CHART / "templates").glob("*.yaml")}
    assert {path.rsplit("/", 1)[1] for path in kinds} == templates, "a template never rendered in any value set"


def test_helm_binaries_are_the_pinned_real_releases() -> None:
    # Guards the installer: both binaries are what scripts/install-helm.sh pins, not something on PATH.
    from tests.chart.tools import helm_binary

    for major, version in ((4, "v4.1.4"), (3, "v3.17.2")):
        helm = helm_binary(major)
        out = subprocess.run(
            [str(helm.path), "version", "--template", "{{.Version}}"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "KUBECONFIG": os.devnull},
        ).stdout
        assert out == version


# Settings the chart leaves to the operator's defaults on purpose (everything else is a value).
NOT_EXPOSED = {
    "kubeconfig": "only outside a cluster; in the Pod the ServiceAccount is used",
    "health_host": "0.0.0.0 in a Pod, so the kubelet's probes reach it",
    "metrics_host": "0.0.0.0 in a Pod, so Prometheus reaches it through the metrics Service",
    "health_path": "the probes use /healthz; the chart fixes it",
    "plugins": "plugin names only the trainer image has: extraEnv MFED_OPERATOR_PLUGINS (docs/plugins.md)",
}


def test_every_operator_setting_is_a_chart_value_or_deliberately_left_out(helm: Helm) -> None:
    # A new MFED_OPERATOR_* setting fails here until the chart exposes it (or says why not).
    set_by_chart = set()
    for values in VALUE_SETS:
        set_by_chart |= set(env_of(deployment(render(helm, values))))
    fields = {f.name for f in dataclasses.fields(OperatorConfig)}
    names = {f"MFED_OPERATOR_{name.upper()}": name for name in fields}
    unexposed = {names[n] for n in names if n not in set_by_chart}
    assert unexposed == set(NOT_EXPOSED)


# Pod Security Standards, "restricted" profile (kubernetes.io/docs/concepts/security/pod-security-standards).
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


@pytest.mark.parametrize("values", sorted(VALUE_SETS))
def test_the_operator_pod_meets_the_restricted_pod_security_standard(helm: Helm, values: str) -> None:
    pod = deployment(render(helm, values))["spec"]["template"]["spec"]
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    for volume in pod.get("volumes") or []:
        assert set(volume) - {"name"} <= RESTRICTED_VOLUME_TYPES, volume
    for container in pod["containers"] + pod.get("initContainers", []):
        security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True and security.get("runAsUser", 1) != 0
        assert container["securityContext"].get("allowPrivilegeEscalation") is False
        assert not container["securityContext"].get("privileged")
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert set(container["securityContext"]["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
        assert security["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
        assert not any(p.get("hostPort") for p in container.get("ports", []))


def test_kubectl_get_federationrounds_shows_dm_vs_local_from_the_installed_crd(helm: Helm) -> None:
    """The CRD the chart installs (helm template --include-crds, what `helm install` applies)
    has the `dm% vs Local` column, shown by default (priority 0), reading the field the operator
    writes (tests/e2e/test_baselines.py checks the field's value). What this does not run:
    kube-apiserver's table rendering of the column (no API server here)."""
    crds = [d for d in helm.template({}, "--include-crds") if d.get("kind") == "CustomResourceDefinition"]
    rounds = next(d for d in crds if d["spec"]["names"]["kind"] == "FederationRound")
    columns = {c["name"]: c for c in rounds["spec"]["versions"][0]["additionalPrinterColumns"]}
    column = columns["dm% vs Local"]
    assert column["jsonPath"] == ".status.summary.dmLocal"
    assert column["type"] == "string" and column.get("priority", 0) == 0
    status = rounds["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["summary"]["properties"]["dmLocal"]["type"] == "string"
