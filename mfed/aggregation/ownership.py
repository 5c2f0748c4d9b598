"""Who owns a parameter: the whole federation, or one task group.

Site models name parameters `encoder.*` and `decoder.*`. A global model stores

    encoder.<p>                 encoder parameters shared ACROSS task groups
    tasks.<task>.encoder.<p>    encoder parameters kept per task group (not shared)
    tasks.<task>.decoder.<p>    the task group's global decoder D_tau

With `SharingPolicy.task_level` a shared parameter ALSO has a task-level copy per task group
(`encoder.<p>` and `tasks.<task>.encoder.<p>` both exist): a "dual" parameter. Sites then start
from a mix of the two, and the aggregator keeps both up to date (fedavg.py).

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
# A site that trains two tracks (SiteStrategy.FALLBACK) uploads, beside its task-level track
# (`encoder.*` delta from E_tau, `decoder.*`), its shared track under this prefix: the delta of
# the dual parameters from E_G (`shared.encoder.*`) and that track's decoder (`shared.decoder.*`).
SHARED_TRACK = "shared."
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
        shared = is_shared_across_tasks(key, policy)
        if shared:
            out[key] = value
        if not shared or policy.task_level:
            for task in decoders:
                out[global_key(key, task, shared=False)] = value
    for task, decoder in decoders.items():
        for key, value in decoder.items():
            out[global_key(key, task, shared=False)] = value
    return out


def task_view(global_tensors: Mapping[str, np.ndarray], task: str, part: str) -> dict[str, np.ndarray]:
    """The `part` ("encoder" or "decoder") of one task group, with site-model key names.

    For a dual parameter the task-level copy is the one returned (the safe fallback)."""
    view: dict[str, np.ndarray] = {}
    for key in sorted(global_tensors):
        owner = owner_of(key)
        if owner.part == part and owner.task == task:
            view[owner.site_key] = global_tensors[key]
        elif owner.part == part and owner.task is None:
            view.setdefault(owner.site_key, global_tensors[key])
    return view


def shared_view(global_tensors: Mapping[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    """One task group's encoder with every shared parameter taken from the shared encoder E_G."""
    view = task_view(global_tensors, task, "encoder")
    for key in view:
        if key in global_tensors:
            view[key] = global_tensors[key]
    return view


def dual_keys(global_keys: Iterable[str], task: str) -> list[str]:
    """Site-model names of the encoder parameters that exist both shared and at `task`'s level."""
    keys = set(global_keys)
    prefix = f"tasks.{task}."
    return sorted(k for k in keys if k.startswith(ENCODER) and f"{prefix}{k}" in keys)


def tasks_in(global_keys: Iterable[str]) -> list[str]:
    return sorted({o.task for o in map(owner_of, global_keys) if o.task is not None})


def contribution_view(
    global_tensors: Mapping[str, np.ndarray], task: str, part: str, *, two_track: bool
) -> dict[str, np.ndarray]:
    """The tensors (site-model names, base values) a contribution's delta ("encoder") or decoder
    file must hold: the task view, plus the shared track's copies for a two-track upload."""
    view = task_view(global_tensors, task, part)
    if not two_track:
        return view
    extra = dual_keys(global_tensors, task) if part == "encoder" else sorted(view)
    return {**view, **{SHARED_TRACK + key: view[key] for key in extra}}
