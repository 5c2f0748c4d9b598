"""Where a site's files are: a directory (a PVC) or an S3 prefix, behind the one small interface
the image-folder and tar-shard readers use, so both formats read from either.

- A directory is listed and read in place.
- An S3 prefix is listed with ListObjectsV2 (keys and sizes only). An image is one GET when a
  loader worker decodes it; nothing is kept. A tar shard is downloaded whole into a bounded
  local cache (`cacheMiB`, least recently used out first) and read from there as a stream: a
  shard is read front to back, and a local copy lets a later epoch, or the validation pass, skip
  the download while it fits.

The cache is shared by the trainer and its loader workers (forked: they each download the shards
dealt to them), one lock file serialising what it holds. A shard being read is never cut short
when it is evicted: its reader holds the file open, and an unlinked file stays readable until it
is closed. Downloads in flight count at their full size, so the cache never holds more than its
bound, and a shard larger than the whole cache fails the site with the fix.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from mfed.learning.data import DataError
from mfed.spec import DataSpec
from mfed.storage import S3Settings, StorageError, s3_client, s3_error, split_s3_uri

CACHE_DIR_ENV = "MFED_DATA_CACHE_DIR"  # where the cache's directory is made (default: the temp dir)
_PART = ".part"


@dataclass(frozen=True)
class StoredFile:
    key: str  # relative to the root, '/'-separated: what messages, splits and the index name
    size: int


class DataRoot(Protocol):
    uri: str

    def files(self) -> list[StoredFile]:
        """Every file under the root (recursively), sorted by key."""
        ...

    def read(self, key: str) -> bytes:
        """One file's bytes; raises OSError or StorageError when it cannot be read."""
        ...

    def open(self, file: StoredFile) -> BinaryIO:
        """A local, seekable copy of the file, open for reading."""
        ...


class LocalRoot:
    def __init__(self, path: Path) -> None:
        self.path, self.uri = path, str(path)

    def files(self) -> list[StoredFile]:
        if not self.path.is_dir():
            raise DataError(f"{self.path}: the data directory does not exist or is not a directory")
        found = (p for p in self.path.rglob("*") if p.is_file())
        return sorted((StoredFile(p.relative_to(self.path).as_posix(), p.stat().st_size) for p in found), key=_key)

    def read(self, key: str) -> bytes:
        return (self.path / key).read_bytes()

    def open(self, file: StoredFile) -> BinaryIO:
        return (self.path / file.key).open("rb")


def _key(file: StoredFile) -> str:
    return file.key


class S3Root:
    """The objects under an s3:// prefix, as files relative to it."""

    def __init__(self, uri: str, cache: DataCache, settings: S3Settings | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.bucket, prefix = split_s3_uri(self.uri + "/")
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.cache, self.settings = cache, settings or S3Settings.from_env()
        self._client: tuple[int, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The pilot hands a site's data to spawned worker processes: a client does not pickle.
        return {**self.__dict__, "_client": None}

    def _s3(self) -> Any:
        # A forked loader worker must not share the trainer's connection pool: one client per process.
        if self._client is None or self._client[0] != os.getpid():
            client = s3_client(self.settings) if self._client is None else s3_client.__wrapped__(self.settings)
            self._client = (os.getpid(), client)
        return self._client[1]

    def files(self) -> list[StoredFile]:
        found = []
        try:
            pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    key = str(item["Key"])[len(self.prefix) :]
                    if key and not key.endswith("/"):
                        found.append(StoredFile(key, int(item["Size"])))
        except Exception as exc:
            raise _storage_error(exc, self.uri) from None
        if not found:
            raise DataError(f"{self.uri}: no objects under this prefix; upload the site's files there")
        return sorted(found, key=_key)

    def read(self, key: str) -> bytes:
        try:
            return bytes(self._s3().get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read())
        except Exception as exc:
            raise _storage_error(exc, f"{self.uri}/{key}") from None

    def open(self, file: StoredFile) -> BinaryIO:
        def download(target: Path) -> None:
            try:
                self._s3().download_file(self.bucket, self.prefix + file.key, str(target))
            except Exception as exc:
                raise _storage_error(exc, f"{self.uri}/{file.key}") from None

        return self.cache.open(f"{self.uri}/{file.key}", file.size, download)


def _storage_error(exc: Exception, uri: str) -> Exception:
    return exc if isinstance(exc, (StorageError, DataError)) else s3_error(exc, uri)


class DataCache:
    """At most `limit_bytes` of downloaded files in `directory`, least recently used out first."""

    def __init__(self, directory: Path, limit_bytes: int) -> None:
        self.directory, self.limit = directory, limit_bytes
        directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def temporary(cls, limit_bytes: int) -> DataCache:
        """A cache in a directory of its own, removed with the cache by the process that made it."""
        parent = os.environ.get(CACHE_DIR_ENV) or tempfile.gettempdir()
        Path(parent).mkdir(parents=True, exist_ok=True)
        cache = cls(Path(tempfile.mkdtemp(prefix="mfed-data-cache-", dir=parent)), limit_bytes)
        weakref.finalize(cache, _remove_if_owner, cache.directory, os.getpid())
        return cache

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.directory / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def held_bytes(self) -> int:
        """Bytes the cache holds or has promised to downloads in flight (read under the lock: a
        listing taken while a download is renamed into place may name the file twice)."""
        with self._locked():
            return self._held_bytes()

    def _held_bytes(self) -> int:
        return sum(size for _path, size, _time in self._entries(with_parts=True))

    def _entries(self, *, with_parts: bool) -> list[tuple[Path, int, float]]:
        entries = []
        for path in self.directory.iterdir():
            try:
                if path.name.endswith(_PART):
                    if with_parts:  # <name>.<pid>.<size>.part: its promised size
                        entries.append((path, int(path.name.split(".")[-2]), 0.0))
                elif path.name != ".lock":
                    stat = path.stat()
                    entries.append((path, stat.st_size, stat.st_mtime))
            except (OSError, ValueError, IndexError):
                continue  # evicted by another process meanwhile
        return entries

    def _make_room(self, size: int, uri: str) -> None:
        if size > self.limit:
            raise DataError(
                f"{uri}: {size / 2**20:.0f} MiB is larger than the data cache ({self.limit / 2**20:.0f} MiB); "
                "raise spec.data.s3.cacheMiB above (loaderWorkers + 1) x the largest shard, or write smaller shards"
            )
        held = self._held_bytes()
        for path, file_size, _time in sorted(self._entries(with_parts=False), key=lambda e: e[2]):
            if held + size <= self.limit:
                break
            path.unlink(missing_ok=True)
            held -= file_size
        if held + size > self.limit:
            raise DataError(
                f"{uri}: the data cache ({self.limit / 2**20:.0f} MiB) is full of downloads in flight; raise "
                "spec.data.s3.cacheMiB above (loaderWorkers + 1) x the largest shard"
            )

    def open(self, uri: str, size: int, download: Callable[[Path], None]) -> BinaryIO:
        name = hashlib.sha256(uri.encode()).hexdigest()[:32]
        final = self.directory / name
        with self._locked():
            if final.is_file() and final.stat().st_size == size:
                os.utime(final)  # the most recently used now
                return final.open("rb")
            self._make_room(size, uri)
            part = self.directory / f"{name}.{os.getpid()}.{size}{_PART}"
            part.touch()
        try:
            download(part)  # outside the lock: the other workers go on reading and downloading
            if part.stat().st_size != size:
                raise DataError(f"{uri}: downloaded {part.stat().st_size} bytes of {size}; the object changed")
            with self._locked():
                os.replace(part, final)
                return final.open("rb")
        finally:
            part.unlink(missing_ok=True)


def _remove_if_owner(directory: Path, owner: int) -> None:
    if os.getpid() == owner:  # never a forked loader worker's exit
        shutil.rmtree(directory, ignore_errors=True)


def data_roots(spec: DataSpec) -> tuple[DataRoot, DataRoot | None]:
    """The site's training root and its test root (None: no test data): s3:// prefixes, sharing
    one cache of `spec.cache_mib`, or local directories."""
    assert spec.uri is not None  # DataSpec guarantees it for files of the site's own
    cache: DataCache | None = None

    def root(uri: str) -> DataRoot:
        nonlocal cache
        if not uri.startswith("s3://"):
            return LocalRoot(Path(uri))
        cache = cache or DataCache.temporary(spec.cache_mib * 2**20)
        return S3Root(uri, cache)

    return root(spec.uri), root(spec.test_uri) if spec.test_uri else None
