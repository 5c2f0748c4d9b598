"""`mfed export` and `mfed.load_site_model`: the model a site deploys, as one file plus its config.

After a round, a site deploys the round's global encoder (the task level, the shared one, or
the gate's choice, per its siteStrategy) with its own decoder from the round (or the task's
global decoder, per decoderSource); a two-track site deploys the track its upload says it
chose (`deploy_shared`, also in the round's status). That is exactly the model the site would
start the next round from, so this module asks the trainer's own code for it
(`mfed.rounds.site_round.prepare_start`) instead of rebuilding it a second way.

The export is `<site>.safetensors` (the site model's `encoder.*` and `decoder.*` tensors) and
`<site>.json` (architecture, task, input shape, provenance); `load_site_model` rebuilds a ready
`nn.Module` from them through the registry, plugins included.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfed.artifacts.layout import DECODER_FILE, MANIFEST_FILE, join, site_prefix
from mfed.artifacts.manifest import ContributionManifest, ManifestError
from mfed.artifacts.tensorfile import decode_tensors, encode_tensors, sha256_hex
from mfed.fields import FieldError, Fields
from mfed.learning.model import SiteModel, build_site_model, load_part, part_state
from mfed.learning.shapes import InputSpec
from mfed.learning.tasks import Task
from mfed.model_store import read_global_manifest
from mfed.spec import ArchSpec, DataSpec, DecoderSource, RoundSpec, SiteStrategy, TaskSpec, TrainingSpec
from mfed.storage import NotFound, Storage

SITE_MODEL_FORMAT = "mfed.dev/site-model"
SITE_MODEL_VERSION = 1


class ExportError(ValueError):
    """The round, the site or the exported files cannot give a site model; the message says why."""


@dataclass(frozen=True, kw_only=True)
class SiteModelConfig:
    federation: str
    round: int
    site: str
    task: TaskSpec
    encoder: ArchSpec
    decoder: ArchSpec
    input: InputSpec
    track: str  # "task" (task-level track, or the only one) or "shared" (a two-track site's shared track)
    metric: str
    higher_is_better: bool
    model_sha256: str
    plugins: Mapping[str, str] = field(default_factory=dict)
    source: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)  # the site's metrics in that round

    def to_json(self) -> str:
        body = {
            "format": SITE_MODEL_FORMAT,
            "formatVersion": SITE_MODEL_VERSION,
            "federation": self.federation,
            "round": self.round,
            "site": self.site,
            "task": {"name": self.task.name, "type": self.task.type, "params": dict(self.task.params)},
            "encoder": {"name": self.encoder.name, "params": dict(self.encoder.params)},
            "decoder": {"name": self.decoder.name, "params": dict(self.decoder.params)},
            "input": self.input.to_dict(),
            "track": self.track,
            "metric": self.metric,
            "higherIsBetter": self.higher_is_better,
            "modelSha256": self.model_sha256,
            "plugins": dict(self.plugins),
            "source": dict(self.source),
            "metrics": dict(self.metrics),
        }
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> SiteModelConfig:
        try:
            f = Fields(json.loads(text), "")
            if f.str("format") != SITE_MODEL_FORMAT:
                raise FieldError("format", f"is not {SITE_MODEL_FORMAT!r}")
            if f.int("formatVersion") != SITE_MODEL_VERSION:
                raise FieldError("formatVersion", f"this mfed reads version {SITE_MODEL_VERSION}")
            return cls(
                federation=f.str("federation"),
                round=f.int("round"),
                site=f.str("site"),
                task=TaskSpec.parse(f.obj("task")),
                encoder=ArchSpec.parse(f.obj("encoder")),
                decoder=ArchSpec.parse(f.obj("decoder")),
                input=InputSpec.from_dict(f.raw("input")),
                track=f.str("track", choices=["task", "shared"]),
                metric=f.str("metric"),
                higher_is_better=f.bool("higherIsBetter", True),
                model_sha256=f.str("modelSha256"),
                plugins={str(k): str(v) for k, v in f.mapping("plugins").items()},
                source={str(k): str(v) for k, v in f.mapping("source").items()},
                metrics={str(k): float(v) for k, v in f.mapping("metrics").items()},
            )
        except (json.JSONDecodeError, UnicodeDecodeError, FieldError, ValueError) as exc:
            raise ExportError(f"not an mfed site-model config: {exc}") from None


@dataclass(frozen=True)
class SiteExport:
    model: SiteModel
    task: Task
    config: SiteModelConfig
    model_bytes: bytes


def round_root(uri: str) -> str:
    """The round's prefix, given it or its global model's prefix (the round's status.globalUri)."""
    uri = uri.rstrip("/")
    return uri.removesuffix("/global")


def contributors(storage: Storage, round_uri: str) -> list[str]:
    """The sites whose uploads made the round's global model."""
    manifest = read_global_manifest(storage, join(round_root(round_uri), "global"))
    return sorted(c.site for c in manifest.contributors)


def _setting(manifest: ContributionManifest, key: str, override: str | None) -> str:
    if override:
        return override
    value = manifest.trainer.get(key)
    if value is None:
        raise ExportError(
            f"site {manifest.site}'s upload does not record {key} (made by an older trainer); pass it with "
            f"--{'site-strategy' if key == 'siteStrategy' else 'decoder-source'} as the round's method sets it"
        )
    return value


def export_site(
    storage: Storage,
    round_uri: str,
    site: str,
    *,
    site_strategy: str | None = None,
    decoder_source: str | None = None,
) -> SiteExport:
    """The model `site` deploys after the round at `round_uri` (its prefix, or its global model's)."""
    from mfed.rounds.site_round import prepare_start

    root = round_root(round_uri)
    global_prefix = join(root, "global")
    global_manifest = read_global_manifest(storage, global_prefix)
    accepted = {c.site: c for c in global_manifest.contributors}
    if site not in accepted:
        rejected = {r.site: r for r in global_manifest.rejected}
        why = (
            f"it was rejected ({rejected[site].reason}: {rejected[site].detail})"
            if site in rejected
            else (f"it did not contribute (contributors: {', '.join(sorted(accepted)) or 'none'})")
        )
        raise ExportError(f"site {site} has no model in the round at {root}: {why}; export a round it contributed to")
    prefix = site_prefix(root, site)
    try:
        contribution = ContributionManifest.from_json(storage.read(join(prefix, MANIFEST_FILE)))
    except (NotFound, ManifestError) as exc:
        raise ExportError(f"site {site}'s upload manifest at {prefix} cannot be read: {exc}") from None
    if contribution.delta.sha256 != accepted[site].delta_sha256:
        raise ExportError(f"site {site}'s upload at {prefix} is not the one the round aggregated (delta differs)")
    decoder_uri = join(prefix, DECODER_FILE)
    if sha256_hex(storage.read(decoder_uri)) != contribution.decoder.sha256:
        raise ExportError(f"{decoder_uri} does not match its manifest's SHA-256")
    info = global_manifest.tasks[contribution.task]
    strategy = SiteStrategy(_setting(contribution, "siteStrategy", site_strategy))
    source = DecoderSource(_setting(contribution, "decoderSource", decoder_source))
    if strategy is SiteStrategy.MIX:
        raise ExportError(
            f"site {site} uses siteStrategy mix, whose encoder is chosen on the site's own validation data at "
            "the start of its next round: export is only possible where that data is (not supported yet)"
        )
    task_spec = TaskSpec(name=contribution.task, type=info.type, params=dict(info.params))
    spec = RoundSpec(
        federation=global_manifest.federation,
        round=global_manifest.round + 1,
        site=site,
        task=task_spec,
        encoder=global_manifest.encoder,
        decoder=info.decoder,
        training=TrainingSpec(site_strategy=strategy, decoder_source=source, device="cpu"),
        data=DataSpec(),
        global_model=global_prefix,
        previous_decoder=decoder_uri,
        output=join(root, "export-unused"),
    )
    state = prepare_start(spec, storage, None)
    model, track = state.model, "task"
    if state.shared is not None and contribution.metrics.get("deploy_shared", 0.0) >= 0.5:
        model, track = state.shared.model, "shared"
    model.eval()
    tensors = {**part_state(model, "encoder"), **part_state(model, "decoder")}
    model_bytes = encode_tensors(tensors)
    config = SiteModelConfig(
        federation=global_manifest.federation,
        round=global_manifest.round,
        site=site,
        task=task_spec,
        encoder=global_manifest.encoder,
        decoder=info.decoder,
        input=model.input_spec,
        track=track,
        metric=state.task.metric_name,
        higher_is_better=state.task.higher_is_better,
        model_sha256=sha256_hex(model_bytes),
        plugins=dict(global_manifest.plugins),
        source={
            "globalModel": global_prefix,
            "globalSha256": global_manifest.model.sha256,
            "decoder": decoder_uri,
            "decoderSha256": contribution.decoder.sha256,
            "siteStrategy": strategy.value,
            "decoderSource": source.value,
        },
        metrics=dict(contribution.metrics),
    )
    return SiteExport(model=model, task=state.task, config=config, model_bytes=model_bytes)


def write_export(export: SiteExport, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, config = out_dir / f"{export.config.site}.safetensors", out_dir / f"{export.config.site}.json"
    tensors.write_bytes(export.model_bytes)
    config.write_text(export.config.to_json() + "\n", encoding="utf-8")
    return tensors, config


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


@dataclass(frozen=True)
class SiteBundle:
    model: SiteModel
    task: Task
    config: SiteModelConfig


def load_site_bundle(path: str | Path) -> SiteBundle:
    """The exported model (eval mode, on the CPU), its task (loss, metric) and its config."""
    tensors_path, config_path = _paths(path)
    try:
        config = SiteModelConfig.from_json(config_path.read_bytes())
        data = tensors_path.read_bytes()
    except FileNotFoundError as exc:
        raise ExportError(
            f"{exc.filename} does not exist: pass the .json or .safetensors `mfed export` wrote"
        ) from None
    if sha256_hex(data) != config.model_sha256:
        raise ExportError(f"{tensors_path} does not match the SHA-256 in {config_path}")
    from mfed import registry

    try:
        model, task = build_site_model(config.encoder, config.task, config.decoder)
    except registry.UnknownPlugin as exc:
        packages = " ".join(sorted(set(config.plugins.values())))
        hint = f"; the model was built with {packages}: pip install {packages}" if packages else ""
        raise ExportError(f"{exc}{hint}") from exc
    tensors: dict[str, Any] = dict(decode_tensors(data).tensors)
    load_part(model, "encoder", tensors)
    load_part(model, "decoder", tensors)
    return SiteBundle(model=model.eval(), task=task, config=config)


def load_site_model(path: str | Path) -> SiteModel:
    """A ready `nn.Module` (eval mode) from the files `mfed export` wrote: `model(inputs)` gives the
    site's predictions for a batch of inputs shaped like `config.input`."""
    return load_site_bundle(path).model
