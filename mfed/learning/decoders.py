"""Decoder (head) architectures. A task says what it outputs; the decoder maps features to it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mfed.learning.encoders import ArchError, ImageShape
from mfed.spec import ArchSpec


@dataclass(frozen=True)
class VectorOutput:
    """Logits or regression outputs of this size."""

    size: int


@dataclass(frozen=True)
class ImageOutput:
    """A dense output with the given shape (reconstruction, denoising, segmentation)."""

    shape: ImageShape


Output = VectorOutput | ImageOutput


def _params(spec: ArchSpec, allowed: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(spec.params) - set(allowed))
    if unknown:
        raise ArchError(f"decoder {spec.name!r} has no parameter {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return {**allowed, **spec.params}


def mlp(spec: ArchSpec, feature_dim: int, output: Output) -> nn.Module:
    """Classification or regression head: hidden Linear+ReLU layers, then a Linear output."""
    if not isinstance(output, VectorOutput):
        shape = output.shape
        raise ArchError(
            f"decoder 'mlp' produces vectors, but this task outputs {shape.channels}x{shape.height}x"
            f"{shape.width} images: use decoder 'upsample'"
        )
    p = _params(spec, {"hidden": []})
    hidden = p["hidden"]
    if not isinstance(hidden, list | tuple) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ArchError("decoder 'mlp': parameter 'hidden' must be a list of positive integers")
    layers: list[nn.Module] = []
    previous = feature_dim
    for width in hidden:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, output.size))
    return nn.Sequential(*layers)


class _Upsample(nn.Module):
    def __init__(self, feature_dim: int, shape: ImageShape, base_channels: int, steps: int) -> None:
        super().__init__()
        factor = 2**steps
        if shape.height % factor or shape.width % factor:
            raise ArchError(
                f"decoder 'upsample': image {shape.height}x{shape.width} is not divisible by 2^steps={factor}; "
                "change 'steps'"
            )
        self.seed_shape = (base_channels, shape.height // factor, shape.width // factor)
        self.project = nn.Sequential(
            nn.Linear(feature_dim, base_channels * self.seed_shape[1] * self.seed_shape[2]), nn.ReLU()
        )
        ups: list[nn.Module] = []
        channels = base_channels
        for i in range(steps):
            last = i == steps - 1
            out = shape.channels if last else max(channels // 2, 8)
            ups.append(nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1))
            if not last:
                ups.append(nn.ReLU())
            channels = out
        self.up = nn.Sequential(*ups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], *self.seed_shape)
        return torch.sigmoid(self.up(x))


def upsample(spec: ArchSpec, feature_dim: int, output: Output) -> nn.Module:
    """Dense image decoder: project features to a small map, then transposed convolutions."""
    if not isinstance(output, ImageOutput):
        raise ArchError(
            f"decoder 'upsample' produces images, but this task outputs vectors of {output.size}: use decoder 'mlp'"
        )
    p = _params(spec, {"base_channels": 64, "steps": 2})
    return _Upsample(feature_dim, output.shape, int(p["base_channels"]), int(p["steps"]))


DECODERS: dict[str, Callable[[ArchSpec, int, Output], nn.Module]] = {"mlp": mlp, "upsample": upsample}


def build_decoder(spec: ArchSpec, feature_dim: int, output: Output) -> nn.Module:
    try:
        factory = DECODERS[spec.name]
    except KeyError:
        raise ArchError(f"unknown decoder {spec.name!r}; available: {', '.join(sorted(DECODERS))}") from None
    return factory(spec, feature_dim, output)
