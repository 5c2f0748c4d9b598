"""The `mfed` command: `mfed pilot` runs a whole federation locally (see `mfed pilot --help`);
`mfed import-weights` and `mfed export` move models in and out of a federation (mfed.weights);
`mfed report` prints the pilot's table for a chain of FederationRounds on a cluster."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from mfed.aggregation.crosstask import Level2Rule, Level2Weighting
from mfed.aggregation.robust import RobustRule, RobustSettings
from mfed.methods import Method
from mfed.pilot.attacks import Attack, AttackKind
from mfed.pilot.config import ALL_METHODS, QUICK, SCENARIOS, PilotConfig, PilotConfigError
from mfed.privacy.settings import PrivacySettingError, PrivacySettings
from mfed.report.cli import add_report_command
from mfed.spec import ArchSpec, Regularizer, SharingPolicy, SiteStrategy, SpecError, TaskSpec
from mfed.weights.cli import add_weight_commands

PRIVACY_FLAGS = {
    "clipNorm": "--clip",
    "noiseMultiplier": "--dp-noise",
    "delta": "--dp-delta",
    "targetQuantile": "--clip-quantile",
}


def _task_samples(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        task, _, count = item.partition("=")
        if not count.isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: use TASK=N, e.g. cls10=50,coarse4=50")
        out[task.strip()] = int(count)
    return out


def _arch(text: str) -> ArchSpec:
    """`NAME` or `NAME:{json params}`, e.g. `patch_net:{"width": 32}`."""
    name, sep, params = text.partition(":")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME or NAME:{{json params}}")
    try:
        parsed = json.loads(params) if sep else {}
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: the parameters are not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: the parameters must be a JSON object")
    return ArchSpec(name=name.strip(), params=parsed)


def _named_arch(text: str) -> tuple[str, ArchSpec]:
    """`TASK=NAME[:{json params}]`."""
    task, sep, arch = text.partition("=")
    if not sep or not task.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: use TASK=NAME or TASK=NAME:{{json params}}")
    return task.strip(), _arch(arch)


def _pilot_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "pilot",
        help="run a local federation (Fashion-MNIST, 4 tasks) and compare methods",
        description=(
            "Run a whole federation on this machine with the real trainer and aggregator: "
            "Local, Task-FedAvg, Encoder-FedAvg and M-Fed side by side. Prints a table of "
            "per-task metrics and dm% versus Local, writes results.json and metrics.png."
        ),
    )
    p.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default="equal",
        help="equal: 4 tasks x 2 sites, 300 images each (default); scarce: one site per task, "
        "50 labelled images for cls10/coarse4 beside 3000 for rot4/denoise",
    )
    p.add_argument(
        "-f",
        "--filename",
        type=Path,
        metavar="DIR",
        help="pilot the SiteTask and FederationRound manifests of DIR (what `kubectl apply -f DIR` creates): "
        "the round's method beside local, task-fedavg and encoder-fedavg, on the sites' own data",
    )
    p.add_argument("--round", dest="round_name", help="with -f: the FederationRound to pilot when DIR holds several")
    p.add_argument(
        "--data",
        type=_claim_folder,
        action="append",
        default=[],
        metavar="CLAIM=PATH",
        help="with -f: the local folder holding PVC claim CLAIM's files (repeatable)",
    )
    p.add_argument(
        "--s3-dir",
        type=Path,
        help="with -f: read s3://BUCKET/KEY data from S3-DIR/BUCKET/KEY (default: from S3, with the MFED_S3_* "
        "environment a site Job gets)",
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="with -f: the S3 endpoint the sites' s3:// data is read from, e.g. http://127.0.0.1:8333 (default: "
        "MFED_S3_ENDPOINT; credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, as a site Job)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny run for smoke tests (2 rounds, 1 site per task)")
    p.add_argument(
        "--encoder",
        type=_arch,
        help="the encoder, built in or a plugin: NAME or NAME:{json params} (default small_cnn; docs/plugins.md)",
    )
    p.add_argument("--tasks", help="comma-separated task groups (default cls10,coarse4,denoise,rot4)")
    p.add_argument(
        "--task",
        type=_named_arch,
        action="append",
        default=[],
        help='define a task group: NAME=TYPE or NAME=TYPE:{json params}, e.g. inset=membership:{"positives":[5,7,9]} '
        "(repeatable; list it in --tasks)",
    )
    p.add_argument(
        "--decoder",
        type=_named_arch,
        action="append",
        default=[],
        help="a task group's decoder: TASK=NAME or TASK=NAME:{json params} (repeatable)",
    )
    p.add_argument("--rounds", type=int, help="federated rounds (default 30)")
    p.add_argument("--sites-per-task", type=int, help="sites per task (default 2)")
    p.add_argument("--samples-per-site", type=int, help="images per site, validation split included (default 300)")
    p.add_argument("--task-samples", type=_task_samples, help="per-task images, e.g. cls10=50,rot4=3000")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0); results are averaged")
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods (default {','.join(m.value for m in ALL_METHODS)}; local is required); "
        f"also: {','.join(m.value for m in Method if m not in ALL_METHODS)} (docs/strategies.md)",
    )
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--delta-dtype",
        choices=["float32", "float16", "bfloat16"],
        help="precision of the encoder deltas sites upload (default float32; 16-bit halves traffic)",
    )
    p.add_argument("--mu", type=float, help="M-Fed decoder regulariser weight (default 0.01)")
    p.add_argument("--regularizer", choices=[r.value for r in Regularizer], help="M-Fed regulariser (default l2)")
    p.add_argument(
        "--shared-layers",
        default=None,
        help="encoder parameters M-Fed shares across tasks: all (default), none, N (lowest N stages) or "
        "prefix:P1,P2; a +task suffix (all+task) also keeps task-level copies of them",
    )
    p.add_argument("--level2", choices=[w.value for w in Level2Weighting], help="level-2 weighting (default uniform)")
    p.add_argument(
        "--level2-rule",
        choices=[r.value for r in Level2Rule],
        help="how level 2 combines task groups' updates, overriding the method's: mean (M-Fed), "
        "cagrad (conflict-averse), gated (only groups whose updates agree)",
    )
    p.add_argument("--cagrad-c", type=float, help="radius of the conflict-averse rule around the mean (default 0.4)")
    p.add_argument(
        "--site-strategy",
        choices=[s.value for s in SiteStrategy],
        help="where sites start / what they deploy, overriding the method's: shared, task, gate, mix "
        "(chosen on validation), fallback (two tracks, the better on validation deployed)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="optimizer steps per site, the same for every method, Local included (both tracks of a "
        "two-track site counted); a multiple of --rounds, each round steps/rounds long (default 600)",
    )
    p.add_argument(
        "--shared-steps",
        type=int,
        help="a two-track site (fallback, auto) trains its shared track at most this many steps a round "
        "(default: half the round; auto: 20), the rest of the round goes to its task track",
    )
    p.add_argument("--epochs", type=int, help="local epochs per round (default 1)")
    p.add_argument("--batch-size", type=int, help="batch size (default 32)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--test-samples", type=int, help="Fashion-MNIST test images scored per task (default 2000)")
    p.add_argument(
        "--select-ties",
        choices=["latest", "earliest"],
        help="of the rounds tied for a site's best validation score, report the latest (default: the most "
        "trained) or the earliest (the rule of the results measured before 2026-11-26)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes that train a round's sites side by side (default: one per CPU core, at most one "
        "per site; 0: one after the other in this process); the numbers do not depend on it",
    )
    p.add_argument(
        "--rule",
        choices=[r.value for r in RobustRule],
        help="how the federated methods combine sites and task groups: mean (default), median or trimmed-mean "
        "(FederationRound spec.aggregation.rule; docs/privacy.md)",
    )
    p.add_argument("--trim", type=float, help="share cut at each end by trimmed-mean (default 0.2)")
    p.add_argument(
        "--norm-factor",
        type=float,
        help="refuse a site whose update norm is above this x its group's median (all sites' when the group has < 3)",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        help="refuse a site whose encoder update has a cosine below this to the other sites' median update "
        "(e.g. 0: a sign-flipped update; FederationRound spec.aggregation.minCosine)",
    )
    p.add_argument(
        "--dp-noise",
        type=float,
        help="site-level differential privacy: noise multiplier z (noise std z x --clip on each task group's sum "
        "of clipped updates; FederationRound spec.privacy); needs --clip",
    )
    p.add_argument("--clip", type=float, help="L2 bound on a site's round update under --dp-noise")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="delta of the reported epsilon (default 1e-5)")
    p.add_argument(
        "--clip-quantile",
        type=float,
        help="adaptive clipping: the share of sites to keep within the clip norm (--clip is then the first "
        "round's; spec.privacy.targetQuantile)",
    )
    p.add_argument(
        "--attack",
        choices=[a.value for a in AttackKind],
        help="one site misbehaves: sign-flip or scale (x100) its encoder delta, or train on shuffled labels; "
        "or is absent (never uploads: the floor for a rule that refuses it); its own scores are left out "
        "of the table (needs --attack-site)",
    )
    p.add_argument("--attack-site", help="the misbehaving site, e.g. cls10-0")
    p.add_argument("--out", type=Path, default=Path("runs/pilot"), help="output directory (default runs/pilot)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _claim_folder(text: str) -> tuple[str, Path]:
    claim, sep, path = text.partition("=")
    if not sep or not claim.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: use CLAIM=PATH, e.g. --data inspection-images=/data/site-a")
    return claim.strip(), Path(path.strip())


# What a flag of the built-in pilot sets, and where the manifests of `-f` say it instead.
MANIFEST_FIELDS = {
    "quick": "the manifests' own sizes",
    "encoder": "FederationRound spec.encoder",
    "tasks": "the SiteTasks the round selects",
    "task": "SiteTask spec.task",
    "decoder": "SiteTask spec.decoder",
    "sites_per_task": "the SiteTasks the round selects",
    "samples_per_site": "SiteTask spec.data",
    "task_samples": "SiteTask spec.data",
    "delta_dtype": "FederationRound spec.training.deltaDtype",
    "mu": "FederationRound spec.training.mu",
    "regularizer": "FederationRound spec.training.regularizer",
    "shared_layers": "FederationRound spec.encoder.sharing",
    "level2": "FederationRound spec.aggregation.weighting",
    "level2_rule": "FederationRound spec.aggregation.level2Rule",
    "cagrad_c": "FederationRound spec.aggregation.cagradC",
    "site_strategy": "FederationRound spec.training.siteStrategy",
    "steps": "FederationRound spec.training.minSteps / maxSteps",
    "shared_steps": "FederationRound spec.training.sharedSteps",
    "epochs": "FederationRound spec.training.epochs",
    "batch_size": "FederationRound spec.training.batchSize",
    "lr": "FederationRound spec.training.learningRate",
    "test_samples": "SiteTask spec.data.demo.testSamples",
    "rule": "FederationRound spec.aggregation.rule",
    "trim": "FederationRound spec.aggregation.trim",
    "norm_factor": "FederationRound spec.aggregation.normFactor",
    "min_cosine": "FederationRound spec.aggregation.minCosine",
    "dp_noise": "FederationRound spec.privacy.noiseMultiplier",
    "clip": "FederationRound spec.privacy.clipNorm",
    "clip_quantile": "FederationRound spec.privacy.targetQuantile",
}


def manifest_config_from_args(args: argparse.Namespace) -> tuple[PilotConfig, list[str]]:
    """`mfed pilot -f DIR`: the manifests say what the built-in flags would; the command line
    only chooses seeds, methods, the device, a shorter chain and an attack."""
    from mfed.pilot.manifests import DataPlaces, manifest_pilot

    for flag, where in MANIFEST_FIELDS.items():
        if getattr(args, flag) not in (None, False, []):
            raise PilotConfigError(f"--{flag.replace('_', '-')} does not combine with -f: {where} says it")
    if args.scenario != "equal":
        raise PilotConfigError("--scenario does not combine with -f: the manifests are the scenario")
    if (args.attack is None) != (args.attack_site is None):
        raise PilotConfigError("--attack and --attack-site go together")
    overrides: dict[str, Any] = {}
    if args.seeds:
        overrides["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    if args.methods:
        overrides["methods"] = tuple(Method.parse(m) for m in args.methods.split(",") if m.strip())
    for name, value in (("device", args.device), ("rounds", args.rounds), ("select_ties", args.select_ties)):
        if value is not None:
            overrides[name] = value
    if args.attack:
        overrides["attack"] = Attack(kind=AttackKind(args.attack), site=args.attack_site)
    if args.storage is not None:
        if not args.storage.startswith(("http://", "https://")):
            raise PilotConfigError(f"--storage {args.storage}: use an http:// or https:// URL of the S3 endpoint")
        if args.s3_dir is not None:
            raise PilotConfigError("--storage and --s3-dir both say where s3:// data is: choose one")
        # The environment, as a Job gets it: the trainer's code and the spawned site workers read it.
        os.environ["MFED_S3_ENDPOINT"] = args.storage
    places = DataPlaces(claims=dict(args.data), s3_dir=args.s3_dir)
    return manifest_pilot(args.filename, places, round_name=args.round_name, **overrides)


def config_from_args(args: argparse.Namespace) -> PilotConfig:
    if args.data or args.s3_dir or args.round_name or args.storage:
        raise PilotConfigError("--data, --s3-dir, --storage and --round read manifests: use them with -f DIR")
    base = PilotConfig(scenario=args.scenario, **SCENARIOS[args.scenario])
    if args.quick:
        base = replace(base, **QUICK)
    overrides: dict[str, Any] = {}
    for field_name, value in (
        ("rounds", args.rounds),
        ("sites_per_task", args.sites_per_task),
        ("samples_per_site", args.samples_per_site),
        ("device", args.device),
        ("delta_dtype", args.delta_dtype),
        ("mu", args.mu),
        ("epochs", args.epochs),
        ("batch_size", args.batch_size),
        ("learning_rate", args.lr),
        ("test_samples", args.test_samples),
        ("steps", args.steps),
        ("select_ties", args.select_ties),
    ):
        if value is not None:
            overrides[field_name] = value
    if args.encoder is not None:
        overrides["encoder"] = args.encoder
    if args.tasks:
        overrides["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if args.task:
        overrides["custom_tasks"] = {
            name: TaskSpec(name=name, type=arch.name, params=dict(arch.params)) for name, arch in args.task
        }
    if args.decoder:
        overrides["decoders"] = dict(args.decoder)
    if args.task_samples:
        overrides["task_samples"] = {**base.task_samples, **args.task_samples}
    elif args.samples_per_site is not None:
        overrides["task_samples"] = {}
    if args.seeds:
        overrides["seeds"] = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    if args.methods:
        overrides["methods"] = tuple(Method.parse(m) for m in args.methods.split(",") if m.strip())
    if args.regularizer:
        overrides["regularizer"] = Regularizer(args.regularizer)
    if args.shared_layers:
        overrides["sharing"] = SharingPolicy.from_text(args.shared_layers)
    if args.level2:
        overrides["level2_weighting"] = Level2Weighting(args.level2)
    if args.level2_rule:
        overrides["level2_rule"] = Level2Rule(args.level2_rule)
    if args.site_strategy:
        overrides["site_strategy"] = SiteStrategy(args.site_strategy)
    if args.shared_steps is not None:
        overrides["shared_steps"] = args.shared_steps
    if args.cagrad_c is not None:
        overrides["cagrad_c"] = args.cagrad_c
    if args.rule or args.trim is not None or args.norm_factor is not None or args.min_cosine is not None:
        defaults = RobustSettings()
        overrides["robust"] = RobustSettings(
            rule=RobustRule(args.rule) if args.rule else defaults.rule,
            trim=defaults.trim if args.trim is None else args.trim,
            norm_factor=args.norm_factor,
            min_cosine=args.min_cosine,
        )
    if (args.dp_noise is None) != (args.clip is None):
        raise PilotConfigError("--dp-noise and --clip go together: the noise is calibrated to the clip norm")
    if args.clip_quantile is not None and args.dp_noise is None:
        raise PilotConfigError("--clip-quantile adapts the clip norm of --dp-noise: set --dp-noise and --clip too")
    if args.dp_noise is not None:
        try:
            overrides["privacy"] = PrivacySettings(
                clip_norm=args.clip,
                noise_multiplier=args.dp_noise,
                delta=args.dp_delta,
                target_quantile=args.clip_quantile,
            )
        except PrivacySettingError as exc:
            raise PilotConfigError(f"{PRIVACY_FLAGS.get(exc.field, exc.field)} {exc.message}") from None
    if (args.attack is None) != (args.attack_site is None):
        raise PilotConfigError("--attack and --attack-site go together")
    if args.attack:
        overrides["attack"] = Attack(kind=AttackKind(args.attack), site=args.attack_site)
    return replace(base, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mfed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _pilot_parser(sub)
    add_weight_commands(sub)
    add_report_command(sub)
    args = parser.parse_args(argv)
    if args.command != "pilot":
        return int(args.run(args))
    from mfed.rounds.site_round import INPUT_ERRORS, BadInput

    try:
        config, notes = manifest_config_from_args(args) if args.filename else (config_from_args(args), [])
    except (PilotConfigError, SpecError, ValueError) as exc:
        parser.error(str(exc))
    except (*INPUT_ERRORS, BadInput) as exc:  # a site's data that cannot be read
        print(f"mfed pilot: error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"mfed pilot: {note}", file=sys.stderr)
    from mfed.pilot import run_pilot

    try:
        results = run_pilot(config, args.out, show_progress=not args.no_progress, workers=args.workers)
    except (*INPUT_ERRORS, BadInput) as exc:  # a plugin, architecture or task that does not fit
        print(f"mfed pilot: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(results["table"])
    print(f"\nresults: {args.out / 'results.json'}   plot: {args.out / 'metrics.png'}   ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
