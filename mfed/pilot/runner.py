"""The local federation: every method runs through the real trainer round and aggregator.

Sites, rounds and the global model go through the same code a Kubernetes deployment uses
(`run_site_round` writes safetensors + manifests; `aggregate` streams and validates them),
only with a local directory instead of S3 and in-process calls instead of Jobs.

Fairness (MFED.md): Local gets at least as many optimizer steps per site as any federated
method (`local_min_steps` more if that is larger), and every method's reported model per site
is the round with the best score on that site's own validation split, never the test set.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mfed.aggregation.fedavg import ContributionSource, aggregate
from mfed.artifacts.layout import DECODER_FILE, MANIFEST_FILE, global_prefix, join, round_prefix, site_prefix
from mfed.artifacts.manifest import ContributionManifest
from mfed.learning.data import SiteData
from mfed.learning.encoders import build_encoder, input_spec_of
from mfed.learning.tasks import build_task
from mfed.learning.train import planned_steps, shared_track_steps
from mfed.methods import Method, MethodPlan, plan_method
from mfed.model_store import read_global_model, write_global_model
from mfed.pilot.config import PilotConfig
from mfed.rounds.initial import init_global_model
from mfed.rounds.site_round import evaluate_start, load_site_splits, run_site_round
from mfed.seeding import derive_seed
from mfed.spec import ArchSpec, DataSpec, InitSpec, RoundSpec, TaskGroupSpec, TaskSpec, TrainingSpec
from mfed.storage import Storage

SiteRoundCallback = Callable[[], None]
FASHION_MNIST_TRAIN = 60000


@dataclass(frozen=True)
class PilotSite:
    name: str
    task: TaskSpec
    decoder: ArchSpec
    data: DataSpec


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
    """The validation-selected model of one site."""

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


def pilot_sites(config: PilotConfig, seed: int) -> list[PilotSite]:
    """Sites named `<task>-<i>`, each on its own disjoint shard of Fashion-MNIST's train set."""
    shard_count = config.site_count
    shard_size = FASHION_MNIST_TRAIN // shard_count
    sites = []
    for t, task_name in enumerate(config.tasks):
        task, decoder = config.task_definition(task_name)
        samples = config.samples_for(task_name)
        if samples > shard_size:
            raise ValueError(
                f"{samples} samples per {task_name} site exceed the {shard_size}-image shards of {shard_count} sites"
            )
        for i in range(config.sites_per_task):
            data = DataSpec(
                shard_index=t * config.sites_per_task + i,
                shard_count=shard_count,
                samples=samples,
                shard_seed=seed,
                test_samples=config.test_samples,
            )
            sites.append(PilotSite(name=f"{task_name}-{i}", task=task, decoder=decoder, data=data))
    return sites


def steps_per_round(config: PilotConfig, samples: int) -> int:
    train = samples - max(1, round(samples * config.val_fraction))
    return config.epochs * -(-train // config.batch_size)


def plan_for(config: PilotConfig, method: Method) -> MethodPlan:
    plan = _plan(config, method)
    return replace(plan, min_steps=local_round_steps(config)) if method is Method.LOCAL else plan


def local_round_steps(config: PilotConfig) -> int:
    """Local trains in rounds at least as long as the longest minimum of the run's federated
    methods: a 40-image Local site would otherwise make 2-step rounds, its optimizer state reset
    every 2 steps, a handicap no federated site with 20-step rounds has."""
    plans = [_plan(config, m) for m in config.methods]
    return max((p.min_steps for p in plans if p.federated), default=0)


def _plan(config: PilotConfig, method: Method) -> MethodPlan:
    return plan_method(
        method,
        sharing=config.sharing,
        mu=config.mu,
        regularizer=config.regularizer,
        level2_weighting=config.level2_weighting,
        level2_rule=config.level2_rule,
        site_strategy=config.site_strategy,
        min_steps=config.min_steps,
        cagrad_c=config.cagrad_c,
        shared_steps=config.shared_steps,
    )


def federated_steps(config: PilotConfig, samples: int) -> int:
    """The most optimizer steps any federated method of the run gives a site of this size:
    rounds x steps per round (raised by min_steps), per deployed model, or, with
    `local_budget` "site", for all the models the site trains (a two-track site's shared track
    too, capped by shared_steps)."""
    train = samples - max(1, round(samples * config.val_fraction))
    most = 0
    for method in config.methods:
        plan = _plan(config, method)
        if plan.federated:
            per_round = planned_steps(
                train, epochs=config.epochs, batch_size=config.batch_size, min_steps=plan.min_steps
            )
            if config.local_budget == "site" and plan.tracks == 2:
                per_round += shared_track_steps(per_round, plan.shared_steps)
            most = max(most, config.rounds * per_round)
    return most


def local_rounds(config: PilotConfig, samples: int) -> int:
    """Rounds (of `epochs` each) a Local site trains: never fewer steps than a federated site of
    the same size gets (federated_steps), and at least `local_min_steps`."""
    budget = max(config.local_min_steps, federated_steps(config, samples))
    train = samples - max(1, round(samples * config.val_fraction))
    per_round = planned_steps(
        train, epochs=config.epochs, batch_size=config.batch_size, min_steps=local_round_steps(config)
    )
    return max(config.rounds, -(-budget // per_round))


def curve_checkpoints(rounds: int, points: int) -> dict[int, int]:
    """Round -> curve index for `points` evenly spread checkpoints, the last on the final round."""
    points = min(points, rounds)
    return {-(-k * rounds // points): k for k in range(1, points + 1)}


class Federation:
    """One method over a set of sites, with its own artifact directory."""

    def __init__(
        self,
        *,
        sites: Sequence[PilotSite],
        plan: MethodPlan,
        config: PilotConfig,
        seed: int,
        data: dict[str, SiteData],
        root: Path,
        name: str,
    ) -> None:
        self.sites = sorted(sites, key=lambda s: s.name)
        self.plan, self.config, self.seed, self.data = plan, config, seed, data
        self.root, self.name = str(root), name
        self.storage = Storage()
        self.training = TrainingSpec(
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            mu=plan.mu,
            regularizer=plan.regularizer,
            decoder_source=plan.decoder_source,
            seed=seed,
            device=config.device,
            delta_dtype=config.delta_dtype,
            val_fraction=config.val_fraction,
            min_steps=plan.min_steps,
            site_strategy=plan.site_strategy,
            shared_steps=plan.shared_steps,
        )

    def _prefix(self, round_number: int) -> str:
        return round_prefix(self.root, self.name, f"round-{round_number:04d}")

    def spec(self, site: PilotSite, round_number: int) -> RoundSpec:
        previous = None
        if round_number > 1:
            previous = join(site_prefix(self._prefix(round_number - 1), site.name), DECODER_FILE)
        return RoundSpec(
            federation=self.name,
            round=round_number,
            site=site.name,
            task=site.task,
            encoder=self.config.encoder,
            decoder=site.decoder,
            training=self.training,
            data=site.data,
            global_model=global_prefix(self._prefix(round_number - 1)),
            previous_decoder=previous,
            output=site_prefix(self._prefix(round_number), site.name),
        )

    def initialise(self) -> None:
        groups = {s.task.name: TaskGroupSpec(task=s.task, decoder=s.decoder) for s in self.sites}
        init = InitSpec(
            federation=self.name,
            encoder=self.config.encoder,
            groups=tuple(groups.values()),
            sharing=self.plan.sharing,
            seed=derive_seed(self.seed, "init"),
            output=global_prefix(self._prefix(0)),
        )
        model_bytes, manifest = init_global_model(init)
        write_global_model(self.storage, init.output, model_bytes, manifest)

    def _source(self, site: PilotSite, round_number: int) -> ContributionSource:
        prefix = site_prefix(self._prefix(round_number), site.name)
        return ContributionSource(
            site=site.name,
            read_manifest=lambda: ContributionManifest.from_json(self.storage.read(join(prefix, MANIFEST_FILE))),
            read_files=lambda m: (
                self.storage.read(join(prefix, m.delta.name)),
                self.storage.read(join(prefix, m.decoder.name)),
            ),
        )

    def run_round(self, round_number: int, on_site_round: SiteRoundCallback) -> int:
        """Train every site and aggregate; returns the optimizer steps each site took."""
        steps = 0
        for site in self.sites:
            # The trainer gets no test data: model selection must never see it.
            data = replace(self.data[site.name], test=None)
            result = run_site_round(self.spec(site, round_number), self.storage, data=data)
            steps = max(steps, int(result.manifest.metrics["steps"]))
            on_site_round()
        base = read_global_model(self.storage, self.spec(self.sites[0], round_number).global_model)
        aggregated = aggregate(
            base.manifest,
            base.tensors,
            round_number,
            [self._source(s, round_number) for s in self.sites],
            self.plan.aggregation,
        )
        if aggregated.manifest.rejected:
            raise RuntimeError(f"pilot contribution rejected: {aggregated.manifest.rejected[0]}")
        write_global_model(
            self.storage, global_prefix(self._prefix(round_number)), aggregated.model_bytes, aggregated.manifest
        )
        if round_number >= 2:  # keep the directory small: the previous round's files are no longer read
            shutil.rmtree(self._prefix(round_number - 1), ignore_errors=True)
        return steps

    def score(self, site: PilotSite, round_number: int, want_test: Callable[[float], bool]) -> dict[str, float]:
        """Score the model the site would start the next round from (global encoder + its decoder)."""
        return evaluate_start(
            self.spec(site, round_number + 1), self.storage, self.data[site.name], want_test=want_test
        )

    def _best(self, site: PilotSite) -> str:
        return join(self.root, self.name, "best", site.name)

    def keep_best(self, site: PilotSite, round_number: int) -> None:
        """Copy the artifacts of the site's validation-best model, to score it on test at the end."""
        spec = self.spec(site, round_number + 1)
        best = self._best(site)
        shutil.rmtree(best, ignore_errors=True)
        shutil.copytree(spec.global_model, join(best, "global"))
        if spec.previous_decoder:
            shutil.copyfile(spec.previous_decoder, join(best, DECODER_FILE))

    def score_best(self, site: PilotSite) -> dict[str, float]:
        best = self._best(site)
        spec = replace(self.spec(site, 2), global_model=join(best, "global"), previous_decoder=join(best, DECODER_FILE))
        return evaluate_start(spec, self.storage, self.data[site.name])


def _improves(current: SiteSelection | None, val: float, higher_is_better: bool, ties: str) -> bool:
    if current is None or current.val is None:
        return True
    if val == current.val:
        return ties == "latest"
    return val > current.val if higher_is_better else val < current.val


def _constantly(answer: bool) -> Callable[[float], bool]:
    return lambda _val: answer


def _select(
    run: MethodRun,
    site: str,
    round_number: int,
    steps: int,
    scores: dict[str, float],
    higher_is_better: bool,
    ties: str = "latest",
) -> bool:
    """Keep the round with the best validation score (of tied rounds the latest, or with `ties`
    "earliest" the first); its test score is what gets reported.

    The test score may be filled in later (nan until then): selection never looks at it."""
    if not _improves(run.sites.get(site), scores["val"], higher_is_better, ties):
        return False
    evidence = {k: v for k, v in sorted(scores.items()) if k != "val" and not k.startswith("test")}
    run.sites[site] = SiteSelection(
        round=round_number, steps=steps, val=scores["val"], test=scores.get("test", math.nan), evidence=evidence
    )
    return True


def run_method(
    method: Method,
    config: PilotConfig,
    seed: int,
    data: dict[str, SiteData],
    higher_is_better: dict[str, bool],
    on_site_round: SiteRoundCallback,
) -> MethodRun:
    plan = plan_for(config, method)
    sites = pilot_sites(config, seed)
    run = MethodRun(method=method, seed=seed)
    # Local: each site is a federation of one, trained for its Local budget.
    groups = [[s] for s in sites] if not plan.federated else [sites]
    points: dict[int, CurvePoint] = {}
    with tempfile.TemporaryDirectory(prefix=f"mfed-pilot-{method.value}-") as tmp:
        for group in groups:
            name = f"{method.value.replace('_', '-')}-{group[0].name if len(group) == 1 else 'all'}"
            federation = Federation(
                sites=group, plan=plan, config=config, seed=seed, data=data, root=Path(tmp), name=name
            )
            federation.initialise()
            rounds = config.rounds if plan.federated else local_rounds(config, group[0].data.samples or 0)
            # Test data is scored only at curve checkpoints (it is the costly part); a model selected
            # between checkpoints is kept on disk and scored once at the end.
            checkpoints = curve_checkpoints(rounds, config.rounds)
            total_steps = 0
            for r in range(1, rounds + 1):
                total_steps += federation.run_round(r, on_site_round)
                index = checkpoints.get(r)
                for site in group:
                    scores = federation.score(site, r, want_test=_constantly(index is not None))
                    if (
                        _select(
                            run, site.name, r, total_steps, scores, higher_is_better[site.task.name], config.select_ties
                        )
                        and index is None
                    ):
                        federation.keep_best(site, r)
                    run.steps_per_site[site.name] = total_steps
                    if index is not None:
                        point = points.setdefault(index, CurvePoint(index=index, steps={}, test={}))
                        point.steps[site.name] = total_steps
                        point.test[site.name] = scores["test"]
                        if "test_shared_track" in scores:
                            point.tracks[site.name] = {
                                "task": scores["test_task_track"],
                                "shared": scores["test_shared_track"],
                            }
            for site in group:
                if math.isnan(run.sites[site.name].test):
                    run.sites[site.name].test = federation.score_best(site)["test"]
    run.curve = [points[k] for k in sorted(points)]
    return run


def site_data(config: PilotConfig, seed: int) -> dict[str, SiteData]:
    """Load every site's splits once per seed (the same splits the trainer would build)."""
    storage = Storage()
    return {
        site.name: load_site_splits(site.data, site.name, config.val_fraction, storage)
        for site in pilot_sites(config, seed)
    }


def higher_is_better(config: PilotConfig) -> dict[str, bool]:
    shape = input_spec_of(build_encoder(config.encoder))
    tasks = {t: config.task_definition(t)[0] for t in config.tasks}
    return {t: build_task(spec.type, spec.params, shape).higher_is_better for t, spec in tasks.items()}


def total_site_rounds(config: PilotConfig) -> int:
    per_seed = 0
    for method in config.methods:
        for task in config.tasks:
            samples = config.samples_for(task)
            rounds = local_rounds(config, samples) if method is Method.LOCAL else config.rounds
            per_seed += rounds * config.sites_per_task
    return per_seed * len(config.seeds)
