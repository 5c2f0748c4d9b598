"""The operator's round read cache (adapters/dataplane.py): small contribution files are read
whole, in parallel, before the aggregation; the result must not depend on it.

The store here is a dict in memory that counts whole reads and ranged reads; it does not check
what S3 adds (latency, Range semantics, errors): the e2e federations and bench/control_plane.py
run the same code against SeaweedFS.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from mfed_operator.adapters import dataplane
from mfed_operator.adapters.dataplane import CountingStorage, aggregate_round
from mfed_operator.domain.actions import Aggregate, Aggregated

from mfed.aggregation.fedavg import AggregationSettings
from mfed.artifacts.layout import DECODER_FILE, DELTA_FILE, MANIFEST_FILE, join
from mfed.artifacts.ranged import BytesRange
from mfed.artifacts.tensorfile import decode_tensors
from mfed.model_store import GlobalModel
from mfed.storage import NotFound
from tests.unit.factories import make_base, make_contribution


class MemoryStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.whole_reads = 0
        self.ranged_opens = 0
        self._lock = threading.Lock()

    def read(self, uri: str) -> bytes:
        with self._lock:
            self.whole_reads += 1
        if uri not in self.objects:
            raise NotFound(uri)
        return self.objects[uri]

    def write(self, uri: str, data: bytes) -> None:
        self.objects[uri] = data

    def exists(self, uri: str) -> bool:
        return uri in self.objects

    def open_range(self, uri: str) -> BytesRange:
        with self._lock:
            self.ranged_opens += 1
        if uri not in self.objects:
            raise NotFound(uri)
        return BytesRange(self.objects[uri])


def _round() -> tuple[MemoryStore, GlobalModel, Aggregate]:
    manifest, _tensors, data = make_base()
    store = MemoryStore()
    rng = np.random.default_rng(7)
    sites, prefixes = [], {}
    for i in range(6):
        site, task = f"site-{i}", ("a", "b")[i % 2]
        m, delta, decoder, _, _ = make_contribution(manifest, site, task, 10 + i, rng)
        prefix = f"s3://bucket/round-1/{site}"
        if i == 3:
            delta = delta[:-4] + b"\x00\x00\x00\x00"  # corrupt: its checksum no longer matches
        store.objects[join(prefix, MANIFEST_FILE)] = m.to_json().encode()
        store.objects[join(prefix, DELTA_FILE)] = delta
        if i != 5:  # site-5's decoder was never uploaded
            store.objects[join(prefix, DECODER_FILE)] = decoder
        sites.append(site)
        prefixes[site] = prefix
    base = GlobalModel(manifest=manifest, tensors=dict(decode_tensors(data).tensors))
    action = Aggregate(
        sites=tuple(sites),
        site_prefixes=prefixes,
        base_uri="s3://bucket/round-0",
        output="s3://bucket/round-1/global",
        round_number=1,
        min_sites=1,
        settings=AggregationSettings(),
    )
    return store, base, action


def _aggregate(monkeypatch: pytest.MonkeyPatch, small: int, budget: int) -> tuple[Aggregated, MemoryStore]:
    monkeypatch.setattr(dataplane, "SMALL_OBJECT_BYTES", small)
    monkeypatch.setattr(dataplane, "PREFETCH_BUDGET_BYTES", budget)
    store, base, action = _round()
    result = aggregate_round(CountingStorage(store), base, action)  # type: ignore[arg-type]
    assert isinstance(result, Aggregated)
    return result, store


def test_the_read_cache_changes_the_reads_not_the_model_nor_the_rejections(monkeypatch):
    ranged, ranged_store = _aggregate(monkeypatch, small=-1, budget=0)  # nothing cached
    cached, cached_store = _aggregate(monkeypatch, small=2**20, budget=2**30)  # everything small
    assert ranged_store.ranged_opens > 0
    # only site-5's missing decoder was asked of the store again: by the one-pass attempt of the
    # mean rule, and by the two-pass path that then records why it is refused (fused.py)
    assert cached_store.ranged_opens == 2
    assert cached.sha256 == ranged.sha256
    assert cached.contributors == ranged.contributors == ("site-0", "site-1", "site-2", "site-4")
    assert cached.rejected == ranged.rejected
    assert {site for site, _, _ in cached.rejected} == {"site-3", "site-5"}


def test_a_budget_smaller_than_the_round_caches_some_files_and_reads_the_rest_by_range(monkeypatch):
    full, _ = _aggregate(monkeypatch, small=2**20, budget=2**30)
    store, _, _ = _round()
    one_file = len(store.objects[join("s3://bucket/round-1/site-0", DELTA_FILE)])
    partial, partial_store = _aggregate(monkeypatch, small=2**20, budget=2 * one_file)
    assert partial_store.ranged_opens > 0
    assert partial.sha256 == full.sha256
    assert partial.rejected == full.rejected
