"""A site's own images as files: one sub-folder per class, or an index (CSV / JSONL) of file ->
target. Read lazily: only the list of (file, target) is in memory, each batch's images are
decoded (Pillow) when the trainer asks for them, in `loader_workers` processes, so a site's
memory does not grow with its data set (the formula: docs/data.md).

Every record is checked where it is read, and a bad one is never trained on silently: an
unreadable image, a wrong mode (channels) or size, a target outside the task's classes, a file
the index names that does not exist. With `on_bad_record: fail` the first one stops the site with
a DataError naming the file and the problem; with `skip` it is left out and counted, up to
`max_bad_records`, beyond which the site fails anyway (a folder of garbage is not "skipped").

The validation split is chosen per file from a hash of (seed, file key), not from a shuffled
index: the same file is in the same split whatever else is added to the folder, for the same
seed, and choosing needs no pass over the data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch

from mfed.learning.data import DataError, SiteData
from mfed.learning.data_root import DataRoot, data_roots
from mfed.spec import DataSpec
from mfed.storage import StorageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MODES = {1: "L", 3: "RGB"}  # channels -> the Pillow mode a file must have


class OnBadRecord(StrEnum):
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class ImageRecord:
    key: str  # the file relative to the data root: what messages and the split hash name
    target: int


@dataclass(frozen=True, kw_only=True)
class BadRecords:
    """What to do with a bad record, and the ones seen (key -> problem)."""

    policy: OnBadRecord = OnBadRecord.FAIL
    limit: int = 0  # skip at most this many; one more fails the site
    seen: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: DataSpec) -> BadRecords:
        return cls(policy=OnBadRecord(spec.on_bad_record), limit=spec.max_bad_records)

    def record(self, key: str, problem: str) -> None:
        if self.policy is OnBadRecord.FAIL:
            raise DataError(f"{key}: {problem} (onBadRecord: fail; set onBadRecord: skip to leave such files out)")
        self.seen[key] = problem
        if len(self.seen) > self.limit:
            raise DataError(
                f"{len(self.seen)} bad records, more than maxBadRecords {self.limit} (the latest: {key}: {problem}); "
                "fix the data or raise maxBadRecords"
            )


def list_class_folders(root: DataRoot, bad: BadRecords) -> tuple[list[ImageRecord], tuple[str, ...]]:
    """Images under root/<class>/..., the classes numbered in sorted order of the sub-folders that
    hold files (an object store has no empty folders); files at the top level are not images."""
    files = [f for f in root.files() if "/" in f.key]
    classes = tuple(sorted({f.key.split("/", 1)[0] for f in files}))
    if not classes:
        raise DataError(f"{root.uri}: no class sub-folders; put each class's images in a folder of its own")
    number = {name: target for target, name in enumerate(classes)}
    records = []
    for f in files:
        if f.key.lower().endswith(IMAGE_SUFFIXES):
            records.append(ImageRecord(key=f.key, target=number[f.key.split("/", 1)[0]]))
        else:
            bad.record(f.key, f"not an image file ({', '.join(IMAGE_SUFFIXES)})")
    if not records:
        raise DataError(f"{root.uri}: the class folders hold no {'/'.join(IMAGE_SUFFIXES)} files")
    return records, classes


def read_index(root: DataRoot, index: str, bad: BadRecords) -> list[ImageRecord]:
    """An index of file -> target: CSV with a header `file,target`, or JSON lines
    {"file": ..., "target": ...}; files are relative to `root`."""
    try:
        text = root.read(index).decode()
    except (OSError, StorageError, UnicodeDecodeError) as exc:
        raise DataError(f"{root.uri}/{index}: cannot read the index: {exc}") from exc
    if index.lower().endswith(".jsonl"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{index} line {number}: not JSON: {exc}") from exc
    else:
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or not {"file", "target"} <= set(reader.fieldnames):
            raise DataError(f"{index}: the CSV index needs a header with columns file,target")
        rows = [(number, row) for number, row in enumerate(reader, start=2)]
    present = {f.key for f in root.files()}
    records = []
    for number, row in rows:
        where = f"{posixpath.basename(index)} line {number}"
        if not isinstance(row, dict) or "file" not in row or "target" not in row:
            raise DataError(f"{where}: each entry needs file and target")
        key = posixpath.normpath(str(row["file"]))
        try:
            target = int(row["target"])
        except (TypeError, ValueError):
            bad.record(key, f"target {row['target']!r} ({where}) is not an integer class")
            continue
        if key.startswith(("../", "/")) or key == "..":
            raise DataError(f"{where}: {row['file']} points outside the data folder; use a path inside it")
        if key not in present:
            bad.record(key, f"missing file (named by {where})")
            continue
        records.append(ImageRecord(key=key, target=target))
    if not records:
        raise DataError(f"{root.uri}/{index}: the index names no readable image")
    return records


def check_targets(records: Sequence[ImageRecord], classes: int | None, bad: BadRecords) -> list[ImageRecord]:
    """The records whose target is a class of the task (`classes`: how many; None: any)."""
    if classes is None:
        return list(records)
    kept = []
    for r in records:
        if 0 <= r.target < classes:
            kept.append(r)
        else:
            bad.record(r.key, f"target {r.target} is outside the task's classes 0..{classes - 1}")
    return kept


def in_validation(key: str, seed: int, fraction: float) -> bool:
    """Whether the file is in the validation split: a hash of (seed, key) below `fraction`."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def decode_image(data: bytes, shape: tuple[int, int, int], key: str) -> np.ndarray | str:
    """The image as float32 (C, H, W) in [0, 1], or the problem as text (never raises for bad data)."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode != MODES.get(channels):
                return f"image mode {image.mode}, the encoder needs {MODES.get(channels, f'{channels} channels')}"
            if image.size != (width, height):
                return f"image size {image.size[0]}x{image.size[1]}, the encoder needs {width}x{height}"
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"unreadable image: {exc}"
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


class _Decoded(torch.utils.data.Dataset[tuple[np.ndarray | str, int, str]]):
    def __init__(self, root: DataRoot, keys: np.ndarray, targets: np.ndarray, shape: tuple[int, int, int]) -> None:
        self.root, self.keys, self.targets, self.shape = root, keys, targets, shape

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[np.ndarray | str, int, str]:
        key, target = self.keys[i].decode(), int(self.targets[i])
        try:
            data = self.root.read(key)
        except (OSError, StorageError) as exc:
            return f"cannot read the file: {exc}", target, key
        return decode_image(data, self.shape, key), target, key


Decoded = tuple[np.ndarray | str, int, str]  # the image or its problem, the target, where it came from


def keep_all(batch: list[Decoded]) -> list[Decoded]:
    return batch  # decoded in the worker, judged in the trainer (where the policy and its count live)


def judged_batches(
    loader: Iterable[list[Decoded]], bad: BadRecords, pin: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches as (inputs, targets), each bad record judged by the policy (fail
    raises DataError, skip leaves it out of its batch; a batch left empty is dropped)."""
    for batch in loader:
        images, targets = [], []
        for image, target, where in batch:
            if isinstance(image, str):
                bad.record(where, image)
                continue
            images.append(image)
            targets.append(target)
        if images:
            x, y = torch.from_numpy(np.stack(images)), torch.tensor(targets, dtype=torch.int64)
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)


class ImageFolderSplit:
    """One split of an image folder, decoded batch by batch (the trainer's batch source).

    The files are kept as two numpy arrays (keys as fixed-width bytes, targets as int64), not a
    list of Python objects: about (longest key + 8) bytes per file, and the loader workers,
    forked from the trainer, share those pages instead of copying them (reading a Python object
    writes its reference count; reading a numpy array does not)."""

    def __init__(
        self,
        root: DataRoot,
        records: Sequence[ImageRecord],
        shape: tuple[int, int, int],
        bad: BadRecords,
        loader_workers: int = 2,
    ) -> None:
        self.root, self.shape, self.bad, self.loader_workers = root, shape, bad, loader_workers
        self.keys = np.array([r.key.encode() for r in records], dtype=bytes)
        self.targets = np.array([r.target for r in records], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def record(self, i: int) -> ImageRecord:
        return ImageRecord(key=self.keys[i].decode(), target=int(self.targets[i]))

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def example_dtype(self) -> str:
        return "float32"

    def batches(
        self, indices: Sequence[torch.Tensor], pin: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) of each list of indices, in order; bad records are judged by the
        policy (fail raises DataError, skip leaves them out of their batch). The workers decode
        ahead of the trainer (prefetch_factor batches each)."""
        loader = torch.utils.data.DataLoader(
            _Decoded(self.root, self.keys, self.targets, self.shape),
            batch_sampler=[index.tolist() for index in indices],
            num_workers=self.loader_workers,
            collate_fn=keep_all,
        )
        yield from judged_batches(loader, self.bad, pin)


def load_image_folder(
    spec: DataSpec, shape: tuple[int, int, int], classes: int | None, *, val_fraction: float, split_seed: int
) -> SiteData:
    """The site's splits from `spec.uri` (class sub-folders, or `spec.index`), validation chosen
    per file (in_validation); `spec.test_uri`, when set, is a second folder of the same layout."""
    assert spec.uri is not None  # DataSpec guarantees it
    bad = BadRecords.from_spec(spec)
    root, test_root = data_roots(spec)
    records = _records(root, spec.index, classes, bad)
    val = [r for r in records if in_validation(r.key, split_seed, val_fraction)]
    train = [r for r in records if not in_validation(r.key, split_seed, val_fraction)]
    if not val or not train:
        raise DataError(
            f"{spec.uri}: {len(records)} images leave {len(train)} for training and {len(val)} for validation "
            f"(valFraction {val_fraction}); add images"
        )
    test = None
    if test_root is not None:
        test_records = _records(test_root, spec.index, classes, bad)
        test = ImageFolderSplit(test_root, test_records, shape, bad, spec.loader_workers)
    return SiteData(
        train=ImageFolderSplit(root, train, shape, bad, spec.loader_workers),
        val=ImageFolderSplit(root, val, shape, bad, spec.loader_workers),
        test=test,
    )


def _records(root: DataRoot, index: str | None, classes: int | None, bad: BadRecords) -> list[ImageRecord]:
    records = read_index(root, index, bad) if index else list_class_folders(root, bad)[0]
    return check_targets(records, classes, bad)
