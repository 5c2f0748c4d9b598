"""A site model: shared-architecture encoder + task-specific decoder.

Parameters are named `encoder.*` and `decoder.*`, which is what ownership rules and artifact
files use. Conversions to and from numpy live here so the rest of the system never sees torch.
Every part is built by registered name (mfed.registry), so plugins build exactly like built-ins:
the encoder first, the task from the encoder's declared input, the decoder from the encoder's
declared features and the task's output.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from mfed.artifacts.signature import Signature
from mfed.learning.decoders import build_decoder
from mfed.learning.encoders import build_encoder, feature_spec_of, input_spec_of
from mfed.learning.shapes import InputSpec
from mfed.learning.tasks import Task, build_task
from mfed.spec import ArchSpec, TaskSpec


class SiteModel(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @property
    def input_spec(self) -> InputSpec:
        """The shape of one input example, as the encoder declares it."""
        return input_spec_of(self.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.encoder(x)
        prediction: torch.Tensor = self.decoder(features)
        return prediction


def build_site_model(encoder_spec: ArchSpec, task_spec: TaskSpec, decoder_spec: ArchSpec) -> tuple[SiteModel, Task]:
    encoder = build_encoder(encoder_spec)
    task = build_task(task_spec.type, task_spec.params, input_spec_of(encoder))
    decoder = build_decoder(decoder_spec, feature_spec_of(encoder), task.output)
    return SiteModel(encoder, decoder), task


def part_state(model: SiteModel, part: str) -> dict[str, np.ndarray]:
    """`encoder.*` or `decoder.*` parameters as float32 numpy arrays (copies, on the CPU)."""
    module = getattr(model, part)
    return {
        f"{part}.{name}": tensor.detach().to("cpu", torch.float32).numpy().copy()
        for name, tensor in module.state_dict().items()
    }


def load_part(model: SiteModel, part: str, values: Mapping[str, np.ndarray]) -> None:
    """Load `encoder.*` or `decoder.*` arrays into the model (strict: every key, every shape)."""
    module = getattr(model, part)
    prefix = f"{part}."
    state = {
        k[len(prefix) :]: torch.from_numpy(np.array(v, dtype=np.float32))
        for k, v in values.items()
        if k.startswith(prefix)
    }
    module.load_state_dict(state, strict=True)


def signature(model: SiteModel, part: str) -> Signature:
    module = getattr(model, part)
    return Signature.of(
        (f"{part}.{name}", tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in module.state_dict().items()
    )
