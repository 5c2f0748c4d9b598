"""What a round costs the control plane: the operator's reaction times, API calls and memory.

The real operator process (production defaults: `MFED_OPERATOR_RESYNC_SECONDS=10`) against the
emulated Kubernetes API (kmock, tests/support/kubeapi.py) and a real S3 (SeaweedFS). A bench
"kubelet" completes each Job at once with a valid contribution (the first site of each task in a
round runs the real trainer in process, 1 optimizer step on 16 demo images; the others get a copy
of its bytes under their own prefix and name), so the uploads pass the operator's validation and
the numbers measure the operator, not the training. For a chain of rounds over N sites it prints:

- overhead, chain: the round's last Job completed -> every Job of the next chained round created
- overhead, done: the round's last Job completed -> the round Succeeded
- API requests the operator made per round, and its peak RSS (VmHWM)

and, with `--idle-sitetasks`, the operator's RSS holding 1000 SiteTasks and 100 active rounds
(each waiting on its init Job, which nothing runs).

What the emulator does not show: a real API server's watch latency, its rate limits (kopf and
the client send as fast as kmock answers), etcd write latency, and the Job controller's own
delay in reporting completion.

    python bench/control_plane.py --sites 100 [--rounds 5] [--idle-sitetasks]
ends with `sites=<n> overhead_p50_s=<x> overhead_p95_s=<y> operator_rss_mb=<z>` (the chain overhead).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mfed_operator.domain.names import LABEL_ROUND
from mfed_trainer.main import run as run_trainer

from mfed.artifacts.layout import MANIFEST_FILE, join
from mfed.artifacts.manifest import ContributionManifest
from mfed.spec import InitSpec, RoundSpec, parse_spec
from mfed.storage import Storage
from tests.support import manifests as m
from tests.support.kubeapi import KUBECONFIG_TOKEN, KubeAPI, LoggedRequest
from tests.support.kubelet import Kubelet, _Run
from tests.support.operator import OperatorProcess, operator_env
from tests.support.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS
from tests.support.waiting import wait_for

NAMESPACE = "bench"
BUCKET = "mfed"
# The chart's defaults, not the tests' fast ones.
PRODUCTION = {"MFED_OPERATOR_RESYNC_SECONDS": "10", "MFED_OPERATOR_VALIDATION_GRACE_SECONDS": "60"}


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class InProcessKubelet(Kubelet):
    """Completes each Job at once with a valid contribution, then reports it Complete (or Failed).

    The first site of a task in a round runs the real trainer in this process (torch imported
    once; 1 optimizer step on 16 demo images); every other site of that task and round gets a
    copy of those bytes under its own prefix, with a manifest naming it. The contributions are
    well-formed and pass the operator's validation (same base, signatures, checksums), so the
    bench measures the operator at 100+ sites without training 100 models a round."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._made: dict[tuple[str, str], tuple[bytes, bytes, ContributionManifest]] = {}

    def _start(self, job: Mapping[str, Any], previous: _Run | None) -> _Run:
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        env = self._job_env(namespace, job["spec"]["template"]["spec"]["containers"][0])
        run = _Run(namespace=namespace, name=name, uid=meta.get("uid", ""), process=None, started=time.monotonic())
        try:
            with environment(env):
                self._contribute(parse_spec(env["MFED_SPEC"]), Storage())
        except Exception as exc:  # a bench must say so, not hang
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
            self._finish(run, failed=True, reason="BenchTrainerFailed", message=str(exc)[:200])
            return run
        self._finish(run, failed=False)
        return run

    def _contribute(self, spec: RoundSpec | InitSpec, storage: Storage) -> None:
        if not isinstance(spec, RoundSpec):
            run_trainer(spec, storage)
            return
        key = (spec.global_model, spec.task.name)
        made = self._made.get(key)
        if made is None:
            run_trainer(spec, storage)
            manifest = ContributionManifest.from_json(storage.read(join(spec.output, MANIFEST_FILE)))
            delta = storage.read(join(spec.output, manifest.delta.name))
            decoder = storage.read(join(spec.output, manifest.decoder.name))
            self._made[key] = (delta, decoder, manifest)
            return
        delta, decoder, manifest = made
        # The trainer's write order (delta, decoder, manifest): a manifest only for complete uploads.
        storage.write(join(spec.output, manifest.delta.name), delta)
        storage.write(join(spec.output, manifest.decoder.name), decoder)
        own = dataclasses.replace(manifest, site=spec.site, round=spec.round)
        storage.write(join(spec.output, MANIFEST_FILE), own.to_json().encode())


def _post_round(r: LoggedRequest) -> str | None:
    if r.method == "POST" and r.plural == "jobs" and isinstance(r.data, dict):
        return str(((r.data.get("metadata") or {}).get("labels") or {}).get(LABEL_ROUND) or "") or None
    return None


def _completes(r: LoggedRequest) -> bool:
    if not (r.method == "PATCH" and r.plural == "jobs" and r.subresource == "status" and isinstance(r.data, dict)):
        return False
    conditions = (r.data.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions)


def _succeeded(r: LoggedRequest) -> str | None:
    patch = r.method == "PATCH" and r.plural == "federationrounds" and isinstance(r.data, dict)
    return r.name if patch and (r.data.get("status") or {}).get("phase") == "Succeeded" else None


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def round_names(rounds: int) -> list[str]:
    return ["bench"] + [f"bench-r{k}" for k in range(2, rounds + 1)]


def chain(sites: int, rounds: int, work: Path, seaweed: SeaweedFS, timeline: bool = False) -> dict[str, float]:
    api = KubeAPI().start()
    kubelet = InProcessKubelet(api.client(), work / "kubelet", poll_seconds=0.05).start()
    env = operator_env(api, work, MFED_OPERATOR_WATCH_NAMESPACES=NAMESPACE, **PRODUCTION)
    operator = OperatorProcess(env=env, log_path=work / "operator").start()
    try:
        client = api.client()
        client.create(m.secret(NAMESPACE, "s3-credentials", ACCESS_KEY, SECRET_KEY))
        tasks = (("cls10", "classification", {"num_classes": 10}), ("rot4", "rotation", {}))
        for i in range(sites):
            task, task_type, params = tasks[i % 2]
            client.create(
                m.sitetask(
                    NAMESPACE,
                    f"site-{i:04d}",
                    federation="bench",
                    task=task,
                    task_type=task_type,
                    params=params,
                    shard=i,
                    shards=sites,
                    samples=16,
                    test_samples=16,
                )
            )
        client.create(
            m.federation_round(
                NAMESPACE,
                "bench",
                federation="bench",
                bucket=BUCKET,
                endpoint=seaweed.endpoint,
                training={"method": "task-fedavg", "epochs": 1, "batchSize": 16},
                aggregation={"minSites": sites, "deadlineSeconds": 1800},
                followUpRounds=rounds - 1,
            )
        )
        last = round_names(rounds)[-1]

        def finished() -> bool:
            body = client.get("mfed.dev/v1alpha1", "federationrounds", NAMESPACE, last) or {}
            return (body.get("status") or {}).get("phase") in ("Succeeded", "Failed")

        wait_for(finished, timeout=120 + 3 * sites * rounds, interval=0.5, what=f"round {last} to finish")
        assert operator.process is not None
        peak = rss_mb(operator.process.pid)
        if kubelet.errors:
            raise RuntimeError(f"the bench kubelet failed: {kubelet.errors[:3]}")
        log = api.requests()
    finally:
        operator.stop()
        kubelet.stop()
        api.stop()

    job_round = {str(r.data["metadata"]["name"]): rnd for r in log if (rnd := _post_round(r))}
    names = round_names(rounds)
    done = {n: max(r.at or 0 for r in log if _completes(r) and job_round.get(r.name or "") == n) for n in names}
    succeeded = {n: min(r.at or 0 for r in log if _succeeded(r) == n) for n in names}
    created = {n: max(r.at or 0 for r in log if _post_round(r) == n) for n in names}
    chain_gaps = [created[b] - done[a] for a, b in itertools.pairwise(names)]
    if timeline:  # every write the operator made, to see where a slow reaction went
        t0 = min(r.at or 0 for r in log)
        for r in log:
            if (
                r.plural in ("federationrounds", "jobs")
                and r.method in ("POST", "PATCH")
                and r.token == KUBECONFIG_TOKEN
            ):
                phase = (r.data.get("status") or {}).get("phase") if isinstance(r.data, dict) else None
                print(f"{(r.at or 0) - t0:8.2f} {r.method} {r.plural} {r.name} {r.subresource} {phase}")
        print({n: {"done": done[n] - t0, "succeeded": succeeded[n] - t0, "jobs": created[n] - t0} for n in names})
    done_gaps = [succeeded[n] - done[n] for n in names]
    calls = sum(1 for r in log if r.token == KUBECONFIG_TOKEN and r.params.get("watch") != "true")
    return {
        "chain_p50": float(np.percentile(chain_gaps, 50)),
        "chain_p95": float(np.percentile(chain_gaps, 95)),
        "done_p50": float(np.percentile(done_gaps, 50)),
        "done_p95": float(np.percentile(done_gaps, 95)),
        "calls_per_round": calls / rounds,
        "rss_mb": peak,
    }


def idle(sitetasks: int, rounds: int, work: Path, seaweed: SeaweedFS) -> float:
    """RSS with many SiteTasks and active rounds (each waiting on an init Job nothing runs)."""
    api = KubeAPI().start()
    env = operator_env(api, work, MFED_OPERATOR_WATCH_NAMESPACES=NAMESPACE, **PRODUCTION)
    operator = OperatorProcess(env=env, log_path=work / "operator-idle").start()
    try:
        client = api.client()
        client.create(m.secret(NAMESPACE, "s3-credentials", ACCESS_KEY, SECRET_KEY))
        per = sitetasks // rounds
        for i in range(sitetasks):
            federation = f"fed-{i // per:03d}"
            client.create(
                m.sitetask(
                    NAMESPACE,
                    f"site-{i:04d}",
                    federation=federation,
                    task="cls10",
                    task_type="classification",
                    params={"num_classes": 10},
                    shard=i % per,
                    shards=per,
                )
            )
        for k in range(rounds):
            client.create(
                m.federation_round(
                    NAMESPACE, f"round-{k:03d}", federation=f"fed-{k:03d}", bucket=BUCKET, endpoint=seaweed.endpoint
                )
            )
        wait_for(lambda: len(client.list("batch/v1", "jobs")) >= rounds, timeout=600, interval=1, what="init Jobs")
        assert operator.process is not None
        time.sleep(25)  # a bench, not a test: let two resync ticks pass over every round before reading RSS
        return rss_mb(operator.process.pid)
    finally:
        operator.stop()
        api.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="10,100", help="comma list of site counts (e.g. 10,100,250)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds in the chain (p50/p95 over rounds-1 gaps)")
    parser.add_argument("--timeline", action="store_true", help="print the operator's writes, timed")
    parser.add_argument("--idle-sitetasks", action="store_true", help="also: RSS with 1000 SiteTasks, 100 rounds")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sites.split(",")]
    with tempfile.TemporaryDirectory(prefix="mfed-bench-") as tmp:
        seaweed = SeaweedFS(Path(tmp) / "s3")
        seaweed.start()
        try:
            seaweed.create_bucket(BUCKET)
            print("| sites | chain p50 s | chain p95 s | done->Succeeded p50 s | p95 s | API calls/round | RSS MB |")
            print("|---|---|---|---|---|---|---|")
            results = {}
            for n in sizes:
                r = chain(n, args.rounds, Path(tmp) / f"n{n}", seaweed, args.timeline)
                results[n] = r
                print(
                    f"| {n} | {r['chain_p50']:.2f} | {r['chain_p95']:.2f} | {r['done_p50']:.2f} | {r['done_p95']:.2f}"
                    f" | {r['calls_per_round']:.0f} | {r['rss_mb']:.0f} |",
                    flush=True,
                )
            if args.idle_sitetasks:
                held = idle(1000, 100, Path(tmp), seaweed)
                print(f"idle: 1000 SiteTasks, 100 active rounds: operator RSS {held:.0f} MB")
        finally:
            seaweed.stop()
    n = sizes[-1]
    r = results[n]
    print(
        f"sites={n} overhead_p50_s={r['chain_p50']:.3f} overhead_p95_s={r['chain_p95']:.3f}"
        f" operator_rss_mb={r['rss_mb']:.0f}"
    )


if __name__ == "__main__":
    main()
