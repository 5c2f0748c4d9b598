"""What the CRD schema cannot check: cross-object consistency of a round and its sites.

Each problem carries a reason (CamelCase, for conditions and events) and a message that says
what to fix. `waitable` problems can resolve themselves (a SiteTask or Secret applied a moment
after the round), so the round waits for them up to the operator's grace period; `blocking`
ones (a previous round still running) are waited for without limit; the rest fail at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from mfed.privacy.ledger import PrivacyLedger
from mfed.privacy.settings import PrivacySettings
from mfed.registry import KINDS, Catalog
from mfed.resources.agreement import arch_text, site_disagreements
from mfed.resources.method_settings import method_plan
from mfed.resources.views import InitialKind, RoundView, SiteTaskView
from mfed.spec import ArchSpec, SharingPolicy
from mfed_operator.domain.observations import PreviousRound, SecretCheck
from mfed_operator.domain.phases import Phase


class Severity(StrEnum):
    HARD = "hard"
    WAITABLE = "waitable"
    BLOCKING = "blocking"


@dataclass(frozen=True)
class Problem:
    reason: str
    message: str
    severity: Severity = Severity.HARD


def validate_selection(
    r: RoundView,
    sites: Sequence[SiteTaskView],
    invalid_sites: Sequence[tuple[str, str]],
    secret: SecretCheck | None,
    previous: PreviousRound | None,
    max_sites: int,
    plugins: Catalog,
) -> list[Problem]:
    problems: list[Problem] = check_plugins(r, sites, plugins)
    w = Severity.WAITABLE
    for name, error in invalid_sites:
        problems.append(
            Problem(
                "SiteTaskInvalid",
                f"selected SiteTask {name} is invalid ({error}); fix it "
                "or change its labels so spec.siteSelector no longer selects it",
                w,
            )
        )
    if not sites:
        problems.append(
            Problem(
                "NoSitesSelected",
                f"no SiteTask of federation {r.federation} in namespace "
                f"{r.namespace} matches spec.siteSelector; create SiteTasks or fix the selector",
                w,
            )
        )
    if len(sites) > max_sites:
        problems.append(
            Problem(
                "TooManySites",
                f"{len(sites)} sites selected, at most {max_sites} per round; "
                "split the federation or narrow spec.siteSelector",
            )
        )
    if r.min_sites is not None and sites and r.min_sites > len(sites):
        problems.append(
            Problem(
                "NotEnoughSites",
                f"spec.aggregation.minSites is {r.min_sites} but only "
                f"{len(sites)} sites are selected; lower minSites or add SiteTasks",
                w,
            )
        )
    if secret is not None and secret.forbidden:
        problems.append(
            Problem(
                "SecretForbidden",
                f"the operator may not read Secret {secret.name} (spec.storage.credentialsSecret) in namespace "
                f"{r.namespace}: add {secret.name} to the chart's rbac.secretNames (helm upgrade), or bind the "
                "operator a Role that may get it (docs/install.md, RBAC)",
                w,
            )
        )
    elif secret is not None and not secret.exists:
        problems.append(
            Problem(
                "SecretNotFound",
                f"Secret {secret.name} (spec.storage.credentialsSecret) does "
                f"not exist in namespace {r.namespace}; create it with the S3 access key pair",
                w,
            )
        )
    elif secret is not None and secret.missing_keys:
        problems.append(
            Problem(
                "SecretKeyMissing",
                f"Secret {secret.name} lacks key(s) "
                f"{', '.join(secret.missing_keys)}; add them or set "
                "spec.storage.credentialsSecret.accessKeyIdKey/secretAccessKeyKey",
                w,
            )
        )
    problems.extend(Problem(d.reason, d.message, w) for d in site_disagreements(r, sites))
    if r.initial.kind is InitialKind.FROM_ROUND:
        if previous is None:
            problems.append(
                Problem(
                    "PreviousRoundNotFound",
                    f"spec.initialModel.fromRound names "
                    f"{r.initial.from_round}, which does not exist in namespace {r.namespace}",
                    w,
                )
            )
        elif previous.phase is Phase.FAILED:
            problems.append(
                Problem(
                    "PreviousRoundFailed",
                    f"the previous round {previous.name} failed; start from another round or from a seed",
                )
            )
        elif previous.phase is not Phase.SUCCEEDED or not previous.global_uri:
            problems.append(
                Problem(
                    "WaitingForPreviousRound",
                    f"the previous round {previous.name} is {previous.phase.value}; this round starts when it succeeds",
                    Severity.BLOCKING,
                )
            )
    return problems


def unknown_reason(kind: str) -> str:
    """UnknownEncoder, UnknownDecoder, UnknownTaskType: one per registry kind, named after it."""
    return "Unknown" + "".join(word.capitalize() for word in KINDS[kind].what.split())


def check_plugins(r: RoundView, sites: Sequence[SiteTaskView], plugins: Catalog) -> list[Problem]:
    """Every architecture and task type the round names is known here, before any Job starts.

    Names only, from entry-point metadata (nothing is imported: the operator has no torch);
    whether a plugin's parameters are valid is for the trainer to say, in the init Job."""
    uses = [("encoder", r.encoder.name, "spec.encoder.name")]
    for site in sorted(sites, key=lambda s: s.name):
        uses.append(("decoder", site.decoder.name, f"SiteTask {site.name} spec.decoder.name"))
        uses.append(("task", site.task_type, f"SiteTask {site.name} spec.task.type"))
        if site.data.dataset is not None:
            uses.append(("dataset", site.data.dataset, f"SiteTask {site.name} spec.data.pvc.dataset"))
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for kind, name, where in uses:
        if (kind, name) in seen or plugins.problem(kind, name) is None:
            continue
        seen.add((kind, name))
        what = KINDS[kind].what
        claims = plugins.claimants(kind, name)
        if claims:
            owners = " and ".join(c.package for c in claims)
            problems.append(
                Problem("PluginConflict", f"{where}: {what} {name!r} is claimed by {owners}; rename or uninstall one")
            )
            continue
        # Status messages are clipped at 300 characters: the fix comes first, the list last.
        problems.append(
            Problem(
                unknown_reason(kind),
                f"{where}: no {what} {name!r} here; install its plugin in the operator image too (pip install "
                f"--no-deps <package>) or set MFED_OPERATOR_PLUGINS={kind}:{name}; known: "
                + ", ".join(plugins.known(kind)),
            )
        )
    return problems


@dataclass(frozen=True, kw_only=True)
class BaseTask:
    type: str
    params: Mapping[str, Any]
    decoder: ArchSpec


@dataclass(frozen=True, kw_only=True)
class BaseSummary:
    """What the operator needs from a global model's manifest to check a round against it."""

    uri: str
    sha256: str
    federation: str
    encoder: ArchSpec
    sharing: SharingPolicy
    tasks: Mapping[str, BaseTask]
    privacy: PrivacyLedger = PrivacyLedger()  # what the model's chain has released so far
    # The chain's epsilon once this round is aggregated too (spec.privacy), computed where the
    # manifest was read (an I/O thread): the accountant (scipy) stays out of the event loop.
    epsilon_after_round: float | None = None


def epsilon_after_round(ledger: PrivacyLedger, privacy: PrivacySettings) -> float:
    """Epsilon at spec.privacy.delta once one more round of `privacy` is composed (inf when the
    chain had rounds without noise)."""
    return ledger.after(privacy.mechanisms).epsilon(privacy.delta)


def privacy_budget_problem(base: BaseSummary, r: RoundView) -> Problem | None:
    """Refuse, before any site trains, a round that would take its chain past spec.privacy.epsilonBudget."""
    privacy = r.privacy
    if privacy is None or privacy.epsilon_budget is None:
        return None
    after = base.privacy.after(privacy.mechanisms)
    if after.unprotected_rounds:
        return Problem(
            "PrivacyBudgetExceeded",
            f"the initial model at {base.uri} comes from {after.unprotected_rounds} round(s) aggregated without "
            "spec.privacy, so no finite epsilon holds for its sites; start a fresh chain (spec.initialModel.seed) "
            "with spec.privacy set, or drop spec.privacy.epsilonBudget",
        )
    epsilon = base.epsilon_after_round
    if epsilon is None:  # a summary read without the round's settings: account here
        epsilon = epsilon_after_round(base.privacy, privacy)
    if epsilon > privacy.epsilon_budget:
        return Problem(
            "PrivacyBudgetExceeded",
            f"this round would bring the chain to epsilon {epsilon:.3g} at delta {privacy.delta:g} after "
            f"{after.rounds} private rounds, above spec.privacy.epsilonBudget {privacy.epsilon_budget:g}; "
            "the chain stops here (raise the budget or spec.privacy.noiseMultiplier to go on)",
        )
    return None


def check_base(base: BaseSummary, r: RoundView, sites: Sequence[SiteTaskView]) -> list[Problem]:
    """The starting model must fit the round: same federation, encoder, sharing, and tasks."""
    problems: list[Problem] = []
    if base.federation != r.federation:
        problems.append(
            Problem(
                "WrongFederation",
                f"the initial model at {base.uri} belongs to federation "
                f"{base.federation}, not {r.federation}; point spec.initialModel elsewhere",
            )
        )
    if base.encoder != r.encoder:
        problems.append(
            Problem(
                "EncoderMismatch",
                f"the initial model was trained with encoder "
                f"{arch_text(base.encoder)} but spec.encoder is {arch_text(r.encoder)}; "
                "make them equal or start fresh with spec.initialModel.seed",
            )
        )
    sharing = method_plan(r).sharing
    if base.sharing != sharing:
        problems.append(
            Problem(
                "SharingMismatch",
                f"the initial model shares encoder parameters as "
                f"{base.sharing.to_dict()} but this round's method needs {sharing.to_dict()}; "
                "use the same method and spec.encoder.sharing as the rounds before",
            )
        )
    problem = privacy_budget_problem(base, r)
    if problem is not None:
        problems.append(problem)
    for site in sorted(sites, key=lambda s: s.name):
        task = base.tasks.get(site.task_name)
        if task is None:
            problems.append(
                Problem(
                    "TaskNotInModel",
                    f"site {site.name} trains task {site.task_name}, which "
                    f"the initial model does not have (tasks: {', '.join(sorted(base.tasks))}); "
                    "new tasks can only join a federation that starts from a seed",
                )
            )
        elif task.decoder != site.decoder or task.type != site.task_type or dict(task.params) != dict(site.task_params):
            problems.append(
                Problem(
                    "DecoderMismatch",
                    f"site {site.name} declares task {site.task_name} as "
                    f"{site.task_type} with decoder {arch_text(site.decoder)}, but the model "
                    f"has {task.type} with decoder {arch_text(task.decoder)}; make the "
                    "SiteTask match the federation",
                )
            )
    return problems
