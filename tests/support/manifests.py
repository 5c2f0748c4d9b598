"""Test resources: built in code, or loaded from examples/ (so the example cannot rot)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def load_kustomization(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k directory` would create (resources list only, in order)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    namespace = kustomization.get("namespace")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources") or []:
        path = directory / entry
        if path.is_dir():
            objects.extend(load_kustomization(path))
            continue
        for doc in load_yaml_documents(path):
            if namespace and doc.get("kind") != "Namespace":
                doc.setdefault("metadata", {})["namespace"] = namespace
            objects.append(doc)
    return objects


def secret(namespace: str, name: str, access_key: str, secret_key: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
    }


def sitetask(
    namespace: str,
    name: str,
    *,
    federation: str,
    task: str,
    task_type: str,
    shard: int,
    shards: int,
    samples: int = 100,
    test_samples: int = 200,
    params: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    env: list[dict[str, Any]] | None = None,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "mfed.dev/v1alpha1",
        "kind": "SiteTask",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": {
            "federation": federation,
            "task": {"name": task, "type": task_type, "params": dict(params or {})},
            "decoder": {"name": "mlp", "params": {}},
            "data": data
            or {"demo": {"shardIndex": shard, "shardCount": shards, "samples": samples, "testSamples": test_samples}},
            "env": list(env or [{"name": "OMP_NUM_THREADS", "value": "1"}]),
        },
    }


def federation_round(
    namespace: str,
    name: str,
    *,
    federation: str,
    bucket: str,
    endpoint: str,
    secret_name: str = "s3-credentials",
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "mfed.dev/v1alpha1",
        "kind": "FederationRound",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "federation": federation,
            "encoder": {"name": "small_cnn", "params": {}, "sharing": {"mode": "depth", "depth": 1}},
            "training": {"method": "m-fed", "epochs": 1, "batchSize": 32},
            "aggregation": {"deadlineSeconds": 300},
            "storage": {
                "endpoint": endpoint,
                "bucket": bucket,
                "prefix": "federations",
                "credentialsSecret": {"name": secret_name},
            },
            "initialModel": {"seed": 0},
        },
    }
    for key, value in spec.items():
        body["spec"][key] = copy.deepcopy(value)
    return body
