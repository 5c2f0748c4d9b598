"""Running the operator against the emulated API: in-process (KopfRunner) or as a real process."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kopf.testing import KopfRunner
from mfed_operator.config import OperatorConfig
from mfed_operator.handlers import register

from tests.support.kubeapi import KubeAPI
from tests.support.ports import free_ports


def operator_env(api: KubeAPI, tmp: Path, **overrides: str) -> dict[str, str]:
    """MFED_OPERATOR_* settings for tests: fast resync, short grace, loopback ports."""
    metrics, health = free_ports(2)
    env = {
        "MFED_OPERATOR_KUBECONFIG": str(api.write_kubeconfig(tmp / "kubeconfig.yaml")),
        "MFED_OPERATOR_RESYNC_SECONDS": "0.3",
        "MFED_OPERATOR_VALIDATION_GRACE_SECONDS": "2",
        "MFED_OPERATOR_METRICS_PORT": str(metrics),
        "MFED_OPERATOR_HEALTH_PORT": str(health),
        "MFED_OPERATOR_HEALTH_HOST": "127.0.0.1",
        "MFED_OPERATOR_METRICS_HOST": "127.0.0.1",
        "MFED_OPERATOR_API_RETRY_DELAY_SECONDS": "0.5",
        "MFED_OPERATOR_STORAGE_RETRY_BASE_SECONDS": "0.5",
        "MFED_OPERATOR_STORAGE_RETRY_MAX_SECONDS": "2",
        "MFED_OPERATOR_S3_CONNECT_TIMEOUT_SECONDS": "1",
        "MFED_OPERATOR_S3_READ_TIMEOUT_SECONDS": "3",
        "MFED_OPERATOR_S3_MAX_ATTEMPTS": "1",
        "MFED_OPERATOR_TRAINER_IMAGE": "registry.example/mfed-trainer:test",
    }
    env.update(overrides)
    return env


@contextmanager
def operator_in_thread(env: Mapping[str, str], namespace: str) -> Iterator[KopfRunner]:
    """kopf's KopfRunner in a thread, with our registry and a config built from `env`."""
    config = OperatorConfig.from_env(env)
    registry = kopf.OperatorRegistry()
    register(registry, config)
    runner = KopfRunner(
        ["run", "--standalone", "--namespace", namespace, "--liveness", config.liveness_endpoint],
        registry=registry,
        timeout=60,
    )
    with runner:
        yield runner
    # kopf's runner stops its event loop with aiohttp sessions still open (its watch streams are
    # cancelled, not closed); their ResourceWarnings would surface, as errors, in whatever test
    # the garbage collector happens to run next. Collect them here, where they belong, silenced:
    # the operator process proper exits instead, and no test here checks kopf's socket hygiene.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@dataclass
class OperatorProcess:
    """`mfed-operator` as a real process (so a test can SIGKILL it mid-flight)."""

    env: Mapping[str, str]
    log_path: Path
    # The module run with `python -m`: the image's entrypoint, or tests.support.incluster_operator
    # (the same, logging in from ServiceAccount files as in a Pod).
    module: str = "mfed_operator.main"
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    def start(self) -> OperatorProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MFED_", "KUBERNETES_SERVICE_", "KUBECONFIG"))}
        env.update(self.env)
        self.starts += 1
        log = self.log_path.with_suffix(f".{self.starts}.log")
        self.logs.append(log)
        handle = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, like a node loss or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


def job_names(api: KubeAPI, namespace: str) -> list[str]:
    return sorted(j["metadata"]["name"] for j in api.client().list("batch/v1", "jobs", namespace))


def round_status(api: KubeAPI, namespace: str, name: str) -> dict[str, Any]:
    body = api.client().get("mfed.dev/v1alpha1", "federationrounds", namespace, name) or {}
    return dict(body.get("status") or {})
