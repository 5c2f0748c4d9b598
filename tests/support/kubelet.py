"""A test-only kubelet + Job controller: runs each Job's container command as a local process.

It lists Jobs through the API (like a real controller), resolves the container's env (values,
secretKeyRef and configMapKeyRef from the API), runs `command + args` as a subprocess, and
patches the Job's status the way the Job controller does: `active`/`startTime` while running,
then `succeeded` + Complete, or `failed` + retries up to `backoffLimit`, honouring the
`podFailurePolicy` FailJob rule on exit codes and `activeDeadlineSeconds`. Suspended Jobs are
left alone (as with Kueue before admission); deleted Jobs have their process killed.
Volumes, resources and placement are not emulated.

With `image` (a working container of the built trainer image, tests/support/images.py), each Job
runs inside that image with `buildah run` instead of from the test venv: the Job's command and
env only, as the image's user, with a scratch folder as HOME. The container's files are shared
by the Jobs run in it (a node's image cache, not a fresh Pod filesystem each time).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support.images import ENV as IMAGE_ENV
from tests.support.images import Container
from tests.support.kubeapi import ApiError, KubeClient

ExitHook = Callable[[dict[str, Any], int], None]


def _now() -> str:
    return datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Run:
    namespace: str
    name: str
    uid: str
    process: subprocess.Popen[bytes] | None
    started: float
    failed: int = 0
    retry_at: float | None = None
    finished: bool = False
    log: Path | None = None


@dataclass
class Kubelet:
    client: KubeClient
    workdir: Path
    poll_seconds: float = 0.2
    retry_backoff_seconds: float = 0.5
    extra_env: Mapping[str, str] = field(default_factory=dict)
    on_exit: ExitHook | None = None  # called after a process exits, before the status is patched
    image: Container | None = None  # run Jobs in this container of the built trainer image
    _runs: dict[str, _Run] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    started_jobs: list[str] = field(default_factory=list)  # "<ns>/<name>" per process start
    errors: list[str] = field(default_factory=list)

    def start(self) -> Kubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._loop, name="test-kubelet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for run in self._runs.values():
            self._kill(run)

    def logs(self, namespace: str, name: str) -> str:
        run = self._runs.get(f"{namespace}/{name}")
        return run.log.read_text(errors="replace") if run and run.log and run.log.exists() else ""

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # keep going; the test sees the errors
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.poll_seconds)

    def _tick(self) -> None:
        jobs = {
            f"{j['metadata']['namespace']}/{j['metadata']['name']}": j for j in self.client.list("batch/v1", "jobs")
        }
        for key, run in list(self._runs.items()):
            job = jobs.get(key)
            if job is None or job["metadata"].get("uid") != run.uid:
                self._kill(run)  # the Job was deleted: its Pod goes with it
                del self._runs[key]
        for key, job in jobs.items():
            run = self._runs.get(key)
            if run is None:
                if self._done(job) or (job.get("spec") or {}).get("suspend"):
                    continue
                self._runs[key] = self._start(job, None)
                continue
            if run.finished:
                continue
            self._check(job, run)

    @staticmethod
    def _done(job: Mapping[str, Any]) -> bool:
        return any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in (job.get("status") or {}).get("conditions") or []
        )

    # ------------------------------------------------------------------ processes
    def _env(self, namespace: str, container: Mapping[str, Any]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MFED_", "AWS_"))}
        env.update(self._job_env(namespace, container))
        env["HOME"] = env["TMPDIR"] = str(self.workdir)
        return env

    def _job_env(self, namespace: str, container: Mapping[str, Any]) -> dict[str, str]:
        """The container's env as the kubelet resolves it (plus the test's extra_env)."""
        env = dict(self.extra_env)
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = str(var["value"])
                continue
            source = var.get("valueFrom") or {}
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[var["name"]] = self.client.secret_value(namespace, ref["name"], ref["key"])
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                cm = self.client.get("v1", "configmaps", namespace, ref["name"]) or {}
                env[var["name"]] = str((cm.get("data") or {})[ref["key"]])
        return env

    def _start(self, job: Mapping[str, Any], previous: _Run | None) -> _Run:
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        log = self.workdir / f"{namespace}_{name}.log"
        if self.image is not None:
            scratch = self.workdir / f"{namespace}_{name}.home"
            scratch.mkdir(exist_ok=True)
            scratch.chmod(0o777)  # the image's user (uid 10001) writes there
            env = {**self._job_env(namespace, container), "HOME": "/scratch", "TMPDIR": "/scratch"}
            command, process_env = self.image.command(argv, env, volumes=[f"{scratch}:/scratch"]), IMAGE_ENV
        else:
            bindir = os.path.dirname(sys.executable)
            resolved = shutil.which(argv[0], path=bindir + os.pathsep + os.environ.get("PATH", ""))
            if resolved is None:
                raise RuntimeError(f"command {argv[0]!r} of Job {name} not found")
            command, process_env = [resolved, *argv[1:]], self._env(namespace, container)
        handle = log.open("ab")
        process = subprocess.Popen(
            command,
            env=process_env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        handle.close()
        self.started_jobs.append(f"{namespace}/{name}")
        run = _Run(
            namespace=namespace,
            name=name,
            uid=meta.get("uid", ""),
            process=process,
            started=time.monotonic(),
            failed=previous.failed if previous else 0,
            log=log,
        )
        status = {"active": 1, "ready": 1, "startTime": (job.get("status") or {}).get("startTime") or _now()}
        if previous:
            status["failed"] = previous.failed
        self._patch(namespace, name, status)
        return run

    def _check(self, job: Mapping[str, Any], run: _Run) -> None:
        spec = job.get("spec") or {}
        if run.process is None:  # waiting for a retry
            if run.retry_at is not None and time.monotonic() >= run.retry_at:
                self._runs[f"{run.namespace}/{run.name}"] = self._start(job, run)
            return
        deadline = spec.get("activeDeadlineSeconds")
        if deadline is not None and time.monotonic() - run.started > float(deadline):
            self._kill(run)
            self._finish(
                run, failed=True, reason="DeadlineExceeded", message="Job was active longer than specified deadline"
            )
            return
        code = run.process.poll()
        if code is None:
            return
        run.process = None
        if self.on_exit is not None:
            self.on_exit(dict(job), code)
        if code == 0:
            self._finish(run, failed=False)
            return
        run.failed += 1
        if code in self._fail_job_codes(spec):
            self._finish(
                run,
                failed=True,
                reason="PodFailurePolicy",
                message=f"Container trainer for pod {run.name} failed with exit code {code} "
                "matching FailJob rule at index 0",
            )
        elif run.failed > int(spec.get("backoffLimit", 6)):
            self._finish(
                run,
                failed=True,
                reason="BackoffLimitExceeded",
                message=f"Job has reached the specified backoff limit (last exit code {code})",
            )
        else:
            run.retry_at = time.monotonic() + self.retry_backoff_seconds * 2 ** (run.failed - 1)
            self._patch(run.namespace, run.name, {"active": 0, "ready": 0, "failed": run.failed})

    @staticmethod
    def _fail_job_codes(spec: Mapping[str, Any]) -> set[int]:
        codes: set[int] = set()
        for rule in (spec.get("podFailurePolicy") or {}).get("rules") or []:
            exit_codes = rule.get("onExitCodes")
            if rule.get("action") == "FailJob" and exit_codes and exit_codes.get("operator") == "In":
                codes.update(int(v) for v in exit_codes.get("values") or [])
        return codes

    def _finish(self, run: _Run, *, failed: bool, reason: str = "", message: str = "") -> None:
        run.finished = True
        now = _now()
        if failed:
            conditions = [
                {
                    "type": "FailureTarget",
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now,
                },
                {"type": "Failed", "status": "True", "reason": reason, "message": message, "lastTransitionTime": now},
            ]
            status = {"active": 0, "ready": 0, "failed": max(run.failed, 1), "conditions": conditions}
        else:
            conditions = [
                {
                    "type": "SuccessCriteriaMet",
                    "status": "True",
                    "reason": "CompletionsReached",
                    "message": "Reached expected number of succeeded pods",
                    "lastTransitionTime": now,
                },
                {
                    "type": "Complete",
                    "status": "True",
                    "reason": "CompletionsReached",
                    "message": "Reached expected number of succeeded pods",
                    "lastTransitionTime": now,
                },
            ]
            status = {"active": 0, "ready": 0, "succeeded": 1, "completionTime": now, "conditions": conditions}
        self._patch(run.namespace, run.name, status)

    def _patch(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        try:
            self.client.patch("batch/v1", "jobs", namespace, name, {"status": dict(status)}, subresource="status")
        except ApiError as exc:
            if exc.status != 404:
                raise

    @staticmethod
    def _kill(run: _Run) -> None:
        process = run.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
