"""Reading and writing artifacts at local paths or `s3://bucket/key` URIs.

S3 settings come from the environment, the way a Kubernetes Job receives them:
`MFED_S3_ENDPOINT` (or `AWS_ENDPOINT_URL`), `AWS_REGION`, `MFED_S3_PATH_STYLE=true|false`,
`AWS_CA_BUNDLE`, and credentials through boto3's standard chain (`AWS_ACCESS_KEY_ID`, ...).
Every call has explicit timeouts and a bounded number of retries.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from mfed.artifacts.ranged import ByteRange, FileRange


class StorageError(Exception):
    """Storage failed in a way that may pass (network, throttling, server error)."""


class NotFound(StorageError):
    """The object does not exist."""


@dataclass(frozen=True, kw_only=True)
class S3Settings:
    endpoint: str | None = None
    region: str | None = None
    path_style: bool = True
    ca_bundle: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 5

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        return cls(
            endpoint=env.get("MFED_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            path_style=env.get("MFED_S3_PATH_STYLE", "true").lower() in ("1", "true", "yes"),
            ca_bundle=env.get("AWS_CA_BUNDLE") or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            max_attempts=int(env.get("MFED_S3_MAX_ATTEMPTS", "5")),
        )


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ValueError(f"{uri!r} must name a bucket and a key: s3://bucket/key")
    return bucket, key


@lru_cache(maxsize=8)
def s3_client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        s3={"addressing_style": "path" if settings.path_style else "auto"},
    )
    return boto3.client(
        "s3",
        endpoint_url=settings.endpoint,
        region_name=settings.region,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        verify=settings.ca_bundle if settings.ca_bundle else True,
        config=config,
    )


def s3_error(exc: Exception, uri: str) -> StorageError:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFound(f"{uri} does not exist")
        if code in ("NoSuchBucket",):
            return NotFound(f"bucket of {uri} does not exist")
        return StorageError(f"{uri}: S3 error {code}")
    # Never put the exception's repr of the request in messages: it can include headers.
    return StorageError(f"{uri}: {type(exc).__name__}")


class Storage:
    """Bytes in, bytes out, at local paths or s3:// URIs."""

    def __init__(self, s3: S3Settings | None = None) -> None:
        self._s3 = s3

    @property
    def s3(self) -> S3Settings:
        if self._s3 is None:
            self._s3 = S3Settings.from_env()
        return self._s3

    def read(self, uri: str) -> bytes:
        if uri.startswith("s3://"):
            bucket, key = split_s3_uri(uri)
            try:
                response = s3_client(self.s3).get_object(Bucket=bucket, Key=key)
                return bytes(response["Body"].read())
            except Exception as exc:
                raise s3_error(exc, uri) from None
        path = _local(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist") from None

    def write(self, uri: str, data: bytes) -> None:
        if uri.startswith("s3://"):
            bucket, key = split_s3_uri(uri)
            try:
                s3_client(self.s3).put_object(Bucket=bucket, Key=key, Body=data)
            except Exception as exc:
                raise s3_error(exc, uri) from None
            return
        path = _local(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename, so a reader never sees half a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=".tmp-") as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)

    def open_range(self, uri: str) -> ByteRange:
        """Random access to a stored file: S3 Range GETs, or reads of a local file."""
        if uri.startswith("s3://"):
            return S3Range(self.s3, uri)
        path = _local(uri)
        try:
            return FileRange(path)
        except FileNotFoundError:
            raise NotFound(f"{path} does not exist") from None

    def exists(self, uri: str) -> bool:
        try:
            if uri.startswith("s3://"):
                bucket, key = split_s3_uri(uri)
                try:
                    s3_client(self.s3).head_object(Bucket=bucket, Key=key)
                except Exception as exc:
                    raise s3_error(exc, uri) from None
                return True
            return _local(uri).exists()
        except NotFound:
            return False


class S3Range:
    """One S3 object read by byte ranges (its size from one HEAD, each read one Range GET)."""

    def __init__(self, settings: S3Settings, uri: str) -> None:
        self._uri = uri
        self._bucket, self._key = split_s3_uri(uri)
        self._client = s3_client(settings)
        try:
            self._size = int(self._client.head_object(Bucket=self._bucket, Key=self._key)["ContentLength"])
        except Exception as exc:
            raise s3_error(exc, uri) from None

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(f"range [{offset}, {offset + length}) is outside {self._uri} ({self._size} bytes)")
        if length == 0:
            return b""
        try:
            response = self._client.get_object(
                Bucket=self._bucket, Key=self._key, Range=f"bytes={offset}-{offset + length - 1}"
            )
            data = bytes(response["Body"].read())
        except Exception as exc:
            raise s3_error(exc, self._uri) from None
        if len(data) != length:
            raise StorageError(f"{self._uri}: asked for {length} bytes at {offset}, got {len(data)}")
        return data


def _local(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))
