"""One site, one round: read the global model, train locally, write delta + decoder + manifest.

Used unchanged by the Kubernetes Job entrypoint (`mfed-trainer`, a thin wrapper) and by the
local pilot.
Writes are ordered delta, decoder, manifest: a manifest exists only for complete uploads, and a
restarted Job that finds its own complete upload for the same base model returns it instead of
training again (idempotent re-runs).
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

import mfed
from mfed import registry
from mfed.aggregation.ownership import SHARED_TRACK
from mfed.artifacts.layout import DECODER_FILE, DELTA_FILE, MANIFEST_FILE, join
from mfed.artifacts.manifest import (
    ContributionManifest,
    FileRef,
    ManifestError,
    TaskGroupInfo,
)
from mfed.artifacts.signature import SignatureMismatch
from mfed.artifacts.tensorfile import (
    StoredDtype,
    TensorFileError,
    encode_tensors,
    sha256_hex,
)
from mfed.learning.augment import check_augment
from mfed.learning.data import DataError, Examples, SiteData, check_inputs, load_site_data
from mfed.learning.encoders import ArchError
from mfed.learning.image_folder import ImageFolderSplit
from mfed.learning.model import SiteModel, build_site_model, load_part, part_state, signature
from mfed.learning.protection import prefers_shared
from mfed.learning.shapes import ShapeError
from mfed.learning.tar_shards import TarShardSplit
from mfed.learning.tasks import TaskError
from mfed.learning.train import (
    Objective,
    ProgressCallback,
    TrainStats,
    evaluate,
    pick_device,
    planned_steps,
    shared_track_steps,
    train_local,
)
from mfed.model_store import GlobalModelError, read_global_manifest, read_global_model
from mfed.rounds.baseline import BaselineStateMissing, train_and_store_local
from mfed.rounds.start import StartError, StartState, assemble_start
from mfed.seeding import derive_seed
from mfed.spec import ArchSpec, DataSource, DataSpec, Regularizer, RoundSpec, SpecError, TaskSpec
from mfed.storage import NotFound, Storage


class BadInput(Exception):
    """The spec, data or model does not fit: retrying the same Job cannot succeed."""


# Everything that means "fix the input", as opposed to "try again later".
INPUT_ERRORS = (
    SpecError,
    ManifestError,
    SignatureMismatch,
    ArchError,
    TaskError,
    DataError,
    TensorFileError,
    StartError,
    GlobalModelError,
    registry.PluginError,
    ShapeError,
    BaselineStateMissing,
)


@dataclass(frozen=True)
class SiteRoundResult:
    manifest: ContributionManifest
    reused: bool  # True when a complete upload for this base already existed


def _trainer_info(device: torch.device) -> dict[str, str]:
    return {
        "mfedVersion": mfed.__version__,
        "torch": torch.__version__,
        "device": str(device),
        "python": platform.python_version(),
    }


def _existing_upload(storage: Storage, spec: RoundSpec, base_digest: str) -> ContributionManifest | None:
    manifest_uri = join(spec.output, MANIFEST_FILE)
    try:
        existing = ContributionManifest.from_json(storage.read(manifest_uri))
    except (NotFound, ManifestError):
        return None
    if (existing.base_digest, existing.round, existing.site) != (base_digest, spec.round, spec.site):
        return None
    for ref in (existing.delta, existing.decoder):
        try:
            if sha256_hex(storage.read(join(spec.output, ref.name))) != ref.sha256:
                return None
        except NotFound:
            return None
    return existing


def _check_task_matches(spec: RoundSpec, info: TaskGroupInfo) -> None:
    if info.type != spec.task.type or dict(info.params) != dict(spec.task.params):
        raise BadInput(
            f"task {spec.task.name!r} is {spec.task.type} {dict(spec.task.params)} at this site but "
            f"{info.type} {dict(info.params)} in the federation; sites of one task must agree"
        )
    if info.decoder != spec.decoder:
        raise BadInput(
            f"decoder {spec.decoder.name} {dict(spec.decoder.params)} differs from the task group's "
            f"{info.decoder.name} {dict(info.decoder.params)}; decoders must agree within a task"
        )


def load_site_splits(
    data: DataSpec,
    site: str,
    val_fraction: float,
    storage: Storage,
    *,
    example_shape: tuple[int, ...] | None = None,
    classes: int | None = None,
) -> SiteData:
    """The site's splits; the same data spec and site always give the same validation split.
    Files read one by one (image-folder) are checked against the encoder's `example_shape` and
    the task's `classes`."""
    return load_site_data(
        data,
        val_fraction=val_fraction,
        split_seed=derive_seed(data.shard_seed, site, "split"),
        read=storage.read,
        example_shape=example_shape,
        classes=classes,
    )


def _load_for(spec: RoundSpec, storage: Storage) -> SiteData:
    return load_site_for(
        spec.site, spec.data, spec.encoder, spec.task, spec.decoder, spec.training.val_fraction, storage
    )


def load_site_for(
    site: str,
    data: DataSpec,
    encoder: ArchSpec,
    task_spec: TaskSpec,
    decoder: ArchSpec,
    val_fraction: float,
    storage: Storage,
) -> SiteData:
    """The site's splits for this model: files read one by one are checked, as they are decoded,
    against the encoder's input shape and the task's classes (arrays are checked whole later)."""
    if data.source not in (DataSource.IMAGE_FOLDER, DataSource.TAR_SHARDS, DataSource.PLUGIN):
        return load_site_splits(data, site, val_fraction, storage)
    model, task = build_site_model(encoder, task_spec, decoder)
    return load_site_splits(
        data,
        site,
        val_fraction,
        storage,
        example_shape=tuple(model.input_spec.shape),
        classes=task.label_classes,
    )


def run_site_round(
    spec: RoundSpec,
    storage: Storage,
    *,
    data: SiteData | None = None,
    progress: ProgressCallback | None = None,
) -> SiteRoundResult:
    """Train one site for one round and upload its contribution. Raises BadInput or StorageError."""
    try:
        return _run(spec, storage, data, progress)
    except INPUT_ERRORS as exc:
        raise BadInput(str(exc)) from exc


def prepare_start(spec: RoundSpec, storage: Storage, data: SiteData | None = None) -> StartState:
    """Load the global model and assemble the model this site starts the round from.

    `data` is needed by the mix strategy, which chooses its start on the validation split."""
    try:
        return _prepare(spec, storage, data)
    except INPUT_ERRORS as exc:
        raise BadInput(str(exc)) from exc


def _prepare(spec: RoundSpec, storage: Storage, data: SiteData | None) -> StartState:
    global_model = read_global_model(storage, spec.global_model)
    global_manifest, global_tensors = global_model.manifest, global_model.tensors
    if global_manifest.federation != spec.federation:
        raise BadInput(f"global model belongs to federation {global_manifest.federation!r}, not {spec.federation!r}")
    info = global_manifest.tasks.get(spec.task.name)
    if info is None:
        raise BadInput(
            f"task {spec.task.name!r} is not in the federation's global model "
            f"(tasks: {', '.join(sorted(global_manifest.tasks))})"
        )
    _check_task_matches(spec, info)
    try:
        model, task = build_site_model(spec.encoder, spec.task, spec.decoder)
    except registry.UnknownPlugin as exc:
        raise BadInput(f"{exc}{_install_hint(global_manifest.plugins)}") from exc
    if data is not None:
        check_inputs(data, model.input_spec.shape, model.input_spec.dtype, spec.encoder.name)
        check_augment(spec.data.augment, data.train.example_shape)
    global_manifest.encoder_signature.require_equal(signature(model, "encoder"), "encoder")
    info.decoder_signature.require_equal(signature(model, "decoder"), "decoder")
    return assemble_start(spec, storage, data, global_manifest, info, global_tensors, model, task)


def _install_hint(plugins: Mapping[str, str]) -> str:
    """Which packages the federation's model was built with (its manifest records them)."""
    if not plugins:
        return ""
    listed = ", ".join(f"{key} from {package}" for key, package in sorted(plugins.items()))
    packages = " ".join(sorted(set(plugins.values())))
    return f". The federation's model was built with {listed}: pip install {packages} into the trainer image"


def evaluate_start(
    spec: RoundSpec, storage: Storage, data: SiteData, *, want_test: Callable[[float], bool] = lambda val: True
) -> dict[str, float]:
    """Score the model a site would start `spec`'s round from: validation, and test when present
    and `want_test(validation score)` says so (test scoring is the expensive part).

    The model scored is the one the site deploys: for a two-track site the track that is better
    on validation ("shared": 1.0 when it is the shared track); "alpha" is the start mix. When a
    two-track site is scored on test, both tracks are ("test_task_track", "test_shared_track"):
    what each would have given, to show how well the validation split chose."""
    state = prepare_start(spec, storage, data)
    device = pick_device(spec.training.device)
    eval_seed = derive_seed("eval", spec.site)
    model = state.model
    val = evaluate(model, state.task, data.val, device=device, seed=eval_seed)
    scores = {"val": val, **state.evidence}
    if state.shared is not None:
        shared_val = evaluate(state.shared.model, state.task, data.val, device=device, seed=eval_seed)
        scores["val_task_track"], scores["val_shared_track"] = val, shared_val
        scores["shared"] = 0.0
        if prefers_shared(state.task, shared_val, val, len(data.val)):
            model, scores["val"], scores["shared"] = state.shared.model, shared_val, 1.0
    if data.test is not None and want_test(scores["val"]):
        test_seed = derive_seed("test", spec.task.name)
        if state.shared is None:
            scores["test"] = evaluate(model, state.task, data.test, device=device, seed=test_seed)
        else:
            for name, track in (("task", state.model), ("shared", state.shared.model)):
                scores[f"test_{name}_track"] = evaluate(track, state.task, data.test, device=device, seed=test_seed)
            scores["test"] = scores["test_shared_track" if scores["shared"] else "test_task_track"]
    return scores


def _run(
    spec: RoundSpec, storage: Storage, data: SiteData | None, progress: ProgressCallback | None
) -> SiteRoundResult:
    base_manifest = read_global_manifest(storage, spec.global_model)
    existing = _existing_upload(storage, spec, base_manifest.model.sha256)
    if existing is not None:
        return SiteRoundResult(manifest=existing, reused=True)
    if data is None:
        data = _load_for(spec, storage)
    state = _prepare(spec, storage, data)
    model, task, info = state.model, state.task, state.info
    device = pick_device(spec.training.device)
    global_decoder = copy.deepcopy(model.decoder)
    load_part(SiteModel(model.encoder, global_decoder), "decoder", state.task_decoder)

    seed = derive_seed(spec.training.seed, spec.federation, spec.site, spec.round)
    eval_seed = derive_seed("eval", spec.site)
    metrics: dict[str, float] = {"val_before": evaluate(model, task, data.val, device=device, seed=eval_seed)}
    if data.test is not None:
        test_seed = derive_seed("test", spec.task.name)
        metrics["test_before"] = evaluate(model, task, data.test, device=device, seed=test_seed)

    objective = Objective(regularizer=spec.training.regularizer, mu=spec.training.mu, global_decoder=global_decoder)
    steps = planned_steps(
        len(data.train),
        epochs=spec.training.epochs,
        batch_size=spec.training.batch_size,
        min_steps=spec.training.min_steps,
        max_steps=spec.training.max_steps,
    )
    per_epoch = -(-len(data.train) // spec.training.batch_size)

    def train(
        site_model: SiteModel, track_seed: int, track_objective: Objective = objective, track_steps: int = steps
    ) -> TrainStats:
        return train_local(
            site_model,
            task,
            data.train,
            epochs=-(-track_steps // per_epoch),
            batch_size=spec.training.batch_size,
            learning_rate=spec.training.learning_rate,
            objective=track_objective,
            device=device,
            seed=track_seed,
            max_steps=track_steps,
            progress=progress,
            augment=spec.data.augment,
        )

    baseline_start = copy.deepcopy(model) if spec.local_baseline is not None else None
    stats = train(model, seed)
    metrics["val_after"] = evaluate(model, task, data.val, device=device, seed=eval_seed)
    metrics.update(
        {
            "train_task_loss": stats.task_loss,
            "train_regularizer_loss": stats.regularizer_loss,
            "steps": float(stats.steps),
            "train_seconds": stats.seconds,
            "val_samples": float(len(data.val)),
            **state.evidence,
        }
    )

    end_encoder = part_state(model, "encoder")
    delta = {k: end_encoder[k] - state.start_encoder[k] for k in sorted(end_encoder)}
    decoder = part_state(model, "decoder")
    if state.shared is not None:
        shared_delta, shared_decoder = _train_shared_track(
            state,
            lambda m, s, o: train(m, s, o, shared_track_steps(steps, spec.training.shared_steps)),
            lambda m: evaluate(m, task, data.val, device=device, seed=eval_seed),
            len(data.val),
            seed,
            metrics,
        )
        delta, decoder = delta | shared_delta, decoder | shared_decoder
    if spec.local_baseline is not None and baseline_start is not None:
        eval_split, eval_split_seed = _eval_split(data, spec)
        # Equal compute: Local gets every step the site trained this round, both tracks of a
        # two-track site (as in the pilot), not only the task track's.
        site_steps = int(metrics["steps"])
        metrics.update(
            _local_baseline(
                spec,
                storage,
                baseline_start,
                # the model this site deploys after the round: for a two-track site the track
                # that won on validation
                state.shared.model if state.shared is not None and metrics.get("deploy_shared") else model,
                lambda m, o: train(m, derive_seed(seed, "local"), o, site_steps),
                lambda m: evaluate(m, task, eval_split, device=device, seed=eval_split_seed),
                -1.0 if not task.higher_is_better else 1.0,
            )
        )
    delta_dtype = StoredDtype.parse(spec.training.delta_dtype)
    delta_bytes = encode_tensors(delta, float_dtype=delta_dtype)
    decoder_bytes = encode_tensors(decoder)
    # The site's traffic this round, for the report (the manifest's own few kB not counted).
    metrics["upload_bytes"] = float(len(delta_bytes) + len(decoder_bytes))
    if isinstance(data.train, (ImageFolderSplit, TarShardSplit)):  # skipped (onBadRecord: skip), all splits
        metrics["bad_records_skipped"] = float(len(data.train.bad.seen))
    manifest = ContributionManifest(
        federation=spec.federation,
        round=spec.round,
        site=spec.site,
        task=spec.task.name,
        task_type=spec.task.type,
        samples=len(data.train),
        base_digest=state.global_manifest.digest,
        encoder_signature=state.global_manifest.encoder_signature.digest,
        decoder_signature=info.decoder_signature.digest,
        delta=FileRef(name=DELTA_FILE, sha256=sha256_hex(delta_bytes), size=len(delta_bytes)),
        decoder=FileRef(name=DECODER_FILE, sha256=sha256_hex(decoder_bytes), size=len(decoder_bytes)),
        delta_dtype=delta_dtype.value,
        metrics=metrics,
        start_mix=state.start_mix,
        trainer={
            **_trainer_info(device),
            "metric": task.metric_name,
            "higherIsBetter": str(task.higher_is_better).lower(),
            "decoderStart": state.decoder_origin,
            # What `mfed export` needs to rebuild the model this site deploys after the round.
            "decoderSource": spec.training.decoder_source.value,
            "siteStrategy": spec.training.site_strategy.value,
        },
    )
    storage.write(join(spec.output, DELTA_FILE), delta_bytes)
    storage.write(join(spec.output, DECODER_FILE), decoder_bytes)
    storage.write(join(spec.output, MANIFEST_FILE), manifest.to_json().encode())
    return SiteRoundResult(manifest=manifest, reused=False)


def _train_shared_track(
    state: StartState,
    train: Callable[[SiteModel, int, Objective], TrainStats],
    score: Callable[[SiteModel], float],
    validation_samples: int,
    seed: int,
    metrics: dict[str, float],
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train the shared track of a two-track site. Returns what joins the upload under `shared.`:
    its delta from E_G (dual parameters only) and its decoder; the evidence for the site's
    choice between the tracks joins `metrics` (both scored on the site's validation split)."""
    assert state.shared is not None
    track = state.shared
    metrics["val_before_shared"] = score(track.model)
    # D_tau is the FedAvg of the task-level tracks' decoders: no target for this track's decoder.
    no_regularizer = Objective(regularizer=Regularizer.NONE, mu=0.0, global_decoder=None)
    stats = train(track.model, derive_seed(seed, "shared"), no_regularizer)
    metrics["val_after_shared"] = score(track.model)
    metrics["steps"] += float(stats.steps)
    metrics["train_seconds"] += stats.seconds
    metrics["deploy_shared"] = float(
        prefers_shared(state.task, metrics["val_after_shared"], metrics["val_after"], validation_samples)
    )
    end = part_state(track.model, "encoder")
    delta = {SHARED_TRACK + k: end[k] - track.start_encoder[k] for k in state.dual}
    decoder = {SHARED_TRACK + k: v for k, v in part_state(track.model, "decoder").items()}
    return delta, decoder


def _eval_split(data: SiteData, spec: RoundSpec) -> tuple[Examples, int]:
    """The split both the federated and the Local model are scored on (test, else validation),
    with its evaluation seed."""
    if data.test is not None:
        return data.test, derive_seed("test", spec.task.name)
    return data.val, derive_seed("eval", spec.site)


def _local_baseline(
    spec: RoundSpec,
    storage: Storage,
    start: SiteModel,
    federated: SiteModel,
    train: Callable[[SiteModel, Objective], TrainStats],
    score: Callable[[SiteModel], float],
    sign: float,
) -> dict[str, float]:
    """Train the site's Local baseline for this round (the steps the site trained, both tracks
    counted; no regulariser: no global decoder to pull toward) and score it beside the federated
    model.

    `baseline_gain` is the relative gain of the federated model in percent, positive when it is
    better (`sign` is -1 for lower-is-better metrics)."""
    assert spec.local_baseline is not None
    result = train_and_store_local(spec.local_baseline, spec.round, start, storage, train)
    fed, local = score(federated), score(result.model)
    return {
        "baseline_federated": fed,
        "baseline_local": local,
        "baseline_gain": sign * (fed - local) / abs(local) * 100.0 if local else 0.0,
        "baseline_sign": sign,
        "baseline_steps": float(result.stats.steps),
        "baseline_seconds": result.stats.seconds,
    }
