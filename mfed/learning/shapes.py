"""What flows between the parts of a site model, declared by the parts themselves.

An encoder declares the `InputSpec` it consumes (the shape of ONE example and its dtype: images
`(1, 28, 28)`, a tabular row `(16,)`, a sensor window `(3, 256)`) and the `Features` it produces
(a vector, or a spatial map). A task declares its `Output`. Decoders are built from the
encoder's features and the task's output, so no part hard-codes another's sizes. All plain
frozen values (no torch), so they can be written into JSON configs and compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# dtypes an encoder may declare for its inputs; the data loader produces float32 today.
INPUT_DTYPES = ("float32",)


class ShapeError(ValueError):
    """A declared shape is malformed."""


def _dims(values: Any, what: str) -> tuple[int, ...]:
    if (
        not isinstance(values, list | tuple)
        or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    ):
        raise ShapeError(f"{what} must be a non-empty list of positive integers, got {values!r}")
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class InputSpec:
    """One example's shape (no batch dimension) and dtype, as the encoder consumes it."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _dims(self.shape, "input shape")
        if self.dtype not in INPUT_DTYPES:
            raise ShapeError(f"input dtype {self.dtype!r} is not supported; use {', '.join(INPUT_DTYPES)}")

    @classmethod
    def image(cls, channels: int, height: int, width: int) -> InputSpec:
        return cls(shape=(channels, height, width))

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Any) -> InputSpec:
        if not isinstance(data, dict):
            raise ShapeError("input must be an object {shape, dtype}")
        return cls(shape=_dims(data.get("shape"), "input.shape"), dtype=str(data.get("dtype", "float32")))


@dataclass(frozen=True)
class VectorFeatures:
    """Features of shape (batch, size)."""

    size: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.size,)


@dataclass(frozen=True)
class MapFeatures:
    """A spatial feature map of shape (batch, channels, height, width)."""

    channels: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.height, self.width)


Features = VectorFeatures | MapFeatures


def features_from_shape(shape: tuple[int, ...]) -> Features:
    """The declaration an output of this per-example shape corresponds to."""
    if len(shape) == 1:
        return VectorFeatures(shape[0])
    if len(shape) == 3:
        return MapFeatures(*shape)
    raise ShapeError(f"features must be a vector (size,) or a map (channels, height, width), got {shape}")


def features_to_dict(features: Features) -> dict[str, Any]:
    kind = "vector" if isinstance(features, VectorFeatures) else "map"
    return {"kind": kind, "shape": list(features.shape)}


@dataclass(frozen=True)
class VectorOutput:
    """Logits or regression outputs of this size: shape (batch, size)."""

    size: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.size,)


@dataclass(frozen=True)
class DenseOutput:
    """A dense output of this per-example shape (a reconstructed image (C, H, W), a signal...)."""

    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


Output = VectorOutput | DenseOutput
