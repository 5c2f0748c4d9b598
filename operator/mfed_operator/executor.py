"""Performs a plan's actions through the adapters, off the event loop, and reports outcomes.

Blocking work (the Kubernetes client, S3, aggregation) runs in a bounded thread pool. A storage
outage becomes a StorageFailed outcome (the planner retries with backoff and a limit); an
unavailable Kubernetes API stops the run and is returned so the handler can ask kopf to retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mfed.model_store import GlobalModelError
from mfed.resources.views import RoundView
from mfed.storage import S3Settings, Storage, StorageError
from mfed_operator.adapters.dataplane import (
    BaseModelCache,
    CountingStorage,
    aggregate_round,
    inspect_base,
    read_failure,
    verify_site,
)
from mfed_operator.adapters.kube import Conflict, Gone, Kube, KubeUnavailable, Refused, S3Credentials
from mfed_operator.config import OperatorConfig
from mfed_operator.domain.actions import (
    S3_ACTIONS,
    Action,
    Aggregate,
    Aggregated,
    BaseInspected,
    BaseUnusable,
    CreateJob,
    CreateRound,
    DeleteJob,
    InspectBase,
    JobCreated,
    JobDeleted,
    JobRefused,
    Outcome,
    ReadFailure,
    ReportSiteTasks,
    RoundCreated,
    SiteRejected,
    SiteTasksReported,
    SiteVerified,
    StorageFailed,
    VerifySite,
)
from mfed_operator.domain.names import LABEL_ROUND, LABEL_SITE, label_value
from mfed_operator.domain.observations import SecretCheck
from mfed_operator.domain.status import RoundStatus, bounded_metrics
from mfed_operator.metrics import Metrics

T = TypeVar("T")


@dataclass
class RunResult:
    outcomes: list[Outcome] = field(default_factory=list)
    error: Exception | None = None  # a Kubernetes API outage: retry the reconciliation later


class Executor:
    def __init__(self, config: OperatorConfig, metrics: Metrics, kube: Callable[[], Kube]) -> None:
        self._config = config
        self._metrics = metrics
        self._kube = kube
        self._pool = ThreadPoolExecutor(max_workers=config.worker_threads, thread_name_prefix="mfed-io")
        self._bases = BaseModelCache()
        self._ca_dir = tempfile.mkdtemp(prefix="mfed-operator-ca-")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def read_round(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._io(self._kube().get_round, namespace, name)

    async def write_round_status(self, namespace: str, name: str, planned_on: str, status: Mapping[str, Any]) -> None:
        await self._io(self._kube().patch_round_status, namespace, name, planned_on, status)

    async def check_secret(self, r: RoundView) -> SecretCheck | None:
        """Whether the round's S3 credentials Secret exists with the keys it names (values unread).
        None when the round names no Secret and the operator has no default one."""
        name = r.storage.secret_name or self._config.default_s3_secret
        if not name:
            return None
        try:
            keys = await self._io(self._kube().secret_keys, r.namespace, name)
        except Refused as exc:
            if exc.status != 403:
                raise
            # Least privilege: the chart grants Secrets by name (rbac.secretNames); say which to add.
            return SecretCheck(name=name, exists=False, forbidden=True)
        wanted = (r.storage.access_key_key, r.storage.secret_key_key)
        return SecretCheck(
            name=name,
            exists=keys is not None,
            missing_keys=tuple(k for k in wanted if keys is not None and k not in keys),
        )

    async def run(self, r: RoundView | None, status: RoundStatus, actions: Sequence[Action]) -> RunResult:
        result = RunResult()
        storage: CountingStorage | None = None
        storage_down = False
        for action in actions:
            try:
                if isinstance(action, S3_ACTIONS):
                    if storage_down or r is None:
                        continue
                    if storage is None:
                        made = await self._storage(r)
                        if isinstance(made, StorageFailed):
                            storage_down = True
                            self._metrics.storage_errors.labels(made.operation).inc()
                            result.outcomes.append(made)
                            continue
                        storage = made
                    outcome = await self._s3(storage, status, action)
                    if isinstance(outcome, StorageFailed):
                        storage_down = True
                        self._metrics.storage_errors.labels(outcome.operation).inc()
                    result.outcomes.append(outcome)
                else:
                    result.outcomes.append(await self._kube_action(r, action))
            except KubeUnavailable as exc:
                result.error = exc
                break
        if storage is not None:
            self._metrics.bytes_moved.labels("read").inc(storage.read_bytes)
            self._metrics.bytes_moved.labels("write").inc(storage.written_bytes)
        return result

    # -- Kubernetes actions
    async def _kube_action(self, r: RoundView | None, action: Action) -> Outcome:
        kube = self._kube()
        if isinstance(action, CreateJob):
            try:
                await self._io(kube.create_job, action.manifest)
            except Conflict:
                return await self._existing_job(kube, r, action)
            except Refused as exc:
                return JobRefused(
                    site=action.site,
                    name=action.name,
                    reason="JobRejected",
                    message=f"the API refused Job {action.name}: {exc.message}",
                )
            self._metrics.jobs_created.labels("init" if action.site is None else "site").inc()
            return JobCreated(site=action.site, name=action.name)
        if isinstance(action, DeleteJob):
            await self._io(kube.delete_job, r.namespace if r else "", action.name)
            return JobDeleted(name=action.name)
        if isinstance(action, CreateRound):
            try:
                await self._io(kube.create_round, action.manifest)
            except Conflict:
                return RoundCreated(name=action.name, already_existed=True)
            return RoundCreated(name=action.name)
        if isinstance(action, ReportSiteTasks):
            assert r is not None
            bodies: list[tuple[str, dict[str, Any]]] = []
            for report in action.reports:
                last_round = {
                    "name": action.round_name,
                    "round": action.round_number,
                    "result": report.result,
                    "reason": report.reason,
                    "message": report.message if report.result != "Accepted" else None,
                    "completedAt": action.completed_at,
                }
                # Each field is replaced whole: a round's metrics replace the last ones, never merge.
                body: dict[str, Any] = {"lastRound": {k: v for k, v in last_round.items() if v is not None}}
                if report.result == "Accepted":
                    body["lastMetrics"] = bounded_metrics(report.metrics)
                    body["samples"] = report.samples
                bodies.append((report.sitetask, body))
            # Independent patches, as many at once as the pool has threads (one each would take
            # seconds at a hundred sites).
            await asyncio.gather(
                *(self._io(kube.replace_sitetask_status_fields, r.namespace, site, body) for site, body in bodies)
            )
            return SiteTasksReported(count=len(action.reports))
        raise TypeError(f"not a Kubernetes action: {action!r}")

    async def _existing_job(self, kube: Kube, r: RoundView | None, action: CreateJob) -> Outcome:
        """A 409: fine if the Job is ours (same round and site), a conflict otherwise."""
        namespace = action.manifest["metadata"]["namespace"]
        try:
            body = await self._io(kube.get_job, namespace, action.name)
        except Gone:  # deleted between our create and get: the next reconciliation creates it
            return JobCreated(site=action.site, name=action.name, already_existed=True)
        labels = (body.get("metadata") or {}).get("labels") or {}
        owners = [o.get("uid") for o in (body.get("metadata") or {}).get("ownerReferences") or []]
        ours = (
            r is not None
            and labels.get(LABEL_ROUND) == label_value(r.name)
            and labels.get(LABEL_SITE) == (label_value(action.site) if action.site else None)
            and (not r.uid or r.uid in owners)
        )
        if ours:
            return JobCreated(site=action.site, name=action.name, already_existed=True)
        return JobRefused(
            site=action.site,
            name=action.name,
            reason="JobNameConflict",
            message=f"a Job named {action.name} already exists and does not belong to this "
            "round and site; delete it or rename the SiteTask",
        )

    # -- S3 actions
    async def _storage(self, r: RoundView) -> CountingStorage | StorageFailed:
        kube = self._kube()
        s = r.storage
        secret = s.secret_name or self._config.default_s3_secret
        creds: S3Credentials | None = None
        ca_path: str | None = None
        try:
            if secret:
                creds = await self._io(kube.s3_credentials, r.namespace, secret, s.access_key_key, s.secret_key_key)
            if s.ca_config_map:
                pem = await self._io(kube.config_map_value, r.namespace, *s.ca_config_map)
                ca_path = self._write_ca(pem)
        except Gone as exc:
            return StorageFailed(operation="ReadCredentials", message=f"not found: {exc}")
        except Refused as exc:
            return StorageFailed(operation="ReadCredentials", message=exc.message)
        settings = S3Settings(
            endpoint=s.endpoint or self._config.default_s3_endpoint,
            region=s.region or self._config.default_s3_region,
            path_style=s.path_style,
            ca_bundle=ca_path,
            access_key=creds.access_key if creds else None,
            secret_key=creds.secret_key if creds else None,
            connect_timeout_s=self._config.s3_connect_timeout_seconds,
            read_timeout_s=self._config.s3_read_timeout_seconds,
            max_attempts=self._config.s3_max_attempts,
        )
        return CountingStorage(Storage(settings))

    def _write_ca(self, pem: str) -> str:
        path = os.path.join(self._ca_dir, hashlib.sha256(pem.encode()).hexdigest()[:16] + ".pem")
        if not os.path.exists(path):
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(pem)
        return path

    async def _s3(self, storage: CountingStorage, status: RoundStatus, action: Action) -> Outcome:
        try:
            if isinstance(action, InspectBase):
                return BaseInspected(base=await self._io(inspect_base, storage, action.uri, action.privacy))
            if isinstance(action, VerifySite):
                base = await self._io(self._bases.get, storage, status.base_uri or "", status.base_sha256 or "")
                outcome = await self._io(verify_site, storage, base, status.round or 1, action.site, action.prefix)
                if isinstance(outcome, SiteVerified):
                    self._metrics.contributions.labels("accepted", "").inc()
                    seconds = outcome.metrics.get("train_seconds")
                    record = status.site(action.site)
                    if seconds is not None and record is not None:
                        self._metrics.site_training_seconds.labels(record.task).observe(seconds)
                elif isinstance(outcome, SiteRejected):
                    self._metrics.contributions.labels("rejected", outcome.reason).inc()
                return outcome
            if isinstance(action, ReadFailure):
                return await self._io(read_failure, storage, action.site, action.prefix)
            if isinstance(action, Aggregate):
                base = await self._io(self._bases.get, storage, action.base_uri, status.base_sha256 or "")
                aggregated = await self._io(aggregate_round, storage, base, action)
                if isinstance(aggregated, Aggregated):
                    self._metrics.aggregation_seconds.observe(aggregated.seconds)
                return aggregated
        except StorageError as exc:
            return StorageFailed(operation=type(action).__name__, message=str(exc))
        except GlobalModelError as exc:
            return BaseUnusable(uri=status.base_uri or "", message=str(exc))
        raise TypeError(f"not a storage action: {action!r}")
