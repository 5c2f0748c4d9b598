"""Two encoders that are nothing like mfed's built-ins.

`patch_net`: a patch embedding plus depthwise-separable mixing blocks, with its layers in named
attributes (`embed`, `blocks`), not in `stages`, and a spatial feature map as output.
`flat_mlp`: an MLP over the flattened input, so it takes any input shape: images, or one
feature row per example (tabular data).

A factory takes the architecture's `params` (spec.encoder.params) and returns any
`torch.nn.Module` that declares `input_spec` (one example's shape) and `feature_spec`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mfed.plugins import ArchError, InputSpec, MapFeatures, VectorFeatures, int_list, positive_int, with_defaults


class _MixBlock(nn.Module):
    """Depthwise 3x3 convolution (mixes space) + pointwise (mixes channels), residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.channels = nn.Conv2d(width, width, 1)
        self.norm = nn.GroupNorm(1, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.channels(torch.relu(self.norm(self.spatial(x))))


class PatchNet(nn.Module):
    def __init__(self, in_channels: int, image_size: int, width: int, patch: int, depth: int) -> None:
        super().__init__()
        if image_size % patch:
            raise ArchError(f"encoder 'patch_net': image_size {image_size} is not a multiple of patch {patch}")
        side = image_size // patch
        self.embed = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.blocks = nn.Sequential(*[_MixBlock(width) for _ in range(depth)])
        # The declarations mfed builds the rest of the model from.
        self.input_spec = InputSpec(shape=(in_channels, image_size, image_size))
        self.feature_spec = MapFeatures(width, side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.blocks(self.embed(x)))


def patch_net(params: Mapping[str, Any]) -> nn.Module:
    what = "encoder 'patch_net'"
    p = with_defaults(params, {"in_channels": 1, "image_size": 28, "width": 16, "patch": 4, "depth": 2}, what=what)
    return PatchNet(
        positive_int(p, "in_channels", what=what),
        positive_int(p, "image_size", what=what),
        positive_int(p, "width", what=what),
        positive_int(p, "patch", what=what),
        positive_int(p, "depth", what=what),
    )


class FlatMLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        previous = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(previous, size), nn.ReLU()]
            previous = size
        self.net = nn.Sequential(*layers)
        self.input_spec = InputSpec(shape=input_shape)
        self.feature_spec = VectorFeatures(previous)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def flat_mlp(params: Mapping[str, Any]) -> nn.Module:
    """`input_shape`: one example's shape, e.g. [1, 28, 28] for images or [16] for a tabular row."""
    what = "encoder 'flat_mlp'"
    p = with_defaults(params, {"input_shape": [1, 28, 28], "hidden": [256, 128]}, what=what)
    return FlatMLP(tuple(int_list(p, "input_shape", what=what)), int_list(p, "hidden", what=what))
