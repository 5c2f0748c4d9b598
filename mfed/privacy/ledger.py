"""What a model has released so far, and the epsilon that comes to (dp-accounting's RDP accountant).

Every round that aggregates under spec.privacy is one Gaussian mechanism on each site's
clipped update (sensitivity clipNorm, noise std noiseMultiplier x clipNorm, every site takes
part in every round: no sampling), plus, with adaptive clipping, one on the count of sites
within the clip norm (sensitivity 1, noise std countNoise). Task groups are disjoint, so a round is one such mechanism
per site, whatever the number of groups; level 2 and every later step only post-process the
noisy group means. The chain's rounds compose. A model that also carries rounds aggregated
WITHOUT noise has no finite epsilon, and says so (`unprotected_rounds`).

The ledger travels in each global model's manifest (`aggregation.privacy`), so the model alone
says what it cost, and the next round continues from it whatever its own settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
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
    """`releases`: (noise multiplier, count) of every Gaussian mechanism released so far, one
    entry per multiplier, sorted (composition does not depend on the order); `rounds`: private
    rounds of the chain."""

    releases: tuple[tuple[float, int], ...] = ()
    rounds: int = 0
    unprotected_rounds: int = 0

    def after(self, mechanisms: tuple[float, ...] | None) -> PrivacyLedger:
        """The ledger once one more round is aggregated, releasing Gaussian mechanisms of these
        noise multipliers (PrivacySettings.mechanisms; None: without noise)."""
        if mechanisms is None:
            return replace(self, unprotected_rounds=self.unprotected_rounds + 1)
        counts = dict(self.releases)
        for z in mechanisms:
            counts[z] = counts.get(z, 0) + 1
        return replace(self, releases=tuple(sorted(counts.items())), rounds=self.rounds + 1)

    def epsilon(self, delta: float) -> float:
        """math.inf when a round released its sites' updates without noise."""
        return math.inf if self.unprotected_rounds else chain_epsilon(self.releases, delta)

    def to_dict(self, delta: float) -> dict[str, Any]:
        epsilon = self.epsilon(delta)
        return {
            "releases": [[z, n] for z, n in self.releases],
            "rounds": self.rounds,
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
            releases = tuple(sorted((float(z), int(n)) for z, n in record.get("releases") or ()))
            unprotected = int(record.get("unprotectedRounds") or 0)
            rounds = int(record.get("rounds") or 0)
        except (TypeError, ValueError):
            raise ValueError(f"the model's privacy record is malformed: {dict(record)!r}") from None
        if any(not (math.isfinite(z) and z > 0) or n < 1 for z, n in releases) or min(unprotected, rounds) < 0:
            raise ValueError(f"the model's privacy record is malformed: {dict(record)!r}")
        return cls(releases=releases, rounds=rounds, unprotected_rounds=unprotected)
