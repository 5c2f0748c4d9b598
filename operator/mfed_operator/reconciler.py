"""One reconciliation of a FederationRound: read it fresh, plan, act, write its status.

The timer (the safety net, every MFED_OPERATOR_RESYNC_SECONDS) and the wake-ups after events
both call `reconcile_round`. It always plans on the round as the API serves it NOW (a GET under
the round's lock), never on the copy kopf cached when it scheduled the call: that copy may be
older than our own last status patch, and planning on it would repeat the last step (a second
aggregation, the same Event twice). The status patch carries the resourceVersion it was planned
on, so a change made in between (a user's edit) makes the API refuse it (409) and the round is
planned again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf

from mfed.registry import Catalog
from mfed.resources.method_settings import check_settings
from mfed.resources.views import InitialKind, ResourceError, RoundView, SiteTaskView, parse_round, parse_sitetask
from mfed_operator.adapters.kube import Conflict, KubeUnavailable
from mfed_operator.config import OperatorConfig
from mfed_operator.domain.actions import CreateJob, CreateRound
from mfed_operator.domain.names import API_VERSION, ROUND_KIND
from mfed_operator.domain.observations import SecretCheck, previous_round_view
from mfed_operator.domain.phases import Phase
from mfed_operator.domain.planner import Desired, Observed, apply_outcome, plan
from mfed_operator.domain.status import RoundStatus
from mfed_operator.runtime import Runtime

log = logging.getLogger("mfed.operator")


class KubeUnavailableNow(Exception):
    """The Kubernetes API failed mid-reconciliation; the caller retries later."""


@dataclass(frozen=True)
class Indexes:
    """kopf's in-memory indexes (kept current by its watches), as one value to pass around."""

    sitetasks_by_federation: kopf.Index[Any, Any]
    jobs_by_round: kopf.Index[Any, Any]

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Indexes:
        """From a handler's kwargs: kopf passes every index under its handler id."""
        return cls(kwargs["sitetasks_by_federation"], kwargs["jobs_by_round"])


def now() -> datetime:
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


async def reconcile_round(runtime: Runtime, namespace: str, name: str, indexes: Indexes) -> bool:
    """Reconcile one round; True when its status changed (the caller may want another pass).
    Raises KubeUnavailableNow when the API failed (nothing is lost: every action is idempotent)."""
    executor = runtime.require_executor()
    async with runtime.wakeups.lock((namespace, name)):
        try:
            body = await executor.read_round(namespace, name)
        except KubeUnavailable as exc:
            raise KubeUnavailableNow(str(exc)) from None
        if body is None or body["metadata"].get("deletionTimestamp"):
            runtime.wakeups.forget((namespace, name))
            return False
        spec, status = body.get("spec") or {}, body.get("status") or {}
        if not needs_reconcile(status, spec):
            return False
        with runtime.metrics.reconcile_seconds.time():
            generation = int(body["metadata"].get("generation") or 0)
            before = RoundStatus.parse(status)
            desired = _desired(body, spec, indexes.sitetasks_by_federation, runtime.config, runtime.plugins)
            observed = await _observed(
                desired,
                before,
                now(),
                generation,
                runtime,
                indexes.jobs_by_round.get((namespace, name), []),
            )
            decision = plan(desired, observed)
            owner = owner_stub(body)
            for action in decision.actions:
                if isinstance(action, CreateJob | CreateRound):
                    kopf.adopt(action.manifest, owner=owner)  # type: ignore[arg-type]
            result = await executor.run(desired.round, decision.status, decision.actions)
            after = decision.status
            for outcome in result.outcomes:
                after = apply_outcome(after, outcome, desired, now())
            rendered = after.render(generation, now())
            changed = any(status.get(key) != value for key, value in rendered.items())
            if changed:
                try:
                    await executor.write_round_status(namespace, name, body["metadata"]["resourceVersion"], rendered)
                except Conflict:
                    return True  # changed under us: plan again on what is there now
                except KubeUnavailable as exc:
                    raise KubeUnavailableNow(str(exc)) from None
            if after.phase is not before.phase:
                reason = after.headline.reason if after.headline else after.phase.value
                message = after.headline.message if after.headline else ""
                kind = "Warning" if after.phase is Phase.FAILED else "Normal"
                # the raw round from the API; kopf only reads its apiVersion, kind and metadata
                kopf.event(body, type=kind, reason=after.phase.value, message=f"{reason}: {message}")  # type: ignore[arg-type]
                runtime.metrics.transitions.labels(after.phase.value, reason).inc()
                log.info("%s/%s: phase %s -> %s (%s)", namespace, name, before.phase.value, after.phase.value, reason)
            if result.error is not None:
                runtime.metrics.reconcile_errors.labels("KubeUnavailable").inc()
                raise KubeUnavailableNow(str(result.error))
            return changed


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
) -> Observed:
    r = desired.round
    owned = {j.name: j for j in jobs if r is not None and (j.owner_uid in (None, r.uid))}
    secret: SecretCheck | None = None
    previous = None
    if r is not None and status.phase is Phase.PENDING:
        secret = await runtime.require_executor().check_secret(r)
    # Only a Pending round needs the round it starts from (its model, decoders, number); after
    # that the status holds what it took, so later passes skip the extra read.
    needs_previous = status.phase is Phase.PENDING or status.round is None
    if r is not None and needs_previous and r.initial.kind is InitialKind.FROM_ROUND and r.initial.from_round:
        # Read fresh, like the round itself: kopf's cached copy may not show yet that the round
        # this one starts from has just succeeded (its patch and this wake-up race).
        found = await runtime.require_executor().read_round(r.namespace, r.initial.from_round)
        if found is not None:
            prev_spec = found.get("spec") or {}
            prev_root = parse_storage_root(prev_spec) or r.storage.root
            previous = previous_round_view(
                r.initial.from_round,
                found.get("status") or {},
                prev_root,
                str(prev_spec.get("federation") or r.federation),
            )
    return Observed(now=now, generation=generation, status=status, jobs=owned, secret=secret, previous=previous)


def parse_storage_root(spec: Mapping[str, Any]) -> str | None:
    storage = spec.get("storage") or {}
    bucket = storage.get("bucket")
    if not bucket:
        return None
    prefix = storage.get("prefix")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
