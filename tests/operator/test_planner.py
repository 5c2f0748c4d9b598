"""The pure planner, table-driven: each phase x observed situation -> next status and actions."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import pytest
from mfed_operator.domain.actions import (
    Action,
    Aggregated,
    AggregationImpossible,
    BaseInspected,
    CreateJob,
    SiteFailureRead,
    SiteRejected,
    SiteVerified,
    StorageFailed,
)
from mfed_operator.domain.observations import JobState, PreviousRound, SecretCheck
from mfed_operator.domain.phases import TRANSITIONS, IllegalTransition, Phase, SitePhase, check_transition
from mfed_operator.domain.planner import Decision, Desired, Observed, apply_outcome, plan
from mfed_operator.domain.status import Retry, RoundStatus, SiteRecord, iso
from mfed_operator.domain.validation import BaseSummary, BaseTask, epsilon_after_round

from mfed.privacy.ledger import PrivacyLedger
from mfed.privacy.settings import PrivacySettings
from mfed.registry import KINDS, Catalog, Entry, Listing, builtin_catalog
from mfed.resources.views import RoundView, SiteTaskView
from mfed.spec import ArchSpec, SharingMode, SharingPolicy
from tests.operator.builders import CONFIG, NOW, job, later, round_view, site

SITES = (site("a"), site("b"), site("c", "rot4"))
SECRET_OK = SecretCheck(name="s3-credentials", exists=True)
BASE_URI = "s3://models/federations/fed/r1/init"


def training_status(*records: SiteRecord, started: datetime = NOW) -> RoundStatus:
    return RoundStatus(
        phase=Phase.TRAINING,
        round=1,
        pending_since=iso(started),
        training_started_at=iso(started),
        base_uri=BASE_URI,
        base_sha256="ab" * 32,
        init_job="r1-init",
        sites=records,
        spec_digest=round_view().digest,
    )


def rec(name: str, phase: SitePhase = SitePhase.PENDING, task: str = "cls10") -> SiteRecord:
    return SiteRecord(site=name, task=task, phase=phase, job=f"r1-{name}")


@dataclass(frozen=True)
class Case:
    id: str
    status: RoundStatus
    now: datetime = NOW
    sites: tuple[SiteTaskView, ...] = SITES
    jobs: tuple[Any, ...] = ()
    secret: SecretCheck | None = SECRET_OK
    previous: PreviousRound | None = None
    round: RoundView = field(default_factory=round_view)
    plugins: Catalog = field(default_factory=builtin_catalog)
    # expectations
    phase: Phase = Phase.PENDING
    reason: str | None = None
    actions: tuple[str, ...] = ()  # action type names, in order
    sites_after: dict[str, SitePhase] = field(default_factory=dict)


def decide(case: Case) -> Decision:
    desired = Desired(round=case.round, raw_spec={}, sites=case.sites, config=CONFIG, plugins=case.plugins)
    observed = Observed(
        now=case.now,
        generation=1,
        status=case.status,
        jobs={j.name: j for j in case.jobs},
        secret=case.secret,
        previous=case.previous,
    )
    return plan(desired, observed)


def _claimed_twice(task_type: str) -> Catalog:
    """The built-ins, with `task_type` also claimed by an installed plugin (acme-tasks)."""
    catalog = builtin_catalog()
    tasks = catalog.listings["task"]
    claims = (tasks.entries[task_type], Entry(kind="task", name=task_type, target="acme:T", distribution="acme-tasks"))
    entries = {k: v for k, v in tasks.entries.items() if k != task_type}
    return Catalog(
        listings={
            **catalog.listings,
            "task": Listing(kind=KINDS["task"], entries=entries, conflicts={task_type: claims}),
        }
    )


CASES = [
    # ---- Pending
    Case(
        "pending: an encoder neither built in nor installed fails at once, before any Job",
        RoundStatus(),
        round=round_view(encoder={"name": "acme_net", "sharing": {"mode": "all"}}),
        phase=Phase.FAILED,
        reason="UnknownEncoder",
    ),
    Case(
        "pending: a site's unknown decoder fails at once, before any Job",
        RoundStatus(),
        sites=(site("a"), replace(site("b"), decoder=ArchSpec(name="acme_head"))),
        phase=Phase.FAILED,
        reason="UnknownDecoder",
    ),
    Case(
        "pending: a task type two packages claim fails at once",
        RoundStatus(),
        plugins=_claimed_twice("rotation"),
        phase=Phase.FAILED,
        reason="PluginConflict",
    ),
    Case(
        "pending: plugin names declared to the operator (MFED_OPERATOR_PLUGINS) go ahead",
        RoundStatus(),
        round=round_view(encoder={"name": "acme_net", "sharing": {"mode": "all"}}),
        sites=(replace(site("a"), decoder=ArchSpec(name="acme_head"), task_type="acme_task"),),
        plugins=builtin_catalog().with_declared(
            [("encoder", "acme_net"), ("decoder", "acme_head"), ("task", "acme_task")]
        ),
        reason="Initializing",
        actions=("CreateJob",),
    ),
    Case(
        "pending: valid round with a seed creates the init Job",
        RoundStatus(),
        reason="Initializing",
        actions=("CreateJob",),
    ),
    Case(
        "pending: init Job still running waits",
        RoundStatus(pending_since=iso(NOW), init_job="r1-init"),
        jobs=(job("r1-init", JobState.RUNNING),),
        reason="Initializing",
    ),
    Case(
        "pending: init Job done inspects the initial model",
        RoundStatus(pending_since=iso(NOW)),
        jobs=(job("r1-init", JobState.SUCCEEDED),),
        reason="Initializing",
        actions=("InspectBase",),
    ),
    Case(
        "pending: init Job failed fails the round",
        RoundStatus(pending_since=iso(NOW)),
        jobs=(job("r1-init", JobState.FAILED, reason="BackoffLimitExceeded"),),
        phase=Phase.FAILED,
        reason="InitFailed",
    ),
    Case(
        "pending: checked base creates one Job per site and starts training",
        RoundStatus(pending_since=iso(NOW), base_uri=BASE_URI, base_sha256="ab" * 32),
        jobs=(job("r1-init", JobState.SUCCEEDED),),
        phase=Phase.TRAINING,
        reason="Training",
        actions=("CreateJob", "CreateJob", "CreateJob"),
        sites_after={"a": SitePhase.PENDING, "b": SitePhase.PENDING, "c": SitePhase.PENDING},
    ),
    Case(
        "pending: missing Secret waits within the grace period",
        RoundStatus(pending_since=iso(NOW)),
        secret=SecretCheck(name="s3-credentials", exists=False),
        now=later(10),
        reason="SecretNotFound",
    ),
    Case(
        "pending: missing Secret fails after the grace period",
        RoundStatus(pending_since=iso(NOW)),
        secret=SecretCheck(name="s3-credentials", exists=False),
        now=later(61),
        phase=Phase.FAILED,
        reason="SecretNotFound",
    ),
    Case(
        "pending: a Secret the operator may not read fails after the grace period, naming the RBAC fix",
        RoundStatus(pending_since=iso(NOW)),
        secret=SecretCheck(name="team-s3", exists=False, forbidden=True),
        now=later(61),
        phase=Phase.FAILED,
        reason="SecretForbidden",
    ),
    Case("pending: no site selected waits", RoundStatus(pending_since=iso(NOW)), sites=(), reason="NoSitesSelected"),
    Case(
        "pending: quorum above the selection fails after the grace period",
        RoundStatus(pending_since=iso(NOW)),
        round=round_view(aggregation={"minSites": 5}),
        now=later(120),
        phase=Phase.FAILED,
        reason="NotEnoughSites",
    ),
    Case(
        "pending: decoders that disagree within a task fail after the grace period",
        RoundStatus(pending_since=iso(NOW)),
        now=later(120),
        sites=(site("a"), replace(site("b"), decoder=ArchSpec(name="mlp", params={"hidden": [8]}))),
        phase=Phase.FAILED,
        reason="DecoderMismatch",
    ),
    Case(
        "pending: a previous round that failed fails at once",
        RoundStatus(pending_since=iso(NOW)),
        round=round_view(initialModel={"fromRound": "r0"}),
        previous=PreviousRound(name="r0", phase=Phase.FAILED, round=1, global_uri=None),
        phase=Phase.FAILED,
        reason="PreviousRoundFailed",
    ),
    Case(
        "pending: a previous round still training is waited for without limit",
        RoundStatus(pending_since=iso(NOW)),
        round=round_view(initialModel={"fromRound": "r0"}),
        now=later(3600),
        previous=PreviousRound(name="r0", phase=Phase.TRAINING, round=1, global_uri=None),
        reason="WaitingForPreviousRound",
    ),
    Case(
        "pending: a finished previous round is inspected as the base",
        RoundStatus(pending_since=iso(NOW)),
        round=round_view(initialModel={"fromRound": "r0"}),
        previous=PreviousRound(name="r0", phase=Phase.SUCCEEDED, round=1, global_uri="s3://models/x/global"),
        reason="CheckingBaseModel",
        actions=("InspectBase",),
    ),
    Case(
        "pending: storage backoff postpones the inspection",
        RoundStatus(
            pending_since=iso(NOW),
            retry=Retry(
                operation="InspectBase", attempts=1, since=iso(NOW), next_attempt_at=iso(later(30)), message="down"
            ),
        ),
        jobs=(job("r1-init", JobState.SUCCEEDED),),
        now=later(5),
        reason="Initializing",
    ),
    # ---- Training
    Case(
        "training: Jobs not yet in the cache are created again (409 is fine)",
        training_status(rec("a"), rec("b")),
        sites=SITES[:2],
        phase=Phase.TRAINING,
        actions=("CreateJob", "CreateJob"),
    ),
    Case(
        "training: suspended and running Jobs show as Queued and Running",
        training_status(rec("a"), rec("b")),
        sites=SITES[:2],
        phase=Phase.TRAINING,
        jobs=(job("r1-a", JobState.SUSPENDED, "a"), job("r1-b", JobState.RUNNING, "b")),
        sites_after={"a": SitePhase.QUEUED, "b": SitePhase.RUNNING},
    ),
    Case(
        "training: a succeeded Job gets its contribution verified",
        training_status(rec("a"), rec("b")),
        sites=SITES[:2],
        phase=Phase.TRAINING,
        jobs=(job("r1-a", JobState.SUCCEEDED, "a"), job("r1-b", JobState.RUNNING, "b")),
        actions=("VerifySite",),
        sites_after={"a": SitePhase.UPLOADED},
    ),
    Case(
        "training: a failed Job marks its site Failed",
        training_status(rec("a"), rec("b", SitePhase.ACCEPTED)),
        sites=SITES[:2],
        phase=Phase.AGGREGATING,
        round=round_view(aggregation={"minSites": 1}),
        jobs=(job("r1-a", JobState.FAILED, "a", reason="PodFailurePolicy"),),
        actions=("ReadFailure",),  # once, as the failure is seen: did the trainer say why?
        sites_after={"a": SitePhase.FAILED},
    ),
    Case(
        "training: all sites done with quorum moves to Aggregating",
        training_status(rec("a", SitePhase.ACCEPTED), rec("b", SitePhase.ACCEPTED)),
        sites=SITES[:2],
        phase=Phase.AGGREGATING,
        reason="Aggregating",
    ),
    Case(
        "training: all sites done below quorum fails the round",
        training_status(rec("a", SitePhase.ACCEPTED), rec("b", SitePhase.REJECTED)),
        sites=SITES[:2],
        phase=Phase.FAILED,
        reason="QuorumNotMet",
        actions=("ReportSiteTasks",),
    ),
    Case(
        "training: past the deadline stragglers are deleted and quorum decides",
        training_status(rec("a", SitePhase.ACCEPTED), rec("b", SitePhase.RUNNING)),
        sites=SITES[:2],
        round=round_view(aggregation={"minSites": 1, "deadlineSeconds": 60}),
        now=later(61),
        jobs=(job("r1-b", JobState.RUNNING, "b"),),
        phase=Phase.AGGREGATING,
        actions=("DeleteJob",),
        sites_after={"b": SitePhase.STRAGGLER},
    ),
    Case(
        "training: past the deadline without quorum fails and deletes the stragglers",
        training_status(rec("a", SitePhase.RUNNING), rec("b", SitePhase.RUNNING)),
        sites=SITES[:2],
        round=round_view(aggregation={"deadlineSeconds": 60}),
        now=later(61),
        jobs=(job("r1-a", JobState.RUNNING, "a"), job("r1-b", JobState.RUNNING, "b")),
        phase=Phase.FAILED,
        reason="QuorumNotMet",
        actions=("DeleteJob", "DeleteJob", "ReportSiteTasks"),
    ),
    Case(
        "training: an uploaded site is not a straggler at the deadline",
        training_status(rec("a", SitePhase.UPLOADED)),
        sites=SITES[:1],
        now=later(4000),
        jobs=(job("r1-a", JobState.SUCCEEDED, "a"),),
        phase=Phase.TRAINING,
        actions=("VerifySite",),
    ),
    Case(
        "training: a spec change mid-round fails the round",
        replace(training_status(rec("a", SitePhase.RUNNING)), spec_digest="something-else"),
        sites=SITES[:1],
        jobs=(job("r1-a", JobState.RUNNING, "a"),),
        phase=Phase.FAILED,
        reason="SpecChanged",
        actions=("DeleteJob", "ReportSiteTasks"),
    ),
    # ---- Aggregating / terminal
    Case(
        "aggregating: aggregates the accepted sites",
        replace(training_status(rec("a", SitePhase.ACCEPTED), rec("b", SitePhase.REJECTED)), phase=Phase.AGGREGATING),
        phase=Phase.AGGREGATING,
        actions=("Aggregate",),
    ),
    Case(
        "succeeded: creates the next round of the chain and reports to the sites",
        replace(
            training_status(rec("a", SitePhase.ACCEPTED)),
            phase=Phase.SUCCEEDED,
            completed_at=iso(NOW),
            global_uri="s3://models/federations/fed/r1/global",
            global_sha256="cd" * 32,
        ),
        round=round_view(followUpRounds=2),
        phase=Phase.SUCCEEDED,
        actions=("CreateRound", "ReportSiteTasks"),  # the next round first: its sites train meanwhile
    ),
    Case(
        "succeeded: nothing left to do once reported and chained",
        replace(
            training_status(rec("a", SitePhase.ACCEPTED)),
            phase=Phase.SUCCEEDED,
            completed_at=iso(NOW),
            sitetasks_reported=True,
            next_round="r1-r2",
            global_uri="s3://x/global",
        ),
        round=round_view(followUpRounds=2),
        phase=Phase.SUCCEEDED,
    ),
    Case(
        "failed: leftover running Jobs are deleted",
        replace(
            training_status(rec("a", SitePhase.FAILED)),
            phase=Phase.FAILED,
            completed_at=iso(NOW),
            sitetasks_reported=True,
        ),
        jobs=(job("r1-init", JobState.RUNNING),),
        phase=Phase.FAILED,
        actions=("DeleteJob",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_planner_decides_the_next_status_and_actions(case: Case) -> None:
    decision = decide(case)
    assert decision.status.phase is case.phase
    if case.reason is not None:
        assert decision.status.headline is not None
        assert decision.status.headline.reason == case.reason, decision.status.headline
    assert tuple(type(a).__name__ for a in decision.actions) == case.actions
    for name, phase in case.sites_after.items():
        record = decision.status.site(name)
        assert record is not None and record.phase is phase, (name, record)


def test_planner_fails_an_invalid_spec_with_the_parsers_message() -> None:
    desired = Desired(round=None, spec_error="spec.storage.bucket: is required", config=CONFIG)
    decision = plan(desired, Observed(now=NOW, generation=1, status=RoundStatus()))
    assert decision.status.phase is Phase.FAILED
    assert decision.status.headline is not None
    assert decision.status.headline.reason == "InvalidSpec"
    assert "spec.storage.bucket: is required" in decision.status.headline.message


def test_every_site_job_carries_the_site_round_spec_and_the_previous_decoder() -> None:
    previous = PreviousRound(
        name="r0",
        phase=Phase.SUCCEEDED,
        round=4,
        global_uri="s3://models/f/r0/global",
        decoders={"a": "s3://models/f/r0/sites/a/decoder.safetensors"},
    )
    status = RoundStatus(pending_since=iso(NOW), base_uri="s3://models/f/r0/global", base_sha256="ab" * 32)
    decision = plan(
        Desired(round=round_view(initialModel={"fromRound": "r0"}), sites=SITES[:2], config=CONFIG),
        Observed(now=NOW, generation=1, status=status, secret=SECRET_OK, previous=previous),
    )
    specs = {a.site: a.manifest for a in decision.actions if isinstance(a, CreateJob)}
    env = {e["name"]: e.get("value") for e in specs["a"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    import json

    spec = json.loads(env["MFED_SPEC"] or "{}")
    assert spec["round"] == 5  # the previous round's number + 1
    assert spec["previousDecoder"] == "s3://models/f/r0/sites/a/decoder.safetensors"
    assert spec["globalModel"] == "s3://models/f/r0/global"
    assert decision.status.site("b") is not None and decision.status.site("b").previous_decoder is None  # type: ignore[union-attr]


# ---- outcomes folded into the status


def test_a_verified_site_is_accepted_with_its_samples_and_metrics() -> None:
    status = apply_outcome(
        training_status(rec("a", SitePhase.UPLOADED)),
        SiteVerified(site="a", samples=80, delta_sha256="ef" * 32, metrics={"val_after": 0.5}),
        Desired(round=round_view(), config=CONFIG),
        NOW,
    )
    record = status.site("a")
    assert record is not None
    assert (record.phase, record.samples, record.metrics) == (SitePhase.ACCEPTED, 80, {"val_after": 0.5})


def test_a_rejected_contribution_records_its_typed_reason() -> None:
    status = apply_outcome(
        training_status(rec("a", SitePhase.UPLOADED)),
        SiteRejected(site="a", reason="NonFiniteValues", detail="NaN in encoder.x"),
        Desired(round=round_view(), config=CONFIG),
        NOW,
    )
    record = status.site("a")
    assert record is not None and (record.phase, record.reason) == (SitePhase.REJECTED, "NonFiniteValues")


def test_what_a_failed_trainer_said_about_its_input_becomes_the_sites_reason() -> None:
    failed = rec("a", SitePhase.FAILED)
    failed = replace(failed, reason="PodFailurePolicy", message="exit code 2 matching FailJob rule")
    desired = Desired(round=round_view(), config=CONFIG)
    said = apply_outcome(
        training_status(failed), SiteFailureRead(site="a", message="img/7.png: unreadable image"), desired, NOW
    )
    record = said.site("a")
    assert record is not None
    assert (record.phase, record.reason, record.message) == (
        SitePhase.FAILED,
        "BadInput",
        "img/7.png: unreadable image",
    )
    silent = apply_outcome(training_status(failed), SiteFailureRead(site="a", message=None), desired, NOW)
    assert silent.site("a") == failed  # nothing written: the Job's own reason stays


def test_storage_failures_back_off_exponentially_then_fail_the_round_at_the_limit() -> None:
    desired = Desired(
        round=round_view(),
        config=replace(
            CONFIG, storage_retry_base_seconds=5, storage_retry_max_seconds=15, storage_retry_limit_seconds=100
        ),
    )
    status = replace(training_status(rec("a", SitePhase.ACCEPTED)), phase=Phase.AGGREGATING)
    delays = []
    for attempt in range(3):
        status = apply_outcome(status, StorageFailed(operation="Aggregate", message="refused"), desired, later(attempt))
        assert status.retry is not None
        delays.append((datetime.fromisoformat(status.retry.next_attempt_at) - later(attempt)).total_seconds())
    assert delays == [5, 10, 15]
    assert status.headline is not None and status.headline.reason == "StorageUnavailable"
    failed = apply_outcome(status, StorageFailed(operation="Aggregate", message="refused"), desired, later(101))
    assert failed.phase is Phase.FAILED
    assert failed.headline is not None and failed.headline.reason == "StorageUnavailable"


def test_aggregation_success_records_the_model_and_who_was_left_out() -> None:
    status = replace(
        training_status(rec("a", SitePhase.ACCEPTED), rec("b", SitePhase.ACCEPTED)), phase=Phase.AGGREGATING
    )
    outcome = Aggregated(
        uri="s3://m/global",
        sha256="12" * 32,
        size=10,
        contributors=("a",),
        tasks={"cls10": {"sites": 1, "samples": 80, "metrics": {"val_after": 0.7}}},
        rejected=(("b", "ChecksumMismatch", "delta SHA-256 differs"),),
    )
    after = apply_outcome(status, outcome, Desired(round=round_view(), config=CONFIG), NOW)
    assert after.phase is Phase.SUCCEEDED
    assert after.global_sha256 == "12" * 32
    assert after.site("b") is not None and after.site("b").phase is SitePhase.REJECTED  # type: ignore[union-attr]
    assert after.headline is not None and after.headline.degraded
    rendered = after.render(1, NOW)
    assert rendered["summary"] == {"selected": 2, "accepted": 1, "sites": "1/2", "metrics": "cls10=0.7"}
    assert {c["type"]: c["status"] for c in rendered["conditions"]} == {
        "Ready": "True",
        "Progressing": "False",
        "Degraded": "True",
        "Reconciling": "False",
        "Stalled": "False",
    }


def test_aggregation_below_quorum_fails_the_round() -> None:
    status = replace(training_status(rec("a", SitePhase.ACCEPTED)), phase=Phase.AGGREGATING)
    after = apply_outcome(
        status,
        AggregationImpossible(reason="QuorumNotMet", message="too few"),
        Desired(round=round_view(), config=CONFIG),
        NOW,
    )
    assert after.phase is Phase.FAILED


def test_a_base_model_that_does_not_fit_the_round_fails_it_with_what_to_fix() -> None:
    base = BaseSummary(
        uri=BASE_URI,
        sha256="ab" * 32,
        federation="fed",
        encoder=ArchSpec(name="resnet"),
        sharing=SharingPolicy(mode=SharingMode.DEPTH, depth=1),
        tasks={"cls10": BaseTask(type="classification", params={}, decoder=ArchSpec(name="mlp"))},
    )
    after = apply_outcome(
        RoundStatus(pending_since=iso(NOW)),
        BaseInspected(base=base),
        Desired(round=round_view(), sites=SITES, config=CONFIG),
        NOW,
    )
    assert after.phase is Phase.FAILED
    assert after.headline is not None and after.headline.reason == "EncoderMismatch"
    assert "spec.encoder" in after.headline.message


def test_the_transition_table_allows_only_forward_moves() -> None:
    assert TRANSITIONS[Phase.SUCCEEDED] == frozenset() and TRANSITIONS[Phase.FAILED] == frozenset()
    for phase in Phase:
        if not phase.terminal:
            assert Phase.FAILED in TRANSITIONS[phase]
    with pytest.raises(IllegalTransition):
        check_transition(Phase.SUCCEEDED, Phase.TRAINING)
    with pytest.raises(IllegalTransition):
        check_transition(Phase.PENDING, Phase.AGGREGATING)


def test_action_types_used_in_the_table_exist() -> None:
    names = {a.__name__ for a in typing.get_args(Action)}
    for case in CASES:
        assert set(case.actions) <= names


def test_a_forbidden_secret_says_which_chart_value_grants_it() -> None:
    from mfed_operator.domain.validation import validate_selection

    secret = SecretCheck(name="team-s3", exists=False, forbidden=True)
    problems = validate_selection(round_view(), [site("a")], [], secret, None, 256, builtin_catalog())
    assert [p.reason for p in problems] == ["SecretForbidden"]
    assert "add team-s3 to the chart's rbac.secretNames" in problems[0].message
    assert "in namespace team-a" in problems[0].message


def _fitting_base(ledger: PrivacyLedger, privacy: PrivacySettings | None = None) -> BaseSummary:
    """A base model the round and SITES fit, carrying `ledger`; with the round's `privacy`, the
    epsilon the adapter computes when it reads the manifest (dataplane.inspect_base)."""
    r = round_view()
    return BaseSummary(
        uri=BASE_URI,
        sha256="ab" * 32,
        federation="fed",
        encoder=r.encoder,
        sharing=r.sharing,
        tasks={s.task_name: BaseTask(type=s.task_type, params=dict(s.task_params), decoder=s.decoder) for s in SITES},
        privacy=ledger,
        epsilon_after_round=None if privacy is None else epsilon_after_round(ledger, privacy),
    )


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_round_that_would_pass_the_privacy_budget_fails_before_any_job(adaptive: bool) -> None:
    privacy: dict[str, Any] = {"clipNorm": 1.0, "noiseMultiplier": 1.0}
    if adaptive:
        privacy.update(targetQuantile=0.5, countNoise=2.0)  # a second mechanism a round
    mechanisms = (1.0, 2.0) if adaptive else (1.0,)
    after_three = PrivacyLedger().after(mechanisms).after(mechanisms).after(mechanisms).epsilon(1e-5)
    after_two = PrivacyLedger().after(mechanisms).after(mechanisms).epsilon(1e-5)
    budget = (after_two + after_three) / 2
    r = round_view(privacy={**privacy, "epsilonBudget": budget})
    base_after_one = PrivacyLedger().after(mechanisms)
    fits = apply_outcome(
        RoundStatus(pending_since=iso(NOW)),
        BaseInspected(base=_fitting_base(base_after_one)),
        Desired(round=r, sites=SITES, config=CONFIG),
        NOW,
    )
    assert fits.phase is Phase.PENDING and fits.base_uri == BASE_URI, fits.headline
    refused = apply_outcome(
        RoundStatus(pending_since=iso(NOW)),
        BaseInspected(base=_fitting_base(base_after_one.after(mechanisms), r.privacy)),
        Desired(round=r, sites=SITES, config=CONFIG),
        NOW,
    )
    assert refused.phase is Phase.FAILED and refused.headline is not None
    assert refused.headline.reason == "PrivacyBudgetExceeded"
    assert (
        f"epsilon {after_three:.3g}" in refused.headline.message
        and "after 3 private rounds" in refused.headline.message
    )
    # a base from plain rounds has no finite epsilon: refused whatever the budget
    plain = apply_outcome(
        RoundStatus(pending_since=iso(NOW)),
        BaseInspected(base=_fitting_base(PrivacyLedger(unprotected_rounds=2))),
        Desired(round=r, sites=SITES, config=CONFIG),
        NOW,
    )
    assert plain.headline is not None and plain.headline.reason == "PrivacyBudgetExceeded"
    assert "2 round(s) aggregated without spec.privacy" in plain.headline.message
