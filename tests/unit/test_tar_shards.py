"""Tar shards (spec.data.pvc.format tar-shards) through the real trainer: written here with
tarfile from arrays, read back as a stream. Oracles: the arrays the shards were written from,
and the multiset of samples (every training sample once per epoch, whatever the order).

What this does not check: a PVC mounted by a real kubelet, and shards in S3 (not read yet)."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mfed.learning.image_folder import BadRecords, OnBadRecord
from mfed.learning.tar_shards import TarShardSplit, count_samples, list_shards, load_tar_shards, validation_shards
from mfed.rounds.site_round import BadInput, run_site_round
from mfed.spec import DataSource, DataSpec
from mfed.storage import Storage
from tests.unit.factories import class_image
from tests.unit.test_image_folder import _spec


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _shards(root: Path, shards: int = 5, per_shard: int = 24, seed: int = 0) -> dict[str, tuple[np.ndarray, int]]:
    """Samples `<shard>:<key>` -> (pixels, target), written as <key>.png + <key>.cls members."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as archive:
            for i in range(per_shard):
                target = (s * per_shard + i) % 3
                pixels = class_image(target, rng)
                key = f"{s:04d}{i:04d}"
                _add(archive, f"{key}.png", _png(pixels))
                _add(archive, f"{key}.cls", str(target).encode())
                written[f"shard-{s:04d}.tar:{key}"] = (pixels, target)
    return written


def test_a_site_trains_a_round_on_its_shards(tmp_path):
    _shards(tmp_path / "shards", shards=5, per_shard=30)
    data = DataSpec(source=DataSource.TAR_SHARDS, uri=str(tmp_path / "shards"))
    metrics = run_site_round(_spec(tmp_path, data), Storage()).manifest.metrics
    assert metrics["val_after"] > metrics["val_before"] + 20
    assert metrics["bad_records_skipped"] == 0


def test_the_stream_in_order_is_the_pixels_and_targets_that_were_written(tmp_path):
    written = _shards(tmp_path / "shards", shards=2, per_shard=5)
    split = TarShardSplit(list_shards(tmp_path / "shards"), (1, 28, 28), 3, BadRecords(), loader_workers=0)
    assert len(split) == 10 == count_samples(split.shards)
    rows = [(x, y) for xs, ys in split.stream(batch_size=4, seed=None) for x, y in zip(xs, ys, strict=True)]
    for (x, y), (pixels, target) in zip(rows, written.values(), strict=True):  # archive order
        np.testing.assert_array_equal(x.numpy(), pixels.astype(np.float32)[None] / 255.0)
        assert int(y) == target


def _epoch(split: TarShardSplit, seed: int) -> list[bytes]:
    return [x.numpy().tobytes() for xs, _ in split.stream(batch_size=7, seed=seed) for x in xs]


def test_an_epoch_is_every_sample_once_in_a_seeded_order(tmp_path):
    _shards(tmp_path / "shards", shards=4, per_shard=20)
    split = TarShardSplit(list_shards(tmp_path / "shards"), (1, 28, 28), 3, BadRecords(), loader_workers=2)
    split.shuffle_buffer = 16
    one, again, other = _epoch(split, 1), _epoch(split, 1), _epoch(split, 2)
    in_order = [x.numpy().tobytes() for xs, _ in split.stream(batch_size=7, seed=None) for x in xs]
    assert Counter(one) == Counter(in_order) and len(one) == 80  # each sample exactly once
    assert one == again and one != other and one != in_order


def test_validation_is_a_share_of_the_shards_never_all_of_them(tmp_path):
    shards = [tmp_path / f"s{i}.tar" for i in range(10)]
    val = validation_shards(shards, seed=3, fraction=0.2)
    assert len(val) == 2 and val == validation_shards(shards, seed=3, fraction=0.2)
    assert len(validation_shards(shards[:2], seed=3, fraction=0.9)) == 1
    with pytest.raises(Exception, match="at least 2"):
        validation_shards(shards[:1], seed=3, fraction=0.2)


def _break(root: Path, case: str) -> str:
    if case == "empty":
        with tarfile.open(root / "shard-0009.tar", "w"):
            pass
        return "shard-0009.tar: empty shard"
    if case == "truncated":
        data = (root / "shard-0001.tar").read_bytes()
        (root / "shard-0001.tar").write_bytes(data[: len(data) // 2 + 100])
        return "shard-0001.tar: truncated archive"
    if case == "no-target":
        with tarfile.open(root / "shard-0008.tar", "w") as archive:
            _add(archive, "lonely.png", _png(np.zeros((28, 28), dtype=np.uint8)))
        return "shard-0008.tar:lonely: no .cls target"
    if case == "label":
        with tarfile.open(root / "shard-0008.tar", "w") as archive:
            _add(archive, "far.png", _png(np.zeros((28, 28), dtype=np.uint8)))
            _add(archive, "far.cls", b"7")
        return "shard-0008.tar:far: target 7 is outside the task's classes 0..2"
    if case == "unreadable":
        with tarfile.open(root / "shard-0008.tar", "w") as archive:
            _add(archive, "junk.png", b"not a png")
            _add(archive, "junk.cls", b"1")
        return "shard-0008.tar:junk: unreadable image"
    raise AssertionError(case)


CASES = ["empty", "truncated", "no-target", "label", "unreadable"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_shard_or_sample_fails_the_site_naming_it(tmp_path, case):
    _shards(tmp_path / "shards", shards=6, per_shard=10)
    expected = _break(tmp_path / "shards", case)
    # one worker: the site reads every shard (validation shards are scored, training shards trained)
    data = DataSpec(source=DataSource.TAR_SHARDS, uri=str(tmp_path / "shards"), loader_workers=0)
    with pytest.raises(BadInput, match=expected.replace(".", r"\.")):
        run_site_round(_spec(tmp_path, data), Storage())


@pytest.mark.parametrize("case", CASES)
def test_with_on_bad_record_skip_a_bad_shard_or_sample_is_counted_not_trained_on(tmp_path, case):
    _shards(tmp_path / "shards", shards=6, per_shard=10)
    _break(tmp_path / "shards", case)
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
