"""Pure builders for the Kubernetes Jobs the operator creates (golden-tested).

Owner references are added by the handler layer with kopf.adopt; everything else about a Job is
decided here, from the round, the site and the operator's configuration.
"""

from __future__ import annotations

import json
from typing import Any

from mfed.resources.method_settings import PVC_MOUNT
from mfed.resources.views import DataKind, RoundView, SiteTaskView
from mfed.spec import InitSpec, RoundSpec
from mfed_operator.config import OperatorConfig
from mfed_operator.domain.names import (
    COMPONENT_INIT,
    COMPONENT_SITE,
    KUEUE_QUEUE_LABEL,
    LABEL_COMPONENT,
    LABEL_FEDERATION,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_PART_OF,
    LABEL_ROUND,
    LABEL_ROUND_NUMBER,
    LABEL_SITE,
    LABEL_TASK,
    MANAGED_BY,
    label_value,
)

CONTAINER = "trainer"
EXIT_BAD_INPUT = 2  # mfed-trainer: retrying cannot help
CA_MOUNT = "/var/run/mfed/ca"
TMP_MOUNT = "/tmp"


def _labels(r: RoundView, round_number: int, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: "mfed-trainer",
        LABEL_COMPONENT: component,
        LABEL_PART_OF: "mfed",
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_FEDERATION: label_value(r.federation),
        LABEL_ROUND: label_value(r.name),
        LABEL_ROUND_NUMBER: str(round_number),
    }


def storage_env(r: RoundView, config: OperatorConfig) -> list[dict[str, Any]]:
    """S3 settings as the trainer reads them; credentials only as secretKeyRef."""
    s = r.storage
    env: list[dict[str, Any]] = []
    endpoint = s.endpoint or config.default_s3_endpoint
    if endpoint:
        env.append({"name": "MFED_S3_ENDPOINT", "value": endpoint})
    env.append({"name": "AWS_REGION", "value": s.region or config.default_s3_region})
    env.append({"name": "MFED_S3_PATH_STYLE", "value": "true" if s.path_style else "false"})
    if s.ca_config_map:
        env.append({"name": "AWS_CA_BUNDLE", "value": f"{CA_MOUNT}/{s.ca_config_map[1]}"})
    secret = s.secret_name or config.default_s3_secret
    if secret:
        env.append(
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": secret, "key": s.access_key_key}}}
        )
        env.append(
            {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": s.secret_key_key}}}
        )
    return env


def _job(
    name: str,
    namespace: str,
    labels: dict[str, str],
    pod_spec: dict[str, Any],
    r: RoundView,
    config: OperatorConfig,
    *,
    suspend: bool,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "backoffLimit": config.job_backoff_limit,
        # Exit code 2 means bad input: fail the Job at once instead of retrying it.
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]},
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]
        },
        "activeDeadlineSeconds": r.deadline_seconds or config.default_deadline_seconds,
        "suspend": suspend,
        # Pods do not carry the Kueue label: Kueue admits the Job, not its Pods.
        "template": {
            "metadata": {"labels": {k: v for k, v in labels.items() if k != KUEUE_QUEUE_LABEL}},
            "spec": pod_spec,
        },
    }
    if config.job_ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = config.job_ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec,
    }


def _pod_spec(container: dict[str, Any], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "restartPolicy": "Never",  # required by podFailurePolicy; the Job controller retries
        "automountServiceAccountToken": False,  # the trainer never talks to the API server
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }


def _container(
    image: str,
    config: OperatorConfig,
    env: list[dict[str, Any]],
    mounts: list[dict[str, Any]],
    resources: dict[str, Any],
) -> dict[str, Any]:
    return {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["mfed-trainer"],
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def _common_env(spec_json: str) -> list[dict[str, Any]]:
    return [
        {"name": "MFED_SPEC", "value": spec_json},
        {"name": "HOME", "value": TMP_MOUNT},
        {"name": "TMPDIR", "value": TMP_MOUNT},
    ]


def _common_volumes(r: RoundView) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": TMP_MOUNT}]
    if r.storage.ca_config_map:
        volumes.append({"name": "s3-ca", "configMap": {"name": r.storage.ca_config_map[0]}})
        mounts.append({"name": "s3-ca", "mountPath": CA_MOUNT, "readOnly": True})
    return volumes, mounts


def build_init_job(r: RoundView, spec: InitSpec, name: str, config: OperatorConfig) -> dict[str, Any]:
    """The Job that writes the round-0 global model (the operator has no torch)."""
    volumes, mounts = _common_volumes(r)
    env = _common_env(json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":")))
    env += storage_env(r, config)
    container = _container(
        config.trainer_image,
        config,
        env,
        mounts,
        {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    )
    labels = _labels(r, 0, COMPONENT_INIT)
    return _job(name, r.namespace, labels, _pod_spec(container, volumes), r, config, suspend=False)


def build_site_job(
    r: RoundView, site: SiteTaskView, spec: RoundSpec, name: str, config: OperatorConfig
) -> dict[str, Any]:
    """One site's training Job for one round."""
    volumes, mounts = _common_volumes(r)
    if site.data.kind is DataKind.PVC:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": site.data.claim_name, "readOnly": True}})
        mounts.append({"name": "data", "mountPath": PVC_MOUNT, "readOnly": True})
    env = _common_env(spec.to_json()) + storage_env(r, config)
    for var in site.env:
        if var.value is not None:
            env.append({"name": var.name, "value": var.value})
        elif var.secret is not None:
            env.append({"name": var.name, "valueFrom": {"secretKeyRef": {"name": var.secret[0], "key": var.secret[1]}}})
        elif var.config_map is not None:
            env.append(
                {
                    "name": var.name,
                    "valueFrom": {"configMapKeyRef": {"name": var.config_map[0], "key": var.config_map[1]}},
                }
            )
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if site.cpu:
        requests["cpu"] = site.cpu  # no CPU limit: throttling slows training for nothing
    if site.memory:
        requests["memory"] = limits["memory"] = site.memory
    if site.gpu:
        requests[site.gpu_resource] = limits[site.gpu_resource] = site.gpu
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    container = _container(site.image or config.trainer_image, config, env, mounts, resources)
    pod = _pod_spec(container, volumes)
    if site.service_account:
        pod["serviceAccountName"] = site.service_account
    if site.node_selector:
        pod["nodeSelector"] = dict(site.node_selector)
    if site.tolerations:
        pod["tolerations"] = [
            {
                k: v
                for k, v in (
                    ("key", t.key),
                    ("operator", t.operator),
                    ("value", t.value),
                    ("effect", t.effect),
                    ("tolerationSeconds", t.toleration_seconds),
                )
                if v is not None
            }
            for t in site.tolerations
        ]
    if site.affinity:
        pod["affinity"] = dict(site.affinity)
    if site.priority_class:
        pod["priorityClassName"] = site.priority_class
    if site.runtime_class:
        pod["runtimeClassName"] = site.runtime_class
    if site.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in site.image_pull_secrets]
    labels = _labels(r, spec.round, COMPONENT_SITE)
    labels[LABEL_SITE] = label_value(site.name)
    labels[LABEL_TASK] = label_value(site.task_name)
    queue = site.queue_name
    if queue:
        labels[KUEUE_QUEUE_LABEL] = queue
    # With a Kueue queue the Job starts suspended; Kueue un-suspends it on admission.
    return _job(name, r.namespace, labels, pod, r, config, suspend=bool(queue))
