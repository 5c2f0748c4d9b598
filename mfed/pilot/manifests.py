"""`mfed pilot -f DIR`: pilot the federation you are about to deploy, from the very SiteTask and
FederationRound manifests that `kubectl apply -f DIR` would create.

Parsing, the sites' agreement checks and every trainer setting come from mfed.resources, the code
the operator reconciles with, so a pilot cannot read a manifest differently from a cluster. Only
where the data lives differs: a PVC claim is a local folder (`--data CLAIM=PATH`); an s3:// URI
is read from S3 with the MFED_S3_* environment a site Job gets, or from a local folder that
stands in for the buckets (`--s3-dir DIR`: s3://bucket/key is DIR/bucket/key).

What a pilot adds to the manifests is the comparison: the round's method beside Local,
Task-FedAvg and Encoder-FedAvg, every one trained the same optimizer steps per site, each site's
model chosen on its own validation split (mfed.pilot.runner).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from mfed.aggregation.crosstask import Level2Rule, Level2Weighting
from mfed.methods import Method
from mfed.naming import API_VERSION, GROUP, ROUND_KIND, SITETASK_KIND
from mfed.pilot.config import ALL_METHODS, PilotConfig, PilotConfigError, PilotSite
from mfed.resources.agreement import site_disagreements
from mfed.resources.method_settings import DEFAULTS, check_settings, data_spec, task_spec, training_spec
from mfed.resources.views import (
    DataKind,
    InitialKind,
    ResourceError,
    RoundView,
    SiteTaskView,
    parse_round,
    parse_sitetask,
)
from mfed.spec import DataSpec, Regularizer, SiteStrategy

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(PilotConfigError):
    """The manifests cannot be piloted; the message names the file, the object and the fix."""


@dataclass(frozen=True)
class Manifests:
    round: RoundView
    sites: tuple[SiteTaskView, ...]  # the SiteTasks the round selects, by name
    ignored: tuple[str, ...]  # kind/name of documents a pilot has no use for (Namespace, Secret, ...)


@dataclass(frozen=True)
class DataPlaces:
    """Where the pilot finds what a cluster mounts or downloads."""

    claims: Mapping[str, Path]  # PVC claim name -> the local folder holding its files
    s3_dir: Path | None = None  # a local stand-in for every bucket; None: read S3 itself


def _documents(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    if not directory.is_dir():
        raise ManifestError(f"-f {directory}: not a directory of manifests")
    # kubectl apply -f DIR reads the directory's own files, not its sub-folders (without -R)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in MANIFEST_SUFFIXES)
    documents = []
    for path in files:
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: not valid YAML ({exc})") from None
        for i, doc in enumerate(loaded):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ManifestError(f"{path}: document {i + 1} is not an object with apiVersion and kind")
            # `kubectl get -o yaml` writes a List of the objects; kubectl apply takes it as they are
            items = doc.get("items") if doc.get("kind") == "List" else [doc]
            if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                raise ManifestError(f"{path}: document {i + 1} is a List whose items are not objects")
            documents += [(path, item) for item in items]
    return documents


def _parse(path: Path, doc: Mapping[str, Any]) -> SiteTaskView | RoundView | None:
    kind, version = doc.get("kind"), str(doc.get("apiVersion", ""))
    if kind not in (SITETASK_KIND, ROUND_KIND) or not version.startswith(f"{GROUP}/"):
        return None
    name = (doc.get("metadata") or {}).get("name", "?")
    if version != API_VERSION:
        raise ManifestError(f"{path}: {kind} {name} is {version}; this mfed reads {API_VERSION}")
    try:
        return parse_sitetask(doc) if kind == SITETASK_KIND else parse_round(doc)
    except ResourceError as exc:
        raise ManifestError(f"{path}: {kind} {name}: {exc}") from None


def read_manifests(directory: Path, round_name: str | None = None) -> Manifests:
    """The FederationRound of `directory` (the one named `round_name` when there are several) and
    the SiteTasks it selects, checked as the operator checks them before it starts a Job."""
    rounds: list[RoundView] = []
    site_tasks: list[SiteTaskView] = []
    ignored: list[str] = []
    for path, doc in _documents(directory):
        parsed = _parse(path, doc)
        if isinstance(parsed, RoundView):
            rounds.append(parsed)
        elif isinstance(parsed, SiteTaskView):
            site_tasks.append(parsed)
        elif not (path.name.startswith("kustomization.") or doc.get("kind") == "Kustomization"):
            ignored.append(f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '?')}")
    r = _one_round(directory, rounds, round_name)
    sites = tuple(
        sorted(
            (
                s
                for s in site_tasks
                if s.federation == r.federation and s.namespace == r.namespace and r.selector.matches(s.labels)
            ),
            key=lambda s: s.name,
        )
    )
    if not sites:
        elsewhere = sorted(
            {s.namespace or "(none)" for s in site_tasks if s.federation == r.federation and s.namespace != r.namespace}
        )
        hint = f" (SiteTasks of that federation name namespace {', '.join(elsewhere)})" if elsewhere else ""
        raise ManifestError(
            f"{directory}: no SiteTask of federation {r.federation} in the round's namespace "
            f"{r.namespace or '(none)'} matches FederationRound {r.name}'s spec.siteSelector{hint}; "
            "add SiteTasks, fix the selector or make the namespaces agree"
        )
    problems = site_disagreements(r, sites)
    if problems:
        raise ManifestError(f"{directory}: {problems[0].reason}: {problems[0].message}")
    try:
        check_settings(r)
    except ResourceError as exc:
        raise ManifestError(f"{directory}: FederationRound {r.name}: {exc}") from None
    return Manifests(round=r, sites=sites, ignored=tuple(ignored))


def _one_round(directory: Path, rounds: Sequence[RoundView], name: str | None) -> RoundView:
    names = ", ".join(sorted(r.name for r in rounds))
    if name is not None:
        chosen = [r for r in rounds if r.name == name]
        if not chosen:
            raise ManifestError(f"{directory}: no FederationRound {name}; the directory has: {names or 'none'}")
        return chosen[0]
    if len(rounds) != 1:
        if not rounds:
            raise ManifestError(f"{directory}: no FederationRound (kind FederationRound, apiVersion {API_VERSION})")
        raise ManifestError(f"{directory}: {len(rounds)} FederationRounds ({names}); choose one with --round NAME")
    return rounds[0]


def _local(uri: str | None, s3_dir: Path | None) -> str | None:
    if uri is None or s3_dir is None or not uri.startswith("s3://"):
        return uri
    return str(s3_dir / uri.removeprefix("s3://"))


def site_data_spec(site: SiteTaskView, places: DataPlaces) -> DataSpec:
    """The site's DataSpec as its Job would get it, its claim or buckets replaced by local folders."""
    d = site.data
    if d.kind is DataKind.PVC:
        assert d.claim_name is not None
        folder = places.claims.get(d.claim_name)
        if folder is None:
            raise ManifestError(
                f"SiteTask {site.name} reads PVC claim {d.claim_name}: pass --data {d.claim_name}=PATH, "
                "the local folder holding the claim's files"
            )
        if not folder.is_dir():
            raise ManifestError(f"--data {d.claim_name}={folder}: not a directory")
        if d.test_path is None:
            raise ManifestError(
                f"SiteTask {site.name}: the pilot scores every site on its test split; set spec.data.pvc.testPath"
            )
        return data_spec(site, mount=str(folder))
    spec = data_spec(site)
    if d.kind is DataKind.S3:
        if d.test_uri is None:
            raise ManifestError(
                f"SiteTask {site.name}: the pilot scores every site on its test split; set spec.data.s3.testUri"
            )
        return replace(spec, uri=_local(spec.uri, places.s3_dir), test_uri=_local(spec.test_uri, places.s3_dir))
    if spec.test_samples < 1:
        raise ManifestError(
            f"SiteTask {site.name}: the pilot scores every site on test images; set spec.data.demo.testSamples >= 1"
        )
    return spec


def pilot_site(site: SiteTaskView, places: DataPlaces) -> PilotSite:
    return PilotSite(
        name=site.name,
        task=task_spec(site),
        decoder=site.decoder,
        data=site_data_spec(site, places),
        reseed=site.data.kind is DataKind.DEMO and site.data.shard_seed is None,
    )


def compared_methods(r: RoundView) -> tuple[Method, ...]:
    """The round's method beside the baselines every pilot reports."""
    return tuple(dict.fromkeys([*ALL_METHODS, r.training.method]))


def pilot_config(
    manifests: Manifests, places: DataPlaces, *, source: str, round_steps: int, **overrides: Any
) -> PilotConfig:
    """The pilot of the manifests' round: its chain's rounds, settings and sites; `round_steps`
    optimizer steps per site and round for every method (round_length says how many the sites'
    Jobs would take); `overrides`: PilotConfig fields the command line sets (seeds, methods, ...)."""
    r = manifests.round
    if r.initial.kind is not InitialKind.SEED:
        raise ManifestError(
            f"FederationRound {r.name}: spec.initialModel.{r.initial.kind.value} continues a model on a cluster; "
            "a pilot starts from spec.initialModel.seed (set it, or pilot the chain's first round)"
        )
    t, spec = r.training, training_spec(r)
    sites = tuple(pilot_site(s, places) for s in manifests.sites)
    tasks = {s.task.name: s for s in sites}
    rounds = overrides.pop("rounds", None) or r.follow_up_rounds + 1
    fields: dict[str, Any] = {
        "scenario": r.name,
        "source": source,
        "rounds": rounds,
        "steps": rounds * round_steps,
        "methods": compared_methods(r),
        "seeds": (spec.seed,),
        "epochs": spec.epochs,
        "batch_size": spec.batch_size,
        "learning_rate": spec.learning_rate,
        # what method_plan(r) passes to plan_method, so the pilot's plan is the operator's
        "mu": DEFAULTS.mu if t.mu is None else t.mu,
        "regularizer": DEFAULTS.regularizer if t.regularizer is None else Regularizer(t.regularizer),
        "sharing": r.sharing,
        "val_fraction": spec.val_fraction,
        "device": spec.device,
        "delta_dtype": spec.delta_dtype,
        "encoder": r.encoder,
        "tasks": tuple(sorted(tasks)),
        "custom_tasks": {name: s.task for name, s in tasks.items()},
        "decoders": {name: s.decoder for name, s in tasks.items()},
        "sites": sites,
        "robust": r.robust,
        "privacy": r.privacy,
        "shared_steps": t.shared_steps,
        "gate_threshold": r.gate_threshold,
        **_level2(r),
    }
    return PilotConfig(**{**fields, **overrides})


def _level2(r: RoundView) -> dict[str, Any]:
    """The round's cross-task settings as method_plan(r) reads them (test_pilot_manifests checks it)."""
    out: dict[str, Any] = {}
    if r.weighting:
        out["level2_weighting"] = Level2Weighting(r.weighting)
    if r.level2_rule:
        out["level2_rule"] = Level2Rule(r.level2_rule)
    if r.training.site_strategy:
        out["site_strategy"] = SiteStrategy(r.training.site_strategy)
    if r.cagrad_c is not None:
        out["cagrad_c"] = r.cagrad_c
    return out


def round_length(r: RoundView, train_sizes: Mapping[str, int]) -> tuple[int, str | None]:
    """Optimizer steps per round of the pilot's sites, and a note when the sites' Jobs would differ.

    A Job trains `epochs` passes over its training split, at least minSteps, at most maxSteps
    (mfed.learning.train.planned_steps). The pilot gives every site and every method the same
    length: the most any site's Job would take, so no site trains less than on the cluster."""
    from mfed.learning.train import planned_steps

    spec = training_spec(r)
    per_site = {
        name: planned_steps(
            size, epochs=spec.epochs, batch_size=spec.batch_size, min_steps=spec.min_steps, max_steps=spec.max_steps
        )
        for name, size in train_sizes.items()
    }
    steps = max(per_site.values())
    if len(set(per_site.values())) == 1:
        return steps, None
    fewer = ", ".join(f"{n} {s}" for n, s in sorted(per_site.items()) if s < steps)
    return steps, (
        f"every site trains {steps} steps a round in this pilot, as many as the largest site's Job; on the "
        f"cluster these would take fewer ({fewer}): set spec.training.minSteps = maxSteps to make them equal"
    )


def fixed_round_length(r: RoundView) -> int | None:
    """The round length when minSteps = maxSteps fixes it, whatever the data."""
    spec = training_spec(r)
    return spec.max_steps if spec.max_steps is not None and spec.min_steps >= spec.max_steps else None


def train_sizes(manifests: Manifests, places: DataPlaces) -> dict[str, int]:
    """Every site's training split size, read the way its trainer reads it (files are listed,
    not decoded)."""
    from mfed.rounds.site_round import load_site_for
    from mfed.storage import Storage

    r, storage = manifests.round, Storage()
    val_fraction = training_spec(r).val_fraction
    sizes = {}
    for s in manifests.sites:
        site = pilot_site(s, places)
        data = load_site_for(site.name, site.data, r.encoder, site.task, site.decoder, val_fraction, storage)
        sizes[site.name] = len(data.train)
    return sizes


def manifest_pilot(
    directory: Path, places: DataPlaces, *, round_name: str | None = None, **overrides: Any
) -> tuple[PilotConfig, list[str]]:
    """The pilot of `directory`'s manifests, and notes for the user (what was not piloted, and
    where the pilot's round length differs from the sites' Jobs)."""
    manifests = read_manifests(directory, round_name)
    notes = (
        [f"not piloted (no SiteTask or FederationRound): {', '.join(manifests.ignored)}"] if manifests.ignored else []
    )
    steps = fixed_round_length(manifests.round)
    if steps is None:
        steps, note = round_length(manifests.round, train_sizes(manifests, places))
        notes += [note] if note else []
    config = pilot_config(manifests, places, source=str(directory), round_steps=steps, **overrides)
    return config, notes
