"""Checks a contribution must pass before a single value of it is added to a global model.

Each failure raises ContributionRejected with a typed reason; the caller records it (the
operator puts it in the round's status) and carries on with the other sites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from mfed.aggregation.ownership import SHARED_TRACK, contribution_view
from mfed.artifacts.manifest import ContributionManifest, GlobalManifest, Rejection
from mfed.artifacts.signature import Signature, SignatureMismatch
from mfed.artifacts.tensorfile import (
    StoredDtype,
    TensorFile,
    TensorFileError,
    decode_tensors,
    sha256_hex,
)


class RejectReason(StrEnum):
    UNREADABLE = "Unreadable"  # manifest or files missing / not parseable
    WRONG_FEDERATION = "WrongFederation"
    WRONG_ROUND = "WrongRound"
    UNKNOWN_TASK = "UnknownTask"
    DUPLICATE_SITE = "DuplicateSite"
    WRONG_BASE = "WrongBaseModel"
    BAD_SAMPLES = "BadSampleCount"
    CHECKSUM = "ChecksumMismatch"
    MALFORMED = "MalformedTensors"
    KEYS = "KeyMismatch"
    SHAPE = "ShapeMismatch"
    DTYPE = "DtypeMismatch"
    NON_FINITE = "NonFiniteValues"
    BAD_MIX = "BadStartMix"
    NORM_OUTLIER = "NormOutlier"  # well-formed, but its norm is far above its group's median (robust.py)
    DIRECTION_OUTLIER = "DirectionOutlier"  # well-formed, but pointing away from the other sites' median


class NothingAccepted(ValueError):
    """No contribution is left to aggregate; `rejected` says what happened to each site, so the
    round's status can show it (a screen that refused every site, every upload malformed)."""

    def __init__(self, rejected: Sequence[Rejection]) -> None:
        super().__init__("no contribution was accepted; there is nothing to aggregate")
        self.rejected = tuple(rejected)


class ContributionRejected(Exception):
    def __init__(self, site: str, reason: RejectReason, detail: str) -> None:
        super().__init__(f"contribution of site {site!r} rejected ({reason.value}): {detail}")
        self.site = site
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ValidContribution:
    """A contribution whose tensors passed every check (arrays are read-only views)."""

    manifest: ContributionManifest
    delta: Mapping[str, np.ndarray]
    decoder: Mapping[str, np.ndarray]

    def tensor(self, site_key: str) -> np.ndarray:
        """One tensor by its site-model name (`encoder.*` from the delta, `decoder.*`)."""
        return self.decoder[site_key] if site_key.startswith("decoder.") else self.delta[site_key]

    def read_flat(self, site_key: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of the flattened tensor."""
        flat: np.ndarray = self.tensor(site_key).reshape(-1)[start:stop]
        return flat


def check_manifest(manifest: ContributionManifest, base: GlobalManifest, round_number: int, accepted: set[str]) -> None:
    """Metadata checks, cheap, done before any tensor bytes are read."""
    site = manifest.site

    def reject(reason: RejectReason, detail: str) -> ContributionRejected:
        return ContributionRejected(site, reason, detail)

    if manifest.federation != base.federation:
        raise reject(RejectReason.WRONG_FEDERATION, f"federation {manifest.federation!r}, expected {base.federation!r}")
    if manifest.round != round_number:
        raise reject(RejectReason.WRONG_ROUND, f"round {manifest.round}, expected {round_number}")
    if site in accepted:
        raise reject(RejectReason.DUPLICATE_SITE, "this site already contributed to the round")
    if manifest.task not in base.tasks:
        raise reject(
            RejectReason.UNKNOWN_TASK, f"task {manifest.task!r} is not in the global model ({', '.join(base.tasks)})"
        )
    if manifest.samples <= 0:
        raise reject(RejectReason.BAD_SAMPLES, f"sample count {manifest.samples} must be positive")
    for prefix, alpha in sorted(manifest.start_mix.items()):
        if not prefix.startswith("encoder") or not 0.0 <= alpha <= 1.0:
            raise reject(
                RejectReason.BAD_MIX, f"startMix {prefix!r}: {alpha} must name an encoder prefix and lie in [0, 1]"
            )
    if manifest.base_digest != base.digest:
        raise reject(
            RejectReason.WRONG_BASE, f"trained from {manifest.base_digest[:12]}, the round's base is {base.digest[:12]}"
        )


def _decode_checked(site: str, label: str, data: bytes, expected_sha: str) -> TensorFile:
    actual = sha256_hex(data)
    if actual != expected_sha:
        raise ContributionRejected(
            site,
            RejectReason.CHECKSUM,
            f"{label} SHA-256 {actual[:12]} does not match the manifest's {expected_sha[:12]}",
        )
    try:
        return decode_tensors(data)
    except TensorFileError as exc:
        raise ContributionRejected(site, RejectReason.MALFORMED, f"{label}: {exc}") from exc


def check_tensors(
    manifest: ContributionManifest,
    delta_bytes: bytes,
    decoder_bytes: bytes,
    base: GlobalManifest,
    base_tensors: Mapping[str, np.ndarray],
) -> ValidContribution:
    """Checksums, structure against the base model, dtypes, and finiteness."""
    site = manifest.site
    delta = _decode_checked(site, "delta", delta_bytes, manifest.delta.sha256)
    decoder = _decode_checked(site, "decoder", decoder_bytes, manifest.decoder.sha256)

    try:
        expected_dtype = StoredDtype.parse(manifest.delta_dtype).value
    except ValueError as exc:
        raise ContributionRejected(site, RejectReason.DTYPE, str(exc)) from exc

    # A two-track upload (SiteStrategy.FALLBACK) carries its shared track in both files, or in neither.
    two_track = any(k.startswith(SHARED_TRACK) for k in delta.tensors)
    for label, part, parsed, allowed in (
        ("delta", "encoder", delta, {expected_dtype}),
        ("decoder", "decoder", decoder, {"F32"}),
    ):
        tensors, stored = parsed.tensors, parsed.stored_dtypes
        view = contribution_view(base_tensors, manifest.task, part, two_track=two_track)
        expected = Signature.of_arrays(view, dtype="-")
        actual = Signature.of_arrays(tensors, dtype="-")
        try:
            expected.require_equal(actual, what=label, check_dtype=False)
        except SignatureMismatch as exc:
            reason = RejectReason.SHAPE if "shape" in exc.detail else RejectReason.KEYS
            raise ContributionRejected(site, reason, str(exc)) from exc
        for name in sorted(tensors):
            if stored[name] not in allowed:
                raise ContributionRejected(
                    site,
                    RejectReason.DTYPE,
                    f"{label} {name!r} is stored as {stored[name]}, expected {sorted(allowed)[0]}",
                )
            if not np.isfinite(tensors[name]).all():
                raise ContributionRejected(
                    site, RejectReason.NON_FINITE, f"{label} {name!r} holds NaN or infinite values"
                )
    return ValidContribution(
        manifest=manifest,
        delta=delta.tensors,
        decoder=decoder.tensors,
    )
