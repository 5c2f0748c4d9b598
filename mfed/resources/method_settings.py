"""From a FederationRound's spec to trainer and aggregation settings, via mfed.methods.

Method semantics live in mfed.methods (shared with the pilot); this module only maps the
resource's fields onto them. `aggregation_settings` is the ONE place that builds
AggregationSettings from a round, so new aggregation fields are added here only.
"""

from __future__ import annotations

from dataclasses import replace

from mfed.aggregation.crosstask import Level2Rule, Level2Weighting
from mfed.aggregation.fedavg import AggregationSettings
from mfed.artifacts.layout import join, round_prefix, site_prefix
from mfed.methods import MethodPlan, plan_method
from mfed.resources.views import DataKind, InitialKind, ResourceError, RoundView, SiteTaskView
from mfed.spec import (
    ArchSpec,
    BaselineSpec,
    DataSource,
    DataSpec,
    InitSpec,
    Regularizer,
    RoundSpec,
    SiteStrategy,
    SpecError,
    TaskGroupSpec,
    TaskSpec,
    TrainingSpec,
)

PVC_MOUNT = "/var/run/mfed/data"
DEFAULTS = TrainingSpec()


def method_plan(r: RoundView) -> MethodPlan:
    """The round's method with its fields applied; unset fields keep the method's own choice."""
    t = r.training
    defaults = AggregationSettings()
    return plan_method(
        t.method,
        sharing=r.sharing,
        mu=DEFAULTS.mu if t.mu is None else t.mu,
        regularizer=Regularizer(t.regularizer) if t.regularizer else DEFAULTS.regularizer,
        level2_weighting=Level2Weighting(r.weighting) if r.weighting else Level2Weighting.UNIFORM,
        level2_rule=Level2Rule(r.level2_rule) if r.level2_rule else None,
        site_strategy=SiteStrategy(t.site_strategy) if t.site_strategy else None,
        min_steps=t.min_steps,
        shared_steps=t.shared_steps,
        cagrad_c=defaults.cagrad_c if r.cagrad_c is None else r.cagrad_c,
        gate_threshold=defaults.gate_threshold if r.gate_threshold is None else r.gate_threshold,
    )


def aggregation_settings(r: RoundView) -> AggregationSettings:
    """The method's aggregation with spec.aggregation's robust rule and spec.privacy applied;
    raises ResourceError naming the field when the method cannot take them."""
    plan = method_plan(r)
    if plan.sharing.task_level and (r.privacy is not None or not r.robust.is_default):
        field = "spec.privacy" if r.privacy is not None else "spec.aggregation.rule"
        raise ResourceError(
            f"{field}: method {plan.method.value.replace('_', '-')} keeps task-level copies of the shared "
            "encoder, which robust rules and differential privacy do not support yet; use m-fed, "
            "task-fedavg or encoder-fedavg"
        )
    try:
        return replace(plan.aggregation, robust=r.robust, privacy=r.privacy)
    except ValueError as exc:
        field = "spec.privacy" if r.privacy is not None else "spec.aggregation.rule"
        raise ResourceError(
            f"{field}: {exc}; method {plan.method.value.replace('_', '-')} uses level2Rule "
            f"{plan.aggregation.level2_rule.value} (set spec.aggregation.level2Rule: mean, or use m-fed)"
        ) from None


def training_spec(r: RoundView) -> TrainingSpec:
    t, plan = r.training, method_plan(r)
    return TrainingSpec(
        epochs=t.epochs or DEFAULTS.epochs,
        batch_size=t.batch_size or DEFAULTS.batch_size,
        learning_rate=DEFAULTS.learning_rate if t.learning_rate is None else t.learning_rate,
        mu=plan.mu,
        regularizer=plan.regularizer,
        decoder_source=plan.decoder_source,
        seed=DEFAULTS.seed if t.seed is None else t.seed,
        device=t.device or DEFAULTS.device,
        delta_dtype=t.delta_dtype or DEFAULTS.delta_dtype,
        val_fraction=DEFAULTS.val_fraction if t.val_fraction is None else t.val_fraction,
        max_steps=t.max_steps,
        min_steps=plan.min_steps,
        site_strategy=plan.site_strategy,
        shared_steps=plan.shared_steps,
    )


def check_settings(r: RoundView) -> None:
    """Resolve the method and the training settings once, so a combination that each field allows
    but the trainer does not (minSteps above maxSteps, ...) fails the round at once, naming the
    field, instead of failing every site's Job."""
    try:
        training_spec(r)
    except SpecError as exc:
        raise ResourceError(f"spec.{exc.path}: {exc.message}") from None
    aggregation_settings(r)


def round_root(r: RoundView) -> str:
    return round_prefix(r.storage.root, r.federation, r.name)


def init_output(r: RoundView) -> str:
    return join(round_root(r), "init")


def global_output(r: RoundView) -> str:
    return join(round_root(r), "global")


def site_output(r: RoundView, site: str) -> str:
    return site_prefix(round_root(r), site)


def data_spec(site: SiteTaskView, mount: str = PVC_MOUNT) -> DataSpec:
    """Where the trainer finds the site's data: a PVC's files under `mount`, where the Job mounts
    the claim (the pilot passes the folder that stands in for the claim)."""
    d = site.data
    if d.kind is DataKind.DEMO:
        default = DataSpec()
        return DataSpec(
            augment=d.augment,
            source=DataSource.FASHION_MNIST,
            shard_index=d.shard_index,
            shard_count=d.shard_count,
            samples=d.samples,
            shard_seed=default.shard_seed if d.shard_seed is None else d.shard_seed,
            test_samples=default.test_samples if d.test_samples is None else d.test_samples,
        )
    if d.kind is DataKind.S3:
        uri, test_uri = d.uri, d.test_uri
    else:
        uri, test_uri = f"{mount}/{d.path}", f"{mount}/{d.test_path}" if d.test_path else None
    if d.format in ("image-folder", "tar-shards", "plugin"):
        return DataSpec(
            augment=d.augment,
            source=DataSource(d.format),
            dataset=d.dataset,
            params=dict(d.params),
            uri=uri,
            test_uri=test_uri,
            index=d.index,
            on_bad_record=d.on_bad_record,
            max_bad_records=d.max_bad_records,
            loader_workers=d.loader_workers,
            cache_mib=d.cache_mib,
        )
    return DataSpec(augment=d.augment, source=DataSource.NPZ, uri=uri, test_uri=test_uri)


def task_spec(site: SiteTaskView) -> TaskSpec:
    return TaskSpec(name=site.task_name, type=site.task_type, params=dict(site.task_params))


def init_spec(r: RoundView, sites: list[SiteTaskView] | tuple[SiteTaskView, ...]) -> InitSpec:
    """One task group per task name (sites of a task agree: validated before this is called)."""
    groups: dict[str, TaskGroupSpec] = {}
    for site in sorted(sites, key=lambda s: s.name):
        groups.setdefault(site.task_name, TaskGroupSpec(task=task_spec(site), decoder=site.decoder))
    return InitSpec(
        federation=r.federation,
        encoder=r.encoder,
        groups=tuple(groups[name] for name in sorted(groups)),
        sharing=method_plan(r).sharing,
        seed=r.initial.seed,
        output=init_output(r),
    )


def round_spec(
    r: RoundView, site: SiteTaskView, round_number: int, base_uri: str, previous_decoder: str | None
) -> RoundSpec:
    return RoundSpec(
        federation=r.federation,
        round=round_number,
        site=site.name,
        task=task_spec(site),
        encoder=r.encoder,
        decoder=ArchSpec(name=site.decoder.name, params=dict(site.decoder.params)),
        training=training_spec(r),
        data=data_spec(site),
        global_model=base_uri,
        previous_decoder=previous_decoder,
        output=site_output(r, site.name),
        local_baseline=local_baseline(r, site.name, round_number) if "local" in r.baselines else None,
    )


def local_baseline(r: RoundView, site: str, round_number: int) -> BaselineSpec:
    """Where the site keeps its Local baseline for this chain: under the chain's root and the
    site's own name, one file per round, outside every prefix the aggregator reads. A round that
    starts from another round's model continues the previous round's baseline; any other round
    starts it from its own base model (the same start the federation has)."""
    prefix = join(r.storage.root, r.federation, r.chain_root, "baselines", site, "local")
    continues = r.initial.kind is InitialKind.FROM_ROUND and round_number > 1
    return BaselineSpec(prefix=prefix, previous_round=round_number - 1 if continues else None)
