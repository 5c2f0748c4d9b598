"""`mfed report`: the pilot's table, results.json and metrics.png for a chain on a cluster.

Exit codes: 0 written, 2 bad input or a chain that cannot be reported (the message says why)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mfed.artifacts.manifest import ManifestError
from mfed.methods import Method
from mfed.model_store import GlobalModelError
from mfed.storage import StorageError

EXIT_BAD_INPUT = 2


def add_report_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        help="the pilot's table, JSON and learning-curve plot for a chain of FederationRounds",
        description=(
            "Report a chain of FederationRounds run with spec.evaluation.baselines: [local]: per task, "
            "the federated model's and the Local baseline's scores as the sites measured them on their "
            "own test split (else validation), dm% vs Local, steps and bytes uploaded per site per "
            "round, in the same table, results.json and metrics.png as `mfed pilot`. Reads the rounds "
            "through the Kubernetes API (kubeconfig, else in-cluster), or with --artifacts from the "
            "contribution manifests in S3 (credentials from AWS_* and MFED_S3_ENDPOINT as the trainer's)."
        ),
    )
    p.add_argument("round", help="the chain's first FederationRound (the one you applied)")
    p.add_argument("-n", "--namespace", default="default", help="its namespace (default: default)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config, else in-cluster)")
    p.add_argument(
        "--artifacts",
        metavar="URI",
        help="read S3 instead of the API: the folder holding the chain's round folders, "
        "s3://BUCKET/PREFIX/FEDERATION (spec.storage's bucket and prefix, then spec.federation)",
    )
    p.add_argument("--method", help="with --artifacts: the chain's spec.training.method (S3 does not record it)")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="output directory (default runs/report)")
    p.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    from mfed.pilot.report import format_table, plot, write_results
    from mfed.report.chain import ReportError, chain_results
    from mfed.report.sources import read_chain_kubernetes, read_chain_s3

    try:
        if args.artifacts:
            if not args.method:
                raise ReportError("--method: give the chain's spec.training.method with --artifacts, e.g. m-fed")
            chain = read_chain_s3(args.round, args.artifacts, Method.parse(args.method))
        else:
            chain = read_chain_kubernetes(args.round, args.namespace, args.kubeconfig)
        results = chain_results(chain)
    except (ReportError, StorageError, GlobalModelError, ManifestError, ValueError) as exc:
        print(f"mfed report: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    write_results(results, args.out / "results.json")
    plot(results, args.out / "metrics.png")
    print(format_table(results))
    print(f"\nresults: {args.out / 'results.json'}   plot: {args.out / 'metrics.png'}")
    return 0
