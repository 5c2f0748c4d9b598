"""Encoder architectures, chosen by name plus parameters.

Every encoder keeps its layers in `self.stages`, ordered from the input up, so parameters are
named `stages.<i>.*` and "share the lowest N stages across tasks" is a rule over names.
Normalisation is GroupNorm, not BatchNorm: batch statistics are site-specific buffers that do
not average meaningfully across sites with different data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mfed.spec import ArchSpec


class ArchError(ValueError):
    """An architecture name or parameter is invalid."""


@dataclass(frozen=True, kw_only=True)
class ImageShape:
    channels: int
    height: int
    width: int


class Encoder(nn.Module):
    """Base: `stages` applied in order; output is a feature vector of `feature_dim`."""

    def __init__(self, stages: list[nn.Module], feature_dim: int, input_shape: ImageShape) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.feature_dim = feature_dim
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def _params(spec: ArchSpec, allowed: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(spec.params) - set(allowed))
    if unknown:
        raise ArchError(f"encoder {spec.name!r} has no parameter {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return {**allowed, **spec.params}


def _positive_int(params: Mapping[str, Any], name: str, arch: str) -> int:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArchError(f"encoder {arch!r}: parameter {name!r} must be a positive integer, got {value!r}")
    return value


def _int_list(params: Mapping[str, Any], name: str, arch: str) -> list[int]:
    value = params[name]
    if (
        not isinstance(value, list | tuple)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ArchError(f"encoder {arch!r}: parameter {name!r} must be a list of positive integers")
    return list(value)


def small_cnn(spec: ArchSpec) -> Encoder:
    """The encoder of MFED.md: conv32 stride 2, conv64 stride 2, fc128 (for 28x28 images)."""
    p = _params(spec, {"in_channels": 1, "image_size": 28, "channels": [32, 64], "feature_dim": 128})
    in_channels = _positive_int(p, "in_channels", spec.name)
    size = _positive_int(p, "image_size", spec.name)
    feature_dim = _positive_int(p, "feature_dim", spec.name)
    channels = _int_list(p, "channels", spec.name)
    stages: list[nn.Module] = []
    previous, spatial = in_channels, size
    for width in channels:
        stages.append(nn.Sequential(nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.ReLU()))
        previous, spatial = width, (spatial + 1) // 2
    stages.append(nn.Sequential(nn.Flatten(), nn.Linear(previous * spatial * spatial, feature_dim), nn.ReLU()))
    return Encoder(stages, feature_dim, ImageShape(channels=in_channels, height=size, width=size))


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.GroupNorm(min(groups, out_ch), out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet(spec: ArchSpec) -> Encoder:
    """ResNet-style encoder (ResNet-18 layout by default, ~11M parameters) for larger images.

    Images of 64 px and more get the ImageNet stem (7x7 stride 2 + max-pool); smaller images a
    3x3 stem, as CIFAR-style ResNets do.
    """
    p = _params(
        spec,
        {
            "in_channels": 3,
            "image_size": 32,
            "widths": [64, 128, 256, 512],
            "blocks": [2, 2, 2, 2],
            "feature_dim": 512,
            "groups": 8,
        },
    )
    in_channels = _positive_int(p, "in_channels", spec.name)
    size = _positive_int(p, "image_size", spec.name)
    widths = _int_list(p, "widths", spec.name)
    blocks = _int_list(p, "blocks", spec.name)
    groups = _positive_int(p, "groups", spec.name)
    feature_dim = _positive_int(p, "feature_dim", spec.name)
    if len(widths) != len(blocks):
        raise ArchError(f"encoder {spec.name!r}: widths and blocks must have the same length")
    stem: nn.Module
    if size >= 64:
        stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
            nn.GroupNorm(min(groups, widths[0]), widths[0]),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
    else:
        stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.GroupNorm(min(groups, widths[0]), widths[0]),
            nn.ReLU(),
        )
    stages: list[nn.Module] = [stem]
    previous = widths[0]
    for i, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        layer = [_BasicBlock(previous, width, 1 if i == 0 else 2, groups)]
        layer += [_BasicBlock(width, width, 1, groups) for _ in range(count - 1)]
        stages.append(nn.Sequential(*layer))
        previous = width
    head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if feature_dim != previous:
        head += [nn.Linear(previous, feature_dim), nn.ReLU()]
    stages.append(nn.Sequential(*head))
    return Encoder(stages, feature_dim, ImageShape(channels=in_channels, height=size, width=size))


ENCODERS: dict[str, Callable[[ArchSpec], Encoder]] = {"small_cnn": small_cnn, "resnet": resnet}


def build_encoder(spec: ArchSpec) -> Encoder:
    try:
        factory = ENCODERS[spec.name]
    except KeyError:
        raise ArchError(f"unknown encoder {spec.name!r}; available: {', '.join(sorted(ENCODERS))}") from None
    return factory(spec)
