"""The contract between whoever schedules a round (pilot or operator) and the site trainer.

A `RoundSpec` says everything one site needs for one round: its task, the model architecture,
the training settings, where its data is, where the global model is and where to write. An
`InitSpec` asks for the round-0 global model. Both are plain JSON documents, parsed here once,
so the operator (no torch) and the trainer agree by construction.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from mfed.fields import FieldError, Fields

SPEC_VERSION = 1

# Task names become parts of tensor keys (`tasks.<name>.decoder.*`) and of object-store paths.
TASK_NAME = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
SITE_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


class SpecError(FieldError):
    """A round or init spec is invalid; retrying will not help."""


def _check_name(pattern: re.Pattern[str], value: str, path: str, what: str) -> str:
    if not pattern.match(value):
        raise SpecError(
            path,
            f"{what} {value!r} is not valid: use lower-case letters, digits and '-' "
            f"(start and end with a letter or digit)",
        )
    return value


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """An architecture chosen by registered name plus keyword parameters."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, f: Fields) -> ArchSpec:
        f.reject_unknown(["name", "params"])
        return cls(name=f.str("name"), params=f.mapping("params"))


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """A task group: sites with the same `name` share a decoder architecture and average it."""

    name: str
    type: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, f: Fields) -> TaskSpec:
        f.reject_unknown(["name", "type", "params"])
        name = _check_name(TASK_NAME, f.str("name"), f.where("name"), "task name")
        return cls(name=name, type=f.str("type"), params=f.mapping("params"))


class SharingMode(StrEnum):
    ALL = "all"
    NONE = "none"
    DEPTH = "depth"
    PREFIXES = "prefixes"


@dataclass(frozen=True, kw_only=True)
class SharingPolicy:
    """Which encoder parameters are averaged ACROSS task groups (the rest stay per task).

    The built-in encoders name their blocks `encoder.stages.<i>.` from the input up, so `depth: 2`
    shares the two lowest stages; `prefixes` works on any encoder's parameter names. MFED.md
    measured that sharing only lower layers avoids most of the negative transfer that sharing
    everything causes.
    """

    mode: SharingMode = SharingMode.ALL
    depth: int = 0
    prefixes: tuple[str, ...] = ()
    # Also keep each task group's own copy of the shared parameters (`tasks.<t>.encoder.<p>` beside
    # `encoder.<p>`): sites can then mix the shared and the task-level encoder, or fall back to the
    # task level, per round (docs/strategies.md). Off: the literal layout, one copy per parameter.
    task_level: bool = False

    def __post_init__(self) -> None:
        if self.mode is SharingMode.DEPTH and self.depth < 1:
            raise SpecError("sharing.depth", "must be at least 1 when mode is depth")
        if self.mode is SharingMode.PREFIXES and not self.prefixes:
            raise SpecError("sharing.prefixes", "must list at least one prefix when mode is prefixes")

    @classmethod
    def parse(cls, f: Fields) -> SharingPolicy:
        f.reject_unknown(["mode", "depth", "prefixes", "taskLevel"])
        mode = SharingMode(f.str("mode", "all", choices=[m.value for m in SharingMode]))
        return cls(
            mode=mode,
            depth=f.int("depth", 0, minimum=0),
            prefixes=f.str_list("prefixes"),
            task_level=f.bool("taskLevel", False),
        )

    @classmethod
    def from_text(cls, text: str) -> SharingPolicy:
        """`all`, `none`, `2` / `depth:2`, or `prefix:encoder.stages.0.,encoder.stages.1.`; a `+task`
        suffix (`all+task`) keeps task-level copies of the shared parameters too."""
        value = text.strip()
        if value.endswith("+task"):
            return replace(cls.from_text(value.removesuffix("+task")), task_level=True)
        if value in ("all", "none"):
            return cls(mode=SharingMode(value))
        if value.isdigit() or value.startswith("depth:"):
            return cls(mode=SharingMode.DEPTH, depth=int(value.removeprefix("depth:")))
        if value.startswith(("prefix:", "prefixes:")):
            items = value.split(":", 1)[1].split(",")
            return cls(mode=SharingMode.PREFIXES, prefixes=tuple(p for p in items if p))
        raise SpecError(
            "sharing", f"{text!r} is not a sharing policy: use all, none, N (lowest N stages), or prefix:<p1>,<p2>"
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode.value, "depth": self.depth, "prefixes": list(self.prefixes)}
        if self.task_level:  # written only when set, so literal-layout documents are unchanged
            out["taskLevel"] = True
        return out


class Regularizer(StrEnum):
    """How the local decoder is pulled toward the task's global decoder (MFED.md)."""

    NONE = "none"
    L2 = "l2"  # (mu/2) * ||theta(D_k) - theta(D_tau)||^2, the literal reading
    DISTILL = "distill"  # mu * d(D_k(E(x)), D_tau(E(x))), the output-distillation reading


class SiteStrategy(StrEnum):
    """Where a site starts from when the global model keeps task-level copies of the shared
    encoder parameters (SharingPolicy.task_level), and what it deploys (docs/strategies.md).

    Without task-level copies there is only one encoder per task and every strategy starts there.
    """

    SHARED = "shared"  # start from the shared encoder E_G (the literal reading)
    TASK = "task"  # start from the task-level encoder E_tau (no cross-task transfer)
    GATE = "gate"  # E_G while the aggregator's similarity gate is open for the task, else E_tau
    MIX = "mix"  # alpha * E_G + (1 - alpha) * E_tau, alpha chosen on validation after a decoder probe
    FALLBACK = "fallback"  # train both tracks (E_tau and E_G); deploy the better one on validation


class DecoderSource(StrEnum):
    """Where a site's decoder starts a round: its own from last round, or the task's global."""

    OWN = "own"
    GLOBAL = "global"


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-3
    mu: float = 0.01
    regularizer: Regularizer = Regularizer.L2
    decoder_source: DecoderSource = DecoderSource.OWN
    seed: int = 0
    device: str = "auto"
    delta_dtype: str = "float32"
    val_fraction: float = 0.2
    max_steps: int | None = None
    # Train at least this many optimizer steps per round (more epochs for small sites): a site with
    # 40 images otherwise makes 2 steps a round and needs hundreds of rounds to use what it gets.
    min_steps: int = 0
    site_strategy: SiteStrategy = SiteStrategy.SHARED
    # A two-track site (fallback) trains its shared track at most this many steps a round (None:
    # as many as its task track): a data-rich site then spends most of its compute on the model
    # it deploys, while still contributing a shared-track update every round.
    shared_steps: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise SpecError("training.epochs", "must be at least 1")
        if self.batch_size < 1:
            raise SpecError("training.batchSize", "must be at least 1")
        if not self.learning_rate > 0:
            raise SpecError("training.learningRate", "must be greater than 0")
        if self.mu < 0:
            raise SpecError("training.mu", "must be 0 or more")
        if not 0 < self.val_fraction < 1:
            raise SpecError("training.valFraction", "must be between 0 and 1 (exclusive)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise SpecError("training.device", f"is {self.device!r}; use auto, cpu, cuda or cuda:N")
        if self.delta_dtype not in ("float32", "float16", "bfloat16"):
            raise SpecError("training.deltaDtype", "use float32, float16 or bfloat16")
        if self.min_steps < 0:
            raise SpecError("training.minSteps", "must be 0 or more")
        if self.shared_steps is not None and self.shared_steps < 1:
            raise SpecError("training.sharedSteps", "must be at least 1 (leave it unset for no cap)")
        if self.max_steps is not None and self.min_steps > self.max_steps:
            raise SpecError("training.minSteps", f"is {self.min_steps}, above maxSteps {self.max_steps}")

    @classmethod
    def parse(cls, f: Fields) -> TrainingSpec:
        f.reject_unknown(
            [
                "epochs",
                "batchSize",
                "learningRate",
                "mu",
                "regularizer",
                "decoderSource",
                "seed",
                "device",
                "deltaDtype",
                "valFraction",
                "maxSteps",
                "minSteps",
                "siteStrategy",
                "sharedSteps",
            ]
        )
        return cls(
            epochs=f.int("epochs", 1, minimum=1),
            batch_size=f.int("batchSize", 32, minimum=1),
            learning_rate=f.float("learningRate", 1e-3, minimum=0, exclusive_minimum=True),
            mu=f.float("mu", 0.01, minimum=0),
            regularizer=Regularizer(f.str("regularizer", "l2", choices=[r.value for r in Regularizer])),
            decoder_source=DecoderSource(f.str("decoderSource", "own", choices=[d.value for d in DecoderSource])),
            seed=f.int("seed", 0),
            device=f.str("device", "auto"),
            delta_dtype=f.str("deltaDtype", "float32", choices=["float32", "float16", "bfloat16"]),
            val_fraction=f.float("valFraction", 0.2, minimum=0, maximum=1),
            max_steps=f.opt_int("maxSteps", minimum=1),
            min_steps=f.int("minSteps", 0, minimum=0),
            site_strategy=SiteStrategy(f.str("siteStrategy", "shared", choices=[s.value for s in SiteStrategy])),
            shared_steps=f.opt_int("sharedSteps", minimum=1),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "epochs": self.epochs,
            "batchSize": self.batch_size,
            "learningRate": self.learning_rate,
            "mu": self.mu,
            "regularizer": self.regularizer.value,
            "decoderSource": self.decoder_source.value,
            "seed": self.seed,
            "device": self.device,
            "deltaDtype": self.delta_dtype,
            "valFraction": self.val_fraction,
            "maxSteps": self.max_steps,
        }
        # Written only when set, so specs of the literal method keep their bytes (and old trainers
        # that do not know the fields keep reading them).
        if self.min_steps:
            out["minSteps"] = self.min_steps
        if self.site_strategy is not SiteStrategy.SHARED:
            out["siteStrategy"] = self.site_strategy.value
        if self.shared_steps is not None:
            out["sharedSteps"] = self.shared_steps
        return out


class DataSource(StrEnum):
    FASHION_MNIST = "fashion-mnist"  # the built-in demo data set, sharded per site
    NPZ = "npz"  # a site's own data: arrays x (images) and y (labels/targets)
    IMAGE_FOLDER = "image-folder"  # a directory of PNG/JPEG files: class sub-folders or an index
    TAR_SHARDS = "tar-shards"  # a directory of .tar shards of <key>.png + <key>.cls (WebDataset layout)
    PLUGIN = "plugin"  # a reader of the `mfed.datasets` entry points, named by `dataset`


AUGMENT_FLIPS = ("horizontal", "vertical", "both")


@dataclass(frozen=True, kw_only=True)
class AugmentSpec:
    """Per-site augmentation of training batches (mfed.learning.augment); none by default."""

    flip: str | None = None  # mirror each image with probability 1/2: left-right, up-down, or either
    shift: int = 0  # translate each image by up to this many pixels each way (zeros come in)
    brightness: float = 0.0  # scale each image by a factor from [1 - b, 1 + b], clipped to [0, 1]
    noise: float = 0.0  # add Gaussian noise of this standard deviation (images: clipped to [0, 1])

    def __post_init__(self) -> None:
        if self.flip is not None and self.flip not in AUGMENT_FLIPS:
            raise SpecError("data.augment.flip", f"is {self.flip!r}; use {', '.join(AUGMENT_FLIPS)}")
        if self.shift < 0:
            raise SpecError("data.augment.shift", "must be 0 or more pixels")
        if not (math.isfinite(self.brightness) and 0 <= self.brightness < 1):
            raise SpecError("data.augment.brightness", "must be in [0, 1)")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise SpecError("data.augment.noise", "must be 0 or more")

    @property
    def active(self) -> bool:
        return self.flip is not None or self.shift > 0 or self.brightness > 0 or self.noise > 0

    @classmethod
    def parse(cls, f: Fields) -> AugmentSpec:
        f.reject_unknown(["flip", "shift", "brightness", "noise"])
        return cls(
            flip=f.opt_str("flip"),
            shift=f.int("shift", 0, minimum=0),
            brightness=f.float("brightness", 0.0, minimum=0),
            noise=f.float("noise", 0.0, minimum=0),
        )

    def to_dict(self) -> dict[str, Any]:
        values = {"flip": self.flip, "shift": self.shift, "brightness": self.brightness, "noise": self.noise}
        return {k: v for k, v in values.items() if v}


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """Where a site's private data is. Shards of the demo set are disjoint across sites."""

    source: DataSource = DataSource.FASHION_MNIST
    uri: str | None = None  # npz file (path or s3://), or a directory with the IDX files
    test_uri: str | None = None  # optional held-out npz for scoring
    shard_index: int = 0
    shard_count: int = 1
    samples: int | None = None  # take the first N images of the shard
    shard_seed: int = 0
    test_samples: int = 1000  # demo set: score on this many test images (0: none)
    # image-folder: an index of file -> target (CSV/JSONL, relative to uri) instead of class
    # sub-folders; what a bad record does (fail, or skip at most max_bad_records); decoders.
    index: str | None = None
    on_bad_record: str = "fail"
    max_bad_records: int = 0
    loader_workers: int = 2
    # plugin: the `mfed.datasets` entry point that reads `uri`, and its parameters
    dataset: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    augment: AugmentSpec = AugmentSpec()  # training batches only
    # image-folder / tar-shards under an s3:// prefix: the local cache of downloaded shards
    cache_mib: int = 2048

    def __post_init__(self) -> None:
        if self.shard_count < 1 or not 0 <= self.shard_index < self.shard_count:
            raise SpecError("data.shard", f"index {self.shard_index} is not in [0, {self.shard_count})")
        streamed = self.source in (DataSource.IMAGE_FOLDER, DataSource.TAR_SHARDS)
        if (self.source is DataSource.PLUGIN) != (self.dataset is not None):
            raise SpecError("data.dataset", "names the mfed.datasets reader of plugin data, and only of plugin data")
        if (self.source is DataSource.NPZ or streamed) and not self.uri:
            raise SpecError("data.uri", f"is required for {self.source.value} data: where the site's data is")
        if self.cache_mib < 1:
            raise SpecError("data.cacheMiB", f"is {self.cache_mib}; the shard cache needs at least 1 MiB")
        if self.on_bad_record not in ("fail", "skip"):
            raise SpecError("data.onBadRecord", f"is {self.on_bad_record!r}; use fail or skip")
        if self.max_bad_records < 0 or self.loader_workers < 0:
            raise SpecError("data.maxBadRecords", "and loaderWorkers must be 0 or more")
        if self.index is not None and self.source is not DataSource.IMAGE_FOLDER:
            raise SpecError("data.index", "applies to image-folder data only")

    @classmethod
    def parse(cls, f: Fields) -> DataSpec:
        f.reject_unknown(
            [
                "source",
                "uri",
                "testUri",
                "shardIndex",
                "shardCount",
                "samples",
                "shardSeed",
                "testSamples",
                "index",
                "onBadRecord",
                "maxBadRecords",
                "loaderWorkers",
                "dataset",
                "params",
                "augment",
                "cacheMiB",
            ]
        )
        return cls(
            source=DataSource(f.str("source", "fashion-mnist", choices=[s.value for s in DataSource])),
            uri=f.opt_str("uri"),
            test_uri=f.opt_str("testUri"),
            shard_index=f.int("shardIndex", 0, minimum=0),
            shard_count=f.int("shardCount", 1, minimum=1),
            samples=f.opt_int("samples", minimum=1),
            shard_seed=f.int("shardSeed", 0),
            test_samples=f.int("testSamples", 1000, minimum=0),
            index=f.opt_str("index"),
            on_bad_record=f.str("onBadRecord", "fail", choices=["fail", "skip"]),
            max_bad_records=f.int("maxBadRecords", 0, minimum=0),
            loader_workers=f.int("loaderWorkers", 2, minimum=0),
            dataset=f.opt_str("dataset"),
            params=f.mapping("params"),
            augment=AugmentSpec.parse(f.obj("augment", required=False)),
            cache_mib=f.int("cacheMiB", 2048, minimum=1),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.value,
            "uri": self.uri,
            "testUri": self.test_uri,
            "shardIndex": self.shard_index,
            "shardCount": self.shard_count,
            "samples": self.samples,
            "shardSeed": self.shard_seed,
            "testSamples": self.test_samples,
            # only for image folders: a Job for other data reads exactly as before (older trainers
            # refuse keys they do not know)
            **(
                {
                    "index": self.index,
                    "onBadRecord": self.on_bad_record,
                    "maxBadRecords": self.max_bad_records,
                    "loaderWorkers": self.loader_workers,
                }
                if self.source in (DataSource.IMAGE_FOLDER, DataSource.TAR_SHARDS, DataSource.PLUGIN)
                else {}
            ),
            **({"dataset": self.dataset, "params": dict(self.params)} if self.source is DataSource.PLUGIN else {}),
            **({"augment": self.augment.to_dict()} if self.augment.active else {}),
            **({"cacheMiB": self.cache_mib} if self._streamed_from_s3 else {}),
        }

    @property
    def _streamed_from_s3(self) -> bool:
        s3 = any(u is not None and u.startswith("s3://") for u in (self.uri, self.test_uri))
        return s3 and self.source in (DataSource.IMAGE_FOLDER, DataSource.TAR_SHARDS)


@dataclass(frozen=True, kw_only=True)
class TaskGroupSpec:
    task: TaskSpec
    decoder: ArchSpec


@dataclass(frozen=True, kw_only=True)
class InitSpec:
    """Ask the trainer to write the round-0 global model (torch initialisation needs torch)."""

    federation: str
    encoder: ArchSpec
    groups: tuple[TaskGroupSpec, ...]
    sharing: SharingPolicy
    seed: int
    output: str

    def __post_init__(self) -> None:
        names = [g.task.name for g in self.groups]
        if len(set(names)) != len(names):
            raise SpecError("tasks", f"task names must be unique, got {names}")
        if not names:
            raise SpecError("tasks", "at least one task group is required")

    @classmethod
    def parse(cls, data: object) -> InitSpec:
        f = Fields(data, "")
        f.reject_unknown(["kind", "version", "federation", "encoder", "tasks", "sharing", "seed", "output"])
        _check_version(f)
        tasks = f.raw("tasks")
        if not isinstance(tasks, list):
            raise SpecError("tasks", "must be a list of {task, decoder}")
        groups = []
        for i, item in enumerate(tasks):
            g = Fields(item, f"tasks[{i}]")
            groups.append(TaskGroupSpec(task=TaskSpec.parse(g.obj("task")), decoder=ArchSpec.parse(g.obj("decoder"))))
        return cls(
            federation=f.str("federation"),
            encoder=ArchSpec.parse(f.obj("encoder")),
            groups=tuple(groups),
            sharing=SharingPolicy.parse(f.obj("sharing", required=False)),
            seed=f.int("seed", 0),
            output=f.str("output"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "InitSpec",
            "version": SPEC_VERSION,
            "federation": self.federation,
            "encoder": asdict(self.encoder),
            "tasks": [{"task": asdict(g.task), "decoder": asdict(g.decoder)} for g in self.groups],
            "sharing": self.sharing.to_dict(),
            "seed": self.seed,
            "output": self.output,
        }


@dataclass(frozen=True, kw_only=True)
class BaselineSpec:
    """The site's Local baseline: where its state lives, and which round's state it continues.

    `previous_round` None means this round starts the baseline from the round's base model."""

    prefix: str
    previous_round: int | None = None

    @classmethod
    def parse(cls, f: Fields) -> BaselineSpec:
        f.reject_unknown(["prefix", "previousRound"])
        return cls(prefix=f.str("prefix"), previous_round=f.opt_int("previousRound", minimum=1))

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "previousRound": self.previous_round}


@dataclass(frozen=True, kw_only=True)
class RoundSpec:
    """One site's work for one round."""

    federation: str
    round: int
    site: str
    task: TaskSpec
    encoder: ArchSpec
    decoder: ArchSpec
    training: TrainingSpec
    data: DataSpec
    global_model: str  # prefix holding model.safetensors + manifest.json
    previous_decoder: str | None  # this site's decoder.safetensors from its last round, if any
    output: str  # prefix to write delta.safetensors, decoder.safetensors, manifest.json
    local_baseline: BaselineSpec | None = None  # also train the site's Local baseline

    def __post_init__(self) -> None:
        previous = self.local_baseline.previous_round if self.local_baseline else None
        if previous is not None and previous >= self.round:
            raise SpecError("localBaseline.previousRound", f"is {previous}; it must be before round {self.round}")

    @classmethod
    def parse(cls, data: object) -> RoundSpec:
        f = Fields(data, "")
        f.reject_unknown(
            [
                "kind",
                "version",
                "federation",
                "round",
                "site",
                "task",
                "encoder",
                "decoder",
                "training",
                "data",
                "globalModel",
                "previousDecoder",
                "output",
                "localBaseline",
            ]
        )
        _check_version(f)
        site = _check_name(SITE_NAME, f.str("site"), "site", "site name")
        return cls(
            federation=f.str("federation"),
            round=f.int("round", minimum=1),
            site=site,
            task=TaskSpec.parse(f.obj("task")),
            encoder=ArchSpec.parse(f.obj("encoder")),
            decoder=ArchSpec.parse(f.obj("decoder")),
            training=TrainingSpec.parse(f.obj("training", required=False)),
            data=DataSpec.parse(f.obj("data", required=False)),
            global_model=f.str("globalModel"),
            previous_decoder=f.opt_str("previousDecoder"),
            output=f.str("output"),
            local_baseline=BaselineSpec.parse(f.obj("localBaseline")) if f.has("localBaseline") else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "RoundSpec",
            "version": SPEC_VERSION,
            "federation": self.federation,
            "round": self.round,
            "site": self.site,
            "task": asdict(self.task),
            "encoder": asdict(self.encoder),
            "decoder": asdict(self.decoder),
            "training": self.training.to_dict(),
            "data": self.data.to_dict(),
            "globalModel": self.global_model,
            "previousDecoder": self.previous_decoder,
            "output": self.output,
            **({"localBaseline": self.local_baseline.to_dict()} if self.local_baseline else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _check_version(f: Fields) -> None:
    version = f.int("version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise SpecError("version", f"is {version}; this trainer reads version {SPEC_VERSION} (upgrade the image)")


def parse_spec(text: str) -> RoundSpec | InitSpec:
    """Parse a JSON spec whose `kind` is RoundSpec or InitSpec; every failure is a SpecError."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError("spec", f"is not valid JSON: {exc}") from exc
    try:
        kind = Fields(data, "").str("kind", choices=["RoundSpec", "InitSpec"])
        return RoundSpec.parse(data) if kind == "RoundSpec" else InitSpec.parse(data)
    except SpecError:
        raise
    except (FieldError, ValueError) as exc:
        path = exc.path if isinstance(exc, FieldError) else "spec"
        message = exc.message if isinstance(exc, FieldError) else str(exc)
        raise SpecError(path, message) from exc
