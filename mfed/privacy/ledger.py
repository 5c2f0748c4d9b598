"""What a model has released so far, and the epsilon that comes to (dp-accounting's RDP accountant).

Every round that aggregates under spec.privacy is one Gaussian mechanism on each site's
clipped update (sensitivity clipNorm, noise std noiseMultiplier x clipNorm, every site takes
part in every round: no sampling). Task groups are disjoint, so a round is one such mechanism
per site, whatever the number of groups; level 2 and every later step only post-process the
noisy group means. The chain's rounds compose. A model that also carries rounds aggregated
WITHOUT noise has no finite epsilon, and says so (`unprotected_rounds`).

The ledger travels in each global model's manifest (`aggregation.privacy`), so the model alone
says what it cost, and the next round continues from it whatever its own settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def chain_epsilon(releases: tuple[tuple[float, int], ...], delta: float) -> float:
    """Epsilon at `delta` of composing `count` Gaussian mechanisms of each noise multiplier."""
    if not releases:
        return 0.0
    import dp_accounting  # scipy underneath: loaded only where privacy is configured
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    for noise_multiplier, count in releases:
        accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), count)
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True, kw_only=True)
class PrivacyLedger:
    """`releases`: (noise multiplier, rounds) in chain order, runs of one multiplier merged."""

    releases: tuple[tuple[float, int], ...] = ()
    unprotected_rounds: int = 0

    def after(self, noise_multiplier: float | None) -> PrivacyLedger:
        """The ledger once one more round is aggregated (None: without noise)."""
        if noise_multiplier is None:
            return PrivacyLedger(releases=self.releases, unprotected_rounds=self.unprotected_rounds + 1)
        if self.releases and self.releases[-1][0] == noise_multiplier:
            merged = (*self.releases[:-1], (noise_multiplier, self.releases[-1][1] + 1))
        else:
            merged = (*self.releases, (noise_multiplier, 1))
        return PrivacyLedger(releases=merged, unprotected_rounds=self.unprotected_rounds)

    @property
    def rounds(self) -> int:
        return sum(count for _, count in self.releases)

    def epsilon(self, delta: float) -> float:
        """math.inf when a round released its sites' updates without noise."""
        return math.inf if self.unprotected_rounds else chain_epsilon(self.releases, delta)

    def to_dict(self, delta: float) -> dict[str, Any]:
        epsilon = self.epsilon(delta)
        return {
            "releases": [[z, n] for z, n in self.releases],
            "unprotectedRounds": self.unprotected_rounds,
            "delta": delta,
            # JSON has no infinity: null with unprotectedRounds > 0 means "no finite epsilon"
            "epsilon": None if math.isinf(epsilon) else round(epsilon, 6),
        }

    @classmethod
    def of_model(cls, aggregation: Mapping[str, Any], model_round: int) -> PrivacyLedger:
        """The ledger a global model carries. A model of round >= 1 without one was aggregated
        from its sites' updates without noise in each of its `model_round` rounds."""
        record = aggregation.get("privacy")
        if not isinstance(record, Mapping):
            return cls(unprotected_rounds=max(model_round, 0))
        try:
            releases = tuple((float(z), int(n)) for z, n in record.get("releases") or ())
            unprotected = int(record.get("unprotectedRounds") or 0)
        except (TypeError, ValueError):
            raise ValueError(f"the model's privacy record is malformed: {dict(record)!r}") from None
        if any(not (math.isfinite(z) and z > 0) or n < 1 for z, n in releases) or unprotected < 0:
            raise ValueError(f"the model's privacy record is malformed: {dict(record)!r}")
        return cls(releases=releases, unprotected_rounds=unprotected)
