"""A federation's global model in storage: one reader and one writer for trainer, pilot and operator.

A global model is two objects under one prefix, the tensor file and its manifest, written in that
order so a manifest only ever names a complete model. Reading checks the manifest, the file's
SHA-256 against it and the tensor format; every way the model can be unusable is a
`GlobalModelError` (fix the input), while a storage outage stays a `StorageError` (try again).
No torch here: the operator, whose image has none, reads base models through this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mfed.artifacts.layout import MANIFEST_FILE, join
from mfed.artifacts.manifest import GlobalManifest, ManifestError
from mfed.artifacts.tensorfile import TensorFileError, decode_tensors, sha256_hex
from mfed.storage import NotFound


class GlobalModelError(Exception):
    """The global model is missing or corrupt (not a storage outage): retrying cannot help."""


class BlobStore(Protocol):
    """What reading and writing a model needs of storage (mfed.storage.Storage, or a wrapper)."""

    def read(self, uri: str) -> bytes: ...

    def write(self, uri: str, data: bytes) -> None: ...

    def exists(self, uri: str) -> bool: ...


@dataclass(frozen=True)
class GlobalModel:
    manifest: GlobalManifest
    tensors: dict[str, np.ndarray]


def read_global_manifest(storage: BlobStore, prefix: str) -> GlobalManifest:
    uri = join(prefix, MANIFEST_FILE)
    try:
        return GlobalManifest.from_json(storage.read(uri))
    except NotFound:
        raise GlobalModelError(f"no global model manifest at {uri}") from None
    except ManifestError as exc:
        raise GlobalModelError(f"the manifest at {uri} is invalid: {exc}") from None


def read_global_model(storage: BlobStore, prefix: str) -> GlobalModel:
    manifest = read_global_manifest(storage, prefix)
    uri = join(prefix, manifest.model.name)
    try:
        data = storage.read(uri)
    except NotFound:
        raise GlobalModelError(f"{uri} is missing") from None
    if sha256_hex(data) != manifest.model.sha256:
        raise GlobalModelError(f"{uri} does not match its manifest's SHA-256")
    try:
        tensors = decode_tensors(data).tensors
    except TensorFileError as exc:
        raise GlobalModelError(f"{uri} is not a valid tensor file: {exc}") from None
    return GlobalModel(manifest=manifest, tensors=dict(tensors))


def check_global_model_present(storage: BlobStore, prefix: str) -> GlobalManifest:
    """The manifest (small), after checking the model file it names exists (not read)."""
    manifest = read_global_manifest(storage, prefix)
    if not storage.exists(join(prefix, manifest.model.name)):
        raise GlobalModelError(f"{join(prefix, manifest.model.name)} is missing")
    return manifest


def write_global_model(storage: BlobStore, prefix: str, model_bytes: bytes, manifest: GlobalManifest) -> None:
    """Model first, manifest last: a manifest only ever names a complete model."""
    storage.write(join(prefix, manifest.model.name), model_bytes)
    storage.write(join(prefix, MANIFEST_FILE), manifest.to_json().encode())
