"""Decide, then act: `plan(desired, observed)` returns the next status and the actions to take.

Pure: no I/O, no clock (the time is observed), no kopf. The executor performs the actions and
`apply_outcome` folds each result into the status, so every step is reproducible in a table
test. Everything the next reconciliation needs is in the returned status (or in S3), which is
what makes the operator restart-safe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from mfed.artifacts.layout import join
from mfed.registry import Catalog, builtin_catalog
from mfed.resources.method_settings import (
    aggregation_settings,
    global_output,
    init_output,
    init_spec,
    round_spec,
    site_output,
)
from mfed.resources.views import InitialKind, RoundView, SiteTaskView
from mfed_operator.config import OperatorConfig
from mfed_operator.domain.actions import (
    Action,
    Aggregate,
    Aggregated,
    AggregationImpossible,
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
    SiteFailureRead,
    SiteRejected,
    SiteReport,
    SiteTasksReported,
    SiteVerified,
    StorageFailed,
    VerifySite,
)
from mfed_operator.domain.chain import build_next_round
from mfed_operator.domain.jobs import build_init_job, build_site_job
from mfed_operator.domain.names import init_job_name, site_job_name
from mfed_operator.domain.observations import JobObservation, JobState, PreviousRound, SecretCheck
from mfed_operator.domain.phases import Phase, SitePhase, check_transition
from mfed_operator.domain.status import Headline, Retry, RoundStatus, SiteRecord, bounded_metrics, clip, iso, parse_time
from mfed_operator.domain.validation import Severity, check_base, validate_selection

# A failed site whose trainer said why it refused its input (FAILURE_FILE): the reason in its status.
BAD_INPUT = "BadInput"


@dataclass(frozen=True, kw_only=True)
class Desired:
    """What the user asked for: the round (None when its spec is invalid) and the selected sites."""

    round: RoundView | None
    spec_error: str | None = None
    raw_spec: Mapping[str, object] = field(default_factory=dict)
    sites: tuple[SiteTaskView, ...] = ()
    invalid_sites: tuple[tuple[str, str], ...] = ()
    config: OperatorConfig = field(default_factory=OperatorConfig)
    plugins: Catalog = field(default_factory=builtin_catalog)  # the names the round may use


@dataclass(frozen=True, kw_only=True)
class Observed:
    now: datetime
    generation: int
    status: RoundStatus
    jobs: Mapping[str, JobObservation] = field(default_factory=dict)  # by Job name, this round's only
    secret: SecretCheck | None = None
    previous: PreviousRound | None = None


@dataclass(frozen=True, kw_only=True)
class Decision:
    status: RoundStatus
    actions: tuple[Action, ...] = ()


# ---------------------------------------------------------------- helpers


def round_number(desired: Desired, observed: Observed) -> int:
    r = desired.round
    assert r is not None
    if r.round is not None:
        return r.round
    if r.initial.kind is InitialKind.FROM_ROUND and observed.previous and observed.previous.round:
        return observed.previous.round + 1
    return 1


def min_sites(r: RoundView, status: RoundStatus) -> int:
    return r.min_sites if r.min_sites is not None else max(1, len(status.sites))


def deadline(r: RoundView, status: RoundStatus, config: OperatorConfig) -> datetime | None:
    started = parse_time(status.training_started_at)
    if started is None:
        return None
    return started + timedelta(seconds=r.deadline_seconds or config.default_deadline_seconds)


def storage_ready(status: RoundStatus, now: datetime) -> bool:
    if status.retry is None:
        return True
    next_at = parse_time(status.retry.next_attempt_at)
    return next_at is None or next_at <= now


def transition(
    status: RoundStatus, phase: Phase, reason: str, message: str, now: datetime, *, degraded: bool = False
) -> RoundStatus:
    check_transition(status.phase, phase)
    completed_at = iso(now) if phase.terminal and status.completed_at is None else status.completed_at
    aggregation_started_at = iso(now) if phase is Phase.AGGREGATING else status.aggregation_started_at
    return replace(
        status,
        phase=phase,
        headline=Headline(reason=reason, message=clip(message), degraded=degraded),
        retry=None if phase.terminal else status.retry,
        completed_at=completed_at,
        aggregation_started_at=aggregation_started_at,
    )


def headline(status: RoundStatus, reason: str, message: str, *, degraded: bool = False) -> RoundStatus:
    return replace(status, headline=Headline(reason=reason, message=clip(message), degraded=degraded))


def fail(status: RoundStatus, reason: str, message: str, now: datetime) -> RoundStatus:
    return transition(status, Phase.FAILED, reason, message, now)


def _site_view(desired: Desired, name: str) -> SiteTaskView | None:
    return next((s for s in desired.sites if s.name == name), None)


# ---------------------------------------------------------------- plan


def plan(desired: Desired, observed: Observed) -> Decision:
    now, status = observed.now, observed.status
    if status.pending_since is None:
        status = replace(status, pending_since=iso(now))
    r = desired.round
    if r is None:
        if status.phase.terminal:
            return Decision(status=status)
        failed = fail(status, "InvalidSpec", f"{desired.spec_error}; fix the FederationRound's spec", now)
        return _terminal(desired, observed, failed)
    if status.round is None or status.phase is Phase.PENDING:
        # decided while Pending (from the round it starts from), then kept: later passes do not
        # read the previous round at all
        status = replace(status, round=round_number(desired, observed))
    if status.spec_digest is None or status.phase is Phase.PENDING:
        status = replace(status, spec_digest=r.digest)
    elif status.spec_digest != r.digest and not status.phase.terminal:
        status = fail(
            status,
            "SpecChanged",
            "the spec changed while the round was running (only "
            "spec.aggregation.minSites/deadlineSeconds and followUpRounds may change); "
            "restore it, or create a new FederationRound",
            now,
        )
    if status.phase is Phase.PENDING:
        return _pending(desired, observed, status)
    if status.phase is Phase.TRAINING:
        return _training(desired, observed, status)
    if status.phase is Phase.AGGREGATING:
        return _aggregating(desired, observed, status)
    return _terminal(desired, observed, status)


def _pending(desired: Desired, observed: Observed, status: RoundStatus) -> Decision:
    r, now, config = desired.round, observed.now, desired.config
    assert r is not None
    problems = validate_selection(
        r,
        desired.sites,
        desired.invalid_sites,
        observed.secret,
        observed.previous,
        config.max_sites_per_round,
        desired.plugins,
    )
    hard = [p for p in problems if p.severity is Severity.HARD]
    if hard:
        return _terminal(desired, observed, fail(status, hard[0].reason, hard[0].message, now))
    if problems:
        first = problems[0]
        since = parse_time(status.pending_since) or now
        waited = (now - since).total_seconds()
        waitable = [p for p in problems if p.severity is Severity.WAITABLE]
        if waitable and waited >= config.validation_grace_seconds:
            p = waitable[0]
            message = f"{p.message} (still true after waiting {int(waited)}s)"
            return _terminal(desired, observed, fail(status, p.reason, message, now))
        return Decision(status=headline(status, first.reason, f"waiting: {first.message}"))

    actions: list[Action] = []
    if r.initial.kind is InitialKind.SEED:
        base_uri = init_output(r)
        if status.base_sha256 is None:
            name = init_job_name(r.name)
            job = observed.jobs.get(name)
            status = replace(status, init_job=name, base_uri=base_uri)
            if job is None:
                manifest = build_init_job(r, init_spec(r, desired.sites), name, config)
                return Decision(
                    status=headline(status, "Initializing", f"creating Job {name} to write the initial model"),
                    actions=(CreateJob(site=None, manifest=manifest),),
                )
            if job.state is JobState.FAILED:
                message = f"the init Job {name} failed ({job.reason}: {job.message}); see `kubectl logs job/{name}`"
                return _terminal(desired, observed, fail(status, "InitFailed", message, now))
            if job.state is not JobState.SUCCEEDED:
                return Decision(status=headline(status, "Initializing", f"Job {name} is writing the initial model"))
            if storage_ready(status, now):
                actions.append(InspectBase(uri=base_uri, privacy=r.privacy))
            return Decision(
                status=headline(status, "Initializing", "checking the initial model"), actions=tuple(actions)
            )
    else:
        base_uri = (
            observed.previous.global_uri
            if r.initial.kind is InitialKind.FROM_ROUND and observed.previous
            else r.initial.uri
        ) or ""
        if status.base_sha256 is None:
            status = replace(status, base_uri=base_uri)
            if storage_ready(status, now):
                actions.append(InspectBase(uri=base_uri, privacy=r.privacy))
            return Decision(
                status=headline(status, "CheckingBaseModel", f"reading the initial model at {base_uri}"),
                actions=tuple(actions),
            )

    # Everything checked: select the sites for good and create their Jobs.
    assert status.base_uri is not None
    number = status.round or 1
    previous_decoders = observed.previous.decoders if observed.previous else {}
    records = []
    for site in sorted(desired.sites, key=lambda s: s.name):
        name = site_job_name(r.name, site.name)
        previous_decoder = previous_decoders.get(site.name)
        spec = round_spec(r, site, number, status.base_uri, previous_decoder)
        actions.append(CreateJob(site=site.name, manifest=build_site_job(r, site, spec, name, config)))
        records.append(SiteRecord(site=site.name, task=site.task_name, job=name, previous_decoder=previous_decoder))
    status = replace(status, sites=tuple(records), training_started_at=iso(now))
    due = deadline(r, status, config)
    status = replace(status, deadline_at=iso(due) if due else None)
    status = transition(status, Phase.TRAINING, "Training", f"{len(records)} site Jobs created", now)
    return Decision(status=status, actions=tuple(actions))


def _site_from_job(record: SiteRecord, job: JobObservation | None, now: datetime) -> SiteRecord:
    if job is None:
        return record
    if job.state is JobState.SUSPENDED:
        return replace(record, phase=SitePhase.QUEUED)
    if job.state in (JobState.WAITING, JobState.RUNNING):
        return replace(record, phase=SitePhase.RUNNING)
    if job.state is JobState.SUCCEEDED:
        return replace(record, phase=SitePhase.UPLOADED)
    return replace(record, phase=SitePhase.FAILED, reason=job.reason, message=job.message, finished_at=iso(now))


def _training(desired: Desired, observed: Observed, status: RoundStatus) -> Decision:
    r, now, config = desired.round, observed.now, desired.config
    assert r is not None
    actions: list[Action] = []
    due = deadline(r, status, config)
    status = replace(status, deadline_at=iso(due) if due else None)
    past_deadline = due is not None and now >= due
    can_read = storage_ready(status, now)
    for record in status.sites:
        if record.phase.final:
            continue
        job = observed.jobs.get(record.job or "")
        updated = _site_from_job(record, job, now)
        if job is None and record.phase is not SitePhase.UPLOADED and not past_deadline:
            # Not in the watch cache yet, or deleted by someone: create again (a 409 is fine).
            site = _site_view(desired, record.site)
            if site is None:
                updated = replace(
                    record,
                    phase=SitePhase.FAILED,
                    reason="SiteTaskDeleted",
                    message="the SiteTask was deleted before its Job could be recreated",
                    finished_at=iso(now),
                )
            elif record.job:
                spec = round_spec(r, site, status.round or 1, status.base_uri or "", record.previous_decoder)
                actions.append(CreateJob(site=site.name, manifest=build_site_job(r, site, spec, record.job, config)))
        if past_deadline and not updated.phase.final and updated.phase is not SitePhase.UPLOADED:
            seconds = r.deadline_seconds or config.default_deadline_seconds
            updated = replace(
                updated,
                phase=SitePhase.STRAGGLER,
                reason="DeadlineExceeded",
                message=f"not finished within the round's deadline of {seconds}s; its Job was deleted",
                finished_at=iso(now),
            )
            if job is not None:
                actions.append(DeleteJob(name=job.name, site=record.site, reason="Straggler"))
        if updated.phase is SitePhase.UPLOADED and can_read:
            actions.append(VerifySite(site=record.site, prefix=site_output(r, record.site)))
        if updated.phase is SitePhase.FAILED and job is not None and job.state is JobState.FAILED and can_read:
            # once, as the failure is seen: the trainer may have said why (bad data names the file)
            actions.append(ReadFailure(site=record.site, prefix=site_output(r, record.site)))
        status = status.with_site(updated)

    open_sites = [s for s in status.sites if not s.phase.final]
    accepted = status.sites_in(SitePhase.ACCEPTED)
    quorum = min_sites(r, status)
    if not open_sites:
        if len(accepted) >= quorum:
            status = transition(
                status,
                Phase.AGGREGATING,
                "Aggregating",
                f"{len(accepted)} of {len(status.sites)} sites contributed; aggregating",
                now,
            )
        else:
            status = fail(status, "QuorumNotMet", _quorum_message(status, quorum), now)
            return _terminal(desired, observed, status, list(actions))
    elif status.retry is not None:
        status = headline(status, "StorageUnavailable", status.retry.message, degraded=True)
    else:
        done = len(status.sites) - len(open_sites)
        status = headline(
            status,
            "Training",
            f"{done}/{len(status.sites)} sites finished, {len(accepted)} "
            f"accepted (quorum {quorum}); deadline {status.deadline_at}",
        )
    return Decision(status=status, actions=tuple(actions))


def _quorum_message(status: RoundStatus, quorum: int) -> str:
    accepted = len(status.sites_in(SitePhase.ACCEPTED))
    others = ", ".join(
        f"{s.site} ({s.phase.value}: {s.reason})" for s in status.sites if s.phase is not SitePhase.ACCEPTED
    )
    return (
        f"only {accepted} of {len(status.sites)} sites contributed a valid update, quorum "
        f"(spec.aggregation.minSites) is {quorum}: {others}"
    )


def _aggregating(desired: Desired, observed: Observed, status: RoundStatus) -> Decision:
    r, now = desired.round, observed.now
    assert r is not None
    if not storage_ready(status, now):
        return Decision(status=status)
    sites = tuple(sorted(s.site for s in status.sites_in(SitePhase.ACCEPTED)))
    action = Aggregate(
        sites=sites,
        site_prefixes={s: site_output(r, s) for s in sites},
        base_uri=status.base_uri or "",
        output=global_output(r),
        round_number=status.round or 1,
        min_sites=min_sites(r, status),
        settings=aggregation_settings(r),
    )
    return Decision(status=status, actions=(action,))


def _terminal(
    desired: Desired, observed: Observed, status: RoundStatus, actions: list[Action] | None = None
) -> Decision:
    """Succeeded/Failed: no Job of this round keeps running; report to the SiteTasks; chain on."""
    out: list[Action] = list(actions or [])
    now = observed.now
    deleting = {a.name for a in out if isinstance(a, DeleteJob)}
    for record in status.sites:
        if not record.phase.final:
            status = status.with_site(
                replace(
                    record,
                    phase=SitePhase.CANCELLED,
                    reason="RoundEnded",
                    message=f"the round {status.phase.value.lower()} first",
                    finished_at=iso(now),
                )
            )
    for job in observed.jobs.values():
        if job.state in (JobState.WAITING, JobState.RUNNING, JobState.SUSPENDED) and job.name not in deleting:
            out.append(DeleteJob(name=job.name, site=job.site, reason="RoundEnded"))
    r = desired.round
    # The next round first: its sites start training while this round's reports are written
    # (one SiteTask status patch each: at a hundred sites, seconds the GPUs would otherwise idle).
    if (
        r is not None
        and status.phase is Phase.SUCCEEDED
        and r.follow_up_rounds > 0
        and status.next_round is None
        and status.global_uri
    ):
        out.append(CreateRound(manifest=build_next_round(r, desired.raw_spec, status.round or 1)))
    if r is not None and not status.sitetasks_reported and status.sites and status.completed_at:
        out.append(
            ReportSiteTasks(
                round_name=r.name,
                round_number=status.round or 1,
                completed_at=status.completed_at,
                reports=tuple(
                    SiteReport(
                        sitetask=s.site,
                        result=s.phase.value,
                        reason=s.reason,
                        message=s.message,
                        metrics=s.metrics,
                        samples=s.samples,
                    )
                    for s in status.sites
                ),
            )
        )
    return Decision(status=status, actions=tuple(out))


# ---------------------------------------------------------------- outcomes


def apply_outcome(status: RoundStatus, outcome: Outcome, desired: Desired, now: datetime) -> RoundStatus:
    """Fold the result of one action into the status (pure)."""
    r, config = desired.round, desired.config
    if isinstance(outcome, StorageFailed):
        return _storage_failed(status, outcome, config, now)
    if isinstance(outcome, (BaseInspected, SiteVerified, SiteRejected, Aggregated)):
        status = replace(status, retry=None)
        if status.headline and status.headline.reason == "StorageUnavailable":
            status = headline(status, status.phase.value, "storage is reachable again")
    if isinstance(outcome, JobCreated | JobDeleted | RoundCreated | SiteTasksReported):
        if isinstance(outcome, RoundCreated):
            return replace(status, next_round=outcome.name)
        if isinstance(outcome, SiteTasksReported):
            return replace(status, sitetasks_reported=True)
        return status
    if isinstance(outcome, JobRefused):
        if outcome.site is None:
            return fail(status, outcome.reason, outcome.message, now) if not status.phase.terminal else status
        record = status.site(outcome.site)
        if record is None or record.phase.final:
            return status
        return status.with_site(
            replace(
                record,
                phase=SitePhase.FAILED,
                reason=outcome.reason,
                message=clip(outcome.message),
                finished_at=iso(now),
            )
        )
    if isinstance(outcome, BaseUnusable):
        return fail(status, "BaseModelUnusable", f"{outcome.message}; check spec.initialModel", now)
    if isinstance(outcome, BaseInspected):
        assert r is not None
        problems = check_base(outcome.base, r, desired.sites)
        if problems:
            return fail(status, problems[0].reason, problems[0].message, now)
        return headline(
            replace(status, base_uri=outcome.base.uri, base_sha256=outcome.base.sha256),
            "BaseModelReady",
            f"initial model {outcome.base.sha256[:12]} checked",
        )
    if isinstance(outcome, SiteVerified):
        record = status.site(outcome.site)
        if record is None:
            return status
        return status.with_site(
            replace(
                record,
                phase=SitePhase.ACCEPTED,
                samples=outcome.samples,
                delta_sha256=outcome.delta_sha256,
                metrics=bounded_metrics(outcome.metrics),
                reason=None,
                message=None,
                finished_at=iso(now),
            )
        )
    if isinstance(outcome, SiteRejected):
        return _reject(status, outcome.site, outcome.reason, outcome.detail, now)
    if isinstance(outcome, SiteFailureRead):
        record = status.site(outcome.site)
        if record is None or outcome.message is None or record.phase is not SitePhase.FAILED:
            return status
        return status.with_site(replace(record, reason=BAD_INPUT, message=clip(outcome.message)))
    if isinstance(outcome, Aggregated):
        for site, reason, detail in outcome.rejected:
            status = _reject(status, site, reason, detail, now)
        status = replace(
            status,
            global_uri=outcome.uri,
            global_sha256=outcome.sha256,
            global_size=outcome.size,
            tasks={k: dict(v) for k, v in outcome.tasks.items()},
            privacy=outcome.privacy,
        )
        excluded = [s for s in status.sites if s.phase is not SitePhase.ACCEPTED]
        message = f"global model {outcome.sha256[:12]} from {len(outcome.contributors)} sites at {outcome.uri}"
        if outcome.privacy:
            epsilon = outcome.privacy.get("epsilon")
            message += (
                f"; epsilon {epsilon:.3g} at delta {outcome.privacy.get('delta'):g} over the chain"
                if isinstance(epsilon, (int, float))
                else "; no finite epsilon: earlier rounds of the chain were aggregated without spec.privacy"
            )
        if excluded:
            message += "; excluded: " + ", ".join(f"{s.site} ({s.phase.value}: {s.reason})" for s in excluded)
        return transition(status, Phase.SUCCEEDED, "Succeeded", message, now, degraded=bool(excluded))
    if isinstance(outcome, AggregationImpossible):
        for site, reason, detail in outcome.rejected:
            status = _reject(status, site, reason, detail, now)
        return fail(status, outcome.reason, outcome.message, now)
    raise TypeError(f"unknown outcome {outcome!r}")


def _reject(status: RoundStatus, site: str, reason: str, detail: str, now: datetime) -> RoundStatus:
    record = status.site(site)
    if record is None:
        return status
    return status.with_site(
        replace(record, phase=SitePhase.REJECTED, reason=reason, message=clip(detail), finished_at=iso(now))
    )


def _storage_failed(status: RoundStatus, outcome: StorageFailed, config: OperatorConfig, now: datetime) -> RoundStatus:
    previous = status.retry
    attempts = (previous.attempts if previous else 0) + 1
    since = parse_time(previous.since) if previous else None
    since = since or now
    waited = (now - since).total_seconds()
    if waited >= config.storage_retry_limit_seconds and not status.phase.terminal:
        return fail(
            status,
            "StorageUnavailable",
            f"{outcome.operation} kept failing for {int(waited)}s: "
            f"{outcome.message}; check spec.storage and the S3 server",
            now,
        )
    delay = min(config.storage_retry_max_seconds, config.storage_retry_base_seconds * 2 ** (attempts - 1))
    retry = Retry(
        operation=outcome.operation,
        attempts=attempts,
        since=iso(since),
        next_attempt_at=iso(now + timedelta(seconds=delay)),
        message=clip(f"{outcome.message} (attempt {attempts}, next in {delay:.0f}s)"),
    )
    return headline(
        replace(status, retry=retry), "StorageUnavailable", f"{outcome.operation}: {retry.message}", degraded=True
    )


def job_owned(job: JobObservation, round_name: str, round_uid: str) -> bool:
    return job.round == round_name and (job.owner_uid in (None, round_uid))


__all__ = ["Decision", "Desired", "Observed", "apply_outcome", "join", "plan"]
