"""A site's images as tar shards (the WebDataset layout): a directory of `*.tar` files, each
holding samples as members that share a key, `<key>.png` (or .jpg/.jpeg) and `<key>.cls` (the
integer target as text). Read as a stream, shard after shard: nothing of the data set is held
but the shard names and the samples of one shuffle buffer per loader worker.

Why tar shards, not Parquet: images stay the files they were (a shard is `tar cf` of a folder,
readable by every tool), a shard is read front to back in one sequential pass (a PVC or an
object store both stream that at full speed), and the standard library reads them (no Arrow).

- Validation is a share of the SHARDS, chosen by a hash of (seed, shard name): no pass over the
  data to choose it, and validation never reads a training shard. A data set of fewer shards
  than 1/valFraction gets one validation shard; split the data into more shards for finer splits.
- Shuffling is two-level and seeded: the training shards in a new order every epoch, dealt to
  the loader workers in turn, and within each worker a buffer of `shuffle_buffer` samples drawn
  at random. The same seed and the same number of workers give the same batches.
- Every sample is checked where it is read (mfed.learning.image_folder.decode_image and the
  target check), and a shard is checked as it is read: an empty shard, a truncated archive, an
  image without its .cls target; the bad-record policy (fail / skip with a cap) is the image
  folder's.
- Counting a split's samples (the trainer plans its steps from it) reads the tar headers only,
  or nothing when a shard index (`shardindex.json`, WebDataset's wids format) records them.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import torch

from mfed.learning.data import DataError, SiteData
from mfed.learning.data_root import DataRoot, StoredFile, data_roots
from mfed.learning.image_folder import IMAGE_SUFFIXES, BadRecords, Decoded, decode_image, judged_batches, keep_all
from mfed.spec import DataSpec
from mfed.storage import StorageError

TARGET_SUFFIX = ".cls"
# A shard index beside the shards: their sample counts, so counting needs no pass over them
# (for S3, no download before training). WebDataset's wids format; optional.
SHARD_INDEX = "shardindex.json"
Sample = Decoded  # the decoded image or its problem, the target, "shard:key"


def list_shards(root: DataRoot) -> list[StoredFile]:
    """The `.tar` files at the top of the root (a directory, or an S3 prefix)."""
    return _shards(root, root.files())


def _shards(root: DataRoot, files: Sequence[StoredFile]) -> list[StoredFile]:
    shards = [f for f in files if "/" not in f.key and f.key.endswith(".tar")]
    if not shards:
        raise DataError(f"{root.uri}: no .tar shards; write the samples as <key>.png + <key>.cls members of .tar files")
    return shards


def shard_listing(root: DataRoot) -> tuple[list[StoredFile], dict[str, int] | None]:
    """The shards, and their sample counts when the root holds a shard index (SHARD_INDEX); one
    listing of the root for both."""
    files = root.files()
    shards = _shards(root, files)
    if not any(f.key == SHARD_INDEX for f in files):
        return shards, None
    return shards, read_shard_index(root, shards)


def read_shard_index(root: DataRoot, shards: Sequence[StoredFile]) -> dict[str, int]:
    """Shard -> samples from the root's `shardindex.json` (WebDataset's wids-shard-index-v1:
    {"shardlist": [{"url": "shard-0000.tar", "nsamples": 500, "filesize": 8192000}, ...]}),
    checked against the shards present: an index that misses a shard, names one that is not
    there, or records another size is stale, and the site fails naming it."""
    where = f"{root.uri}/{SHARD_INDEX}"
    try:
        document = json.loads(root.read(SHARD_INDEX))
        entries = {str(e["url"]): e for e in document["shardlist"]}
        counts = {url: int(e["nsamples"]) for url, e in entries.items()}
    except (OSError, StorageError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"{where}: not a shard index ({type(exc).__name__}: {exc}); regenerate it or remove it"
        ) from None
    present = {s.key: s for s in shards}
    stale = sorted(set(present) ^ set(entries))
    if stale:
        state = "has no entry for" if stale[0] in present else "names"
        raise DataError(f"{where} {state} {stale[0]}, unlike the shards present; regenerate the index or remove it")
    for key, shard in present.items():
        size = entries[key].get("filesize")
        if (size is not None and int(size) != shard.size) or counts[key] < 0:
            raise DataError(
                f"{where}: its entry for {key} does not match the shard ({shard.size} bytes); regenerate it"
            )
    return counts


def validation_shards(shards: Sequence[StoredFile], seed: int, fraction: float) -> set[StoredFile]:
    """The shards whose hash of (seed, name) ranks in the lowest `fraction` (at least one, never all)."""
    if len(shards) < 2:
        raise DataError(f"{len(shards)} shard cannot be split into training and validation; write at least 2")
    ranked = sorted(shards, key=lambda f: hashlib.blake2b(f"{seed}:{f.key}".encode(), digest_size=8).digest())
    count = min(len(shards) - 1, max(1, round(len(shards) * fraction)))
    return set(ranked[:count])


def _samples(
    root: DataRoot, shard: StoredFile, classes: int | None
) -> Iterator[tuple[str, bytes | None, int | None, str | None]]:
    """(key, image bytes, target, problem) per sample of one shard, in archive order; a problem
    with no key is the shard's own (empty, truncated, unreadable)."""
    try:
        handle = root.open(shard)
    except (OSError, StorageError) as exc:
        yield ("", None, None, f"unreadable archive: {exc}")
        return
    with handle:
        yield from _read_samples(handle, classes)


def _read_samples(handle: BinaryIO, classes: int | None) -> Iterator[tuple[str, bytes | None, int | None, str | None]]:
    seen = 0
    pending: dict[str, dict[str, bytes]] = {}
    ending = _end_marker_problem(handle)
    if ending is not None:  # the whole shard is refused: a cut archive may end inside a sample
        yield ("", None, None, ending)
        return
    try:
        handle.seek(0)
        with tarfile.open(fileobj=handle, mode="r|") as archive:  # a stream: never seeks back
            for member in archive:
                if not member.isfile():
                    continue
                stem, dot, suffix = member.name.rpartition(".")
                if not dot:
                    continue
                content = archive.extractfile(member)
                data = content.read() if content is not None else b""
                parts = pending.setdefault(stem, {})
                parts["." + suffix.lower()] = data
                image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
                if image is not None and TARGET_SUFFIX in parts:
                    seen += 1
                    del pending[stem]
                    yield (stem, image, *_target(parts[TARGET_SUFFIX], classes))
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield ("", None, None, f"truncated or unreadable archive after {seen} samples: {exc}")
        return
    for stem, parts in sorted(pending.items()):
        has_image = any(s in parts for s in IMAGE_SUFFIXES)
        missing = f"no {TARGET_SUFFIX} target" if has_image else "a target without an image"
        yield (stem, None, None, missing)
    if seen == 0 and not pending:
        yield ("", None, None, "empty shard (no samples)")


def _end_marker_problem(handle: BinaryIO) -> str | None:
    """A complete archive ends with two zero blocks, on a 512-byte boundary (tar and tarfile both
    write them); Python's reader stops quietly where a cut archive ends, so look before reading."""
    try:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - 1024))
        tail = handle.read(1024)
    except OSError as exc:
        return f"unreadable archive: {exc}"
    if size == 0 or size % 512 or len(tail) < 1024 or tail.strip(b"\0"):
        return f"truncated archive: {size} bytes without the end-of-archive blocks (copy the shard again)"
    return None


def _target(text: bytes, classes: int | None) -> tuple[int | None, str | None]:
    try:
        target = int(text.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None, f"target {text[:20]!r} is not an integer class"
    if classes is not None and not 0 <= target < classes:
        return None, f"target {target} is outside the task's classes 0..{classes - 1}"
    return target, None


def count_samples(root: DataRoot, shards: Sequence[StoredFile]) -> int:
    """Samples (image members) of the shards, from the tar headers alone (seeks over payloads;
    a shard in S3 is downloaded into the cache for it, where the first epoch may find it)."""
    total = 0
    for shard in shards:
        try:
            with root.open(shard) as handle, tarfile.open(fileobj=handle, mode="r") as archive:
                total += sum(1 for m in archive.getmembers() if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES))
        except (tarfile.TarError, OSError, EOFError, StorageError):
            continue  # reported, by name, when the shard is read
    return total


class _ShardStream(torch.utils.data.IterableDataset[Sample]):
    def __init__(
        self,
        root: DataRoot,
        shards: Sequence[StoredFile],
        shape: tuple[int, int, int],
        classes: int | None,
        seed: int,
        buffer: int,
    ) -> None:
        self.root, self.shards, self.shape, self.classes = root, list(shards), shape, classes
        self.seed, self.buffer = seed, buffer

    def __iter__(self) -> Iterator[Sample]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.shards[worker::workers]
        rng = random.Random(f"{self.seed}:{worker}")
        pool: list[Sample] = []
        for shard in mine:
            for key, image, target, problem in _samples(self.root, shard, self.classes):
                where = f"{shard.key}:{key}" if key else shard.key
                if problem is not None or image is None or target is None:
                    item: Sample = (problem or "unreadable sample", -1, where)
                else:
                    item = (decode_image(image, self.shape, where), target, where)
                if self.buffer <= 1:
                    yield item
                    continue
                pool.append(item)
                if len(pool) >= self.buffer:
                    yield pool.pop(rng.randrange(len(pool)))
        rng.shuffle(pool)
        yield from pool


class TarShardSplit:
    """One split of a shard directory: the shards, read as a stream (the trainer's batch source)."""

    def __init__(
        self,
        root: DataRoot,
        shards: Sequence[StoredFile],
        shape: tuple[int, int, int],
        classes: int | None,
        bad: BadRecords,
        *,
        loader_workers: int = 2,
        shuffle_buffer: int = 1000,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        """`counts`: shard -> samples from a shard index; None: counted from the tar headers."""
        self.root, self.shards, self.shape, self.classes, self.bad = root, list(shards), shape, classes, bad
        self.loader_workers, self.shuffle_buffer = loader_workers, shuffle_buffer
        self.size = count_samples(root, self.shards) if counts is None else sum(counts[s.key] for s in self.shards)

    def __len__(self) -> int:
        return self.size

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def example_dtype(self) -> str:
        return "float32"

    def stream(
        self, batch_size: int, seed: int | None, pin: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass in batches: shuffled with `seed` (shard order and buffer), in order with None."""
        shards = list(self.shards)
        if seed is not None:
            random.Random(seed).shuffle(shards)
        workers = min(self.loader_workers, len(shards))
        loader = torch.utils.data.DataLoader(
            _ShardStream(
                self.root, shards, self.shape, self.classes, seed or 0, self.shuffle_buffer if seed is not None else 0
            ),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=keep_all,
        )
        yield from judged_batches(loader, self.bad, pin)


def load_tar_shards(
    spec: DataSpec, shape: tuple[int, int, int], classes: int | None, *, val_fraction: float, split_seed: int
) -> SiteData:
    """The site's splits from the shards under `spec.uri` (validation: a share of the shards);
    `spec.test_uri`, when set, is a second shard directory."""
    bad = BadRecords.from_spec(spec)
    root, test_root = data_roots(spec)
    shards, counts = shard_listing(root)
    val = validation_shards(shards, split_seed, val_fraction)
    options: dict[str, Any] = {"loader_workers": spec.loader_workers, "counts": counts}
    train = TarShardSplit(root, [s for s in shards if s not in val], shape, classes, bad, **options)
    validation = TarShardSplit(root, sorted(val, key=lambda f: f.key), shape, classes, bad, **options)
    test = None
    if test_root is not None:
        test_shards, test_counts = shard_listing(test_root)
        test = TarShardSplit(
            test_root, test_shards, shape, classes, bad, loader_workers=spec.loader_workers, counts=test_counts
        )
    return SiteData(train=train, val=validation, test=test)
