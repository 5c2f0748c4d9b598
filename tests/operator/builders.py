"""Pure test data for the planner and Job builder tests: resources as the API would hand them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from mfed_operator.config import OperatorConfig
from mfed_operator.domain.observations import JobObservation, JobState

from mfed.resources.views import RoundView, SiteTaskView, parse_round, parse_sitetask
from tests.support import manifests as m

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
CONFIG = OperatorConfig(
    trainer_image="registry.example/mfed-trainer:1.2.3", validation_grace_seconds=60, default_deadline_seconds=3600
)


def later(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def round_body(**spec: Any) -> dict[str, Any]:
    body = m.federation_round(
        "team-a", "r1", federation="fed", bucket="models", endpoint="http://s3.example:8333", **spec
    )
    body["metadata"].update(uid="uid-r1", generation=1)
    return body


def round_view(**spec: Any) -> RoundView:
    return parse_round(round_body(**spec))


def site_body(name: str, task: str = "cls10", **kw: Any) -> dict[str, Any]:
    task_type = {"cls10": "classification", "rot4": "rotation"}.get(task, "classification")
    body = m.sitetask("team-a", name, federation="fed", task=task, task_type=task_type, shard=0, shards=4, **kw)
    body["metadata"].update(uid=f"uid-{name}", generation=1)
    return body


def site(name: str, task: str = "cls10", **kw: Any) -> SiteTaskView:
    return parse_sitetask(site_body(name, task, **kw))


def job(name: str, state: JobState, site_name: str | None = None, reason: str | None = None) -> JobObservation:
    return JobObservation(
        name=name,
        round="r1",
        site=site_name,
        state=state,
        reason=reason,
        message=f"{reason} happened" if reason else None,
        owner_uid="uid-r1",
    )
