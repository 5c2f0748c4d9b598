"""What a FederationRound's `spec.privacy` asks for, checked once with the field to fix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class PrivacySettingError(ValueError):
    """A privacy setting out of range; `field` is its name in spec.privacy."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True, kw_only=True)
class PrivacySettings:
    """Each site's round update (encoder delta and decoder change, as ONE vector) is clipped to
    L2 norm `clip_norm`; each task group's sum of clipped updates gets Gaussian noise of standard
    deviation `noise_multiplier * clip_norm` per coordinate before it is averaged. `delta` is the
    delta of the (epsilon, delta) guarantee reported; a round whose chain would pass
    `epsilon_budget` after it is refused before any site trains.

    With `target_quantile` the clip norm adapts (Andrew et al. 2021, "Differentially private
    learning with adaptive clipping"): `clip_norm` is the first round's, and each round's next
    is C exp(-clip_learning_rate (b - target_quantile)), b the share of sites whose update was
    within C, counted with Gaussian noise of std `count_noise` (a second Gaussian mechanism per
    round, sensitivity 1, accounted beside the update's)."""

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5
    epsilon_budget: float | None = None
    target_quantile: float | None = None
    clip_learning_rate: float = 0.2
    count_noise: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise PrivacySettingError("clipNorm", f"must be a finite number > 0 (an L2 norm), got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise PrivacySettingError(
                "noiseMultiplier",
                f"must be a finite number > 0 (noise std / clipNorm; 0 would give no privacy), got "
                f"{self.noise_multiplier}",
            )
        if not 0 < self.delta < 1:
            raise PrivacySettingError(
                "delta", f"must be in (0, 1), typically below 1/number of sites, got {self.delta}"
            )
        if self.epsilon_budget is not None and not (math.isfinite(self.epsilon_budget) and self.epsilon_budget > 0):
            raise PrivacySettingError("epsilonBudget", f"must be a finite number > 0, got {self.epsilon_budget}")
        if self.target_quantile is not None and not 0 < self.target_quantile < 1:
            raise PrivacySettingError(
                "targetQuantile",
                f"is the share of sites to keep within the clip norm, in (0, 1), got {self.target_quantile}",
            )
        if not (math.isfinite(self.clip_learning_rate) and self.clip_learning_rate > 0):
            raise PrivacySettingError("clipLearningRate", f"must be a finite number > 0, got {self.clip_learning_rate}")
        if not (math.isfinite(self.count_noise) and self.count_noise > 0):
            raise PrivacySettingError("countNoise", f"must be a finite number > 0, got {self.count_noise}")

    @property
    def adaptive(self) -> bool:
        return self.target_quantile is not None

    @property
    def mechanisms(self) -> tuple[float, ...]:
        """Noise multipliers of the Gaussian mechanisms one round releases (sensitivity 1 each,
        in units of the clip norm for the update): the update, and the clipped count if adaptive."""
        return (self.noise_multiplier, self.count_noise) if self.adaptive else (self.noise_multiplier,)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clipNorm": self.clip_norm,
            "noiseMultiplier": self.noise_multiplier,
            "delta": self.delta,
        }
        if self.epsilon_budget is not None:
            out["epsilonBudget"] = self.epsilon_budget
        if self.adaptive:
            out.update(
                targetQuantile=self.target_quantile,
                clipLearningRate=self.clip_learning_rate,
                countNoise=self.count_noise,
            )
        return out
