"""Round and site phases, and the one table of allowed round transitions."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    PENDING = "Pending"
    TRAINING = "Training"
    AGGREGATING = "Aggregating"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.PENDING: frozenset({Phase.TRAINING, Phase.FAILED}),
    Phase.TRAINING: frozenset({Phase.AGGREGATING, Phase.FAILED}),
    Phase.AGGREGATING: frozenset({Phase.SUCCEEDED, Phase.FAILED}),
    Phase.SUCCEEDED: frozenset(),
    Phase.FAILED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug: the planner asked for a transition the table does not allow."""


def check_transition(current: Phase, target: Phase) -> Phase:
    if target is not current and target not in TRANSITIONS[current]:
        raise IllegalTransition(f"{current.value} -> {target.value} is not an allowed transition")
    return target


class SitePhase(StrEnum):
    PENDING = "Pending"  # no Job yet
    QUEUED = "Queued"  # Job exists but is suspended (e.g. waiting for Kueue admission)
    RUNNING = "Running"
    UPLOADED = "Uploaded"  # Job succeeded; contribution not yet verified
    ACCEPTED = "Accepted"
    REJECTED = "Rejected"
    FAILED = "Failed"
    STRAGGLER = "Straggler"
    CANCELLED = "Cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_SITE_PHASES


FINAL_SITE_PHASES = frozenset(
    {
        SitePhase.ACCEPTED,
        SitePhase.REJECTED,
        SitePhase.FAILED,
        SitePhase.STRAGGLER,
        SitePhase.CANCELLED,
    }
)
