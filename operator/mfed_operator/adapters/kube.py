"""The Kubernetes API calls the operator makes itself (kopf makes its own watch/patch calls).

Blocking `kubernetes` client calls, meant to run in a worker thread. Every call has an explicit
timeout and maps failures to typed errors: `Conflict` (409), `Gone` (404), `Refused` (the API
said no for good: 400/403/422) and `KubeUnavailable` (worth retrying: 429, 5xx, network).
The exact verbs and resources are listed in docs/operator-contract.md for the chart's RBAC.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mfed_operator.domain.names import FEDERATIONROUNDS, GROUP, SITETASKS, VERSION


class KubeError(Exception):
    """Base of the typed Kubernetes API errors."""


class Conflict(KubeError):
    """409: the object already exists."""


class Gone(KubeError):
    """404: the object (or its namespace) does not exist."""


class Refused(KubeError):
    """The API refused the request for good (invalid, forbidden)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class KubeUnavailable(KubeError):
    """The API could not answer now (throttled, server error, network); retry later."""


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str

    def __repr__(self) -> str:  # never print the values
        return "S3Credentials(<redacted>)"


def _error(exc: Exception) -> KubeError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        try:
            body = json.loads(exc.body or "{}")
        except (TypeError, ValueError):
            body = {}
        message = str(body.get("message") or exc.reason or "")[:500]
        reason = str(body.get("reason") or exc.reason or "")
        if status == 409:
            return Conflict(message)
        if status == 404:
            return Gone(message)
        if status in (400, 403, 422):
            return Refused(status, reason, message)
        return KubeUnavailable(f"{status} {reason}: {message}")
    return KubeUnavailable(f"{type(exc).__name__}: {exc}"[:300])


class Kube:
    """A thin, typed facade; `api_client` is a configured kubernetes.client.ApiClient."""

    def __init__(self, api_client: Any, timeout_seconds: float) -> None:
        from kubernetes import client

        self._timeout = (min(5.0, timeout_seconds), timeout_seconds)
        self._batch = client.BatchV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            response = fn(*args, _request_timeout=self._timeout, _preload_content=False, **kwargs)
        except Exception as exc:
            raise _error(exc) from None
        data = response.data
        return dict(json.loads(data)) if data else {}

    # -- batch/v1 jobs: create, get, delete
    def create_job(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        return self._call(self._batch.create_namespaced_job, manifest["metadata"]["namespace"], dict(manifest))

    def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call(self._batch.read_namespaced_job, name, namespace)

    def delete_job(self, namespace: str, name: str) -> None:
        with contextlib.suppress(Gone):  # already gone: what we wanted
            self._call(self._batch.delete_namespaced_job, name, namespace, propagation_policy="Background")

    # -- v1 secrets / configmaps: get
    def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        """Which keys a Secret has (None when it does not exist). Values are not kept."""
        try:
            body = self._call(self._core.read_namespaced_secret, name, namespace)
        except Gone:
            return None
        return set((body.get("data") or {}).keys()) | set((body.get("stringData") or {}).keys())

    def s3_credentials(self, namespace: str, name: str, access_key_key: str, secret_key_key: str) -> S3Credentials:
        body = self._call(self._core.read_namespaced_secret, name, namespace)
        data = body.get("data") or {}
        try:
            access = base64.b64decode(data[access_key_key]).decode()
            secret = base64.b64decode(data[secret_key_key]).decode()
        except (KeyError, ValueError):
            raise Refused(
                422, "SecretKeyMissing", f"Secret {name} lacks {access_key_key} or {secret_key_key}"
            ) from None
        return S3Credentials(access_key=access, secret_key=secret)

    def config_map_value(self, namespace: str, name: str, key: str) -> str:
        body = self._call(self._core.read_namespaced_config_map, name, namespace)
        value = (body.get("data") or {}).get(key)
        if value is None:
            raise Refused(422, "ConfigMapKeyMissing", f"ConfigMap {name} has no key {key}")
        return str(value)

    # -- mfed.dev: federationrounds create; sitetasks/status patch
    def create_round(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        return self._call(
            self._custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            manifest["metadata"]["namespace"],
            FEDERATIONROUNDS,
            dict(manifest),
        )

    def get_round(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The FederationRound as the API serves it now (None when it does not exist)."""
        try:
            return self._call(
                self._custom.get_namespaced_custom_object, GROUP, VERSION, namespace, FEDERATIONROUNDS, name
            )
        except Gone:
            return None

    def patch_round_status(self, namespace: str, name: str, planned_on: str, status: Mapping[str, Any]) -> None:
        """Merge-patch the round's status (None values remove fields), only if the round is still
        at resourceVersion `planned_on`: otherwise the API answers 409 (Conflict), so a status
        planned on an older round is never written over a newer one."""
        body = {"metadata": {"resourceVersion": planned_on}, "status": dict(status)}
        with contextlib.suppress(Gone):  # deleted meanwhile: nothing to report to
            self._call(
                self._custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                FEDERATIONROUNDS,
                name,
                body,
                _content_type="application/merge-patch+json",
            )

    def replace_sitetask_status_fields(self, namespace: str, name: str, fields: Mapping[str, Any]) -> None:
        """Replace each of `fields` in the SiteTask's status WHOLE, leaving its other fields alone.

        A merge patch would merge maps: `lastMetrics` would keep the keys of earlier rounds whose
        metrics are gone now. A JSON patch `add` of an object member replaces its value. It needs
        `/status` to exist; when it does not (nothing has written a status yet), there is nothing
        old to keep either, and a merge patch creates it."""
        ops = [{"op": "add", "path": f"/status/{key}", "value": value} for key, value in fields.items()]
        with contextlib.suppress(Gone):  # the SiteTask was deleted: nothing to report to
            try:
                self._patch_sitetask_status(namespace, name, ops, "application/json-patch+json")
            except Refused:
                self._patch_sitetask_status(namespace, name, {"status": dict(fields)}, "application/merge-patch+json")

    def _patch_sitetask_status(self, namespace: str, name: str, body: Any, content_type: str) -> None:
        self._call(
            self._custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            SITETASKS,
            name,
            body,
            _content_type=content_type,
        )
