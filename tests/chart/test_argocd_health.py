"""The Argo CD health checks, run in a real Lua 5.1 against sample resources in every state the
operator's status contract (docs/operator-contract.md) describes. The end-to-end RBAC test also
runs them on the statuses a real federation produced."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.argocd import SCRIPTS, health
from tests.chart.tools import DEPLOY, REPO


def cond(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-26T12:00:00Z",
        "observedGeneration": 1,
    }


def round_obj(
    phase: str | None, *conditions: dict[str, Any], generation: int = 1, observed: int | None = 1
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "mfed.dev/v1alpha1",
        "kind": "FederationRound",
        "metadata": {"name": "r", "namespace": "ns", "generation": generation},
        "spec": {},
    }
    if phase is not None:
        obj["status"] = {"phase": phase, "conditions": list(conditions)}
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


def active(phase: str, reason: str, message: str, degraded: tuple[str, str] | None = None) -> dict[str, Any]:
    deg = cond("Degraded", "True", *degraded) if degraded else cond("Degraded", "False", reason, message)
    return round_obj(
        phase,
        cond("Ready", "False", reason, message),
        cond("Progressing", "True", reason, message),
        deg,
        cond("Reconciling", "True", reason, message),
        cond("Stalled", "False", reason, message),
    )


@dataclass(frozen=True)
class Case:
    name: str
    obj: dict[str, Any]
    status: str
    message: str  # a part of the expected message


ROUND_CASES = [
    Case("new round without status", round_obj(None), "Progressing", "pick up the round"),
    Case(
        "pending",
        active("Pending", "Initializing", "writing the initial model"),
        "Progressing",
        "Pending: writing the initial model",
    ),
    Case(
        "training", active("Training", "Training", "2/4 sites finished"), "Progressing", "Training: 2/4 sites finished"
    ),
    Case("aggregating", active("Aggregating", "Aggregating", "aggregating 4 updates"), "Progressing", "Aggregating"),
    Case(
        "training while S3 is retried",
        active("Training", "Training", "3/4 sites finished", ("StorageUnavailable", "S3 unreachable; retrying in 20s")),
        "Progressing",
        "S3 unreachable; retrying in 20s",
    ),
    Case(
        "succeeded",
        round_obj(
            "Succeeded",
            cond("Ready", "True", "Succeeded", "4/4 sites aggregated"),
            cond("Progressing", "False", "Succeeded", "done"),
            cond("Degraded", "False", "Succeeded", ""),
        ),
        "Healthy",
        "4/4 sites aggregated",
    ),
    Case(
        "succeeded without a straggler",
        round_obj(
            "Succeeded",
            cond("Ready", "True", "Succeeded", "3/4 sites aggregated"),
            cond("Degraded", "True", "SitesLeftOut", "left out: slow-c (Straggler: DeadlineExceeded)"),
        ),
        "Healthy",
        "slow-c (Straggler",
    ),
    Case(
        "failed for want of quorum",
        round_obj(
            "Failed",
            cond("Ready", "False", "QuorumNotMet", "only 1 of 3 sites contributed; quorum is 2"),
            cond("Degraded", "True", "QuorumNotMet", "only 1 of 3 sites contributed; quorum is 2"),
            cond("Stalled", "True", "QuorumNotMet", "only 1 of 3 sites contributed; quorum is 2"),
        ),
        "Degraded",
        "quorum is 2",
    ),
    Case(
        "failed with only a Degraded message",
        round_obj("Failed", cond("Degraded", "True", "InvalidSpec", "bad encoder")),
        "Degraded",
        "bad encoder",
    ),
    Case(
        "spec changed, not yet observed",
        round_obj("Succeeded", cond("Ready", "True", "Succeeded", "done"), generation=3, observed=2),
        "Progressing",
        "observe generation 3",
    ),
    Case(
        "status without observedGeneration",
        round_obj("Training", generation=1, observed=None),
        "Progressing",
        "observe generation 1",
    ),
    Case("a phase from a newer operator", round_obj("Paused"), "Unknown", "Paused"),
]


def sitetask(
    *conditions: dict[str, Any], generation: int = 1, observed: int = 1, last: dict[str, Any] | None = None
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "mfed.dev/v1alpha1",
        "kind": "SiteTask",
        "metadata": {"name": "s", "namespace": "ns", "generation": generation},
        "spec": {},
    }
    if conditions:
        obj["status"] = {"observedGeneration": observed, "conditions": list(conditions)}
        if last:
            obj["status"]["lastRound"] = last
    return obj


VALID = (
    cond("Ready", "True", "Valid", "the spec is valid; FederationRounds can select this site"),
    cond("Degraded", "False", "Valid", "the spec is valid; FederationRounds can select this site"),
)
INVALID = (
    cond("Ready", "False", "InvalidSpec", "spec.task.type: unknown type 'segm'; fix the SiteTask's spec"),
    cond("Degraded", "True", "InvalidSpec", "spec.task.type: unknown type 'segm'; fix the SiteTask's spec"),
)

SITETASK_CASES = [
    Case("new site without status", sitetask(), "Progressing", "validate the SiteTask"),
    Case("valid, in no round yet", sitetask(*VALID), "Healthy", "FederationRounds can select this site"),
    Case(
        "valid, last round accepted",
        sitetask(*VALID, last={"name": "fm-r2", "round": 2, "result": "Accepted"}),
        "Healthy",
        "Last round fm-r2: Accepted",
    ),
    Case(
        "valid, last upload rejected",
        sitetask(*VALID, last={"name": "fm", "round": 1, "result": "Rejected", "reason": "NonFiniteValues"}),
        "Healthy",
        "Rejected (NonFiniteValues)",
    ),
    Case("invalid spec", sitetask(*INVALID), "Degraded", "unknown type 'segm'"),
    Case(
        "being validated",
        sitetask(cond("Ready", "Unknown", "Validating", "checking the spec")),
        "Progressing",
        "checking the spec",
    ),
    Case(
        "spec changed, not yet observed",
        sitetask(*VALID, generation=2, observed=1),
        "Progressing",
        "observe generation 2",
    ),
]


@pytest.mark.parametrize("case", ROUND_CASES, ids=[c.name for c in ROUND_CASES])
def test_federation_round_health_follows_its_phase_and_conditions(case: Case) -> None:
    result = health("FederationRound", case.obj)
    assert (result.status, case.message in result.message) == (case.status, True), result


@pytest.mark.parametrize("case", SITETASK_CASES, ids=[c.name for c in SITETASK_CASES])
def test_sitetask_health_follows_its_conditions(case: Case) -> None:
    result = health("SiteTask", case.obj)
    assert (result.status, case.message in result.message) == (case.status, True), result


def test_the_argocd_cm_patch_carries_both_scripts_verbatim_under_argos_key_names() -> None:
    patch = yaml.safe_load((DEPLOY / "argocd" / "argocd-cm.yaml").read_text())
    assert set(patch) == {"data"}
    assert patch["data"] == {
        "resource.customizations.health.mfed.dev_FederationRound": SCRIPTS["FederationRound"].read_text(),
        "resource.customizations.health.mfed.dev_SiteTask": SCRIPTS["SiteTask"].read_text(),
    }


def test_the_install_docs_show_the_argocd_cm_snippet_as_generated() -> None:
    docs = (REPO / "docs" / "install.md").read_text()
    generated = (DEPLOY / "argocd" / "argocd-cm.yaml").read_text()
    body = generated[generated.index("data:\n") :]
    assert body in docs, "docs/install.md's argocd-cm snippet differs from deploy/argocd/argocd-cm.yaml"


def test_a_broken_script_is_caught_by_the_harness(tmp_path: Path) -> None:
    # The harness itself must fail on a script that returns a status Argo CD does not know.
    bad = tmp_path / "bad.lua"
    bad.write_text('return {status = "Fine", message = "ok"}')
    with pytest.raises(AssertionError, match="Fine"):
        health("FederationRound", round_obj(None), script=bad)
