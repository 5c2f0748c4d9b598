"""Task types: what a site's decoder outputs, its loss, its metric and the metric's direction.

Built-in types: classification, label_map (classification through a label map, e.g. coarse4),
denoise / reconstruction (PSNR), rotation (self-supervised, accuracy) and regression (MAE).
Users add their own without editing this package, through the `mfed.tasks` entry point group
(mfed.registry; the contract is in docs/plugins.md):

    [project.entry-points."mfed.tasks"]
    my_task = "my_package.tasks:MyTask"     # a Task subclass taking (params, input_spec)

A task is bound to the encoder's declared `InputSpec` (the shape of one example), not to images:
only rotation needs square images, and denoising outputs whatever shape its inputs have.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from mfed import registry
from mfed.learning.shapes import DenseOutput, InputSpec, Output, VectorOutput


class TaskError(ValueError):
    """A task type or task parameter is invalid."""


class Task(ABC):
    """A task bound to its parameters and the shape of one input example (`input_spec`)."""

    metric_name: str = "metric"
    higher_is_better: bool = True
    default_decoder: str = "mlp"
    needs_labels: bool = True
    allowed_params: Mapping[str, Any] = {}

    def __init__(self, params: Mapping[str, Any], input_spec: InputSpec) -> None:
        unknown = sorted(set(params) - set(self.allowed_params))
        if unknown:
            raise TaskError(
                f"task type {type(self).__name__} has no parameter {unknown[0]!r}; "
                f"allowed: {', '.join(sorted(self.allowed_params)) or 'none'}"
            )
        self.params = {**self.allowed_params, **params}
        self.input_spec = input_spec

    @property
    @abstractmethod
    def output(self) -> Output: ...

    @property
    def label_classes(self) -> int | None:
        """How many label values a data set may hold (0..n-1), or None: the labels are not classes."""
        return None

    @abstractmethod
    def train_pairs(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for one training batch (may draw fresh randomness)."""

    @abstractmethod
    def eval_pairs(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic inputs and targets for validation/test data."""

    @abstractmethod
    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def metric_sum(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum of the per-example metric over the batch (a device tensor: no host sync)."""

    def distill(self, prediction: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Output-distillation distance to the task's global decoder (MSE by default)."""
        return F.mse_loss(prediction.float(), teacher.float())


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Classification(Task):
    metric_name = "accuracy"
    allowed_params: Mapping[str, Any] = {"num_classes": 10}

    def __init__(self, params: Mapping[str, Any], input_spec: InputSpec) -> None:
        super().__init__(params, input_spec)
        classes = self.params["num_classes"]
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
            raise TaskError(f"num_classes must be an integer >= 2, got {classes!r}")
        self.num_classes = classes

    @property
    def output(self) -> Output:
        return VectorOutput(self.num_classes)

    @property
    def label_classes(self) -> int | None:
        return self.num_classes

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        return y.long()

    def train_pairs(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.targets(y)

    def eval_pairs(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.targets(y)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(prediction.float(), target)

    def metric_sum(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction.argmax(dim=1) == target).sum().float() * 100.0

    def distill(self, prediction: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.kl_div(
            F.log_softmax(prediction.float(), dim=1),
            F.log_softmax(teacher.float(), dim=1),
            log_target=True,
            reduction="batchmean",
        )


class LabelMap(Classification):
    """Classification of mapped labels, e.g. coarse4 = tops/bottoms/shoes/bags."""

    allowed_params: Mapping[str, Any] = {"label_map": None}

    def __init__(self, params: Mapping[str, Any], input_spec: InputSpec) -> None:
        label_map = params.get("label_map")
        if (
            not isinstance(label_map, list)
            or not label_map
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in label_map)
        ):
            raise TaskError("label_map must be a non-empty list of class indices (e.g. [0,1,0,0,0,2,0,2,3,2])")
        Task.__init__(self, params, input_spec)
        self.num_classes = max(label_map) + 1
        if self.num_classes < 2:
            raise TaskError("label_map must map to at least 2 classes")
        self._map = torch.tensor(label_map, dtype=torch.long)
        self._labels_in = len(label_map)

    @property
    def label_classes(self) -> int | None:
        return self._labels_in  # the labels mapped, not the classes they map to

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        labels = y.long()
        if labels.numel() and int(labels.max()) >= len(self._map):
            raise TaskError(f"label {int(labels.max())} has no entry in label_map of length {len(self._map)}")
        return self._map.to(labels.device)[labels]


class Rotation(Classification):
    """Self-supervised: predict the rotation (0/90/180/270 degrees) applied to the image."""

    allowed_params: Mapping[str, Any] = {}
    needs_labels = False

    def __init__(self, params: Mapping[str, Any], input_spec: InputSpec) -> None:
        Task.__init__(self, params, input_spec)
        shape = input_spec.shape
        if len(shape) != 3 or shape[1] != shape[2]:
            raise TaskError(f"rotation needs square images (channels, height, width); the inputs are {shape}")
        self.num_classes = 4

    @staticmethod
    def _rotate(x: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        for k in range(1, 4):
            pick = quarter_turns == k
            if bool(pick.any()):
                out[pick] = torch.rot90(x[pick], k, dims=(2, 3))
        return out

    def train_pairs(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        turns = torch.randint(0, 4, (x.shape[0],), generator=generator).to(x.device)
        return self._rotate(x, turns), turns

    def eval_pairs(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        turns = torch.randint(0, 4, (x.shape[0],), generator=_cpu_generator(seed)).to(x.device)
        return self._rotate(x, turns), turns


class Denoise(Task):
    """Remove Gaussian noise (sigma 0 is plain reconstruction); scored by PSNR in dB."""

    metric_name = "psnr"
    default_decoder = "upsample"
    needs_labels = False
    allowed_params: Mapping[str, Any] = {"sigma": 0.5}

    def __init__(self, params: Mapping[str, Any], input_spec: InputSpec) -> None:
        super().__init__(params, input_spec)
        sigma = self.params["sigma"]
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 <= sigma < 10:
            raise TaskError(f"sigma must be a number in [0, 10), got {sigma!r}")
        self.sigma = float(sigma)

    @property
    def output(self) -> Output:
        return DenseOutput(self.input_spec.shape)

    def _noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator).to(x.device) * self.sigma

    def train_pairs(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x + self._noise(x, generator), x

    def eval_pairs(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x + self._noise(x, _cpu_generator(seed)), x

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction.float(), target)

    def metric_sum(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mse = ((prediction.float() - target) ** 2).flatten(1).mean(dim=1).clamp_min(1e-10)
        return (10.0 * torch.log10(1.0 / mse)).sum()


class Reconstruction(Denoise):
    allowed_params: Mapping[str, Any] = {"sigma": 0.0}


class Regression(Task):
    """Predict a number per image (the `y` array, or the mean intensity for the demo set)."""

    metric_name = "mae"
    higher_is_better = False
    allowed_params: Mapping[str, Any] = {"target": "y", "scale": 1.0}

    def __init__(self, params: Mapping[str, Any], input_spec: InputSpec) -> None:
        super().__init__(params, input_spec)
        if self.params["target"] not in ("y", "mean_intensity"):
            raise TaskError("regression target must be 'y' or 'mean_intensity'")
        self.scale = float(self.params["scale"])
        self.needs_labels = self.params["target"] == "y"

    @property
    def output(self) -> Output:
        return VectorOutput(1)

    def _targets(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raw = y.float() if self.params["target"] == "y" else x.flatten(1).mean(dim=1)
        return raw * self.scale

    def train_pairs(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self._targets(x, y)

    def eval_pairs(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self._targets(x, y)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction.float().squeeze(1), target)

    def metric_sum(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (prediction.float().squeeze(1) - target).abs().sum()


def build_task(type_name: str, params: Mapping[str, Any], input_spec: InputSpec) -> Task:
    """The registered task type `type_name` (built in or from the `mfed.tasks` group)."""
    what = f"task type {type_name!r}"
    factory = registry.load("task", type_name)
    try:
        task = factory(dict(params), input_spec)
    except (TaskError, registry.PluginError):
        raise
    except Exception as exc:  # a plugin's own error: bad input, like ours
        raise TaskError(f"{what} could not be built: {type(exc).__name__}: {exc}") from exc
    if not isinstance(task, Task):
        raise TaskError(f"{what} did not produce a mfed.learning.tasks.Task (got {type(task).__name__})")
    return task
