"""The round-0 global model of a federation: one seeded encoder, one seeded decoder per task group.

Seeded per part (the encoder by the init seed, each decoder by the seed and its task name), so
adding a task group to a federation does not change the other groups' starting decoders.
`initial_parts` and `assemble_global` are separate so `mfed import-weights` can replace seeded
parts with pretrained ones and still write exactly this layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mfed import registry
from mfed.aggregation.ownership import layout_global
from mfed.artifacts.layout import MODEL_FILE
from mfed.artifacts.manifest import FileRef, GlobalManifest, TaskGroupInfo
from mfed.artifacts.signature import Signature
from mfed.artifacts.tensorfile import encode_tensors, sha256_hex
from mfed.learning.decoders import build_decoder
from mfed.learning.encoders import ArchError, build_encoder, feature_spec_of, input_spec_of
from mfed.learning.model import SiteModel, part_state, signature
from mfed.learning.tasks import build_task
from mfed.seeding import derive_seed
from mfed.spec import InitSpec


@dataclass(frozen=True)
class InitialParts:
    """The seeded parts of a round-0 model, with site-model names (`encoder.*`, `decoder.*`)."""

    encoder: dict[str, np.ndarray]
    encoder_signature: Signature
    decoders: dict[str, dict[str, np.ndarray]]  # task name -> decoder.*
    infos: dict[str, TaskGroupInfo]


def initial_parts(spec: InitSpec) -> InitialParts:
    torch.manual_seed(spec.seed)
    encoder = build_encoder(spec.encoder)
    decoders: dict[str, dict[str, np.ndarray]] = {}
    infos: dict[str, TaskGroupInfo] = {}
    for group in sorted(spec.groups, key=lambda g: g.task.name):
        torch.manual_seed(derive_seed(spec.seed, "decoder", group.task.name))
        task = build_task(group.task.type, group.task.params, input_spec_of(encoder))
        model = SiteModel(encoder, build_decoder(group.decoder, feature_spec_of(encoder), task.output))
        decoders[group.task.name] = part_state(model, "decoder")
        infos[group.task.name] = TaskGroupInfo(
            type=group.task.type,
            params=dict(group.task.params),
            decoder=group.decoder,
            decoder_signature=signature(model, "decoder"),
        )
    carrier = SiteModel(encoder, torch.nn.Identity())
    return InitialParts(
        encoder=part_state(carrier, "encoder"),
        encoder_signature=signature(carrier, "encoder"),
        decoders=decoders,
        infos=infos,
    )


def plugin_provenance(spec: InitSpec) -> dict[str, str]:
    """`kind/name` -> `distribution==version` for every plugin the federation's model uses, so a
    site that lacks one is told which package to install (built-ins are not listed)."""
    used = [("encoder", spec.encoder.name)]
    for group in spec.groups:
        used += [("decoder", group.decoder.name), ("task", group.task.type)]
    out = {}
    for kind, name in sorted(set(used)):
        package = registry.provenance(kind, name)
        if package is not None:
            out[f"{kind}/{name}"] = package
    return out


def assemble_global(
    spec: InitSpec, parts: InitialParts, aggregation: Mapping[str, Any]
) -> tuple[bytes, GlobalManifest]:
    """Lay the parts out as a global model (spec.sharing decides which encoder keys are shared)."""
    try:
        tensors = layout_global(parts.encoder, parts.decoders, spec.sharing)
    except KeyError:
        outside = sorted(k for k in parts.encoder if not re.match(r"encoder\.stages\.\d+\.", k))
        top = sorted({k.split(".")[1] + "." for k in parts.encoder})
        raise ArchError(
            f"sharing.mode depth needs an encoder that keeps its layers in `stages` (parameters named "
            f"encoder.stages.<i>.*), and encoder {spec.encoder.name!r} has {outside[0]}; use sharing.mode "
            f"prefixes with prefixes of its parameter names, e.g. {', '.join(top[:4])}"
        ) from None
    model_bytes = encode_tensors(tensors)
    manifest = GlobalManifest(
        federation=spec.federation,
        round=0,
        model=FileRef(name=MODEL_FILE, sha256=sha256_hex(model_bytes), size=len(model_bytes)),
        encoder=spec.encoder,
        encoder_signature=parts.encoder_signature,
        sharing=spec.sharing,
        tasks=parts.infos,
        aggregation=dict(aggregation),
        plugins=plugin_provenance(spec),
    )
    return model_bytes, manifest


def init_global_model(spec: InitSpec) -> tuple[bytes, GlobalManifest]:
    """Round-0 global model: one seeded encoder, one seeded decoder per task group."""
    return assemble_global(spec, initial_parts(spec), {"initSeed": spec.seed})
