"""The Local baseline of a site: the same model trained on the same data and steps, alone.

Its state (encoder + decoder) lives under the site's own baseline prefix, one file per round:

    <baseline prefix>/round-<N>.safetensors

It is never part of the contribution: the aggregator reads only the files the contribution
manifest names, so the baseline uploads zero bytes to it. Round 1 of a chain starts the baseline
from the round's base model (the chain's initial model, the same start as the federation); every
later round continues from the previous round's file. A missing previous file is an input error
with a reason, never a silently re-started (and so under-trained) baseline.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from mfed.artifacts.layout import join
from mfed.artifacts.tensorfile import decode_tensors, encode_tensors
from mfed.learning.model import SiteModel, load_part, part_state
from mfed.learning.train import Objective, TrainStats
from mfed.spec import BaselineSpec, Regularizer
from mfed.storage import NotFound, Storage

LOCAL_NO_REGULARIZER = Objective(regularizer=Regularizer.NONE, mu=0.0, global_decoder=None)


class BaselineStateMissing(Exception):
    """The previous round's baseline state is gone: this round cannot report a fair baseline."""


def state_uri(prefix: str, round_number: int) -> str:
    return join(prefix, f"round-{round_number:05d}.safetensors")


@dataclass(frozen=True)
class LocalResult:
    model: SiteModel
    stats: TrainStats


def start_local(spec: BaselineSpec, round_number: int, start: SiteModel, storage: Storage) -> SiteModel:
    """The model the Local baseline trains this round from (a copy; `start` is not touched)."""
    model = copy.deepcopy(start)
    if spec.previous_round is None:
        return model
    uri = state_uri(spec.prefix, spec.previous_round)
    try:
        tensors = decode_tensors(storage.read(uri)).tensors
    except NotFound:
        raise BaselineStateMissing(
            f"the Local baseline state of round {spec.previous_round} ({uri}) is missing, so round "
            f"{round_number} cannot continue it; restore the object, or start a new chain (its first "
            "round trains the baseline from the initial model)"
        ) from None
    load_part(model, "encoder", tensors)
    load_part(model, "decoder", tensors)
    return model


def train_and_store_local(
    spec: BaselineSpec,
    round_number: int,
    start: SiteModel,
    storage: Storage,
    train: Callable[[SiteModel, Objective], TrainStats],
) -> LocalResult:
    """Continue the site's Local baseline by one round of `train` and store its state."""
    model = start_local(spec, round_number, start, storage)
    stats = train(model, LOCAL_NO_REGULARIZER)
    state = part_state(model, "encoder") | part_state(model, "decoder")
    storage.write(state_uri(spec.prefix, round_number), encode_tensors(state))
    return LocalResult(model=model, stats=stats)
