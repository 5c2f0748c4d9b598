"""What the operator observes besides the round itself: Jobs, the previous round, the Secret."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mfed.artifacts.layout import DECODER_FILE, join, round_prefix, site_prefix
from mfed_operator.domain.names import LABEL_ROUND, LABEL_SITE
from mfed_operator.domain.phases import Phase, SitePhase
from mfed_operator.domain.status import RoundStatus, clip


class JobState(StrEnum):
    SUSPENDED = "Suspended"
    WAITING = "Waiting"  # created, no Pod active yet
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True, kw_only=True)
class JobObservation:
    name: str
    round: str | None
    site: str | None
    state: JobState
    reason: str | None = None
    message: str | None = None
    owner_uid: str | None = None


def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def observe_job(body: Mapping[str, Any]) -> JobObservation:
    """Classify a Job the way the Job controller reports it (conditions first, then counters)."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    owner = next((o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("controller")), None)
    failed = _condition(status, "Failed")
    state: JobState
    reason = message = None
    if _condition(status, "Complete") is not None or ((status.get("succeeded") or 0) > 0 and not failed):
        state = JobState.SUCCEEDED
    elif failed is not None:
        state = JobState.FAILED
        reason = str(failed.get("reason") or "JobFailed")
        message = clip(str(failed.get("message") or "the Job failed"))
    elif spec.get("suspend") and not status.get("active"):
        state = JobState.SUSPENDED
    elif status.get("active") or status.get("ready"):
        state = JobState.RUNNING
    else:
        state = JobState.WAITING
    return JobObservation(
        name=str(meta.get("name", "")),
        round=labels.get(LABEL_ROUND),
        site=labels.get(LABEL_SITE),
        state=state,
        reason=reason,
        message=message,
        owner_uid=owner,
    )


@dataclass(frozen=True, kw_only=True)
class PreviousRound:
    """The round a `fromRound` round continues: its phase, model, and each site's last decoder."""

    name: str
    phase: Phase
    round: int | None
    global_uri: str | None
    decoders: Mapping[str, str] = field(default_factory=dict)


def previous_round_view(
    name: str, status: Mapping[str, Any] | None, storage_root: str, federation: str
) -> PreviousRound:
    parsed = RoundStatus.parse(status)
    prefix = round_prefix(storage_root, federation, name)
    decoders: dict[str, str] = {}
    for record in parsed.sites:
        if record.phase is SitePhase.ACCEPTED:
            decoders[record.site] = join(site_prefix(prefix, record.site), DECODER_FILE)
        elif record.previous_decoder:
            decoders[record.site] = record.previous_decoder  # carried over a round it missed
    return PreviousRound(
        name=name, phase=parsed.phase, round=parsed.round, global_uri=parsed.global_uri, decoders=decoders
    )


@dataclass(frozen=True, kw_only=True)
class SecretCheck:
    name: str
    exists: bool
    missing_keys: tuple[str, ...] = ()
    forbidden: bool = False  # the API refused the operator reading it (403): an RBAC matter
