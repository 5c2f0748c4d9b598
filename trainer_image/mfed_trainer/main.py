"""`mfed-trainer`: the command a site's Kubernetes Job runs.

A thin entrypoint: it reads the spec, calls the `mfed` library (`mfed.rounds`, the same code the
local pilot runs) and turns the outcome into an exit code and JSON lines on stdout.

The spec (a RoundSpec or InitSpec as JSON) comes from `--spec FILE`, `--spec -` (stdin) or the
`MFED_SPEC` environment variable. Exit codes tell the Job controller what to do:

    0   done (or an identical upload already existed)
    2   bad input: spec, data or model do not fit; retrying cannot help (podFailurePolicy: FailJob)
    75  transient: storage unreachable or throttled; retry (EX_TEMPFAIL)
    1   anything else (a bug): retried up to the Job's backoffLimit
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from mfed.artifacts.layout import FAILURE_FILE, MANIFEST_FILE, join
from mfed.model_store import write_global_model
from mfed.rounds.initial import init_global_model
from mfed.rounds.site_round import BadInput, run_site_round
from mfed.spec import InitSpec, RoundSpec, SpecError, parse_spec
from mfed.storage import NotFound, Storage, StorageError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75
SPEC_ENV = "MFED_SPEC"

log = logging.getLogger("mfed.trainer")


def _read_spec(argument: str | None) -> str:
    if argument == "-":
        return sys.stdin.read()
    if argument:
        with open(argument, encoding="utf-8") as handle:
            return handle.read()
    text = os.environ.get(SPEC_ENV)
    if not text:
        raise SpecError("spec", f"missing: pass --spec FILE or set ${SPEC_ENV} to the JSON spec")
    return text


def _report(event: str, **fields: object) -> None:
    """One JSON line per event on stdout: easy to read in `kubectl logs` and to parse."""
    print(json.dumps({"event": event, **fields}, sort_keys=True), flush=True)


def run(spec: RoundSpec | InitSpec, storage: Storage) -> None:
    if isinstance(spec, InitSpec):
        model_bytes, manifest = init_global_model(spec)
        write_global_model(storage, spec.output, model_bytes, manifest)
        _report("initialised", output=join(spec.output, MANIFEST_FILE), digest=manifest.digest)
        return
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] > 10:
            last[0] = now
            _report("progress", site=spec.site, round=spec.round, step=done, steps=total)

    result = run_site_round(spec, storage, progress=progress)
    _report(
        "uploaded" if not result.reused else "already-uploaded",
        site=spec.site,
        round=spec.round,
        samples=result.manifest.samples,
        delta_sha256=result.manifest.delta.sha256,
        metrics=dict(result.manifest.metrics),
    )


def _leave_failure(spec: RoundSpec, message: str) -> None:
    """Best effort: why this site refused its input, where the operator looks when its Job fails
    (the Job's own status says only which exit code failed it)."""
    body = {"site": spec.site, "round": spec.round, "kind": "bad-input", "message": message}
    try:
        Storage().write(join(spec.output, FAILURE_FILE), json.dumps(body, sort_keys=True).encode())
    except (StorageError, OSError) as exc:  # the message is still in the Job's log
        _report("failure-not-recorded", error=str(exc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mfed-trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", help="spec file, or - for stdin (default: $MFED_SPEC)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec: RoundSpec | InitSpec | None = None
    try:
        spec = parse_spec(_read_spec(args.spec))
        run(spec, Storage())
    except (SpecError, BadInput, NotFound, FileNotFoundError) as exc:
        _report("failed", kind="bad-input", error=str(exc))
        if isinstance(spec, RoundSpec):
            _leave_failure(spec, str(exc))
        return EXIT_BAD_INPUT
    except StorageError as exc:
        _report("failed", kind="transient", error=str(exc))
        return EXIT_TRANSIENT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
