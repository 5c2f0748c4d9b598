"""Decoders (heads): the built-ins, and building any registered decoder by name.

A decoder factory gets its parameters, the encoder's declared features and the task's output,
`factory(params, features, output) -> nn.Module`, so a head fits whatever encoder the
federation uses. `mlp` maps vector features (a map is flattened) to vector outputs; `upsample`
maps vector features or a spatial map to an image. Every built decoder is checked on a batch
of zero features: its output must have the task's shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mfed import registry
from mfed.learning.encoders import call_factory, probe_shape
from mfed.learning.params import ArchError, int_list, positive_int, with_defaults
from mfed.learning.shapes import DenseOutput, Features, MapFeatures, Output, VectorFeatures, VectorOutput
from mfed.spec import ArchSpec

__all__ = ["DenseOutput", "Output", "VectorOutput", "build_decoder", "mlp", "upsample"]


def mlp(params: Mapping[str, Any], features: Features, output: Output) -> nn.Module:
    """Classification or regression head: hidden Linear+ReLU layers, then a Linear output."""
    what = "decoder 'mlp'"
    if isinstance(output, DenseOutput) and len(output.shape) != 1:
        raise ArchError(
            f"{what} produces vectors, but this task outputs shape {output.shape}: use decoder 'upsample' "
            "for images, or a decoder plugin"
        )
    p = with_defaults(params, {"hidden": []}, what=what)
    hidden = int_list(p, "hidden", what=what, allow_empty=True)
    layers: list[nn.Module] = [nn.Flatten()] if isinstance(features, MapFeatures) else []
    previous = math.prod(features.shape)
    for width in hidden:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, output.size))
    return nn.Sequential(*layers)


class _Upsample(nn.Module):
    """Features -> a seed map (projected from a vector, or 1x1-convolved from a map), then
    `steps` transposed convolutions that each double the size; a sigmoid keeps pixels in [0, 1]."""

    def __init__(self, features: Features, shape: tuple[int, int, int], base_channels: int, steps: int) -> None:
        super().__init__()
        channels, height, width = shape
        factor = 2**steps
        if height % factor or width % factor:
            raise ArchError(
                f"decoder 'upsample': image {height}x{width} is not divisible by 2^steps={factor}; change 'steps'"
            )
        self.seed_shape = (base_channels, height // factor, width // factor)
        self.project: nn.Module
        if isinstance(features, VectorFeatures):
            self.project = nn.Sequential(
                nn.Linear(features.size, base_channels * self.seed_shape[1] * self.seed_shape[2]),
                nn.ReLU(),
                nn.Unflatten(1, self.seed_shape),
            )
        else:
            if (features.height, features.width) != self.seed_shape[1:]:
                raise ArchError(
                    f"decoder 'upsample': the encoder's {features.height}x{features.width} feature map does not "
                    f"grow to the {height}x{width} output in 2^steps={factor} (it needs a "
                    f"{self.seed_shape[1]}x{self.seed_shape[2]} map); change 'steps'"
                )
            self.project = nn.Sequential(nn.Conv2d(features.channels, base_channels, 1), nn.ReLU())
        ups: list[nn.Module] = []
        current = base_channels
        for i in range(steps):
            last = i == steps - 1
            out = channels if last else max(current // 2, 8)
            ups.append(nn.ConvTranspose2d(current, out, 4, stride=2, padding=1))
            if not last:
                ups.append(nn.ReLU())
            current = out
        self.up = nn.Sequential(*ups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.up(self.project(z)))


def upsample(params: Mapping[str, Any], features: Features, output: Output) -> nn.Module:
    """Dense image decoder: a small seed map, then transposed convolutions up to the image."""
    what = "decoder 'upsample'"
    if not isinstance(output, DenseOutput) or len(output.shape) != 3:
        raise ArchError(
            f"{what} produces images (channels, height, width), but this task outputs shape {output.shape}: "
            "use decoder 'mlp'"
        )
    p = with_defaults(params, {"base_channels": 64, "steps": 2}, what=what)
    c, h, w = output.shape
    return _Upsample(
        features, (c, h, w), positive_int(p, "base_channels", what=what), positive_int(p, "steps", what=what)
    )


def build_decoder(spec: ArchSpec, features: Features, output: Output) -> nn.Module:
    """The registered decoder `spec.name` for these features and this output, checked on a batch
    of zero features."""
    what = f"decoder {spec.name!r}"
    factory = registry.load("decoder", spec.name)
    module = call_factory(factory, dict(spec.params), features, output, what=what)
    if not isinstance(module, nn.Module):
        raise ArchError(f"{what} returned {type(module).__name__}, not a torch.nn.Module")
    actual = probe_shape(module, features.shape, what=what)
    if actual != output.shape:
        raise ArchError(f"{what} maps features {features.shape} to {actual}, but the task outputs {output.shape}")
    return module
