"""Who owns a parameter: the whole federation, or one task group.

Site models name parameters `encoder.*` and `decoder.*`. A global model stores

    encoder.<p>                 encoder parameters shared ACROSS task groups
    tasks.<task>.encoder.<p>    encoder parameters kept per task group (not shared)
    tasks.<task>.decoder.<p>    the task group's global decoder D_tau

Which encoder parameters are shared is decided once, at initialisation, by the federation's
SharingPolicy; afterwards the key layout of the global model is the single source of truth.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from mfed.spec import SharingMode, SharingPolicy

ENCODER = "encoder."
DECODER = "decoder."
_STAGE = re.compile(r"^encoder\.stages\.(\d+)\.")
_TASK_KEY = re.compile(r"^tasks\.([a-z0-9][a-z0-9_-]*)\.(encoder|decoder)\.(.+)$")


@dataclass(frozen=True)
class Owner:
    """`task` is None for parameters owned by the whole federation."""

    task: str | None
    part: str  # "encoder" or "decoder"
    site_key: str  # the name the parameter has inside a site model


def owner_of(global_key: str) -> Owner:
    """The one function that decides who owns a key of a global model."""
    if global_key.startswith(ENCODER):
        return Owner(task=None, part="encoder", site_key=global_key)
    match = _TASK_KEY.match(global_key)
    if not match:
        raise KeyError(f"{global_key!r} is not an encoder.* or tasks.<task>.(encoder|decoder).* key")
    task, part, rest = match.groups()
    return Owner(task=task, part=part, site_key=f"{part}.{rest}")


def is_shared_across_tasks(encoder_key: str, policy: SharingPolicy) -> bool:
    """Decide, at initialisation, whether an encoder parameter crosses task groups."""
    if not encoder_key.startswith(ENCODER):
        raise KeyError(f"{encoder_key!r} is not an encoder parameter")
    if policy.mode is SharingMode.ALL:
        return True
    if policy.mode is SharingMode.NONE:
        return False
    if policy.mode is SharingMode.DEPTH:
        stage = _STAGE.match(encoder_key)
        if stage is None:
            raise KeyError(
                f"{encoder_key!r} is not inside encoder.stages.<i>; depth-based sharing needs "
                "an encoder that names its stages (use sharing mode prefixes instead)"
            )
        return int(stage.group(1)) < policy.depth
    prefixes = [p if p.startswith(ENCODER) else ENCODER + p for p in policy.prefixes]
    return any(encoder_key.startswith(p) for p in prefixes)


def global_key(site_key: str, task: str, shared: bool) -> str:
    if site_key.startswith(ENCODER):
        return site_key if shared else f"tasks.{task}.{site_key}"
    if site_key.startswith(DECODER):
        return f"tasks.{task}.{site_key}"
    raise KeyError(f"{site_key!r} is neither an encoder.* nor a decoder.* parameter")


def layout_global(
    encoder: Mapping[str, np.ndarray],
    decoders: Mapping[str, Mapping[str, np.ndarray]],
    policy: SharingPolicy,
) -> dict[str, np.ndarray]:
    """Arrange an initial encoder and per-task decoders into global-model keys."""
    out: dict[str, np.ndarray] = {}
    for key, value in encoder.items():
        if is_shared_across_tasks(key, policy):
            out[key] = value
        else:
            for task in decoders:
                out[global_key(key, task, shared=False)] = value
    for task, decoder in decoders.items():
        for key, value in decoder.items():
            out[global_key(key, task, shared=False)] = value
    return out


def task_view(global_tensors: Mapping[str, np.ndarray], task: str, part: str) -> dict[str, np.ndarray]:
    """The `part` ("encoder" or "decoder") of one task group, with site-model key names."""
    view: dict[str, np.ndarray] = {}
    for key, value in global_tensors.items():
        owner = owner_of(key)
        if owner.part == part and owner.task in (None, task):
            view[owner.site_key] = value
    return view


def tasks_in(global_keys: Iterable[str]) -> list[str]:
    return sorted({o.task for o in map(owner_of, global_keys) if o.task is not None})
