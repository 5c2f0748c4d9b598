"""What one method's run produced, per site and per round: the input of the report.

The pilot fills these as it trains; `mfed report` fills them from a chain of FederationRounds
(their status, or the contribution manifests in S3). One shape, so both print the same table,
JSON and plot from the same code (mfed.pilot.report). No torch here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mfed.methods import Method


@dataclass(frozen=True)
class CurvePoint:
    """Point k of a method's learning curve: each site's steps so far and its test score.

    `tracks` holds, for two-track sites, the test score of each track ("task", "shared"), the
    deployed one included: what the site would have got had its validation split chosen otherwise."""

    index: int
    steps: dict[str, int]
    test: dict[str, float]
    tracks: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class SiteSelection:
    """The model a site reports: in the pilot the validation-selected round, in a cluster's
    report the last round (what the site deployed)."""

    round: int = 0
    steps: int = 0
    val: float | None = None
    test: float = math.nan
    # The site's protection choice for the selected model, e.g. {"shared": 1.0} when a two-track
    # site deployed its shared track, {"start_alpha": 0.5} for a mixed start (mfed.rounds.start).
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass
class MethodRun:
    method: Method
    seed: int
    sites: dict[str, SiteSelection] = field(default_factory=dict)
    curve: list[CurvePoint] = field(default_factory=list)
    steps_per_site: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    # Traffic: bytes each site sent to the aggregator over the run (encoder delta + decoder
    # files; 0 for Local, which shares nothing), and the rounds it took part in.
    uploaded_bytes: dict[str, int] = field(default_factory=dict)
    site_rounds: dict[str, int] = field(default_factory=dict)
    # Site -> task group (a site of an old results.json without it is named `<task>-<i>`).
    site_tasks: dict[str, str] = field(default_factory=dict)
    # Site -> training samples, the weights of a task's mean (as the round's status weights
    # them). The pilot leaves it empty: a task's sites there are all the same size.
    site_samples: dict[str, int] = field(default_factory=dict)

    def task_of(self, site: str) -> str:
        return self.site_tasks.get(site) or site.rsplit("-", 1)[0]

    def upload_per_site_round(self) -> float:
        """Mean bytes a site uploaded per round."""
        rates = [self.uploaded_bytes.get(site, 0) / n for site, n in self.site_rounds.items() if n]
        return sum(rates) / len(rates) if rates else 0.0
