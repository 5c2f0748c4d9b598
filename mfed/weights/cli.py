"""`mfed import-weights` and `mfed export`: their argument parsers and what they run.

Kept apart from mfed/cli.py (which only hooks them in) and free of torch at import time, so
`mfed --help` and `mfed pilot` start as fast as before; each command imports what it needs.
Exit codes: 0 done, 2 bad input (the message says what to fix).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


def add_weight_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "import-weights",
        help="turn a pretrained state dict into a federation's initial global model",
        description=(
            "Read a state dict (a .safetensors file, or a torch checkpoint read with weights_only=True), "
            "map its keys onto the model described by --config with explicit --map rules, and write the "
            "round-0 global model to --out (a folder or s3://bucket/prefix). A FederationRound starts "
            "from it with spec.initialModel.uri: <--out>. Any key that does not fit is listed and nothing "
            "is written."
        ),
        epilog=(
            "Targets are the model's names: encoder.<p> for the encoder, tasks.<task>.decoder.<p> for a "
            "task group's decoder. A part that receives any key must receive all of its keys; a part "
            "that receives none keeps its seeded initialisation. Example: --map backbone.=encoder. --map fc.="
        ),
    )
    p.add_argument("checkpoint", type=Path, help="the state dict: *.safetensors, or a torch checkpoint (*.pt, *.pth)")
    p.add_argument(
        "--config",
        type=Path,
        required=True,
        help="YAML/JSON: federation, method, encoder {name, params, sharing} as in the FederationRound, "
        "tasks [{task, decoder}] as in the SiteTasks",
    )
    p.add_argument("--out", required=True, help="where to write the global model: a folder or s3://bucket/prefix")
    p.add_argument(
        "--map",
        dest="rules",
        action="append",
        default=[],
        metavar="SOURCE=TARGET",
        help="rewrite keys starting with SOURCE to start with TARGET (longest SOURCE wins; empty TARGET "
        "drops them); repeatable. Without any, the checkpoint's keys must already be the model's names",
    )
    p.add_argument("--key", help="the entry of a torch checkpoint that holds the state dict, e.g. state_dict")
    p.add_argument("--seed", type=int, default=0, help="seed of the parts the checkpoint does not fill (default 0)")
    p.set_defaults(run=run_import)

    e = sub.add_parser(
        "export",
        help="write the model a site deploys after a round (safetensors + JSON config)",
        description=(
            "For a finished round, write the model each chosen site deploys (the round's global encoder as "
            "its strategy takes it, its track and its decoder) as <site>.safetensors + <site>.json; "
            "mfed.load_site_model(path) rebuilds it as a torch.nn.Module."
        ),
    )
    e.add_argument("round", help="the round's prefix, or its global model's (status.globalUri), in a folder or S3")
    target = e.add_mutually_exclusive_group(required=True)
    target.add_argument("--site", action="append", help="a site to export (repeatable)")
    target.add_argument("--all-sites", action="store_true", help="every site whose upload made the round's model")
    e.add_argument("--out", type=Path, required=True, help="folder to write the files to")
    e.add_argument("--site-strategy", help="override what the upload records (uploads by older trainers)")
    e.add_argument("--decoder-source", help="override what the upload records (uploads by older trainers)")
    e.set_defaults(run=run_export)


def _fail(message: str) -> int:
    print(json.dumps({"event": "failed", "error": message}), file=sys.stderr)
    print(f"mfed: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _load_config(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {path}: {exc}") from None


def run_import(args: argparse.Namespace) -> int:
    from mfed.learning.encoders import ArchError
    from mfed.learning.tasks import TaskError
    from mfed.model_store import write_global_model
    from mfed.registry import PluginError
    from mfed.storage import Storage, StorageError
    from mfed.weights.importer import ModelConfig, WeightsError, checkpoint_digest, import_weights, read_checkpoint
    from mfed.weights.mapping import MappingError, Rule

    try:
        rules = [Rule.parse(text) for text in args.rules]
        config = ModelConfig.parse(_load_config(args.config))
        spec = config.init_spec(seed=args.seed, output=args.out)
        data = args.checkpoint.read_bytes()
        state = read_checkpoint(data, args.checkpoint.name, args.key)
        imported = import_weights(
            spec, state, rules, source=args.checkpoint.name, source_sha256=checkpoint_digest(data)
        )
        write_global_model(Storage(), args.out, imported.model_bytes, imported.manifest)
    except (WeightsError, MappingError, ArchError, TaskError, PluginError, ValueError, OSError, StorageError) as exc:
        # every way the input can be wrong (all ValueErrors), an unreadable file, or S3 refusing the write
        return _fail(str(exc))
    report = imported.report
    print(
        json.dumps(
            {
                "event": "imported",
                "out": args.out,
                "digest": imported.manifest.digest,
                "loaded": len(report.loaded),
                "dropped": len(report.dropped),
                "seededParts": list(report.seeded_parts),
            },
            sort_keys=True,
        )
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    from mfed.learning.encoders import ArchError
    from mfed.model_store import GlobalModelError
    from mfed.registry import PluginError
    from mfed.rounds.site_round import BadInput
    from mfed.storage import Storage, StorageError
    from mfed.weights.export import ExportError, contributors, export_site, write_export

    storage = Storage()
    try:
        sites = args.site or contributors(storage, args.round)
        for site in sites:
            export = export_site(
                storage, args.round, site, site_strategy=args.site_strategy, decoder_source=args.decoder_source
            )
            tensors, config = write_export(export, args.out)
            print(
                json.dumps(
                    {
                        "event": "exported",
                        "site": site,
                        "round": export.config.round,
                        "track": export.config.track,
                        "model": str(tensors),
                        "config": str(config),
                    },
                    sort_keys=True,
                )
            )
    except (ExportError, GlobalModelError, BadInput, ArchError, PluginError, StorageError, ValueError) as exc:
        return _fail(str(exc))
    return 0
