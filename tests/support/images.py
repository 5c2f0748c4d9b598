"""Run the built images (scripts/build-images.sh, `make images`) with buildah, no Docker engine.

`buildah run --isolation chroot` shares the host's network, so a container reaches the tests'
SeaweedFS and emulated API on 127.0.0.1. What it is not: a kubelet's Pod. There are no cgroup
limits, and buildah 1.28 has no read-only root filesystem for `run`; the image's files belong to
root, so a process running as the image's user (uid 10001) cannot write them. The tests check
that instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = next(
    line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines() if line.startswith("version = ")
)
TRAINER = f"localhost/mfed-trainer:{VERSION}"
OPERATOR = f"localhost/mfed-operator:{VERSION}"
ENV = {**os.environ, "STORAGE_DRIVER": os.environ.get("STORAGE_DRIVER", "vfs")}


def buildah(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout, env=ENV, check=check)


def require_image(image: str) -> None:
    """The image must be built. Missing: skipped with the reason locally, a failure in CI
    (CI=true, set by .ci/run), where a skipped image test would let a broken Dockerfile through."""
    reason = ""
    try:
        found = buildah("inspect", "--type", "image", image, check=False, timeout=60)
        if found.returncode != 0:
            reason = f"{image} is not built: run `make images` (scripts/build-images.sh ci)"
    except FileNotFoundError:
        reason = "buildah is not installed: run scripts/install-image-tools.sh, then `make images`"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def image_config(image: str) -> dict[str, object]:
    """The OCI image's config (User, Env, Entrypoint), as buildah records it."""
    data = json.loads(buildah("inspect", "--type", "image", image).stdout)
    return dict(data["OCIv1"]["config"])


def image_size_bytes(image: str) -> int:
    """The sum of the image's layers (uncompressed tar sizes, as its manifest in local storage
    records them): what a node stores for it."""
    manifest = json.loads(json.loads(buildah("inspect", "--type", "image", image).stdout)["Manifest"])
    return sum(int(layer["size"]) for layer in manifest["layers"])


@dataclass(frozen=True)
class Container:
    """A working container of an image; `run` starts a process in it as the image's user."""

    name: str
    user: str

    def command(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None, volumes: Sequence[str] = ()
    ) -> list[str]:
        """The buildah command line (for Popen): env as -e pairs, volumes as host:container[:ro]."""
        flags = ["--isolation", "chroot", "--user", self.user]
        for key, value in (env or {}).items():
            flags += ["-e", f"{key}={value}"]
        for volume in volumes:
            flags += ["-v", volume]
        return ["buildah", "run", *flags, self.name, "--", *argv]

    def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        volumes: Sequence[str] = (),
        timeout: float = 300,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv, env, volumes), capture_output=True, text=True, timeout=timeout, env=ENV, input=stdin
        )


@contextmanager
def container(image: str) -> Iterator[Container]:
    """A fresh working container of `image`, always removed."""
    require_image(image)
    name = buildah("from", "--pull-never", image).stdout.strip()
    user = str(image_config(image).get("User") or "0")
    try:
        yield Container(name=name, user=user)
    finally:
        buildah("rm", name, check=False, timeout=120)
