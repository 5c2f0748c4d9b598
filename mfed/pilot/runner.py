"""The local federation: every method runs through the real trainer round and aggregator.

Sites, rounds and the global model go through the same code a Kubernetes deployment uses
(`run_site_round` writes safetensors + manifests; `aggregate` streams and validates them),
only with a local directory instead of S3 and in-process calls instead of Jobs.

Fairness (MFED.md): every method, Local included, trains the same optimizer steps per site
(`PilotConfig.steps`, both tracks of a two-track site counted) in rounds of the same length, and
every method's reported model per site is the round with the best score on that site's own
validation split, never the test set.

The sites of a round are independent: a `SitePool` trains and scores them in worker processes.
Each site round is seeded from its spec alone and every worker runs one torch thread, so the
numbers do not depend on how many workers there are.
"""

from __future__ import annotations

import math
import multiprocessing
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from mfed.aggregation.fedavg import ContributionSource, aggregate
from mfed.aggregation.validate import RejectReason
from mfed.artifacts.layout import DECODER_FILE, MANIFEST_FILE, global_prefix, join, round_prefix, site_prefix
from mfed.artifacts.manifest import ContributionManifest
from mfed.learning.data import SiteData
from mfed.learning.encoders import build_encoder, input_spec_of
from mfed.learning.tasks import build_task
from mfed.methods import Method, MethodPlan
from mfed.model_store import read_global_model, write_global_model
from mfed.pilot.attacks import Attack
from mfed.pilot.centralized import run_centralized
from mfed.pilot.config import PilotConfig, PilotSite
from mfed.pilot.records import CurvePoint, MethodRun, SiteSelection
from mfed.rounds.initial import init_global_model
from mfed.rounds.site_round import evaluate_start, load_site_for, run_site_round
from mfed.seeding import derive_seed
from mfed.spec import DataSpec, InitSpec, RoundSpec, TaskGroupSpec, TrainingSpec
from mfed.storage import Storage

SiteRoundCallback = Callable[[], None]
T = TypeVar("T")
FASHION_MNIST_TRAIN = 60000


def pilot_sites(config: PilotConfig, seed: int) -> list[PilotSite]:
    """The declared sites (manifests), or the built-in ones: `<task>-<i>`, each on its own
    disjoint shard of Fashion-MNIST's train set."""
    if config.sites:
        return [replace(s, data=replace(s.data, shard_seed=seed)) if s.reseed else s for s in config.sites]
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
            sites.append(PilotSite(name=f"{task_name}-{i}", task=task, decoder=decoder, data=data, reseed=True))
    return sites


def steps_per_round(config: PilotConfig, samples: int) -> int:
    """Steps of one epoch over a site's training split (a round may be shorter or longer)."""
    train = samples - max(1, round(samples * config.val_fraction))
    return config.epochs * -(-train // config.batch_size)


def plan_for(config: PilotConfig, method: Method) -> MethodPlan:
    return config.plan(method)


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
        task_steps, shared_steps = config.track_steps(plan.method)
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
            # Exactly the budget's round length, whatever the site's size: epochs only cap nothing.
            min_steps=task_steps,
            max_steps=task_steps,
            site_strategy=plan.site_strategy,
            shared_steps=shared_steps,
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

    def train_specs(self, round_number: int) -> list[tuple[PilotSite, RoundSpec]]:
        return [(site, self.spec(site, round_number)) for site in self.sites]

    def tamper(self, attack: Attack, round_number: int) -> None:
        """The attacker rewrites what it uploaded this round (mfed.pilot.attacks)."""
        attack.tamper(self.storage, site_prefix(self._prefix(round_number), attack.site))

    def aggregate(self, round_number: int) -> None:
        """Aggregate the sites' contributions of `round_number` into the next global model."""
        base = read_global_model(self.storage, self.spec(self.sites[0], round_number).global_model)
        attack = self.config.attack
        withheld = attack.site if attack is not None and attack.withholds and self.plan.federated else None
        aggregated = aggregate(
            base.manifest,
            base.tensors,
            round_number,
            [self._source(s, round_number) for s in self.sites if s.name != withheld],
            self.plan.aggregation,
            # A pilot is a simulation: its DP noise is seeded so a seed gives the same numbers; a
            # deployment's operator draws it from OS entropy (docs/privacy.md).
            noise_rng=np.random.default_rng(derive_seed(self.seed, f"dp-noise-{round_number}")),
        )
        # A screen (--norm-factor, --min-cosine) refusing an outlier is the rule working; anything else is a bug.
        screened = {RejectReason.NORM_OUTLIER.value, RejectReason.DIRECTION_OUTLIER.value}
        refused = [r for r in aggregated.manifest.rejected if r.reason not in screened]
        if refused:
            raise RuntimeError(f"pilot contribution rejected: {refused[0]}")
        write_global_model(
            self.storage, global_prefix(self._prefix(round_number)), aggregated.model_bytes, aggregated.manifest
        )
        if round_number >= 2:  # keep the directory small: the previous round's files are no longer read
            shutil.rmtree(self._prefix(round_number - 1), ignore_errors=True)

    def score_spec(self, site: PilotSite, round_number: int) -> RoundSpec:
        """The spec of the model the site would start the next round from (global encoder + its decoder)."""
        return self.spec(site, round_number + 1)

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


def _train_site(spec: RoundSpec, data: SiteData) -> tuple[int, int]:
    """One site round in a worker; returns the optimizer steps it took (both tracks) and the
    bytes of the files it wrote for the aggregator (encoder delta + decoder)."""
    manifest = run_site_round(spec, Storage(), data=data).manifest
    return int(manifest.metrics["steps"]), manifest.delta.size + manifest.decoder.size


def _score_site(spec: RoundSpec, data: SiteData, want_test: bool) -> dict[str, float]:
    return evaluate_start(spec, Storage(), data, want_test=_constantly(want_test))


def _init_worker() -> None:
    import torch

    # One thread per worker: the workers are the parallelism, and a fixed thread count keeps
    # the kernels' reduction order, hence the numbers, the same for any number of workers.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)


class SitePool:
    """Runs site rounds and scorings in `workers` spawned processes (0: in this process, one
    after the other, the loop the pilot had before it used more than one core)."""

    def __init__(self, workers: int) -> None:
        if workers < 0:
            raise ValueError("--workers must be 0 or more")
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        if workers:
            self._executor = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
            )

    def __enter__(self) -> SitePool:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)

    def map(self, fn: Callable[..., T], calls: Sequence[tuple[object, ...]], on_done: SiteRoundCallback) -> list[T]:
        """fn(*args) for every args in `calls`, results in the order of `calls`."""
        if self._executor is None:
            results = []
            for args in calls:
                results.append(fn(*args))
                on_done()
            return results
        futures = [self._executor.submit(fn, *args) for args in calls]
        for _ in as_completed(futures):
            on_done()
        return [f.result() for f in futures]


def _nothing() -> None:
    pass


def run_method(
    method: Method,
    config: PilotConfig,
    seed: int,
    data: dict[str, SiteData],
    higher_is_better: dict[str, bool],
    on_site_round: SiteRoundCallback,
    pool: SitePool | None = None,
) -> MethodRun:
    with SitePool(0) if pool is None else nullcontext(pool) as sites_pool:
        return _run_method(method, config, seed, data, higher_is_better, on_site_round, sites_pool)


def _run_method(
    method: Method,
    config: PilotConfig,
    seed: int,
    data: dict[str, SiteData],
    higher_is_better: dict[str, bool],
    on_site_round: SiteRoundCallback,
    pool: SitePool,
) -> MethodRun:
    plan = plan_for(config, method)
    sites = pilot_sites(config, seed)
    if method is Method.CENTRALIZED:
        return run_centralized(
            config,
            seed,
            data,
            higher_is_better,
            [(s.name, s.task.name) for s in sites],
            _select,
            curve_checkpoints(config.rounds, config.rounds),
            on_site_round,
        )
    run = MethodRun(method=method, seed=seed, site_tasks={s.name: s.task.name for s in sites})
    # Local: each site is a federation of one; all of them run their rounds side by side.
    groups = [[s] for s in sites] if not plan.federated else [sites]
    points: dict[int, CurvePoint] = {}
    # The trainer gets no test data: model selection must never see it.
    train_data = {name: replace(d, test=None) for name, d in data.items()}
    attack = config.attack
    if attack is not None:
        train_data[attack.site] = attack.poison_data(train_data[attack.site], derive_seed(seed, "attack"))
    with tempfile.TemporaryDirectory(prefix=f"mfed-pilot-{method.value}-") as tmp:
        federations = []
        for group in groups:
            name = f"{method.value.replace('_', '-')}-{group[0].name if len(group) == 1 else 'all'}"
            federation = Federation(
                sites=group, plan=plan, config=config, seed=seed, data=data, root=Path(tmp), name=name
            )
            federation.initialise()
            federations.append(federation)
        # Test data is scored only at curve checkpoints (it is the costly part); a model selected
        # between checkpoints is kept on disk and scored once at the end.
        checkpoints = curve_checkpoints(config.rounds, config.rounds)
        for r in range(1, config.rounds + 1):
            trained = [(f, site, spec) for f in federations for site, spec in f.train_specs(r)]
            done = pool.map(_train_site, [(spec, train_data[site.name]) for _, site, spec in trained], on_site_round)
            for (_, site, _), (taken, written) in zip(trained, done, strict=True):
                run.steps_per_site[site.name] = run.steps_per_site.get(site.name, 0) + taken
                run.site_rounds[site.name] = run.site_rounds.get(site.name, 0) + 1
                # Local's sites are federations of one: what they write never leaves the site.
                shared = written if plan.federated else 0
                run.uploaded_bytes[site.name] = run.uploaded_bytes.get(site.name, 0) + shared
            if attack is not None and plan.federated:
                federations[0].tamper(attack, r)
            for federation in federations:
                federation.aggregate(r)
            index = checkpoints.get(r)
            scored = [(f, site) for f in federations for site in f.sites]
            all_scores = pool.map(
                _score_site,
                [(f.score_spec(site, r), data[site.name], index is not None) for f, site in scored],
                _nothing,
            )
            for (federation, site), scores in zip(scored, all_scores, strict=True):
                total_steps = run.steps_per_site[site.name]
                better = higher_is_better[site.task.name]
                if _select(run, site.name, r, total_steps, scores, better, config.select_ties) and index is None:
                    federation.keep_best(site, r)
                if index is not None:
                    point = points.setdefault(index, CurvePoint(index=index, steps={}, test={}))
                    point.steps[site.name] = total_steps
                    point.test[site.name] = scores["test"]
                    if "test_shared_track" in scores:
                        point.tracks[site.name] = {
                            "task": scores["test_task_track"],
                            "shared": scores["test_shared_track"],
                        }
        for federation in federations:
            for site in federation.sites:
                if math.isnan(run.sites[site.name].test):
                    run.sites[site.name].test = federation.score_best(site)["test"]
    run.curve = [points[k] for k in sorted(points)]
    if attack is not None:  # the table is about everyone else: the attacker's own scores are left out
        for per_site in (run.sites, run.steps_per_site, run.site_rounds, run.uploaded_bytes):
            per_site.pop(attack.site, None)
        for point in run.curve:
            point.steps.pop(attack.site, None)
            point.test.pop(attack.site, None)
            point.tracks.pop(attack.site, None)
    return run


def site_data(config: PilotConfig, seed: int) -> dict[str, SiteData]:
    """Load every site's splits once per seed (the same splits the trainer would build)."""
    storage = Storage()
    return {
        site.name: load_site_for(
            site.name, site.data, config.encoder, site.task, site.decoder, config.val_fraction, storage
        )
        for site in pilot_sites(config, seed)
    }


def higher_is_better(config: PilotConfig) -> dict[str, bool]:
    shape = input_spec_of(build_encoder(config.encoder))
    tasks = {t: config.task_definition(t)[0] for t in config.tasks}
    return {t: build_task(spec.type, spec.params, shape).higher_is_better for t, spec in tasks.items()}


def total_site_rounds(config: PilotConfig) -> int:
    """Site rounds of the whole run: every method trains every site for `rounds` rounds."""
    return config.rounds * config.site_count * len(config.methods) * len(config.seeds)
