"""Frozen views of SiteTask and FederationRound resources, parsed once per reconciliation.

The CRD schema validates on a real API server, but the operator parses defensively anyway (an
emulator or an old API server may not validate), so every error names the field and the fix.
Defaults for unset fields live here, never in the CRD schema.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from mfed.aggregation.crosstask import Level2Rule
from mfed.aggregation.robust import RobustRule, RobustSettings
from mfed.fields import FieldError, Fields
from mfed.methods import Method
from mfed.naming import KUEUE_QUEUE_LABEL, LABEL_CHAIN
from mfed.privacy.settings import PrivacySettingError, PrivacySettings
from mfed.resources.selectors import LabelSelector
from mfed.spec import TASK_NAME, ArchSpec, AugmentSpec, DataSpec, SharingMode, SharingPolicy, SiteStrategy, SpecError

FEDERATION_NAME_MAX = 63


class ResourceError(ValueError):
    """A resource's spec is invalid; the message names the field and how to fix it."""


def _arch(f: Fields) -> ArchSpec:
    f.reject_unknown(["name", "params", "sharing"])
    return ArchSpec(name=f.str("name"), params=f.mapping("params"))


# ---------------------------------------------------------------- SiteTask


class DataKind(StrEnum):
    DEMO = "demo"
    S3 = "s3"
    PVC = "pvc"


@dataclass(frozen=True, kw_only=True)
class SiteData:
    kind: DataKind
    shard_index: int = 0
    shard_count: int = 1
    samples: int | None = None
    test_samples: int | None = None
    shard_seed: int | None = None
    uri: str | None = None
    test_uri: str | None = None
    claim_name: str | None = None
    path: str | None = None
    test_path: str | None = None
    # pvc / s3: what `path` or `uri` is (an .npz file, an image folder, ...), its index, and bad records' fate
    format: str = "npz"
    index: str | None = None
    on_bad_record: str = "fail"
    max_bad_records: int = 0
    loader_workers: int = 2
    cache_mib: int = 2048  # s3 image-folder / tar-shards: the trainer's local cache of shards
    dataset: str | None = None  # format plugin: the mfed.datasets entry point, and its parameters
    params: Mapping[str, Any] = field(default_factory=dict)
    augment: AugmentSpec = AugmentSpec()  # spec.data.augment: training batches only, any source


@dataclass(frozen=True, kw_only=True)
class EnvVar:
    name: str
    value: str | None = None
    secret: tuple[str, str] | None = None  # (name, key)
    config_map: tuple[str, str] | None = None


@dataclass(frozen=True, kw_only=True)
class Toleration:
    key: str | None = None
    operator: str | None = None
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = None


@dataclass(frozen=True, kw_only=True)
class SiteTaskView:
    name: str  # the site name
    namespace: str
    uid: str
    generation: int
    labels: Mapping[str, str]
    federation: str
    task_name: str
    task_type: str
    task_params: Mapping[str, Any]
    decoder: ArchSpec
    encoder: ArchSpec | None
    data: SiteData
    gpu: int = 0
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str | None = None
    memory: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    affinity: Mapping[str, Any] | None = None
    priority_class: str | None = None
    runtime_class: str | None = None
    image: str | None = None
    image_pull_secrets: tuple[str, ...] = ()
    service_account: str | None = None
    env: tuple[EnvVar, ...] = ()

    @property
    def queue_name(self) -> str | None:
        return self.labels.get(KUEUE_QUEUE_LABEL)


def _quantity(f: Fields, name: str) -> str | None:
    value = f.raw(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FieldError(f"{f.path}.{name}", "must be a quantity such as 2, 500m or 4Gi")
    return str(value)


def parse_sitetask(body: Mapping[str, Any]) -> SiteTaskView:
    """Parse a SiteTask; raises ResourceError naming the field to fix."""
    meta = body.get("metadata") or {}
    try:
        spec = Fields(body.get("spec"), "spec")
        task = spec.obj("task")
        task_name = task.str("name")
        if not TASK_NAME.match(task_name):
            raise FieldError("spec.task.name", f"{task_name!r} must be lower-case letters, digits, '_' or '-'")
        data = _site_data(spec.obj("data"))
        resources = spec.obj("resources", required=False)
        placement = spec.obj("placement", required=False)
        env = tuple(_env_var(Fields(item, f"spec.env[{i}]")) for i, item in enumerate(spec.raw("env") or []))
        reserved = [e.name for e in env if e.name == "MFED_SPEC" or e.name.startswith(("MFED_S3_", "AWS_"))]
        if reserved:
            raise FieldError("spec.env", f"{reserved[0]} is set by the operator; remove it")
        return SiteTaskView(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "")),
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation") or 0),
            labels=dict(meta.get("labels") or {}),
            federation=spec.str("federation"),
            task_name=task_name,
            task_type=task.str("type"),
            task_params=task.mapping("params"),
            decoder=_arch(spec.obj("decoder")),
            encoder=_arch(spec.obj("encoder")) if spec.has("encoder") else None,
            data=data,
            gpu=resources.int("gpu", 0, minimum=0),
            gpu_resource=resources.str("gpuResourceName", "nvidia.com/gpu"),
            cpu=_quantity(resources, "cpu"),
            memory=_quantity(resources, "memory"),
            node_selector={str(k): str(v) for k, v in placement.mapping("nodeSelector").items()},
            tolerations=tuple(
                _toleration(Fields(t, f"spec.placement.tolerations[{i}]"))
                for i, t in enumerate(placement.raw("tolerations") or [])
            ),
            affinity=placement.mapping("affinity") or None,
            priority_class=placement.opt_str("priorityClassName"),
            runtime_class=placement.opt_str("runtimeClassName"),
            image=spec.opt_str("image"),
            image_pull_secrets=spec.str_list("imagePullSecrets"),
            service_account=spec.opt_str("serviceAccountName"),
            env=env,
        )
    except FieldError as exc:
        raise ResourceError(str(exc)) from None


def _site_data(f: Fields) -> SiteData:
    present = [k for k in ("demo", "s3", "pvc") if f.has(k)]
    if len(present) != 1:
        raise FieldError(f.path, "set exactly one of demo, s3 or pvc")
    kind = DataKind(present[0])
    try:
        augment = AugmentSpec.parse(f.obj("augment", required=False))
    except SpecError as exc:  # its checks name the trainer's field, data.augment.*
        path = exc.path if exc.path.startswith("spec.") else f"spec.{exc.path}"
        raise FieldError(path, exc.message) from None
    return replace(_site_data_source(f, kind), augment=augment)


def _site_data_source(f: Fields, kind: DataKind) -> SiteData:
    d = f.obj(kind.value)
    if kind is DataKind.DEMO:
        index, count = d.int("shardIndex", minimum=0), d.int("shardCount", minimum=1)
        if index >= count:
            raise FieldError(f"{d.path}.shardIndex", f"is {index}; it must be below shardCount {count}")
        return SiteData(
            kind=kind,
            shard_index=index,
            shard_count=count,
            samples=d.opt_int("samples", minimum=1),
            test_samples=d.opt_int("testSamples", minimum=0),
            shard_seed=d.opt_int("shardSeed"),
        )
    if kind is DataKind.S3:
        uri = d.str("uri")
        if not uri.startswith("s3://"):
            raise FieldError(f"{d.path}.uri", "must be an s3://bucket/key URI")
        formatted = _formatted(d, ("npz", "image-folder", "tar-shards"))
        return SiteData(kind=kind, uri=uri, test_uri=d.opt_str("testUri"), **formatted)
    path = d.str("path")
    if path.startswith("/") or ".." in path:
        raise FieldError(f"{d.path}.path", "must be a relative path inside the volume without '..'")
    formatted = _formatted(d, ("npz", "image-folder", "tar-shards", "plugin"))
    return SiteData(kind=kind, claim_name=d.str("claimName"), path=path, test_path=d.opt_str("testPath"), **formatted)


def _formatted(d: Fields, formats: tuple[str, ...]) -> dict[str, Any]:
    """What the site's files are and how they are read, the same fields for a PVC and an S3 prefix."""
    data_format = d.str("format", "npz", choices=list(formats))
    if (data_format == "plugin") != d.has("dataset"):
        raise FieldError(f"{d.path}.dataset", "names the mfed.datasets reader of format: plugin (and only of it)")
    streamed_only = [k for k in ("onBadRecord", "maxBadRecords", "loaderWorkers", "cacheMiB") if d.has(k)]
    if streamed_only and data_format == "npz":
        raise FieldError(
            f"{d.path}.{streamed_only[0]}", "applies to format image-folder or tar-shards; set the format or drop it"
        )
    if d.has("index") and data_format != "image-folder":
        raise FieldError(f"{d.path}.index", "applies to format: image-folder only; set the format or drop it")
    folder_index = d.opt_str("index")
    if folder_index is not None and (folder_index.startswith("/") or ".." in folder_index):
        raise FieldError(f"{d.path}.index", "must be a path inside the image folder without '..'")
    return {
        "format": data_format,
        "index": folder_index,
        "on_bad_record": d.str("onBadRecord", "fail", choices=["fail", "skip"]),
        "max_bad_records": d.int("maxBadRecords", 0, minimum=0),
        "loader_workers": d.int("loaderWorkers", 2, minimum=0),
        "cache_mib": d.int("cacheMiB", DataSpec().cache_mib, minimum=1),
        "dataset": d.opt_str("dataset"),
        "params": d.mapping("params"),
    }


def _env_var(f: Fields) -> EnvVar:
    name = f.str("name")
    if f.has("value") == f.has("valueFrom"):
        raise FieldError(f.path, "set exactly one of value or valueFrom")
    if f.has("value"):
        return EnvVar(name=name, value=f.str("value"))
    source = f.obj("valueFrom")
    if source.has("secretKeyRef"):
        ref = source.obj("secretKeyRef")
        return EnvVar(name=name, secret=(ref.str("name"), ref.str("key")))
    ref = source.obj("configMapKeyRef")
    return EnvVar(name=name, config_map=(ref.str("name"), ref.str("key")))


def _toleration(f: Fields) -> Toleration:
    return Toleration(
        key=f.opt_str("key"),
        operator=f.opt_str("operator"),
        value=f.opt_str("value"),
        effect=f.opt_str("effect"),
        toleration_seconds=f.opt_int("tolerationSeconds"),
    )


# ---------------------------------------------------------------- FederationRound


@dataclass(frozen=True, kw_only=True)
class StorageView:
    bucket: str
    prefix: str | None
    endpoint: str | None
    region: str | None
    path_style: bool
    ca_config_map: tuple[str, str] | None  # (name, key)
    secret_name: str | None
    access_key_key: str
    secret_key_key: str

    @property
    def root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


class InitialKind(StrEnum):
    SEED = "seed"
    FROM_ROUND = "fromRound"
    URI = "uri"


@dataclass(frozen=True, kw_only=True)
class InitialModel:
    kind: InitialKind
    seed: int = 0
    from_round: str | None = None
    uri: str | None = None


@dataclass(frozen=True, kw_only=True)
class TrainingView:
    method: Method
    epochs: int | None
    batch_size: int | None
    learning_rate: float | None
    mu: float | None
    regularizer: str | None
    seed: int | None
    max_steps: int | None
    delta_dtype: str | None
    device: str | None
    val_fraction: float | None
    min_steps: int | None = None
    site_strategy: str | None = None
    shared_steps: int | None = None


@dataclass(frozen=True, kw_only=True)
class RoundView:
    name: str
    namespace: str
    uid: str
    generation: int
    labels: Mapping[str, str]
    federation: str
    round: int | None
    selector: LabelSelector
    encoder: ArchSpec
    sharing: SharingPolicy
    training: TrainingView
    weighting: str | None
    level2_rule: str | None
    cagrad_c: float | None
    gate_threshold: float | None
    min_sites: int | None
    deadline_seconds: int | None
    storage: StorageView
    initial: InitialModel
    follow_up_rounds: int
    digest: str  # of everything that must not change mid-round
    baselines: tuple[str, ...] = ()  # spec.evaluation.baselines: what every site also trains alone
    robust: RobustSettings = RobustSettings()  # spec.aggregation.rule / trim / normFactor / minCosine
    privacy: PrivacySettings | None = None  # spec.privacy

    @property
    def chain_root(self) -> str:
        return self.labels.get(LABEL_CHAIN) or self.name


def _sharing(f: Fields) -> SharingPolicy:
    if not f.has("sharing"):
        return SharingPolicy()
    s = f.obj("sharing")
    try:
        return SharingPolicy.parse(s)
    except SpecError as exc:
        raise FieldError(f"spec.encoder.{exc.path}", exc.message) from None


MUTABLE_SPEC_FIELDS = ("aggregation", "followUpRounds")
# Aggregation fields that decide the model (not when it is made) are fixed once a round starts.
LEVEL2_RULE_FIELDS = ("level2Rule", "cagradC", "gateThreshold", "rule", "trim", "normFactor", "minCosine")


def spec_digest(spec: Mapping[str, Any]) -> str:
    """SHA-256 over the spec without the fields that may change mid-round."""
    fixed = {k: v for k, v in spec.items() if k not in MUTABLE_SPEC_FIELDS}
    aggregation = spec.get("aggregation") or {}
    # weighting keeps its place and the rule fields are added only when set, so the digest of a
    # round written before they existed does not change under an upgraded operator
    document: dict[str, Any] = {"spec": fixed, "weighting": aggregation.get("weighting")}
    rule = {k: aggregation[k] for k in LEVEL2_RULE_FIELDS if k in aggregation}
    if rule:
        document["level2"] = rule
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_round(body: Mapping[str, Any]) -> RoundView:
    """Parse a FederationRound; raises ResourceError naming the field to fix."""
    meta = body.get("metadata") or {}
    raw_spec = body.get("spec") or {}
    try:
        spec = Fields(raw_spec, "spec")
        federation = spec.str("federation")
        if not TASK_NAME.match(federation) or "_" in federation:
            raise FieldError("spec.federation", f"{federation!r} must be a DNS label (a-z, 0-9, '-')")
        encoder_f = spec.obj("encoder")
        training_f = spec.obj("training", required=False)
        try:
            method = Method.parse(training_f.str("method", "m-fed"))
        except ValueError as exc:
            raise FieldError("spec.training.method", str(exc)) from None
        if method in (Method.LOCAL, Method.CENTRALIZED):
            raise FieldError(
                "spec.training.method",
                f"{method.value} is a pilot baseline (centralized pools every site's data); use m-fed, "
                "task-fedavg, encoder-fedavg or a cross-task strategy (cagrad, gated, mix, fallback, auto)",
            )
        aggregation = spec.obj("aggregation", required=False)
        storage_f = spec.obj("storage")
        ca = storage_f.obj("caBundle") if storage_f.has("caBundle") else None
        secret = storage_f.obj("credentialsSecret") if storage_f.has("credentialsSecret") else None
        prefix = storage_f.opt_str("prefix")
        if prefix is not None and (prefix.startswith("/") or prefix.endswith("/")):
            raise FieldError("spec.storage.prefix", "must not start or end with '/'")
        endpoint = storage_f.opt_str("endpoint")
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            raise FieldError("spec.storage.endpoint", "must be an http:// or https:// URL")
        return RoundView(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "")),
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation") or 0),
            labels=dict(meta.get("labels") or {}),
            federation=federation,
            round=spec.opt_int("round", minimum=1),
            selector=LabelSelector.parse(spec.obj("siteSelector", required=False)),
            encoder=_arch(encoder_f),
            sharing=_sharing(encoder_f),
            training=TrainingView(
                method=method,
                epochs=training_f.opt_int("epochs", minimum=1),
                batch_size=training_f.opt_int("batchSize", minimum=1),
                learning_rate=_opt_float(training_f, "learningRate"),
                mu=_opt_float(training_f, "mu"),
                regularizer=training_f.opt_str("regularizer"),
                seed=training_f.opt_int("seed"),
                max_steps=training_f.opt_int("maxSteps", minimum=1),
                delta_dtype=training_f.opt_str("deltaDtype"),
                device=training_f.opt_str("device"),
                val_fraction=_opt_float(training_f, "valFraction"),
                min_steps=training_f.opt_int("minSteps", minimum=0),
                site_strategy=_opt_choice(training_f, "siteStrategy", SiteStrategy),
                shared_steps=training_f.opt_int("sharedSteps", minimum=1),
            ),
            weighting=aggregation.opt_str("weighting"),
            level2_rule=_opt_choice(aggregation, "level2Rule", Level2Rule),
            cagrad_c=_opt_float(aggregation, "cagradC", minimum=0),
            gate_threshold=_opt_float(aggregation, "gateThreshold", minimum=-1, maximum=1),
            min_sites=aggregation.opt_int("minSites", minimum=1),
            deadline_seconds=aggregation.opt_int("deadlineSeconds", minimum=1),
            storage=StorageView(
                bucket=storage_f.str("bucket"),
                prefix=prefix,
                endpoint=endpoint,
                region=storage_f.opt_str("region"),
                path_style=storage_f.bool("pathStyle", True),
                ca_config_map=(ca.str("configMapName"), ca.str("key")) if ca else None,
                secret_name=secret.str("name") if secret else None,
                access_key_key=secret.str("accessKeyIdKey", "AWS_ACCESS_KEY_ID") if secret else "AWS_ACCESS_KEY_ID",
                secret_key_key=(
                    secret.str("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY") if secret else "AWS_SECRET_ACCESS_KEY"
                ),
            ),
            initial=_initial(spec.obj("initialModel")),
            follow_up_rounds=spec.int("followUpRounds", 0, minimum=0),
            digest=spec_digest(raw_spec),
            baselines=_baselines(spec.obj("evaluation", required=False)),
            robust=_robust(aggregation),
            privacy=_privacy(spec.obj("privacy")) if spec.has("privacy") else None,
        )
    except FieldError as exc:
        raise ResourceError(str(exc)) from None


BASELINES = ("local",)


def _baselines(f: Fields) -> tuple[str, ...]:
    raw = f.str_list("baselines")
    unknown = [b for b in raw if b not in BASELINES]
    if unknown:
        raise FieldError(
            "spec.evaluation.baselines", f"{unknown[0]!r} is not a baseline; sites can train {', '.join(BASELINES)}"
        )
    return tuple(sorted(set(raw)))


def _opt_float(f: Fields, name: str, *, minimum: float | None = None, maximum: float | None = None) -> float | None:
    return None if not f.has(name) else f.float(name, minimum=minimum, maximum=maximum)


def _opt_choice(f: Fields, name: str, choices: type[StrEnum]) -> str | None:
    return None if not f.has(name) else f.str(name, choices=[c.value for c in choices])


def _robust(f: Fields) -> RobustSettings:
    defaults = RobustSettings()
    rule = _opt_choice(f, "rule", RobustRule)
    trim = _opt_float(f, "trim", minimum=0)
    if trim is not None and trim >= 0.5:
        raise FieldError(f"{f.path}.trim", f"is the share cut at each end and must be below 0.5, got {trim}")
    if trim is not None and rule != RobustRule.TRIMMED_MEAN.value:
        raise FieldError(f"{f.path}.trim", "applies to rule: trimmed-mean only; set the rule or drop trim")
    min_cosine = _opt_float(f, "minCosine")
    if min_cosine is not None and not -1 < min_cosine < 1:
        raise FieldError(f"{f.path}.minCosine", f"is a cosine and must be strictly between -1 and 1, got {min_cosine}")
    return RobustSettings(
        rule=RobustRule(rule) if rule else defaults.rule,
        trim=defaults.trim if trim is None else trim,
        norm_factor=_opt_float(f, "normFactor", minimum=1),
        min_cosine=min_cosine,
    )


def _privacy(f: Fields) -> PrivacySettings:
    budget = _opt_float(f, "epsilonBudget")
    delta = _opt_float(f, "delta")
    try:
        defaults = PrivacySettings(clip_norm=1.0, noise_multiplier=1.0)
        rate, count = _opt_float(f, "clipLearningRate"), _opt_float(f, "countNoise")
        return PrivacySettings(
            clip_norm=f.float("clipNorm"),
            noise_multiplier=f.float("noiseMultiplier"),
            delta=1e-5 if delta is None else delta,
            epsilon_budget=budget,
            target_quantile=_opt_float(f, "targetQuantile"),
            clip_learning_rate=defaults.clip_learning_rate if rate is None else rate,
            count_noise=defaults.count_noise if count is None else count,
        )
    except PrivacySettingError as exc:
        raise FieldError(f"{f.path}.{exc.field}", exc.message) from None


def _initial(f: Fields) -> InitialModel:
    present = [k for k in ("seed", "fromRound", "uri") if f.has(k)]
    if len(present) != 1:
        raise FieldError(f.path, "set exactly one of seed, fromRound or uri")
    kind = InitialKind(present[0])
    if kind is InitialKind.SEED:
        return InitialModel(kind=kind, seed=f.int("seed", minimum=0))
    if kind is InitialKind.FROM_ROUND:
        return InitialModel(kind=kind, from_round=f.str("fromRound"))
    uri = f.str("uri")
    if not uri.startswith("s3://"):
        raise FieldError(f"{f.path}.uri", "must be an s3:// prefix holding model.safetensors and manifest.json")
    return InitialModel(kind=kind, uri=uri.rstrip("/"))


__all__ = ["SharingMode"]
