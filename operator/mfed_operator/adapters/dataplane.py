"""The S3 data plane: read a base model, verify a site's contribution, aggregate a round.

Blocking functions meant for a worker thread (never the event loop). Storage outages raise
`mfed.storage.StorageError` for the caller to retry with backoff; bad data becomes a typed
rejection that ends up in the round's status.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mfed.aggregation.fedavg import ContributionSource, RoundAggregator, aggregate
from mfed.aggregation.validate import ContributionRejected, NothingAccepted, RejectReason
from mfed.artifacts.layout import DECODER_FILE, DELTA_FILE, FAILURE_FILE, MANIFEST_FILE, MODEL_FILE, join
from mfed.artifacts.manifest import ContributionManifest, ManifestError
from mfed.artifacts.ranged import ByteRange, BytesRange
from mfed.model_store import GlobalModel, GlobalModelError, check_global_model_present, read_global_model
from mfed.privacy.ledger import PrivacyLedger
from mfed.privacy.settings import PrivacySettings
from mfed.storage import NotFound, Storage
from mfed_operator.domain.actions import (
    Aggregate,
    Aggregated,
    AggregationImpossible,
    SiteFailureRead,
    SiteRejected,
    SiteVerified,
)
from mfed_operator.domain.validation import BaseSummary, BaseTask, epsilon_after_round


class CountingStorage:
    """Storage that counts the bytes it moves (for the bytes-moved metric)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._lock = threading.Lock()
        self.read_bytes = 0
        self.written_bytes = 0

    def read(self, uri: str) -> bytes:
        data = self._storage.read(uri)
        with self._lock:
            self.read_bytes += len(data)
        return data

    def write(self, uri: str, data: bytes) -> None:
        self._storage.write(uri, data)
        with self._lock:
            self.written_bytes += len(data)

    def exists(self, uri: str) -> bool:
        return self._storage.exists(uri)

    def open_range(self, uri: str) -> ByteRange:
        return _CountedRange(self._storage.open_range(uri), self)


class _CountedRange:
    """A ranged file whose reads count towards its storage's bytes read."""

    def __init__(self, inner: ByteRange, counter: CountingStorage) -> None:
        self._inner = inner
        self._counter = counter

    @property
    def size(self) -> int:
        return self._inner.size

    def read(self, offset: int, length: int) -> bytes:
        data = self._inner.read(offset, length)
        with self._counter._lock:
            self._counter.read_bytes += len(data)
        return data


class BaseModelCache:
    """Keeps the last few base models (by URI and digest), so verifying N sites reads it once."""

    def __init__(self, size: int = 2) -> None:
        self._items: OrderedDict[tuple[str, str], GlobalModel] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, storage: CountingStorage, uri: str, sha256: str) -> GlobalModel:
        key = (uri, sha256)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        model = read_global_model(storage, uri)
        if model.manifest.digest != sha256:
            raise GlobalModelError(
                f"the model at {uri} changed: digest {model.manifest.digest[:12]}, expected {sha256[:12]}"
            )
        with self._lock:
            self._items[key] = model
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return model


def inspect_base(storage: CountingStorage, uri: str, round_privacy: PrivacySettings | None = None) -> BaseSummary:
    """Read the manifest only (small), and check the model file is there; with the round's
    `round_privacy`, also the chain's epsilon after the round (the accountant runs in this thread)."""
    manifest = check_global_model_present(storage, uri)
    tasks = {
        name: BaseTask(type=info.type, params=dict(info.params), decoder=info.decoder)
        for name, info in manifest.tasks.items()
    }
    try:
        privacy = PrivacyLedger.of_model(manifest.aggregation, manifest.round)
    except ValueError as exc:
        raise GlobalModelError(f"{uri}: {exc}") from None
    return BaseSummary(
        uri=uri,
        sha256=manifest.digest,
        federation=manifest.federation,
        encoder=manifest.encoder,
        sharing=manifest.sharing,
        tasks=tasks,
        privacy=privacy,
        epsilon_after_round=None if round_privacy is None else epsilon_after_round(privacy, round_privacy),
    )


def _read_manifest(storage: CountingStorage | _Prefetched, site: str, prefix: str) -> ContributionManifest:
    try:
        return ContributionManifest.from_json(storage.read(join(prefix, MANIFEST_FILE)))
    except NotFound:
        raise ContributionRejected(
            site, RejectReason.UNREADABLE, f"no contribution manifest at {join(prefix, MANIFEST_FILE)}"
        ) from None
    except ManifestError as exc:
        raise ContributionRejected(site, RejectReason.UNREADABLE, f"invalid manifest: {exc}") from None


def _read_files(
    storage: CountingStorage | _Prefetched, site: str, prefix: str, manifest: ContributionManifest
) -> tuple[bytes, bytes]:
    try:
        return (
            storage.read(join(prefix, manifest.delta.name or DELTA_FILE)),
            storage.read(join(prefix, manifest.decoder.name or DECODER_FILE)),
        )
    except NotFound as exc:
        raise ContributionRejected(site, RejectReason.UNREADABLE, str(exc)) from None


def _open_files(
    storage: CountingStorage | _Prefetched, site: str, prefix: str, manifest: ContributionManifest
) -> tuple[ByteRange, ByteRange]:
    try:
        return (
            storage.open_range(join(prefix, manifest.delta.name or DELTA_FILE)),
            storage.open_range(join(prefix, manifest.decoder.name or DECODER_FILE)),
        )
    except NotFound as exc:
        raise ContributionRejected(site, RejectReason.UNREADABLE, str(exc)) from None


def read_failure(storage: CountingStorage, site: str, prefix: str) -> SiteFailureRead:
    """What the site's trainer wrote about refusing its input, if anything readable: a report
    that is missing, not JSON, or about another site says nothing (the Job's reason stays)."""
    try:
        body = json.loads(storage.read(join(prefix, FAILURE_FILE)))
    except (NotFound, ValueError):
        return SiteFailureRead(site=site, message=None)
    if not isinstance(body, dict) or body.get("site") != site or not isinstance(body.get("message"), str):
        return SiteFailureRead(site=site, message=None)
    return SiteFailureRead(site=site, message=body["message"])


def verify_site(
    storage: CountingStorage, base: GlobalModel, round_number: int, site: str, prefix: str
) -> SiteVerified | SiteRejected:
    """Every check the aggregation will make, done as soon as the site's Job succeeds."""
    try:
        manifest = _read_manifest(storage, site, prefix)
        if manifest.site != site:
            raise ContributionRejected(site, RejectReason.UNREADABLE, f"manifest names site {manifest.site!r}")
        delta, decoder = _read_files(storage, site, prefix, manifest)
        RoundAggregator(base.manifest, base.tensors, round_number).validate(manifest, delta, decoder)
    except ContributionRejected as exc:
        return SiteRejected(site=site, reason=exc.reason.value, detail=exc.detail)
    return SiteVerified(
        site=site, samples=manifest.samples, delta_sha256=manifest.delta.sha256, metrics=dict(manifest.metrics)
    )


# Small contributions are read whole, once, several at a time, before the aggregation starts.
# Tensor-by-tensor ranged reads keep memory at ~2 models, but for a small model they are many
# tiny GETs, one after another (2 passes x tensors x sites: ~6 s of latency at 100 sites of the
# default encoder, where the arithmetic takes milliseconds). Objects up to SMALL_OBJECT_BYTES
# are fetched in PREFETCH_THREADS parallel GETs while their total stays under
# PREFETCH_BUDGET_BYTES, so the operator's memory grows by at most that constant; larger files
# keep the ranged path, whose reads are big enough that latency does not dominate.
SMALL_OBJECT_BYTES = 8 * 2**20
PREFETCH_BUDGET_BYTES = 128 * 2**20
PREFETCH_THREADS = 8


class _Prefetched:
    """Manifests and small files of a round's contributions, read in parallel; misses go to S3."""

    def __init__(self, storage: CountingStorage, prefixes: Mapping[str, str], sites: Sequence[str]) -> None:
        self._storage = storage
        self._objects: dict[str, bytes] = {}
        with ThreadPoolExecutor(max_workers=PREFETCH_THREADS, thread_name_prefix="mfed-prefetch") as pool:
            manifests = dict(zip(sites, pool.map(lambda s: self._try_manifest(prefixes[s]), sites), strict=True))
            wanted: list[str] = []
            budget = PREFETCH_BUDGET_BYTES
            for site in sites:
                manifest = manifests[site]
                if manifest is None:
                    continue  # missing or invalid: the aggregation's own read records why
                for ref in (manifest.delta, manifest.decoder):
                    if ref.name and 0 <= ref.size <= min(SMALL_OBJECT_BYTES, budget):
                        budget -= ref.size
                        wanted.append(join(prefixes[site], ref.name))
            for uri, data in zip(wanted, pool.map(self._try_read, wanted), strict=True):
                if data is not None:
                    self._objects[uri] = data

    def _try_read(self, uri: str) -> bytes | None:
        try:
            return self._storage.read(uri)
        except NotFound:
            return None

    def _try_manifest(self, prefix: str) -> ContributionManifest | None:
        uri = join(prefix, MANIFEST_FILE)
        data = self._try_read(uri)
        if data is None:
            return None
        self._objects[uri] = data
        try:
            return ContributionManifest.from_json(data)
        except ManifestError:
            return None

    def read(self, uri: str) -> bytes:
        data = self._objects.get(uri)
        return self._storage.read(uri) if data is None else data

    def open_range(self, uri: str) -> ByteRange:
        data = self._objects.get(uri)
        return self._storage.open_range(uri) if data is None else BytesRange(data)


def aggregate_round(
    storage: CountingStorage, base: GlobalModel, action: Aggregate
) -> Aggregated | AggregationImpossible:
    """Stream the accepted sites (sorted) through the aggregator and write model, then manifest."""
    started = time.monotonic()
    read_before = storage.read_bytes
    fetched = _Prefetched(storage, action.site_prefixes, action.sites)

    def source(site: str) -> ContributionSource:
        prefix = action.site_prefixes[site]
        return ContributionSource(
            site=site,
            read_manifest=lambda: _read_manifest(fetched, site, prefix),
            read_files=lambda m: _read_files(fetched, site, prefix, m),
            # Tensor by tensor with Range GETs: the operator's memory stays ~2 models (streaming.py).
            open_files=lambda m: _open_files(fetched, site, prefix, m),
        )

    try:
        result = aggregate(
            base.manifest, base.tensors, action.round_number, [source(s) for s in action.sites], action.settings
        )
    except NothingAccepted as exc:  # every site refused: each one's reason goes to its status
        rejected = tuple((r.site, r.reason, r.detail) for r in exc.rejected)
        return AggregationImpossible(reason="NoValidContribution", message=str(exc), rejected=rejected)
    rejected = tuple((r.site, r.reason, r.detail) for r in result.manifest.rejected)
    contributors = tuple(c.site for c in result.manifest.contributors)
    if len(contributors) < action.min_sites:
        return AggregationImpossible(
            reason="QuorumNotMet",
            rejected=rejected,
            message=f"only {len(contributors)} contributions passed validation at aggregation time, "
            f"quorum (spec.aggregation.minSites) is {action.min_sites}",
        )
    storage.write(join(action.output, MODEL_FILE), result.model_bytes)
    storage.write(join(action.output, MANIFEST_FILE), result.manifest.to_json().encode())
    tasks = {
        name: {
            "sites": len(info.sites),
            "samples": info.samples,
            "metrics": {k: round(float(v), 6) for k, v in sorted(info.metrics.items())[:16]},
        }
        for name, info in result.manifest.tasks.items()
        if info.sites
    }
    return Aggregated(
        uri=action.output,
        sha256=result.manifest.digest,
        size=len(result.model_bytes),
        tasks=tasks,
        contributors=contributors,
        rejected=rejected,
        seconds=time.monotonic() - started,
        bytes_read=storage.read_bytes - read_before,
        privacy=status_privacy(result.manifest.aggregation.get("privacy")),
    )


def status_privacy(record: object) -> dict[str, Any] | None:
    """The ledger for the round's status: epsilon so far, at which delta, over how many rounds."""
    if not isinstance(record, Mapping):
        return None
    out: dict[str, Any] = {
        "epsilon": record.get("epsilon"),
        "delta": record.get("delta"),
        "rounds": record.get("rounds", 0),
        "unprotectedRounds": record.get("unprotectedRounds", 0),
    }
    for key in ("noiseMultiplier", "clipNorm", "nextClipNorm", "epsilonBudget"):
        if key in record:
            out[key] = record[key]
    return out
