"""The round-0 global model of a federation: one seeded encoder, one seeded decoder per task group.

Seeded per part (the encoder by the init seed, each decoder by the seed and its task name), so
adding a task group to a federation does not change the other groups' starting decoders.
"""

from __future__ import annotations

import numpy as np
import torch

from mfed.aggregation.ownership import layout_global
from mfed.artifacts.layout import MODEL_FILE
from mfed.artifacts.manifest import FileRef, GlobalManifest, TaskGroupInfo
from mfed.artifacts.tensorfile import encode_tensors, sha256_hex
from mfed.learning.decoders import build_decoder
from mfed.learning.encoders import build_encoder
from mfed.learning.model import SiteModel, part_state, signature
from mfed.learning.tasks import build_task
from mfed.seeding import derive_seed
from mfed.spec import InitSpec


def init_global_model(spec: InitSpec) -> tuple[bytes, GlobalManifest]:
    """Round-0 global model: one seeded encoder, one seeded decoder per task group."""
    torch.manual_seed(spec.seed)
    encoder = build_encoder(spec.encoder)
    decoders: dict[str, dict[str, np.ndarray]] = {}
    infos: dict[str, TaskGroupInfo] = {}
    encoder_state: dict[str, np.ndarray] = {}
    encoder_signature = None
    for group in sorted(spec.groups, key=lambda g: g.task.name):
        torch.manual_seed(derive_seed(spec.seed, "decoder", group.task.name))
        task = build_task(group.task.type, group.task.params, encoder.input_shape)
        model = SiteModel(encoder, build_decoder(group.decoder, encoder.feature_dim, task.output))
        encoder_state = part_state(model, "encoder")
        encoder_signature = signature(model, "encoder")
        decoders[group.task.name] = part_state(model, "decoder")
        infos[group.task.name] = TaskGroupInfo(
            type=group.task.type,
            params=dict(group.task.params),
            decoder=group.decoder,
            decoder_signature=signature(model, "decoder"),
        )
    assert encoder_signature is not None  # InitSpec guarantees at least one group
    tensors = layout_global(encoder_state, decoders, spec.sharing)
    model_bytes = encode_tensors(tensors)
    manifest = GlobalManifest(
        federation=spec.federation,
        round=0,
        model=FileRef(name=MODEL_FILE, sha256=sha256_hex(model_bytes), size=len(model_bytes)),
        encoder=spec.encoder,
        encoder_signature=encoder_signature,
        sharing=spec.sharing,
        tasks=infos,
        aggregation={"initSeed": spec.seed},
    )
    return model_bytes, manifest
