"""Encoders: the built-in architectures, and building any registered encoder by name.

An encoder is any `torch.nn.Module` mapping a batch of inputs to features that declares, as
attributes, the `input_spec` it consumes and the `feature_spec` it produces (shapes.py). The
built-ins also keep their layers in `self.stages`, ordered from the input up, so their
parameters are named `stages.<i>.*` and `sharing.mode: depth` ("share the lowest N stages")
works on them; any encoder can share by parameter-name prefixes instead. Normalisation is
GroupNorm, not BatchNorm: batch statistics are site-specific buffers that do not average
meaningfully across sites with different data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mfed import registry
from mfed.learning.params import ArchError, int_list, positive_int, with_defaults
from mfed.learning.shapes import Features, InputSpec, MapFeatures, VectorFeatures
from mfed.spec import ArchSpec

__all__ = ["ArchError", "Encoder", "build_encoder", "check_encoder", "probe_shape"]


class Encoder(nn.Module):
    """Base of the built-ins: `stages` applied in order; output is a feature vector."""

    def __init__(self, stages: list[nn.Module], feature_dim: int, input_spec: InputSpec) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.input_spec = input_spec
        self.feature_spec: Features = VectorFeatures(feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def small_cnn(params: Mapping[str, Any]) -> Encoder:
    """The encoder of MFED.md: conv32 stride 2, conv64 stride 2, fc128 (for 28x28 images)."""
    what = "encoder 'small_cnn'"
    p = with_defaults(params, {"in_channels": 1, "image_size": 28, "channels": [32, 64], "feature_dim": 128}, what=what)
    in_channels = positive_int(p, "in_channels", what=what)
    size = positive_int(p, "image_size", what=what)
    feature_dim = positive_int(p, "feature_dim", what=what)
    channels = int_list(p, "channels", what=what)
    stages: list[nn.Module] = []
    previous, spatial = in_channels, size
    for width in channels:
        stages.append(nn.Sequential(nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.ReLU()))
        previous, spatial = width, (spatial + 1) // 2
    stages.append(nn.Sequential(nn.Flatten(), nn.Linear(previous * spatial * spatial, feature_dim), nn.ReLU()))
    return Encoder(stages, feature_dim, InputSpec.image(in_channels, size, size))


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


def resnet(params: Mapping[str, Any]) -> Encoder:
    """ResNet-style encoder (ResNet-18 layout by default, ~11M parameters) for larger images.

    Images of 64 px and more get the ImageNet stem (7x7 stride 2 + max-pool); smaller images a
    3x3 stem, as CIFAR-style ResNets do.
    """
    what = "encoder 'resnet'"
    p = with_defaults(
        params,
        {
            "in_channels": 3,
            "image_size": 32,
            "widths": [64, 128, 256, 512],
            "blocks": [2, 2, 2, 2],
            "feature_dim": 512,
            "groups": 8,
        },
        what=what,
    )
    in_channels = positive_int(p, "in_channels", what=what)
    size = positive_int(p, "image_size", what=what)
    widths = int_list(p, "widths", what=what)
    blocks = int_list(p, "blocks", what=what)
    groups = positive_int(p, "groups", what=what)
    feature_dim = positive_int(p, "feature_dim", what=what)
    if len(widths) != len(blocks):
        raise ArchError(f"{what}: widths and blocks must have the same length")
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
    return Encoder(stages, feature_dim, InputSpec.image(in_channels, size, size))


def call_factory(factory: Callable[..., Any], *args: Any, what: str) -> Any:
    """Call a plugin's factory; whatever it raises becomes an ArchError naming the plugin (bad
    input for the trainer: the same spec and image cannot succeed on a retry)."""
    try:
        return factory(*args)
    except (ArchError, registry.PluginError):
        raise
    except Exception as exc:
        raise ArchError(f"{what} could not be built: {type(exc).__name__}: {exc}") from exc


def probe_shape(module: nn.Module, example_shape: tuple[int, ...], *, what: str) -> tuple[int, ...]:
    """The per-example shape `module` maps a batch of two zero examples to (eval mode, no grad:
    nothing about the module changes)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros((2, *example_shape)))
    except Exception as exc:
        raise ArchError(
            f"{what} fails on a batch of its declared input shape (2, {', '.join(map(str, example_shape))}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ArchError(f"{what} must return one tensor with the batch first; for a batch of 2 it returned {got}")
    return tuple(int(d) for d in out.shape[1:])


def check_encoder(module: object, what: str) -> nn.Module:
    """What the trainer needs of an encoder: a Module declaring input_spec and feature_spec,
    whose output on its declared input has the declared feature shape."""
    if not isinstance(module, nn.Module):
        raise ArchError(f"{what} returned {type(module).__name__}, not a torch.nn.Module")
    input_spec = getattr(module, "input_spec", None)
    if not isinstance(input_spec, InputSpec):
        raise ArchError(
            f"{what} must declare the input it consumes as `module.input_spec = InputSpec(shape=..., dtype=...)` "
            "(mfed.plugins.InputSpec, the shape of one example); see docs/plugins.md"
        )
    features = getattr(module, "feature_spec", None)
    if not isinstance(features, VectorFeatures | MapFeatures):
        raise ArchError(
            f"{what} must declare its features as `module.feature_spec = VectorFeatures(size)` or "
            "`MapFeatures(channels, height, width)` (mfed.plugins); see docs/plugins.md"
        )
    actual = probe_shape(module, input_spec.shape, what=what)
    if actual != features.shape:
        raise ArchError(f"{what} declares features of shape {features.shape} but produces {actual}")
    return module


def build_encoder(spec: ArchSpec) -> nn.Module:
    """The registered encoder `spec.name` built from `spec.params`, checked (see check_encoder)."""
    what = f"encoder {spec.name!r}"
    factory = registry.load("encoder", spec.name)
    return check_encoder(call_factory(factory, dict(spec.params), what=what), what)


def input_spec_of(encoder: nn.Module) -> InputSpec:
    spec = getattr(encoder, "input_spec", None)
    assert isinstance(spec, InputSpec), "encoders are checked by build_encoder"
    return spec


def feature_spec_of(encoder: nn.Module) -> Features:
    spec = getattr(encoder, "feature_spec", None)
    assert isinstance(spec, VectorFeatures | MapFeatures), "encoders are checked by build_encoder"
    return spec
