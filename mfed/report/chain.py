"""A chain of FederationRounds as the report's runs: one for the round's method, one for the
Local baseline the sites trained beside it (spec.evaluation.baselines: [local]).

The numbers are the sites' own: each site scores its deployed federated model and its Local
model on its test split (else validation) every round and reports both (baseline_federated,
baseline_local); its steps, and for the federated model the bytes it uploaded. Nothing here
is recomputed, only arranged as mfed.pilot.report expects, so a cluster's chain and a pilot
print the same table from the same code. A site reports the model of its last round: on a
cluster there is no "best round" to choose, the site deploys what its last round produced.
Pure: no clients (mfed.report.sources reads the rounds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mfed.methods import Method
from mfed.pilot.records import CurvePoint, MethodRun, SiteSelection
from mfed.pilot.report import LAST_ROUND, summarize

# What a site round must report for the report to use it (the trainer writes all of them when
# the round has spec.evaluation.baselines: [local]).
REQUIRED_METRICS = ("baseline_federated", "baseline_local", "baseline_sign", "baseline_steps", "steps")


class ReportError(ValueError):
    """The chain cannot be reported; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class SiteRound:
    """One accepted site in one round of the chain, as the site reported it."""

    site: str
    task: str
    metrics: Mapping[str, float]
    upload_bytes: int
    samples: int  # training samples: a task's numbers are sample-weighted, as in the status
    metric_name: str = "score"  # the task's metric, when the source names it


@dataclass(frozen=True)
class ChainRound:
    name: str
    sites: tuple[SiteRound, ...]


@dataclass(frozen=True)
class Chain:
    root: str
    method: Method
    source: str  # "kubernetes" or "s3"
    rounds: tuple[ChainRound, ...]


def check_reportable(chain: Chain) -> None:
    if not chain.rounds:
        raise ReportError(f"chain {chain.root!r}: no round found")
    for r in chain.rounds:
        if not r.sites:
            raise ReportError(f"round {r.name}: no accepted site (has the round finished? see its status.sites)")
        for s in r.sites:
            missing = [k for k in REQUIRED_METRICS if k not in s.metrics]
            if missing:
                raise ReportError(
                    f"round {r.name}, site {s.site}: no {', '.join(missing)} in what the site reported; "
                    "the report compares with the Local baseline: set spec.evaluation.baselines: [local] "
                    "on the chain's first FederationRound"
                )


def method_runs(chain: Chain) -> tuple[MethodRun, MethodRun]:
    """(Local, the chain's method): curves per round, each site's last round as its model."""
    check_reportable(chain)
    local = MethodRun(method=Method.LOCAL, seed=0)
    federated = MethodRun(method=chain.method, seed=0)
    for index, r in enumerate(chain.rounds, start=1):
        local_point = CurvePoint(index=index, steps={}, test={})
        fed_point = CurvePoint(index=index, steps={}, test={})
        for s in r.sites:
            m = s.metrics
            for run, point, score, steps, upload in (
                (local, local_point, m["baseline_local"], m["baseline_steps"], 0),
                (federated, fed_point, m["baseline_federated"], m["steps"], s.upload_bytes),
            ):
                run.site_tasks[s.site] = s.task
                if s.samples > 0:  # unknown: the site counts as much as any other
                    run.site_samples[s.site] = s.samples
                run.steps_per_site[s.site] = run.steps_per_site.get(s.site, 0) + int(steps)
                run.site_rounds[s.site] = run.site_rounds.get(s.site, 0) + 1
                run.uploaded_bytes[s.site] = run.uploaded_bytes.get(s.site, 0) + upload
                point.steps[s.site] = run.steps_per_site[s.site]
                point.test[s.site] = float(score)
                evidence = {"shared": float(m["deploy_shared"])} if run is federated and "deploy_shared" in m else {}
                run.sites[s.site] = SiteSelection(
                    round=index,
                    steps=run.steps_per_site[s.site],
                    val=float(m["val_after"]) if run is federated and "val_after" in m else None,
                    test=float(score),
                    evidence=evidence,
                )
        local.curve.append(local_point)
        federated.curve.append(fed_point)
    return local, federated


def chain_results(chain: Chain) -> dict[str, Any]:
    """The report document, the same shape as the pilot's results.json."""
    local, federated = method_runs(chain)
    directions: dict[str, bool] = {}
    names: dict[str, str] = {}
    for r in chain.rounds:
        for s in r.sites:
            higher = float(s.metrics["baseline_sign"]) > 0
            if directions.setdefault(s.task, higher) != higher:
                raise ReportError(f"task {s.task}: its sites disagree on whether higher is better")
            if s.metric_name != "score" or s.task not in names:
                names[s.task] = s.metric_name
    config = {
        "selection": LAST_ROUND,
        "chain": chain.root,
        "rounds": [r.name for r in chain.rounds],
        "rounds_in_chain": len(chain.rounds),
        "source": chain.source,
        "method": chain.method.value,
    }
    return summarize([local, federated], config, directions, names, seconds=_site_seconds(chain.rounds))


def _site_seconds(rounds: Sequence[ChainRound]) -> float:
    """Seconds the sites spent training, both models, all rounds (they train in parallel)."""
    return sum(
        float(s.metrics.get("train_seconds", 0.0)) + float(s.metrics.get("baseline_seconds", 0.0))
        for r in rounds
        for s in r.sites
    )
