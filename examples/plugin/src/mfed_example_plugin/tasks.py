"""`membership`: is the example's label one of `positives`? A binary task with one logit.

A task type is a `mfed.plugins.Task` subclass constructed with `(params, input_spec)`; it says
what the decoder outputs, how to form inputs and targets from a batch, its loss and its metric.
It works on any input shape: it only looks at the labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from mfed.plugins import InputSpec, Output, Task, TaskError, VectorOutput


class Membership(Task):
    metric_name = "accuracy"
    higher_is_better = True
    allowed_params: Mapping[str, Any] = {"positives": None}

    def __init__(self, params: Mapping[str, Any], input_spec: InputSpec) -> None:
        super().__init__(params, input_spec)
        positives = self.params["positives"]
        if (
            not isinstance(positives, list)
            or not positives
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in positives)
        ):
            raise TaskError(
                "task type 'membership': params.positives must be a non-empty list of labels, e.g. [5, 7, 9]"
            )
        self.positives = torch.tensor(sorted(set(positives)), dtype=torch.long)

    @property
    def output(self) -> Output:
        return VectorOutput(1)

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        return torch.isin(y.long(), self.positives.to(y.device)).float()

    def train_pairs(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self._targets(y)

    def eval_pairs(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self._targets(y)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(prediction.float().squeeze(1), target)

    def metric_sum(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((prediction.float().squeeze(1) > 0).float() == target).sum() * 100.0
