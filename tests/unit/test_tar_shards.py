"""Tar shards (spec.data.pvc.format tar-shards) through the real trainer: written here with
tarfile from arrays, read back as a stream. Oracles: the arrays the shards were written from,
and the multiset of samples (every training sample once per epoch, whatever the order).

What this does not check: a PVC mounted by a real kubelet (shards in S3: tests/e2e/test_data_from_s3.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mfed.learning.data_root import LocalRoot, StoredFile
from mfed.learning.image_folder import BadRecords, OnBadRecord
from mfed.learning.tar_shards import (
    SHARD_INDEX,
    TarShardSplit,
    count_samples,
    list_shards,
    load_tar_shards,
    shard_listing,
    validation_shards,
)
from mfed.rounds.site_round import BadInput, run_site_round
from mfed.spec import DataSource, DataSpec
from mfed.storage import Storage
from tests.unit.factories import TAR_SHARD_CASES, spoil_tar_shards, write_tar_shards
from tests.unit.test_image_folder import _spec


def test_a_site_trains_a_round_on_itswrite_tar_shards(tmp_path):
    write_tar_shards(tmp_path / "shards", shards=5, per_shard=30)
    data = DataSpec(source=DataSource.TAR_SHARDS, uri=str(tmp_path / "shards"))
    metrics = run_site_round(_spec(tmp_path, data), Storage()).manifest.metrics
    assert metrics["val_after"] > metrics["val_before"] + 20
    assert metrics["bad_records_skipped"] == 0


def test_the_stream_in_order_is_the_pixels_and_targets_that_were_written(tmp_path):
    written = write_tar_shards(tmp_path / "shards", shards=2, per_shard=5)
    root = LocalRoot(tmp_path / "shards")
    split = TarShardSplit(root, list_shards(root), (1, 28, 28), 3, BadRecords(), loader_workers=0)
    assert len(split) == 10 == count_samples(root, split.shards)
    rows = [(x, y) for xs, ys in split.stream(batch_size=4, seed=None) for x, y in zip(xs, ys, strict=True)]
    for (x, y), (pixels, target) in zip(rows, written.values(), strict=True):  # archive order
        np.testing.assert_array_equal(x.numpy(), pixels.astype(np.float32)[None] / 255.0)
        assert int(y) == target


def _epoch(split: TarShardSplit, seed: int) -> list[bytes]:
    return [x.numpy().tobytes() for xs, _ in split.stream(batch_size=7, seed=seed) for x in xs]


def test_an_epoch_is_every_sample_once_in_a_seeded_order(tmp_path):
    write_tar_shards(tmp_path / "shards", shards=4, per_shard=20)
    root = LocalRoot(tmp_path / "shards")
    split = TarShardSplit(root, list_shards(root), (1, 28, 28), 3, BadRecords(), loader_workers=2)
    split.shuffle_buffer = 16
    one, again, other = _epoch(split, 1), _epoch(split, 1), _epoch(split, 2)
    in_order = [x.numpy().tobytes() for xs, _ in split.stream(batch_size=7, seed=None) for x in xs]
    assert Counter(one) == Counter(in_order) and len(one) == 80  # each sample exactly once
    assert one == again and one != other and one != in_order


def test_validation_is_a_share_of_the_shards_never_all_of_them(tmp_path):
    shards = [StoredFile(f"s{i}.tar", 10240) for i in range(10)]
    val = validation_shards(shards, seed=3, fraction=0.2)
    assert len(val) == 2 and val == validation_shards(shards, seed=3, fraction=0.2)
    assert len(validation_shards(shards[:2], seed=3, fraction=0.9)) == 1
    with pytest.raises(Exception, match="at least 2"):
        validation_shards(shards[:1], seed=3, fraction=0.2)


@pytest.mark.parametrize("case", TAR_SHARD_CASES)
def test_a_bad_shard_or_sample_fails_the_site_naming_it(tmp_path, case):
    write_tar_shards(tmp_path / "shards", shards=6, per_shard=10)
    expected = spoil_tar_shards(tmp_path / "shards", case)
    # one worker: the site reads every shard (validation shards are scored, training shards trained)
    data = DataSpec(source=DataSource.TAR_SHARDS, uri=str(tmp_path / "shards"), loader_workers=0)
    with pytest.raises(BadInput, match=expected.replace(".", r"\.")):
        run_site_round(_spec(tmp_path, data), Storage())


@pytest.mark.parametrize("case", TAR_SHARD_CASES)
def test_with_on_bad_record_skip_a_bad_shard_or_sample_is_counted_not_trained_on(tmp_path, case):
    write_tar_shards(tmp_path / "shards", shards=6, per_shard=10)
    spoil_tar_shards(tmp_path / "shards", case)
    data = DataSpec(source=DataSource.TAR_SHARDS, uri=str(tmp_path / "shards"), on_bad_record="skip", max_bad_records=5)
    metrics = run_site_round(_spec(tmp_path, data), Storage()).manifest.metrics
    assert metrics["bad_records_skipped"] == 1


def test_no_shards_says_how_to_write_them(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(Exception, match=r"no \.tar shards; write the samples as <key>\.png"):
        load_tar_shards(
            DataSpec(source=DataSource.TAR_SHARDS, uri=str(tmp_path / "nothing")),
            (1, 28, 28),
            3,
            val_fraction=0.2,
            split_seed=0,
        )
    assert BadRecords(policy=OnBadRecord.SKIP).limit == 0


def _index(root: Path, counts: dict[str, int], sizes: dict[str, int] | None = None) -> None:
    sizes = sizes or {}
    shardlist = [
        {"url": name, "nsamples": n, "filesize": sizes[name] if name in sizes else (root / name).stat().st_size}
        for name, n in counts.items()
    ]
    (root / SHARD_INDEX).write_text(json.dumps({"__kind__": "wids-shard-index-v1", "shardlist": shardlist}))


def test_a_shard_index_gives_the_counts_without_reading_a_header(tmp_path):
    write_tar_shards(tmp_path / "shards", shards=3, per_shard=4)
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    root = LocalRoot(tmp_path / "shards")
    assert count_samples(root, list_shards(root)) == 12  # the headers' count
    _index(tmp_path / "shards", {name: 100 + i for i, name in enumerate(names)})
    shards, counts = shard_listing(root)
    assert [s.key for s in shards] == names and counts == {name: 100 + i for i, name in enumerate(names)}
    split = TarShardSplit(root, shards, (1, 28, 28), 3, BadRecords(), counts=counts)
    assert len(split) == 303  # what the trainer plans with comes from the index, not the 12 headers


@pytest.mark.parametrize(
    ("spoil", "words"),
    [
        ("missing", "has no entry for shard-0002.tar"),
        ("extra", "names shard-0009.tar, unlike the shards present"),
        ("size", "its entry for shard-0000.tar does not match the shard"),
        ("garbage", "not a shard index"),
    ],
)
def test_a_stale_or_broken_shard_index_fails_the_site_naming_it(tmp_path, spoil, words):
    write_tar_shards(tmp_path / "shards", shards=3, per_shard=4)
    counts = {f"shard-{i:04d}.tar": 4 for i in range(3)}
    if spoil == "missing":
        del counts["shard-0002.tar"]
    if spoil == "extra":
        counts["shard-0009.tar"] = 4
        _index(tmp_path / "shards", counts, sizes={"shard-0009.tar": 10240})
    else:
        _index(tmp_path / "shards", counts, sizes={"shard-0000.tar": 1} if spoil == "size" else None)
    if spoil == "garbage":
        (tmp_path / "shards" / SHARD_INDEX).write_text("[1, 2")
    data = DataSpec(source=DataSource.TAR_SHARDS, uri=str(tmp_path / "shards"))
    with pytest.raises(BadInput, match=f"shardindex.json.*{words}".replace(".tar", r"\.tar")):
        run_site_round(_spec(tmp_path, data), Storage())
