"""What a pilot run is: sites, tasks, methods, budgets. Pure configuration, no torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mfed.aggregation.crosstask import Level2Rule, Level2Weighting
from mfed.aggregation.robust import RobustSettings
from mfed.methods import Method, MethodPlan, plan_method
from mfed.pilot.attacks import Attack
from mfed.privacy.settings import PrivacySettings
from mfed.spec import ArchSpec, DataSpec, Regularizer, SharingPolicy, SiteStrategy, TaskSpec

# The four Fashion-MNIST tasks of MFED.md.
COARSE4_LABEL_MAP = [0, 1, 0, 0, 0, 2, 0, 2, 3, 2]  # tops / bottoms / shoes / bags
PILOT_TASKS: dict[str, tuple[TaskSpec, ArchSpec]] = {
    "cls10": (TaskSpec(name="cls10", type="classification", params={"num_classes": 10}), ArchSpec(name="mlp")),
    "coarse4": (
        TaskSpec(name="coarse4", type="label_map", params={"label_map": COARSE4_LABEL_MAP}),
        ArchSpec(name="mlp"),
    ),
    "denoise": (TaskSpec(name="denoise", type="denoise", params={"sigma": 0.5}), ArchSpec(name="upsample")),
    "rot4": (TaskSpec(name="rot4", type="rotation"), ArchSpec(name="mlp")),
}
ALL_METHODS = (Method.LOCAL, Method.TASK_FEDAVG, Method.ENCODER_FEDAVG, Method.MFED)


class PilotConfigError(ValueError):
    pass


@dataclass(frozen=True)
class PilotSite:
    name: str
    task: TaskSpec
    decoder: ArchSpec
    data: DataSpec
    # A demo shard whose manifest sets no shardSeed is drawn with the run's seed, as the built-in
    # sites are: a seed then varies the data a site holds as well as the model's start.
    reseed: bool = False


@dataclass(frozen=True, kw_only=True)
class PilotConfig:
    rounds: int = 30
    sites_per_task: int = 2
    samples_per_site: int = 300
    task_samples: Mapping[str, int] = field(default_factory=dict)  # per-task override
    tasks: tuple[str, ...] = ("cls10", "coarse4", "denoise", "rot4")
    methods: tuple[Method, ...] = ALL_METHODS
    seeds: tuple[int, ...] = (0,)
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-3
    mu: float = 0.01
    regularizer: Regularizer = Regularizer.L2
    sharing: SharingPolicy = SharingPolicy()
    level2_weighting: Level2Weighting = Level2Weighting.UNIFORM
    # Cross-task strategy overrides for M-Fed and its presets (None: each preset's own choice).
    level2_rule: Level2Rule | None = None
    site_strategy: SiteStrategy | None = None
    # The compute budget: optimizer steps per site, the same for every method, Local included
    # (a two-track site counts both tracks). Each round is steps // rounds long; 600 = 30 rounds
    # of 20 steps, where the default scenario's curves have flattened (docs/results.md).
    steps: int = 600
    shared_steps: int | None = None
    cagrad_c: float = 0.4
    val_fraction: float = 0.2
    test_samples: int = 2000
    # Which of the rounds tied for the best validation score a site reports: "latest" (default),
    # the most trained one, or "earliest" (the rule of the tables measured before 2026-11-26). On
    # 10 validation images accuracy moves in steps of 10 points and ties are the rule: "earliest"
    # then reports round 1 or 2 whenever it already scores 10 of 10 (docs/results.md, section 2).
    select_ties: str = "latest"
    device: str = "auto"
    delta_dtype: str = "float32"  # what sites upload: float32, float16 or bfloat16 deltas
    encoder: ArchSpec = ArchSpec(name="small_cnn")
    # Tasks of your own beside (or instead of) the four above, e.g. a plugin's task type, and
    # decoders other than a task's default (`mlp` for custom tasks); Fashion-MNIST data either way.
    custom_tasks: Mapping[str, TaskSpec] = field(default_factory=dict)
    decoders: Mapping[str, ArchSpec] = field(default_factory=dict)
    scenario: str = "equal"
    # How the federated methods aggregate (Local shares nothing, so neither applies to it), and
    # one faulty or hostile site (mfed.pilot.attacks); docs/privacy.md.
    robust: RobustSettings = RobustSettings()
    privacy: PrivacySettings | None = None
    attack: Attack | None = None
    gate_threshold: float | None = None  # the gated rule's threshold (None: the method's default)
    # Sites declared by SiteTask manifests (`mfed pilot -f DIR`, mfed.pilot.manifests); empty:
    # the built-in Fashion-MNIST sites, `sites_per_task` of each task in `tasks`.
    sites: tuple[PilotSite, ...] = ()
    source: str | None = None  # the manifests' directory, when the sites came from there

    def __post_init__(self) -> None:
        for name in ("rounds", "sites_per_task", "samples_per_site", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise PilotConfigError(f"--{name.replace('_', '-')} must be at least 1")
        known = [*PILOT_TASKS, *self.custom_tasks]
        unknown = [t for t in [*self.tasks, *self.decoders] if t not in known]
        if unknown:
            raise PilotConfigError(
                f"unknown pilot task {unknown[0]!r}; choose from {', '.join(known)} or define it with --task"
            )
        unknown = [t for t in self.task_samples if t not in self.tasks]
        if unknown:
            raise PilotConfigError(f"--task-samples names {unknown[0]!r}, which is not a pilot task")
        if not self.seeds:
            raise PilotConfigError("--seeds needs at least one seed")
        if Method.LOCAL not in self.methods:
            raise PilotConfigError("the Local baseline is required: dm% is measured against it")
        if self.select_ties not in ("latest", "earliest"):
            raise PilotConfigError(f"--select-ties is {self.select_ties!r}: use latest or earliest")
        if self.steps % self.rounds:
            near = max(1, round(self.steps / self.rounds)) * self.rounds
            raise PilotConfigError(
                f"--steps {self.steps} is not a multiple of --rounds {self.rounds}: every round must be "
                f"equally long; choose e.g. --steps {near}"
            )
        two_track = [m for m in self.methods if self.plan(m).tracks == 2]
        if self.round_steps < (2 if two_track else 1):
            raise PilotConfigError(
                f"--steps {self.steps} over {self.rounds} rounds leaves {self.round_steps} steps a round: "
                + ("a two-track method needs at least 2 (one per track)" if two_track else "need at least 1")
            )
        if self.shared_steps is not None and self.shared_steps < 1:
            raise PilotConfigError("--shared-steps must be at least 1")
        if self.attack is not None and self.attack.site not in self.site_names:
            raise PilotConfigError(
                f"--attack-site {self.attack.site!r} is not a pilot site; choose from {', '.join(self.site_names)}"
            )
        if self.attack is not None and Method.CENTRALIZED in self.methods:
            raise PilotConfigError(
                "--attack with centralized: the pooled reference is the ceiling of a clean federation; "
                "run it without --attack"
            )
        if self.sites and sorted({s.task.name for s in self.sites}) != sorted(self.tasks):
            raise PilotConfigError("the declared sites' tasks must be the pilot's tasks")
        if self.attack is not None and len(self.sites_of(self.attack.site)) < 2:
            raise PilotConfigError(
                f"--attack-site {self.attack.site} would be the only site of its task, and its scores are left "
                "out: nobody would be left to measure; use --sites-per-task 2 or more"
            )
        if self.privacy is not None or not self.robust.is_default:
            flag = "--dp-noise" if self.privacy is not None else "--rule"
            for method in self.methods:
                plan = self.plan(method)
                if plan.federated and plan.sharing.task_level:
                    raise PilotConfigError(
                        f"{flag} does not combine with {method.value} (task-level copies of the shared encoder); "
                        "use m-fed, task-fedavg or encoder-fedavg beside local"
                    )
                try:
                    plan.aggregation  # noqa: B018 - AggregationSettings checks the combination
                except ValueError as exc:
                    raise PilotConfigError(f"{flag} with {method.value}: {exc}") from None

    def task_definition(self, task: str) -> tuple[TaskSpec, ArchSpec]:
        """The task group `task` (a built-in pilot task or a custom one) and its decoder."""
        spec = self.custom_tasks.get(task) or PILOT_TASKS[task][0]
        default = PILOT_TASKS[task][1] if task in PILOT_TASKS else ArchSpec(name="mlp")
        return spec, self.decoders.get(task, default)

    def samples_for(self, task: str) -> int:
        return self.task_samples.get(task, self.samples_per_site)

    @property
    def round_steps(self) -> int:
        """Optimizer steps a site takes each round, whatever the method: the budget over the rounds."""
        return self.steps // self.rounds

    def plan(self, method: Method) -> MethodPlan:
        """The method's plan, its own minimum steps replaced by the budget's round length."""
        plan = plan_method(
            method,
            sharing=self.sharing,
            mu=self.mu,
            regularizer=self.regularizer,
            level2_weighting=self.level2_weighting,
            level2_rule=self.level2_rule,
            site_strategy=self.site_strategy,
            min_steps=self.round_steps,
            cagrad_c=self.cagrad_c,
            shared_steps=self.shared_steps,
            **({} if self.gate_threshold is None else {"gate_threshold": self.gate_threshold}),
        )
        plan = replace(plan, min_steps=self.round_steps)  # Local's plan too: it trains the same rounds
        return replace(plan, robust=self.robust, privacy=self.privacy) if plan.federated else plan

    def track_steps(self, method: Method) -> tuple[int, int | None]:
        """(task-track steps, shared-track steps or None) a site of `method` trains each round;
        they add up to round_steps. A two-track site gives its shared track at most its cap
        (auto: 20) and at most half the round, the rest to the model it deploys."""
        plan = self.plan(method)
        if plan.tracks == 1:
            return self.round_steps, None
        cap = self.round_steps // 2 if plan.shared_steps is None else min(plan.shared_steps, self.round_steps // 2)
        return self.round_steps - cap, cap

    @property
    def site_count(self) -> int:
        return len(self.sites) if self.sites else len(self.tasks) * self.sites_per_task

    @property
    def site_names(self) -> list[str]:
        """The declared sites' names, or `<task>-<i>` as pilot_sites names the built-in ones."""
        if self.sites:
            return [s.name for s in self.sites]
        return [f"{t}-{i}" for t in self.tasks for i in range(self.sites_per_task)]

    def sites_of(self, site: str) -> list[str]:
        """Every site of `site`'s task, itself included."""
        if self.sites:
            task = next(s.task.name for s in self.sites if s.name == site)
            return [s.name for s in self.sites if s.task.name == task]
        return [n for n in self.site_names if n.rsplit("-", 1)[0] == site.rsplit("-", 1)[0]]

    def _sites_dict(self) -> dict[str, Any]:
        if not self.sites:
            return {"samples_per_site": {t: self.samples_for(t) for t in self.tasks}}
        return {
            "source": self.source,
            "sites": {s.name: {"task": s.task.name, "data": s.data.to_dict()} for s in self.sites},
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "rounds": self.rounds,
            "sites_per_task": self.sites_per_task,
            **self._sites_dict(),
            "tasks": list(self.tasks),
            "methods": [m.value for m in self.methods],
            "seeds": list(self.seeds),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "mu": self.mu,
            "regularizer": self.regularizer.value,
            "sharing": self.sharing.to_dict(),
            "level2_weighting": self.level2_weighting.value,
            "level2_rule": None if self.level2_rule is None else self.level2_rule.value,
            "site_strategy": None if self.site_strategy is None else self.site_strategy.value,
            "steps": self.steps,
            "round_steps": self.round_steps,
            "shared_steps": self.shared_steps,
            "cagrad_c": self.cagrad_c,
            "val_fraction": self.val_fraction,
            "test_samples": self.test_samples,
            "select_ties": self.select_ties,
            "device": self.device,
            "delta_dtype": self.delta_dtype,
            "encoder": {"name": self.encoder.name, "params": dict(self.encoder.params)},
            "task_definitions": {
                t: {
                    "type": spec.type,
                    "params": dict(spec.params),
                    "decoder": {"name": decoder.name, "params": dict(decoder.params)},
                }
                for t in self.tasks
                for spec, decoder in [self.task_definition(t)]
            },
            "robust": self.robust.to_dict(),
            "privacy": None if self.privacy is None else self.privacy.to_dict(),
            "attack": None if self.attack is None else {"kind": self.attack.kind.value, "site": self.attack.site},
        }


QUICK: dict[str, Any] = {
    "rounds": 2,
    "sites_per_task": 1,
    "samples_per_site": 64,
    "test_samples": 200,
    "steps": 8,
}
SCENARIOS: dict[str, dict[str, Any]] = {
    # MFED.md's equal-data benchmark: 4 tasks x 2 sites, 300 images each.
    "equal": {},
    # One site per task: label-scarce supervised sites beside data-rich self-supervised ones. The
    # 3000-image sites are still learning at 600 steps (Local's denoise +0.2 dB over the last 100),
    # flat by 3000 (+0.1 dB over the last 500; docs/results.md section 2): 3000 steps, 100 a round.
    "scarce": {
        "sites_per_task": 1,
        "task_samples": {"cls10": 50, "coarse4": 50, "denoise": 3000, "rot4": 3000},
        "steps": 3000,
    },
}
