"""Site data: Fashion-MNIST IDX files from the Debian package, disjoint shards, user .npz files."""

from __future__ import annotations

import gzip
import io
import struct

import numpy as np
import pytest

from mfed.learning.data import (
    DataError,
    as_images,
    fashion_mnist_shard,
    load_fashion_mnist,
    load_npz,
    load_site_data,
    read_idx,
)
from mfed.spec import DataSource, DataSpec

FMNIST = "/usr/share/datasets/fashion-mnist"


def test_fashion_mnist_is_read_from_the_debian_idx_files():
    images, labels = load_fashion_mnist(FMNIST, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the published first labels
    test_images, _ = load_fashion_mnist(FMNIST, "test")
    assert test_images.shape == (10000, 28, 28)


def test_shards_of_different_sites_never_share_an_image():
    seen: set[bytes] = set()
    for index in range(8):
        x, _ = fashion_mnist_shard(DataSpec(shard_index=index, shard_count=8, samples=300, shard_seed=3))
        digests = {img.tobytes() for img in x}
        assert not digests & seen
        seen |= digests


def test_shards_are_deterministic_under_their_seed_and_differ_across_seeds():
    a = fashion_mnist_shard(DataSpec(shard_index=2, shard_count=8, samples=50, shard_seed=1))[0]
    b = fashion_mnist_shard(DataSpec(shard_index=2, shard_count=8, samples=50, shard_seed=1))[0]
    c = fashion_mnist_shard(DataSpec(shard_index=2, shard_count=8, samples=50, shard_seed=2))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_asking_for_more_samples_than_a_shard_holds_says_how_to_fix_it():
    with pytest.raises(DataError, match="lower samples or shardCount"):
        fashion_mnist_shard(DataSpec(shard_index=0, shard_count=100, samples=1000))


def test_missing_data_set_error_says_how_to_install_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path), "train")


def test_validation_split_is_disjoint_from_training_and_test_is_separate():
    data = load_site_data(
        DataSpec(shard_index=0, shard_count=8, samples=100, test_samples=50),
        val_fraction=0.2,
        split_seed=0,
        read=lambda uri: b"",
    )
    assert (len(data.train), len(data.val)) == (80, 20)
    assert data.test is not None and len(data.test) == 50
    train = {x.tobytes() for x in data.train.x}
    assert not train & {x.tobytes() for x in data.val.x}


def test_idx_parser_rejects_truncated_files():
    good = bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + b"abc"
    assert read_idx(good).tolist() == [97, 98, 99]
    with pytest.raises(DataError):
        read_idx(good[:-1])
    with pytest.raises(DataError):
        read_idx(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00" * 4)  # float IDX: not accepted


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_user_npz_data_in_channels_last_layout_becomes_nchw_floats():
    x = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    loaded_x, loaded_y = load_npz(_npz(x=x, y=np.arange(10)), "data.uri")
    images = as_images(loaded_x, "data.uri")
    assert images.shape == (10, 3, 32, 32) and images.dtype == np.float32 and images.max() <= 1.0
    assert loaded_y.dtype == np.int64


def test_npz_with_pickled_objects_is_refused_without_unpickling():
    payload = _npz(x=np.array([object()], dtype=object), y=np.zeros(1))
    with pytest.raises(DataError, match="without pickles"):
        load_npz(payload, "data.uri")


def test_npz_needs_x_and_y_of_equal_length():
    with pytest.raises(DataError, match="arrays 'x' and 'y'"):
        load_npz(_npz(images=np.zeros((2, 4, 4))), "data.uri")
    with pytest.raises(DataError, match="3 examples but y has 2"):
        load_npz(_npz(x=np.zeros((3, 4, 4)), y=np.zeros(2)), "data.uri")


def test_npz_site_data_goes_through_the_storage_reader():
    x = np.zeros((20, 28, 28), dtype=np.uint8)
    files = {"s3://bucket/site.npz": _npz(x=x, y=np.arange(20) % 10)}
    data = load_site_data(
        DataSpec(source=DataSource.NPZ, uri="s3://bucket/site.npz"),
        val_fraction=0.25,
        split_seed=0,
        read=files.__getitem__,
    )
    assert (len(data.train), len(data.val), data.test) == (15, 5, None)


def test_gzip_of_the_real_files_is_what_the_loader_reads():
    with open(f"{FMNIST}/t10k-labels-idx1-ubyte.gz", "rb") as handle:
        labels = read_idx(gzip.decompress(handle.read()))
    assert labels.shape == (10000,) and set(np.unique(labels).tolist()) == set(range(10))
