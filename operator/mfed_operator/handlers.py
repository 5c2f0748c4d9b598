"""Thin kopf handlers: pick the kwargs, parse once, call the planner/executor, patch the status.

`register(registry, config)` attaches every handler with settings taken from the operator's
configuration (kopf decorators need e.g. the timer interval at registration time).
Typed domain/adaptor errors are mapped to kopf errors here and only here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from mfed.registry import discover_catalog, parse_declared
from mfed.resources.views import ResourceError, parse_sitetask
from mfed_operator.adapters.kube import Kube
from mfed_operator.config import OperatorConfig
from mfed_operator.domain.names import FEDERATIONROUNDS, GROUP, LABEL_MANAGED_BY, MANAGED_BY, SITETASKS, VERSION
from mfed_operator.domain.observations import JobObservation, observe_job
from mfed_operator.domain.phases import Phase
from mfed_operator.domain.status import clip, iso
from mfed_operator.executor import Executor
from mfed_operator.reconciler import Indexes, KubeUnavailableNow, needs_reconcile, now, reconcile_round
from mfed_operator.runtime import Runtime

log = logging.getLogger("mfed.operator")


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Attach all handlers to `registry`, configured by `config`."""

    @kopf.on.startup(registry=registry, id="startup")
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        # Our own finalizer and annotation names instead of kopf's defaults.
        settings.persistence.finalizer = f"{GROUP}/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        # Events are posted only for phase transitions (kopf.event), never from log lines.
        settings.posting.reporting_component = MANAGED_BY
        settings.posting.event_name_prefix = "mfed-"
        # The CRDs are installed before the operator (the chart does it), so no cluster-wide
        # list/watch of CRDs and namespaces is needed: that keeps the RBAC minimal.
        settings.scanning.disabled = True
        # Jobs: the API sends only ours (a server-side label selector on every list and watch),
        # so a cluster-wide operator does not stream every Job of the cluster. The index's
        # `labels=` filter stays as a second, client-side check.
        settings.watching.label_selectors["batch", "v1", "jobs"] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
        # Explicit network timeouts for kopf's own API calls (its default is 5 minutes).
        settings.networking.request_timeout = config.api_timeout_seconds
        settings.networking.connect_timeout = min(10.0, config.api_timeout_seconds)
        # Watches are restarted every 10 minutes so a silently dead connection is noticed.
        settings.watching.server_timeout = 600
        settings.watching.client_timeout = 660
        # Handlers give up after their own retries (kopf's default is to retry forever).
        settings.execution.max_workers = config.worker_threads
        runtime = Runtime(config=config, plugins=discover_catalog(parse_declared(config.plugins)))
        for kind, listing in sorted(runtime.plugins.listings.items()):
            extra = sorted(n for n, e in listing.entries.items() if not e.builtin)
            if extra or listing.conflicts:
                log.info("%s plugins: %s; name conflicts: %s", kind, ", ".join(extra), sorted(listing.conflicts))
        runtime.metrics.serve(config.metrics_port, config.metrics_host)
        runtime.executor = Executor(config, runtime.metrics, runtime.require_kube)
        memo.runtime = runtime

    @kopf.on.cleanup(registry=registry, id="cleanup")
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        runtime: Runtime = memo.runtime
        await runtime.wakeups.close()
        if runtime.executor is not None:
            runtime.executor.close()
        runtime.metrics.stop()

    @kopf.on.login(registry=registry, id="login", retries=5, backoff=2)
    def login(memo: kopf.Memo, logger: Any, **_: Any) -> kopf.ConnectionInfo:
        # kopf calls this at start and again whenever the API answers 401 (e.g. after the kubelet
        # rotated the ServiceAccount token): each call reads the credentials afresh and replaces
        # the operator's own client as well, so both use the same, current token.
        from mfed_operator.adapters.login import LoginError, connect

        runtime: Runtime = memo.runtime
        try:
            api_client, fields = connect(config.kubeconfig)
        except LoginError as exc:
            raise kopf.PermanentError(str(exc)) from None
        runtime.kube = Kube(api_client, config.api_timeout_seconds)
        info = kopf.ConnectionInfo(**fields)
        logger.info("logged in to %s", info.server)
        return info

    @kopf.on.probe(registry=registry, id="rounds")
    def probe_rounds(memo: kopf.Memo, **_: Any) -> int:
        runtime: Runtime = memo.runtime
        return int(sum(runtime.metrics.rounds.labels(p.value)._value.get() for p in Phase))

    # -- indexes: the observed world, kept current by kopf's watches (rebuilt after a restart)
    @kopf.index(GROUP, VERSION, SITETASKS, registry=registry, id="sitetasks_by_federation")
    def sitetasks_by_federation(
        namespace: str | None, spec: kopf.Spec, body: kopf.Body, **_: Any
    ) -> dict[tuple[str, str], dict[str, Any]]:
        return {
            (namespace or "", str(spec.get("federation", ""))): {"metadata": dict(body["metadata"]), "spec": dict(spec)}
        }

    @kopf.index("batch", "v1", "jobs", registry=registry, id="jobs_by_round", labels={LABEL_MANAGED_BY: MANAGED_BY})
    def jobs_by_round(namespace: str | None, body: kopf.Body, **_: Any) -> dict[tuple[str, str], JobObservation]:
        job = observe_job(body)
        return {(namespace or "", job.round or ""): job}

    @kopf.index(GROUP, VERSION, FEDERATIONROUNDS, registry=registry, id="rounds_by_federation")
    def rounds_by_federation(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
        return {(namespace or "", str(spec.get("federation", ""))): name}

    @kopf.index(GROUP, VERSION, FEDERATIONROUNDS, registry=registry, id="rounds_by_base")
    def rounds_by_base(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
        base = (spec.get("initialModel") or {}).get("fromRound")
        return {(namespace or "", str(base)): name} if base else {}

    def wake(runtime: Runtime, namespace: str, name: str, kwargs: dict[str, Any]) -> None:
        """Reconcile the round soon (coalesced), with the same code the timer runs."""
        indexes = Indexes.of(kwargs)

        async def run() -> bool:
            try:
                return await reconcile_round(runtime, namespace, name, indexes)
            except kopf.TemporaryError:  # not logged in yet: the timer comes back
                return False

        runtime.wakeups.wake((namespace, name), run)

    # -- events that wake a round at once (the timer below is only the safety net)
    @kopf.on.event("batch", "v1", "jobs", registry=registry, id="wake_on_job", labels={LABEL_MANAGED_BY: MANAGED_BY})
    async def wake_on_job(body: kopf.Body, namespace: str | None, memo: kopf.Memo, **kwargs: Any) -> None:
        job = observe_job(body)
        if job.round:
            wake(memo.runtime, namespace or "", job.round, kwargs)

    @kopf.on.event(GROUP, VERSION, SITETASKS, registry=registry, id="wake_on_sitetask")
    async def wake_on_sitetask(spec: kopf.Spec, namespace: str | None, memo: kopf.Memo, **kwargs: Any) -> None:
        federation = str(spec.get("federation", ""))
        for name in kwargs["rounds_by_federation"].get((namespace or "", federation), []):
            wake(memo.runtime, namespace or "", name, kwargs)

    @kopf.on.event(GROUP, VERSION, FEDERATIONROUNDS, registry=registry, id="track_round_phase")
    async def track_round_phase(
        event: kopf.RawEvent,
        namespace: str | None,
        name: str,
        spec: kopf.Spec,
        status: kopf.Status,
        memo: kopf.Memo,
        **kwargs: Any,
    ) -> None:
        runtime: Runtime = memo.runtime
        gone = event.get("type") == "DELETED"
        runtime.metrics.observe_round(namespace or "", name, None if gone else str(status.get("phase") or "Pending"))
        if gone:
            runtime.wakeups.forget((namespace or "", name))
            return
        # A round created or changed (also by our own status patch: the pass after a step is
        # what takes the next step), and the rounds that start from it once it has a model.
        if needs_reconcile(status, spec):
            wake(runtime, namespace or "", name, kwargs)
        if status.get("phase") in (Phase.SUCCEEDED.value, Phase.FAILED.value):
            for follower in kwargs["rounds_by_base"].get((namespace or "", name), []):
                wake(runtime, namespace or "", follower, kwargs)

    # -- SiteTask: validate the spec, say so in the Ready condition
    @kopf.on.resume(GROUP, VERSION, SITETASKS, registry=registry, id="validate_sitetask", retries=3, backoff=5)
    @kopf.on.create(GROUP, VERSION, SITETASKS, registry=registry, id="validate_sitetask", retries=3, backoff=5)
    @kopf.on.update(
        GROUP, VERSION, SITETASKS, registry=registry, id="validate_sitetask", retries=3, backoff=5, field="spec"
    )
    def validate_sitetask(
        body: Mapping[str, Any], meta: Mapping[str, Any], status: Mapping[str, Any], patch: kopf.Patch, **_: Any
    ) -> None:
        generation = int(meta.get("generation") or 0)
        try:
            parse_sitetask(body)
            ready, reason, message = True, "Valid", "the spec is valid; FederationRounds can select this site"
        except ResourceError as exc:
            ready, reason, message = False, "InvalidSpec", f"{exc}; fix the SiteTask's spec"
        stamp = iso(now())
        old = {c.get("type"): c for c in status.get("conditions") or []}

        def condition(type_: str, value: bool) -> dict[str, Any]:
            text = "True" if value else "False"
            since = old.get(type_, {}).get("lastTransitionTime") if old.get(type_, {}).get("status") == text else None
            return {
                "type": type_,
                "status": text,
                "reason": reason,
                "message": clip(message),
                "lastTransitionTime": since or stamp,
                "observedGeneration": generation,
            }

        patch.status["observedGeneration"] = generation
        patch.status["conditions"] = [condition("Ready", ready), condition("Degraded", not ready)]

    # -- FederationRound: the reconciler
    @kopf.timer(
        GROUP,
        VERSION,
        FEDERATIONROUNDS,
        registry=registry,
        id="reconcile_round",
        interval=config.resync_seconds,
        when=needs_reconcile,
        retries=None,
        backoff=config.api_retry_delay_seconds,
    )
    async def reconcile_round_on_timer(
        namespace: str | None, name: str, memo: kopf.Memo, logger: Any, **kwargs: Any
    ) -> None:
        runtime: Runtime = memo.runtime
        try:
            await reconcile_round(runtime, namespace or "", name, Indexes.of(kwargs))
        except KubeUnavailableNow as exc:
            raise kopf.TemporaryError(
                f"Kubernetes API unavailable: {exc}", delay=config.api_retry_delay_seconds
            ) from None


__all__ = ["Runtime", "register"]
