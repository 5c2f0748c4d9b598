"""`pooled_head`: a head for any encoder. A spatial map is average-pooled to one vector per
example; a vector passes as is; then a small MLP to the task's vector output.

A decoder factory gets `(params, features, output)`: the encoder's declared features and the
task's declared output, so it never hard-codes a feature size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mfed.plugins import ArchError, Features, MapFeatures, Output, VectorOutput, positive_int, with_defaults


class PooledHead(nn.Module):
    def __init__(self, features: Features, output: VectorOutput, hidden: int) -> None:
        super().__init__()
        self.pool = isinstance(features, MapFeatures)
        width = features.channels if isinstance(features, MapFeatures) else features.size
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, output.size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool:
            features = features.mean(dim=(2, 3))
        return self.mlp(features)


def pooled_head(params: Mapping[str, Any], features: Features, output: Output) -> nn.Module:
    what = "decoder 'pooled_head'"
    if not isinstance(output, VectorOutput):
        raise ArchError(f"{what} produces vectors; this task outputs shape {output.shape}")
    p = with_defaults(params, {"hidden": 32}, what=what)
    return PooledHead(features, output, positive_int(p, "hidden", what=what))
