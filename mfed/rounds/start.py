"""The model a site starts a round from, per its SiteStrategy (docs/strategies.md).

With task-level copies of the shared encoder parameters in the global model, a site starts from
the shared encoder, the task level, the gate's choice, a mix chosen on its validation split, or
(fallback) prepares a second, shared track beside its task-level one. Everything is computed
from the artifacts (global model, the site's own decoder file) and the site's data, so scoring
the same artifacts again makes the same choice.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from mfed.aggregation.ownership import SHARED_TRACK, dual_keys, shared_view, task_view
from mfed.artifacts.manifest import GlobalManifest, TaskGroupInfo
from mfed.artifacts.tensorfile import decode_tensors
from mfed.learning.data import SiteData
from mfed.learning.model import SiteModel, load_part
from mfed.learning.protection import choose_mix, mix_encoders
from mfed.learning.tasks import Task
from mfed.learning.train import pick_device
from mfed.seeding import derive_seed
from mfed.spec import DecoderSource, RoundSpec, SiteStrategy
from mfed.storage import NotFound, Storage


class StartError(ValueError):
    """The site's strategy cannot be applied to this global model (fix the round's settings)."""


@dataclass(frozen=True)
class Track:
    """A second model a two-track site trains (SiteStrategy.FALLBACK): the shared encoder E_G
    with the site's shared-track decoder."""

    model: SiteModel
    start_encoder: dict[str, np.ndarray]


@dataclass(frozen=True)
class StartState:
    """A site's model as a round starts: global encoder + starting decoder, and D_tau."""

    global_manifest: GlobalManifest
    info: TaskGroupInfo
    model: SiteModel
    task: Task
    start_encoder: dict[str, np.ndarray]
    task_decoder: dict[str, np.ndarray]
    decoder_origin: str  # "own" (the site's decoder from last round) or "global" (D_tau)
    start_mix: dict[str, float] = field(default_factory=dict)  # for the manifest (task-level copies only)
    shared: Track | None = None  # the shared track of a two-track site
    dual: tuple[str, ...] = ()  # encoder parameters present both shared and at the task level
    evidence: dict[str, float] = field(default_factory=dict)  # why this start: goes into the metrics


def start_decoders(
    storage: Storage, spec: RoundSpec, global_decoder: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """The decoders the site's task-level track and shared track start from, and their origin.

    The site's decoder file holds `decoder.*` and, after a two-track round, `shared.decoder.*`.
    The task-level track starts from the site's own decoder or the task's global one
    (`decoderSource`); the shared track always continues its own decoder: nothing averages it."""
    own_source = spec.training.decoder_source is DecoderSource.OWN
    two_tracks = spec.training.site_strategy is SiteStrategy.FALLBACK
    own: Mapping[str, np.ndarray] = {}
    if spec.previous_decoder and (own_source or two_tracks):
        # NotFound: the first round at this site starts from the task's global decoder
        with contextlib.suppress(NotFound):
            own = decode_tensors(storage.read(spec.previous_decoder)).tensors
    first = {k: v for k, v in own.items() if not k.startswith(SHARED_TRACK)}
    second = {k.removeprefix(SHARED_TRACK): v for k, v in own.items() if k.startswith(SHARED_TRACK)}
    if own_source and first:
        return first, second or first, "own"
    return global_decoder, second or global_decoder, "global"


def gate_open(manifest: GlobalManifest, task: str) -> bool:
    """Whether the aggregator's similarity gate let `task` share in the round that made `manifest`."""
    gates = manifest.aggregation.get("gateOpen")
    if isinstance(gates, dict) and isinstance(gates.get(task), bool):
        return bool(gates[task])
    return True  # no gate ran (first round, or another rule): nothing has closed it


def choose_start_mix(
    spec: RoundSpec,
    global_manifest: GlobalManifest,
    model: SiteModel,
    task: Task,
    data: SiteData | None,
    shared: dict[str, np.ndarray],
    task_level: dict[str, np.ndarray],
    dual: tuple[str, ...],
) -> tuple[float, dict[str, float]]:
    """How much of the shared encoder the (task-level) track starts from, and the evidence."""
    strategy = spec.training.site_strategy
    if strategy is SiteStrategy.SHARED:
        return 1.0, {}
    if strategy is SiteStrategy.GATE:
        alpha = 1.0 if gate_open(global_manifest, spec.task.name) else 0.0
        return alpha, {"gate_open": alpha}
    if strategy is not SiteStrategy.MIX:
        return 0.0, {}  # task, and fallback's task-level track
    if data is None:
        raise StartError("siteStrategy mix chooses its start on the validation split: the site's data is needed")
    choice = choose_mix(
        model,
        task,
        data,
        shared,
        task_level,
        dual,
        batch_size=spec.training.batch_size,
        learning_rate=spec.training.learning_rate,
        device=pick_device(spec.training.device),
        # Seeded by the model it looks at, not by the round number: scoring the same artifacts
        # later (the pilot re-scores a kept model) must make the same choice.
        seed=derive_seed(spec.training.seed, spec.site, "probe", global_manifest.digest),
        eval_seed=derive_seed("eval", spec.site),
    )
    return choice.alpha, {f"probe_val_a{round(a * 100):03d}": v for a, v in sorted(choice.scores.items())}


def assemble_start(
    spec: RoundSpec,
    storage: Storage,
    data: SiteData | None,
    global_manifest: GlobalManifest,
    info: TaskGroupInfo,
    global_tensors: dict[str, np.ndarray],
    model: SiteModel,
    task: Task,
) -> StartState:
    """Load `model` (already checked against the federation) with the start the strategy asks for."""
    task_level = task_view(global_tensors, spec.task.name, "encoder")
    task_decoder = task_view(global_tensors, spec.task.name, "decoder")
    start_decoder, shared_decoder, decoder_origin = start_decoders(storage, spec, task_decoder)
    load_part(model, "decoder", start_decoder)
    dual = tuple(dual_keys(global_tensors, spec.task.name))
    strategy = spec.training.site_strategy
    alpha: float = 0.0
    evidence: dict[str, float] = {}
    track: Track | None = None
    if not dual:
        # the literal layout: one encoder per task, nothing to mix or fall back to
        if strategy is not SiteStrategy.SHARED:
            raise StartError(
                f"siteStrategy {strategy.value} needs task-level copies of the shared encoder parameters "
                "(sharing.taskLevel: true, and at least one shared parameter)"
            )
        start = task_level
    else:
        shared = shared_view(global_tensors, spec.task.name)
        alpha, evidence = choose_start_mix(spec, global_manifest, model, task, data, shared, task_level, dual)
        if strategy is SiteStrategy.FALLBACK:
            second = copy.deepcopy(model)
            load_part(second, "encoder", shared)
            load_part(second, "decoder", shared_decoder)
            track = Track(model=second, start_encoder=shared)
        start = mix_encoders(shared, task_level, alpha, dual) if alpha else task_level
        evidence["start_alpha"] = alpha
    load_part(model, "encoder", start)
    return StartState(
        global_manifest=global_manifest,
        info=info,
        model=model,
        task=task,
        start_encoder=start,
        task_decoder=task_decoder,
        decoder_origin=decoder_origin,
        start_mix={"encoder.": alpha} if alpha else {},
        shared=track,
        dual=dual,
        evidence=evidence,
    )
