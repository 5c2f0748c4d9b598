"""The JSON manifests that make every artifact self-describing.

A contribution (what a site uploads after a round) and a global model (what the aggregator
writes) each travel as a safetensors file plus one of these manifests. The manifest is
written last, so its presence means the tensor files it names are complete; checksums in it
let any reader detect a truncated, swapped or tampered file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from mfed.artifacts.signature import Signature
from mfed.fields import FieldError, Fields
from mfed.spec import ArchSpec, SharingPolicy

CONTRIBUTION_FORMAT = "mfed.dev/contribution"
GLOBAL_FORMAT = "mfed.dev/global-model"
FORMAT_VERSION = 1


class ManifestError(FieldError):
    """A manifest is malformed or of an unsupported format."""


@dataclass(frozen=True, kw_only=True)
class FileRef:
    """A tensor file next to the manifest, pinned by size and SHA-256."""

    name: str
    sha256: str
    size: int

    @classmethod
    def parse(cls, f: Fields) -> FileRef:
        name = f.str("name")
        if "/" in name or name.startswith("."):
            raise ManifestError(f.where("name"), f"{name!r} must be a plain file name")
        sha = f.str("sha256")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ManifestError(f.where("sha256"), "must be 64 lower-case hex digits")
        return cls(name=name, sha256=sha, size=f.int("size", minimum=0))


def _finite_metrics(f: Fields, name: str) -> dict[str, float]:
    raw = f.mapping(name)
    metrics: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ManifestError(f"{f.where(name)}.{key}", f"must be a finite number, got {value!r}")
        metrics[str(key)] = float(value)
    return metrics


def _check_format(f: Fields, expected: str) -> None:
    fmt = f.str("format")
    if fmt != expected:
        raise ManifestError("format", f"is {fmt!r}, expected {expected!r}")
    version = f.int("formatVersion")
    if version != FORMAT_VERSION:
        raise ManifestError("formatVersion", f"is {version}; this build reads version {FORMAT_VERSION}")


@dataclass(frozen=True, kw_only=True)
class ContributionManifest:
    """What one site produced in one round: encoder delta + its decoder + evidence."""

    federation: str
    round: int
    site: str
    task: str
    task_type: str
    samples: int
    base_digest: str
    encoder_signature: str
    decoder_signature: str
    delta: FileRef
    decoder: FileRef
    delta_dtype: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    trainer: Mapping[str, str] = field(default_factory=dict)
    # Where the site's encoder started, for models with task-level copies of shared parameters
    # (SharingPolicy.task_level): encoder-name prefix -> alpha, the start being
    # alpha * shared + (1 - alpha) * task-level. Longest prefix wins; parameters it does not
    # cover started from the task level (alpha 0). Empty for the literal layout.
    start_mix: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "format": CONTRIBUTION_FORMAT,
            "formatVersion": FORMAT_VERSION,
            "federation": self.federation,
            "round": self.round,
            "site": self.site,
            "task": self.task,
            "taskType": self.task_type,
            "samples": self.samples,
            "baseDigest": self.base_digest,
            "encoderSignature": self.encoder_signature,
            "decoderSignature": self.decoder_signature,
            "delta": asdict(self.delta),
            "decoder": asdict(self.decoder),
            "deltaDtype": self.delta_dtype,
            "metrics": dict(self.metrics),
            "trainer": dict(self.trainer),
        }
        if self.start_mix:  # only when used, so literal-layout manifests keep their bytes
            body["startMix"] = dict(self.start_mix)
        return json.dumps(body, indent=2, sort_keys=True)

    def mix_for(self, encoder_key: str) -> float:
        """The alpha this site started `encoder_key` from (longest matching prefix, else 0)."""
        best, alpha = -1, 0.0
        for prefix, value in self.start_mix.items():
            if encoder_key.startswith(prefix) and len(prefix) > best:
                best, alpha = len(prefix), value
        return alpha

    @classmethod
    def from_json(cls, text: str | bytes) -> ContributionManifest:
        with _as_manifest_error():
            return cls._parse(Fields(_load(text), ""))

    @classmethod
    def _parse(cls, f: Fields) -> ContributionManifest:
        _check_format(f, CONTRIBUTION_FORMAT)
        trainer = f.mapping("trainer")
        return cls(
            federation=f.str("federation"),
            round=f.int("round", minimum=0),
            site=f.str("site"),
            task=f.str("task"),
            task_type=f.str("taskType"),
            # Zero or negative counts are a validation failure, not a parse failure, so they
            # can be recorded against the site instead of hiding the whole manifest.
            samples=f.int("samples"),
            base_digest=f.str("baseDigest"),
            encoder_signature=f.str("encoderSignature"),
            decoder_signature=f.str("decoderSignature"),
            delta=FileRef.parse(f.obj("delta")),
            decoder=FileRef.parse(f.obj("decoder")),
            delta_dtype=f.str("deltaDtype"),
            metrics=_finite_metrics(f, "metrics"),
            trainer={str(k): str(v) for k, v in trainer.items()},
            start_mix=_finite_metrics(f, "startMix"),
        )


@dataclass(frozen=True, kw_only=True)
class TaskGroupInfo:
    """One task group inside a global model: its task, decoder and who contributed."""

    type: str
    params: Mapping[str, Any]
    decoder: ArchSpec
    decoder_signature: Signature
    sites: tuple[str, ...] = ()
    samples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "params": dict(self.params),
            "decoder": asdict(self.decoder),
            "decoderSignature": self.decoder_signature.to_json(),
            "sites": list(self.sites),
            "samples": self.samples,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def parse(cls, f: Fields) -> TaskGroupInfo:
        try:
            signature = Signature.from_json(f.raw("decoderSignature"))
        except ValueError as exc:
            raise ManifestError(f.where("decoderSignature"), str(exc)) from exc
        return cls(
            type=f.str("type"),
            params=f.mapping("params"),
            decoder=ArchSpec.parse(f.obj("decoder")),
            decoder_signature=signature,
            sites=f.str_list("sites"),
            samples=f.int("samples", 0, minimum=0),
            metrics=_finite_metrics(f, "metrics"),
        )


@dataclass(frozen=True, kw_only=True)
class Rejection:
    """A contribution that was refused, and why (ends up in the round's status)."""

    site: str
    reason: str
    detail: str


@dataclass(frozen=True, kw_only=True)
class Contributor:
    site: str
    task: str
    samples: int
    delta_sha256: str


@dataclass(frozen=True, kw_only=True)
class GlobalManifest:
    """A global model: shared encoder, per-task encoder parts and decoders, and provenance."""

    federation: str
    round: int
    model: FileRef
    encoder: ArchSpec
    encoder_signature: Signature
    sharing: SharingPolicy
    tasks: Mapping[str, TaskGroupInfo]
    parent_digest: str | None = None
    contributors: tuple[Contributor, ...] = ()
    rejected: tuple[Rejection, ...] = ()
    aggregation: Mapping[str, Any] = field(default_factory=dict)
    # `kind/name` -> `distribution==version` of each plugin the model's architecture comes from
    # (mfed.registry), carried from round to round: a site without one is told what to install.
    plugins: Mapping[str, str] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Sites name their starting point by the SHA-256 of the model's tensor file."""
        return self.model.sha256

    def to_json(self) -> str:
        body = {
            "format": GLOBAL_FORMAT,
            "formatVersion": FORMAT_VERSION,
            "federation": self.federation,
            "round": self.round,
            "model": asdict(self.model),
            "encoder": asdict(self.encoder),
            "encoderSignature": self.encoder_signature.to_json(),
            "sharing": self.sharing.to_dict(),
            "tasks": {name: info.to_dict() for name, info in sorted(self.tasks.items())},
            "parentDigest": self.parent_digest,
            "contributors": [asdict(c) for c in self.contributors],
            "rejected": [asdict(r) for r in self.rejected],
            "aggregation": dict(self.aggregation),
        }
        if self.plugins:  # only when used, so models of built-in architectures keep their bytes
            body["plugins"] = dict(sorted(self.plugins.items()))
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> GlobalManifest:
        with _as_manifest_error():
            return cls._parse(Fields(_load(text), ""))

    @classmethod
    def _parse(cls, f: Fields) -> GlobalManifest:
        _check_format(f, GLOBAL_FORMAT)
        try:
            encoder_signature = Signature.from_json(f.raw("encoderSignature"))
        except ValueError as exc:
            raise ManifestError("encoderSignature", str(exc)) from exc
        tasks_f = f.obj("tasks")
        tasks = {name: TaskGroupInfo.parse(tasks_f.obj(name)) for name in sorted(f.mapping("tasks"))}
        contributors = []
        for i, item in enumerate(f.raw("contributors") or []):
            c = Fields(item, f"contributors[{i}]")
            contributors.append(
                Contributor(
                    site=c.str("site"),
                    task=c.str("task"),
                    samples=c.int("samples"),
                    delta_sha256=c.str("delta_sha256"),
                )
            )
        rejected = []
        for i, item in enumerate(f.raw("rejected") or []):
            r = Fields(item, f"rejected[{i}]")
            rejected.append(Rejection(site=r.str("site"), reason=r.str("reason"), detail=r.str("detail")))
        return cls(
            federation=f.str("federation"),
            round=f.int("round", minimum=0),
            model=FileRef.parse(f.obj("model")),
            encoder=ArchSpec.parse(f.obj("encoder")),
            encoder_signature=encoder_signature,
            sharing=SharingPolicy.parse(f.obj("sharing", required=False)),
            tasks=tasks,
            parent_digest=f.opt_str("parentDigest"),
            contributors=tuple(contributors),
            rejected=tuple(rejected),
            aggregation=f.mapping("aggregation"),
            plugins={str(k): str(v) for k, v in f.mapping("plugins").items()},
        )


@contextmanager
def _as_manifest_error() -> Iterator[None]:
    """Every parse failure surfaces as ManifestError, with the field path kept."""
    try:
        yield
    except ManifestError:
        raise
    except FieldError as exc:
        raise ManifestError(exc.path, exc.message) from exc


def _load(text: str | bytes) -> object:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError("manifest", f"is not valid JSON: {exc}") from exc
