"""What the planner asks for (actions) and what performing them produced (outcomes)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mfed.aggregation.fedavg import AggregationSettings
from mfed.privacy.settings import PrivacySettings
from mfed_operator.domain.validation import BaseSummary

# ---------------------------------------------------------------- actions


@dataclass(frozen=True, kw_only=True)
class CreateJob:
    site: str | None  # None: the init Job
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])


@dataclass(frozen=True, kw_only=True)
class DeleteJob:
    name: str
    site: str | None
    reason: str


@dataclass(frozen=True, kw_only=True)
class InspectBase:
    uri: str
    privacy: PrivacySettings | None = None  # the round's: the chain's epsilon after it is computed with the read


@dataclass(frozen=True, kw_only=True)
class VerifySite:
    site: str
    prefix: str


@dataclass(frozen=True, kw_only=True)
class ReadFailure:
    """A site's Job failed: read why, if its trainer said (FAILURE_FILE under its prefix)."""

    site: str
    prefix: str


@dataclass(frozen=True, kw_only=True)
class Aggregate:
    sites: tuple[str, ...]
    site_prefixes: Mapping[str, str]
    base_uri: str
    output: str
    round_number: int
    min_sites: int
    settings: AggregationSettings


@dataclass(frozen=True, kw_only=True)
class CreateRound:
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.manifest["metadata"]["name"])


@dataclass(frozen=True, kw_only=True)
class SiteReport:
    sitetask: str
    result: str
    reason: str | None
    message: str | None = None
    metrics: Mapping[str, float]
    samples: int | None


@dataclass(frozen=True, kw_only=True)
class ReportSiteTasks:
    round_name: str
    round_number: int
    completed_at: str
    reports: tuple[SiteReport, ...]


Action = CreateJob | DeleteJob | InspectBase | VerifySite | ReadFailure | Aggregate | CreateRound | ReportSiteTasks
S3_ACTIONS = (InspectBase, VerifySite, ReadFailure, Aggregate)

# ---------------------------------------------------------------- outcomes


@dataclass(frozen=True, kw_only=True)
class JobCreated:
    site: str | None
    name: str
    already_existed: bool = False


@dataclass(frozen=True, kw_only=True)
class JobRefused:
    """The API refused the Job for good (invalid, forbidden, or the name belongs to someone else)."""

    site: str | None
    name: str
    reason: str
    message: str


@dataclass(frozen=True, kw_only=True)
class JobDeleted:
    name: str


@dataclass(frozen=True, kw_only=True)
class BaseInspected:
    base: BaseSummary


@dataclass(frozen=True, kw_only=True)
class BaseUnusable:
    uri: str
    message: str


@dataclass(frozen=True, kw_only=True)
class SiteVerified:
    site: str
    samples: int
    delta_sha256: str
    metrics: Mapping[str, float]


@dataclass(frozen=True, kw_only=True)
class SiteFailureRead:
    """What a failed site's trainer wrote about its input (None: it wrote nothing)."""

    site: str
    message: str | None


@dataclass(frozen=True, kw_only=True)
class SiteRejected:
    site: str
    reason: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class Aggregated:
    uri: str
    sha256: str
    size: int
    tasks: Mapping[str, Mapping[str, Any]]
    contributors: tuple[str, ...]
    rejected: tuple[tuple[str, str, str], ...] = ()  # (site, reason, detail)
    seconds: float = 0.0
    bytes_read: int = 0
    privacy: Mapping[str, Any] | None = None  # the model manifest's privacy ledger (spec.privacy)


@dataclass(frozen=True, kw_only=True)
class AggregationImpossible:
    reason: str
    message: str
    rejected: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True, kw_only=True)
class StorageFailed:
    operation: str
    message: str


@dataclass(frozen=True, kw_only=True)
class RoundCreated:
    name: str
    already_existed: bool = False


@dataclass(frozen=True, kw_only=True)
class SiteTasksReported:
    count: int = 0


Outcome = (
    JobCreated
    | JobRefused
    | JobDeleted
    | BaseInspected
    | BaseUnusable
    | SiteVerified
    | SiteRejected
    | SiteFailureRead
    | Aggregated
    | AggregationImpossible
    | StorageFailed
    | RoundCreated
    | SiteTasksReported
)
