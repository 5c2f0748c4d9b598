"""The FederationRound status as a typed value: parsed from and rendered to the CRD's schema.

Only fields declared in the CRD appear here. Everything the operator needs to resume after a
restart is in this object (or in S3): it never keeps progress only in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from mfed_operator.domain.baselines import LOCAL, dm_column, local_baseline_status
from mfed_operator.domain.phases import Phase, SitePhase

MAX_MESSAGE = 300
# Per site, in status: a trainer reports about 20 (two tracks and a Local baseline add theirs);
# with 16 the alphabetical cut dropped `val_samples`, the evidence of the track choice.
MAX_METRICS = 32


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bounded_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: round(float(metrics[k]), 6) for k in sorted(metrics)[:MAX_METRICS]}


@dataclass(frozen=True, kw_only=True)
class SiteRecord:
    site: str
    task: str
    phase: SitePhase = SitePhase.PENDING
    job: str | None = None
    samples: int | None = None
    delta_sha256: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    reason: str | None = None
    message: str | None = None
    previous_decoder: str | None = None
    finished_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.site, "task": self.task, "phase": self.phase.value}
        for key, value in (
            ("job", self.job),
            ("samples", self.samples),
            ("deltaSha256", self.delta_sha256),
            ("reason", self.reason),
            ("message", self.message),
            ("previousDecoder", self.previous_decoder),
            ("finishedAt", self.finished_at),
        ):
            if value is not None:
                out[key] = value
        if self.metrics:
            out["metrics"] = dict(self.metrics)
        return out

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> SiteRecord:
        try:
            phase = SitePhase(data.get("phase", "Pending"))
        except ValueError:
            phase = SitePhase.PENDING
        return cls(
            site=str(data.get("site", "")),
            task=str(data.get("task", "")),
            phase=phase,
            job=data.get("job"),
            samples=data.get("samples"),
            delta_sha256=data.get("deltaSha256"),
            metrics=dict(data.get("metrics") or {}),
            reason=data.get("reason"),
            message=data.get("message"),
            previous_decoder=data.get("previousDecoder"),
            finished_at=data.get("finishedAt"),
        )


@dataclass(frozen=True, kw_only=True)
class Retry:
    operation: str
    attempts: int
    since: str
    next_attempt_at: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "attempts": self.attempts,
            "since": self.since,
            "nextAttemptAt": self.next_attempt_at,
            "message": self.message,
        }


@dataclass(frozen=True, kw_only=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str
    last_transition_time: str
    observed_generation: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": self.last_transition_time,
            "observedGeneration": self.observed_generation,
        }


@dataclass(frozen=True, kw_only=True)
class Headline:
    """The headline of the current state: what Ready/Progressing/Degraded say and why."""

    reason: str
    message: str
    degraded: bool = False


@dataclass(frozen=True, kw_only=True)
class RoundStatus:
    phase: Phase = Phase.PENDING
    observed_generation: int | None = None
    round: int | None = None
    headline: Headline | None = None
    conditions: tuple[Condition, ...] = ()
    spec_digest: str | None = None
    pending_since: str | None = None
    training_started_at: str | None = None
    deadline_at: str | None = None
    aggregation_started_at: str | None = None
    completed_at: str | None = None
    init_job: str | None = None
    base_uri: str | None = None
    base_sha256: str | None = None
    global_uri: str | None = None
    global_sha256: str | None = None
    global_size: int | None = None
    sites: tuple[SiteRecord, ...] = ()
    tasks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    retry: Retry | None = None
    next_round: str | None = None
    sitetasks_reported: bool = False
    # spec.privacy: the chain's ledger after this round, as the new model's manifest records it
    privacy: Mapping[str, Any] | None = None

    def site(self, name: str) -> SiteRecord | None:
        return next((s for s in self.sites if s.site == name), None)

    def with_site(self, record: SiteRecord) -> RoundStatus:
        sites = [record if s.site == record.site else s for s in self.sites]
        if not any(s.site == record.site for s in self.sites):
            sites.append(record)
        return replace(self, sites=tuple(sorted(sites, key=lambda s: s.site)))

    def sites_in(self, *phases: SitePhase) -> list[SiteRecord]:
        return [s for s in self.sites if s.phase in phases]

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> RoundStatus:
        data = data or {}
        try:
            phase = Phase(data.get("phase") or "Pending")
        except ValueError:
            phase = Phase.PENDING
        base = data.get("baseModel") or {}
        model = data.get("globalModel") or {}
        retry = data.get("retry")
        conditions = tuple(
            Condition(
                type=c.get("type", ""),
                status=c.get("status", "Unknown"),
                reason=c.get("reason", ""),
                message=c.get("message", ""),
                last_transition_time=c.get("lastTransitionTime", ""),
                observed_generation=int(c.get("observedGeneration") or 0),
            )
            for c in data.get("conditions") or []
            if isinstance(c, Mapping)
        )
        ready = next((c for c in conditions if c.type == "Ready"), None)
        degraded = next((c for c in conditions if c.type == "Degraded"), None)
        headline = (
            Headline(reason=ready.reason, message=ready.message, degraded=bool(degraded and degraded.status == "True"))
            if ready
            else None
        )
        return cls(
            phase=phase,
            observed_generation=data.get("observedGeneration"),
            round=data.get("round"),
            headline=headline,
            conditions=conditions,
            spec_digest=data.get("specDigest"),
            pending_since=data.get("pendingSince"),
            training_started_at=data.get("trainingStartedAt"),
            deadline_at=data.get("deadlineAt"),
            aggregation_started_at=data.get("aggregationStartedAt"),
            completed_at=data.get("completedAt"),
            init_job=data.get("initJob"),
            base_uri=base.get("uri"),
            base_sha256=base.get("sha256"),
            global_uri=model.get("uri"),
            global_sha256=model.get("sha256"),
            global_size=model.get("size"),
            sites=tuple(SiteRecord.parse(s) for s in data.get("sites") or [] if isinstance(s, Mapping)),
            tasks=dict(data.get("tasks") or {}),
            retry=Retry(
                operation=retry.get("operation", ""),
                attempts=int(retry.get("attempts") or 0),
                since=retry.get("since", ""),
                next_attempt_at=retry.get("nextAttemptAt", ""),
                message=retry.get("message", ""),
            )
            if isinstance(retry, Mapping)
            else None,
            next_round=data.get("nextRound"),
            sitetasks_reported=bool(data.get("siteTasksReported")),
            privacy=dict(data["privacy"]) if isinstance(data.get("privacy"), Mapping) else None,
        )

    def render(self, generation: int, now: datetime) -> dict[str, Any]:
        """The full status object; unset fields are rendered as None so a merge-patch removes them."""
        accepted = len(self.sites_in(SitePhase.ACCEPTED))
        metrics = " ".join(
            f"{task}={float(info['metrics']['val_after']):.4g}"
            for task, info in sorted(self.tasks.items())
            if isinstance(info.get("metrics"), Mapping) and "val_after" in info["metrics"]
        )
        local = local_baseline_status((s.task, s.samples or 0, s.metrics) for s in self.sites_in(SitePhase.ACCEPTED))
        return {
            "phase": self.phase.value,
            "observedGeneration": generation,
            "round": self.round,
            "conditions": [c.to_dict() for c in conditions_for(self, generation, now)],
            "specDigest": self.spec_digest,
            "pendingSince": self.pending_since,
            "trainingStartedAt": self.training_started_at,
            "deadlineAt": self.deadline_at,
            "aggregationStartedAt": self.aggregation_started_at,
            "completedAt": self.completed_at,
            "initJob": self.init_job,
            "baseModel": {"uri": self.base_uri, "sha256": self.base_sha256} if self.base_uri else None,
            "globalModel": (
                {"uri": self.global_uri, "sha256": self.global_sha256, "size": self.global_size}
                if self.global_uri
                else None
            ),
            "sites": [s.to_dict() for s in self.sites],
            "tasks": {k: dict(v) for k, v in sorted(self.tasks.items())} or None,
            "summary": {
                "selected": len(self.sites),
                "accepted": accepted,
                "sites": f"{accepted}/{len(self.sites)}",
                "metrics": metrics,
                **({"dmLocal": dm_column(local)} if local else {}),
            },
            "baselines": {LOCAL: local} if local else None,
            "retry": self.retry.to_dict() if self.retry else None,
            "nextRound": self.next_round,
            "siteTasksReported": self.sitetasks_reported or None,
            "privacy": dict(self.privacy) if self.privacy else None,
        }


def _condition(
    previous: Mapping[str, Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> Condition:
    value = "True" if status else "False"
    old = previous.get(type_)
    since = old.last_transition_time if old is not None and old.status == value else iso(now)
    return Condition(
        type=type_,
        status=value,
        reason=reason,
        message=clip(message),
        last_transition_time=since,
        observed_generation=generation,
    )


def conditions_for(status: RoundStatus, generation: int, now: datetime) -> list[Condition]:
    """Ready / Progressing / Degraded (the contract) plus Reconciling / Stalled (for kstatus)."""
    previous = {c.type: c for c in status.conditions}
    headline = status.headline or Headline(reason=status.phase.value, message=f"round is {status.phase.value}")
    ready = status.phase is Phase.SUCCEEDED
    progressing = not status.phase.terminal
    failed = status.phase is Phase.FAILED
    degraded = failed or headline.degraded
    args = (generation, now)
    return [
        _condition(previous, "Ready", ready, headline.reason, headline.message, *args),
        _condition(previous, "Progressing", progressing, headline.reason, headline.message, *args),
        _condition(
            previous,
            "Degraded",
            degraded,
            headline.reason if degraded else "AsExpected",
            headline.message if degraded else "no problem",
            *args,
        ),
        _condition(previous, "Reconciling", progressing, headline.reason, headline.message, *args),
        _condition(
            previous,
            "Stalled",
            failed,
            headline.reason if failed else "NotStalled",
            headline.message if failed else "not stalled",
            *args,
        ),
    ]
