"""A site's private data: the built-in Fashion-MNIST demo shards, or the site's own `.npz`.

Inputs are images (N, H, W) / (N, H, W, C) / (N, C, H, W), or one feature vector per example
(N, F: tabular rows, flattened sensor windows); the encoder declares which shape it consumes
and `check_inputs` compares the two before training.

Fashion-MNIST is read from the IDX files of Debian's `dataset-fashion-mnist` package with
numpy (no torchvision, no download). Shards are disjoint slices of one seeded permutation, so
two sites with different shard indices never see the same image. Each site's training shard
is split into train and validation parts; validation picks models, the test set only scores.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch

from mfed.spec import DataSource, DataSpec

if TYPE_CHECKING:
    from mfed.learning.image_folder import ImageFolderSplit
    from mfed.learning.tar_shards import TarShardSplit

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "MFED_FASHION_MNIST_DIR"
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


ReadBytes = Callable[[str], bytes]  # e.g. Storage.read: a path or s3:// URI -> bytes


class DataError(ValueError):
    """The site's data is missing or malformed; retrying will not help."""


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 inputs: images in [0, 1] (N, C, H, W), or feature rows (N, F)
    y: np.ndarray  # labels (int64) or targets (float32), shape (N,)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def example_dtype(self) -> str:
        return str(self.x.dtype)

    def batches(
        self, indices: Sequence[torch.Tensor], pin: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) of each list of indices, in order (the trainer's batch source);
        `pin`: page-locked, for asynchronous copies to a GPU."""
        x_all, y_all = torch.from_numpy(self.x), torch.from_numpy(self.y)
        if pin:
            x_all, y_all = x_all.pin_memory(), y_all.pin_memory()
        for index in indices:
            yield x_all[index], y_all[index]


# What the trainer trains and scores on: arrays in memory, or files decoded as they are read.
Examples: TypeAlias = "Split | ImageFolderSplit | TarShardSplit"


@dataclass(frozen=True)
class SiteData:
    """A site's splits: arrays in memory (Split), or files decoded batch by batch (image-folder)."""

    train: Examples
    val: Examples
    test: Examples | None


def read_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file (magic: 0, 0, type 0x08 = uint8, number of dims; big-endian sizes)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError("not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(f"IDX payload has {len(data) - header} bytes, dims {dims} need {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def fashion_mnist_dir(uri: str | None) -> Path:
    return Path(uri or os.environ.get(FASHION_MNIST_DIR_ENV) or DEFAULT_FASHION_MNIST_DIR)


@lru_cache(maxsize=4)
def load_fashion_mnist(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of the train or test split."""
    folder = Path(directory)
    images_name, labels_name = _FILES[split]
    paths = [folder / images_name, folder / labels_name]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST file {missing[0]} not found. Install it with "
            f"`sudo apt-get install dataset-fashion-mnist`, or point data.uri (or "
            f"${FASHION_MNIST_DIR_ENV}) at a directory holding the four *-ubyte.gz IDX files."
        )
    try:
        images = read_idx(gzip.decompress(paths[0].read_bytes()))
        labels = read_idx(gzip.decompress(paths[1].read_bytes()))
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read Fashion-MNIST from {folder}: {exc}") from exc
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"Fashion-MNIST files in {folder} disagree: {images.shape} vs {labels.shape}")
    return images, labels


def as_images(x: np.ndarray, where: str) -> np.ndarray:
    """Accept images (N,H,W), (N,H,W,C) or (N,C,H,W), uint8 or float, and return float32
    (N,C,H,W); or feature rows (N,F) of numbers, returned as float32 (N,F) unscaled."""
    if x.ndim == 2:
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"{where}: feature rows must be numbers, got {x.dtype}")
        rows = x.astype(np.float32)
        if not np.isfinite(rows).all():
            raise DataError(f"{where}: features contain NaN or infinite values")
        return rows
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = np.transpose(x, (0, 3, 1, 2))
    else:
        raise DataError(
            f"{where}: inputs must be images with 3 or 4 dimensions or feature rows (N, F), got shape {x.shape}"
        )
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: images must be uint8 or float, got {x.dtype}")
    out = x.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{where}: images contain NaN or infinite values")
    return out


def split_train_val(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> tuple[Split, Split]:
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, round(len(x) * val_fraction))
    if len(x) - n_val < 1:
        raise DataError(f"{len(x)} examples are too few to keep a validation split")
    val_idx, train_idx = order[:n_val], order[n_val:]
    return Split(x[train_idx], y[train_idx]), Split(x[val_idx], y[val_idx])


def fashion_mnist_shard(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_fashion_mnist(str(fashion_mnist_dir(spec.uri)), "train")
    shard_size = len(images) // spec.shard_count
    order = np.random.default_rng(spec.shard_seed).permutation(len(images))
    shard = order[spec.shard_index * shard_size : (spec.shard_index + 1) * shard_size]
    if spec.samples is not None:
        if spec.samples > shard_size:
            raise DataError(
                f"data.samples={spec.samples} exceeds the shard size {shard_size} "
                f"(60000 images / shardCount {spec.shard_count}); lower samples or shardCount"
            )
        shard = shard[: spec.samples]
    return images[shard], labels[shard].astype(np.int64)


def load_npz(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        # allow_pickle=False: an object array in a site's file must never execute code here.
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise DataError(f"{where}: the .npz file needs arrays 'x' and 'y', has {sorted(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
    except (ValueError, OSError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{where}: not a readable .npz file without pickles: {exc}") from exc
    if len(x) != len(y):
        raise DataError(f"{where}: x has {len(x)} examples but y has {len(y)}")
    y = y.astype(np.int64) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)
    return x, y


def load_site_data(
    spec: DataSpec,
    *,
    val_fraction: float,
    split_seed: int,
    read: ReadBytes,
    example_shape: tuple[int, ...] | None = None,
    classes: int | None = None,
) -> SiteData:
    """Build a site's train/val/test splits. `read` fetches npz bytes from a path or s3:// URI;
    an image folder needs the encoder's `example_shape` (C, H, W) and the task's `classes`
    (None: targets are not classes) to check each file against."""
    if spec.source in (DataSource.IMAGE_FOLDER, DataSource.TAR_SHARDS, DataSource.PLUGIN):
        from mfed import registry

        name = spec.dataset if spec.source is DataSource.PLUGIN else spec.source.value
        assert name is not None  # DataSpec guarantees it for plugin data
        reader = registry.load("dataset", name)  # built-in image-folder / tar-shards, or an entry point
        if spec.source is not DataSource.PLUGIN and (example_shape is None or len(example_shape) != 3):
            what = spec.source.value
            raise DataError(f"{what} data needs an encoder that consumes images (C, H, W), not {example_shape}")
        data = reader(spec, example_shape, classes, val_fraction=val_fraction, split_seed=split_seed)
        if not isinstance(data, SiteData):
            raise DataError(f"the data set reader {name!r} returned {type(data).__name__}, not mfed SiteData")
        return data
    if spec.source is DataSource.FASHION_MNIST:
        x_raw, y = fashion_mnist_shard(spec)
        test: Split | None = None
        if spec.test_samples:
            tx, ty = load_fashion_mnist(str(fashion_mnist_dir(spec.uri)), "test")
            count = min(spec.test_samples, len(tx))
            test = Split(as_images(tx[:count], "test"), ty[:count].astype(np.int64))
        x = as_images(x_raw, "data")
    else:
        assert spec.uri is not None  # DataSpec guarantees it for npz
        x_raw, y = load_npz(read(spec.uri), "data.uri")
        x = as_images(x_raw, "data.uri")
        test = None
        if spec.test_uri:
            tx, ty = load_npz(read(spec.test_uri), "data.testUri")
            test = Split(as_images(tx, "data.testUri"), ty)
    train, val = split_train_val(x, y, val_fraction, split_seed)
    return SiteData(train=train, val=val, test=test)


def check_inputs(data: SiteData, expected_shape: tuple[int, ...], expected_dtype: str, encoder: str) -> None:
    """Every split's examples have the shape and dtype the encoder declares (its input_spec)."""
    for name, split in (("train", data.train), ("validation", data.val), ("test", data.test)):
        if split is None:
            continue
        shape, dtype = split.example_shape, split.example_dtype
        if shape != tuple(expected_shape) or dtype != expected_dtype:
            raise DataError(
                f"the site's {name} inputs are {dtype} of shape {shape} per example, but encoder {encoder!r} "
                f"consumes {expected_dtype} of shape {tuple(expected_shape)}: fix the data, or the encoder's "
                "parameters that set its input shape (spec.encoder.params)"
            )
