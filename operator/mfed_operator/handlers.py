"""Thin kopf handlers: pick the kwargs, parse once, call the planner/executor, patch the status.

`register(registry, config)` attaches every handler with settings taken from the operator's
configuration (kopf decorators need e.g. the timer interval at registration time).
Typed domain/adaptor errors are mapped to kopf errors here and only here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import kopf

from mfed.registry import Catalog, builtin_catalog, discover_catalog, parse_declared
from mfed_operator.adapters.kube import Kube
from mfed_operator.config import OperatorConfig
from mfed_operator.domain.actions import CreateJob, CreateRound
from mfed_operator.domain.method_settings import check_settings
from mfed_operator.domain.names import (
    API_VERSION,
    FEDERATIONROUNDS,
    GROUP,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    ROUND_KIND,
    SITETASKS,
    VERSION,
)
from mfed_operator.domain.observations import JobObservation, SecretCheck, observe_job, previous_round_view
from mfed_operator.domain.phases import Phase
from mfed_operator.domain.planner import Desired, Observed, apply_outcome, plan
from mfed_operator.domain.status import RoundStatus, clip, iso
from mfed_operator.domain.views import (
    InitialKind,
    ResourceError,
    RoundView,
    SiteTaskView,
    parse_round,
    parse_sitetask,
)
from mfed_operator.executor import Executor
from mfed_operator.metrics import Metrics

log = logging.getLogger("mfed.operator")


@dataclass
class Runtime:
    """Process-wide collaborators, created at startup; kopf passes them around in `memo`."""

    config: OperatorConfig
    # Plugin names from the installed distributions' entry-point metadata plus the declared ones
    # (MFED_OPERATOR_PLUGINS): read once, never imported (the operator image has no torch).
    plugins: Catalog = field(default_factory=builtin_catalog)
    metrics: Metrics = field(default_factory=Metrics)
    kube: Kube | None = None
    executor: Executor | None = None
    # The last phase announced (Event, transition metric) per round uid. kopf may run the timer
    # again before its watch has delivered our own status patch, on a stale status that makes the
    # same transition once more; every action is idempotent, the announcement must be too. After
    # a restart this is empty and the status read from the API is current.
    announced: dict[str, Phase] = field(default_factory=dict)
    # Per round uid: the resourceVersion a status change was computed from, and when. Until the
    # watch brings the round back with another version, the status kopf hands the timer is the
    # one before our own patch (kopf does not feed a timer its patch responses): planning on it
    # would repeat the last step (a second aggregation). Bounded, in case the patch was lost.
    patched_from: dict[str, tuple[str, float]] = field(default_factory=dict)

    def require_kube(self) -> Kube:
        if self.kube is None:
            raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
        return self.kube


def _now() -> datetime:
    return datetime.now(tz=UTC)


def needs_reconcile(status: Mapping[str, Any], spec: Mapping[str, Any], **_: Any) -> bool:
    """Whether a round still has work: not terminal, or terminal with reporting/chaining left."""
    phase = status.get("phase")
    if phase not in (Phase.SUCCEEDED.value, Phase.FAILED.value):
        return True
    if status.get("sites") and not status.get("siteTasksReported"):
        return True
    wants_next = phase == Phase.SUCCEEDED.value and int(spec.get("followUpRounds") or 0) > 0
    return wants_next and not status.get("nextRound")


def owner_stub(body: Mapping[str, Any]) -> dict[str, Any]:
    """The owner as kopf.adopt needs it, WITHOUT labels: kopf.adopt copies the owner's labels,
    and GitOps label tracking (app.kubernetes.io/instance) would then prune our children."""
    meta = body["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": ROUND_KIND,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
    }


def selected_sites(
    r: RoundView, candidates: Sequence[Mapping[str, Any]]
) -> tuple[tuple[SiteTaskView, ...], tuple[tuple[str, str], ...]]:
    """SiteTasks of the round's federation and namespace that match its selector (client-side)."""
    sites: list[SiteTaskView] = []
    invalid: list[tuple[str, str]] = []
    for body in sorted(candidates, key=lambda b: str(b["metadata"]["name"])):
        meta = body["metadata"]
        if meta.get("deletionTimestamp") or meta.get("namespace") != r.namespace:
            continue
        if not r.selector.matches(meta.get("labels") or {}):
            continue
        try:
            site = parse_sitetask(body)
        except ResourceError as exc:
            invalid.append((str(meta["name"]), str(exc)))
            continue
        if site.federation == r.federation:
            sites.append(site)
    return tuple(sites), tuple(invalid)


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

    @kopf.index(GROUP, VERSION, FEDERATIONROUNDS, registry=registry, id="rounds_by_name")
    def rounds_by_name(
        namespace: str | None, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any
    ) -> dict[tuple[str, str], dict[str, Any]]:
        return {(namespace or "", name): {"spec": dict(spec), "status": dict(status)}}

    @kopf.on.event(GROUP, VERSION, FEDERATIONROUNDS, registry=registry, id="track_round_phase")
    def track_round_phase(
        event: kopf.RawEvent,
        namespace: str | None,
        name: str,
        uid: str | None,
        status: kopf.Status,
        memo: kopf.Memo,
        **_: Any,
    ) -> None:
        runtime: Runtime = memo.runtime
        gone = event.get("type") == "DELETED"
        runtime.metrics.observe_round(namespace or "", name, None if gone else str(status.get("phase") or "Pending"))
        if gone:
            runtime.announced.pop(str(uid or ""), None)
            runtime.patched_from.pop(str(uid or ""), None)

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
        now = iso(_now())
        old = {c.get("type"): c for c in status.get("conditions") or []}

        def condition(type_: str, value: bool) -> dict[str, Any]:
            text = "True" if value else "False"
            since = old.get(type_, {}).get("lastTransitionTime") if old.get(type_, {}).get("status") == text else None
            return {
                "type": type_,
                "status": text,
                "reason": reason,
                "message": clip(message),
                "lastTransitionTime": since or now,
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
    async def reconcile_round(
        body: kopf.Body,
        meta: kopf.Meta,
        spec: kopf.Spec,
        status: kopf.Status,
        namespace: str | None,
        name: str,
        patch: kopf.Patch,
        memo: kopf.Memo,
        logger: Any,
        **indexes: Any,  # kopf passes each index under its handler id
    ) -> None:
        sitetasks_by_federation: kopf.Index[Any, Any] = indexes["sitetasks_by_federation"]
        jobs_by_round: kopf.Index[Any, Any] = indexes["jobs_by_round"]
        rounds_by_name: kopf.Index[Any, Any] = indexes["rounds_by_name"]
        runtime: Runtime = memo.runtime
        assert runtime.executor is not None
        runtime.require_kube()  # not logged in yet: a TemporaryError, kopf retries soon
        uid, version = str(meta.get("uid") or ""), str(meta.get("resourceVersion") or "")
        last = runtime.patched_from.get(uid)
        if last is not None and last[0] == version and time.monotonic() - last[1] < config.stale_status_seconds:
            return  # our last status change has not come back through the watch yet
        with runtime.metrics.reconcile_seconds.time():
            now = _now()
            generation = int(meta.get("generation") or 0)
            before = RoundStatus.parse(status)
            desired = _desired(body, spec, sitetasks_by_federation, config, runtime.plugins)
            observed = await _observed(
                desired,
                before,
                now,
                generation,
                runtime,
                jobs_by_round.get((namespace or "", name), []),
                rounds_by_name,
            )
            decision = plan(desired, observed)
            owner = owner_stub(body)
            for action in decision.actions:
                if isinstance(action, CreateJob | CreateRound):
                    kopf.adopt(action.manifest, owner=owner)  # type: ignore[arg-type]
            result = await runtime.executor.run(desired.round, decision.status, decision.actions)
            after = decision.status
            for outcome in result.outcomes:
                after = apply_outcome(after, outcome, desired, _now())
            rendered = after.render(generation, _now())
            patch.status.update(rendered)
            if any(status.get(key) != value for key, value in rendered.items()):
                runtime.patched_from[uid] = (version, time.monotonic())
            if after.phase is not before.phase and runtime.announced.get(uid) is not after.phase:
                runtime.announced[uid] = after.phase
                reason = after.headline.reason if after.headline else after.phase.value
                message = after.headline.message if after.headline else ""
                kind = "Warning" if after.phase is Phase.FAILED else "Normal"
                kopf.event(body, type=kind, reason=after.phase.value, message=f"{reason}: {message}")
                runtime.metrics.transitions.labels(after.phase.value, reason).inc()
                logger.info("phase %s -> %s (%s)", before.phase.value, after.phase.value, reason)
            if result.error is not None:
                runtime.metrics.reconcile_errors.labels("KubeUnavailable").inc()
                raise kopf.TemporaryError(
                    f"Kubernetes API unavailable: {result.error}", delay=config.api_retry_delay_seconds
                )


def _desired(
    body: Mapping[str, Any],
    spec: Mapping[str, Any],
    sitetasks: kopf.Index[Any, Any],
    config: OperatorConfig,
    plugins: Catalog,
) -> Desired:
    try:
        r = parse_round(body)
        check_settings(r)
    except ResourceError as exc:
        return Desired(round=None, spec_error=str(exc), raw_spec=dict(spec), config=config)
    candidates = [dict(b) for b in sitetasks.get((r.namespace, r.federation), [])]
    sites, invalid = selected_sites(r, candidates)
    return Desired(round=r, raw_spec=dict(spec), sites=sites, invalid_sites=invalid, config=config, plugins=plugins)


async def _observed(
    desired: Desired,
    status: RoundStatus,
    now: datetime,
    generation: int,
    runtime: Runtime,
    jobs: Any,
    rounds: kopf.Index[Any, Any],
) -> Observed:
    r = desired.round
    owned = {j.name: j for j in jobs if r is not None and (j.owner_uid in (None, r.uid))}
    secret: SecretCheck | None = None
    previous = None
    if r is not None and status.phase is Phase.PENDING:
        assert runtime.executor is not None
        secret = await runtime.executor.check_secret(r)
    if r is not None and r.initial.kind is InitialKind.FROM_ROUND and r.initial.from_round:
        found = list(rounds.get((r.namespace, r.initial.from_round), []))
        if found:
            prev_spec = found[0]["spec"]
            prev_root = parse_storage_root(prev_spec) or r.storage.root
            previous = previous_round_view(
                r.initial.from_round, found[0]["status"], prev_root, str(prev_spec.get("federation") or r.federation)
            )
    return Observed(now=now, generation=generation, status=status, jobs=owned, secret=secret, previous=previous)


def parse_storage_root(spec: Mapping[str, Any]) -> str | None:
    storage = spec.get("storage") or {}
    bucket = storage.get("bucket")
    if not bucket:
        return None
    prefix = storage.get("prefix")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


__all__ = ["Runtime", "needs_reconcile", "register", "replace"]
