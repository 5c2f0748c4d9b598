"""Static checks of the two Dockerfiles (no Docker engine here): reproducible, non-root, and they
start a program that exists."""

from __future__ import annotations

import importlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.chart.tools import CHART, REPO

DOCKERFILES = {
    "operator": REPO / "operator" / "Dockerfile",
    "trainer": REPO / "trainer_image" / "Dockerfile",
}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BUILD_TOOLS = re.compile(
    r"\b(build-essential|gcc|g\+\+|clang|make|cmake|git|pip wheel|python -m build|setuptools-scm|-dev)\b"
)
PINNED_TAG = re.compile(r":[^:@/]*\d+\.\d+\.\d+[^:@/]*$")
# Debian numbers its point releases major.minor: debian:12.8 is exact, where python:3.11 is not.
DEBIAN_POINT_RELEASE = re.compile(r"^(docker\.io/)?(library/)?debian:\d+\.\d+(-slim)?$")
DIGEST = re.compile(r"@sha256:[a-f0-9]{64}$")


@dataclass
class Stage:
    base: str
    alias: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def global_args(path: Path) -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults (what FROM may use)."""
    out = {}
    for raw in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        line = raw.strip()
        if line.upper().startswith("FROM "):
            break
        if line.upper().startswith("ARG "):
            name, _, default = line[4:].strip().partition("=")
            out[name] = default
    return out


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: FROM (with global ARG defaults substituted), then (keyword,
    arguments) with continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    defaults = global_args(path)
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            args = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), args)
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert match, f"{path}: cannot read FROM {args}"
            stages.append(Stage(base=match.group(1), alias=match.group(2)))
        elif keyword == "ARG" and not stages:
            continue  # a global ARG, read by global_args
        else:
            assert stages, f"{path}: {keyword} before FROM"
            stages[-1].instructions.append((keyword, " ".join(args.split())))
    return stages


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_base_images_are_pinned_by_exact_version_or_digest(image: str) -> None:
    stages = parse(DOCKERFILES[image])
    aliases = {s.alias for s in stages if s.alias}
    for stage in stages:
        if stage.base in aliases:
            continue  # built from an earlier stage
        assert (not stage.base.endswith(":latest") and ":" in stage.base) or "@" in stage.base, stage.base
        pinned = PINNED_TAG.search(stage.base) or DEBIAN_POINT_RELEASE.match(stage.base) or DIGEST.search(stage.base)
        assert pinned, f"{stage.base} is not pinned to an exact version (x.y.z, a Debian point release) or a digest"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_final_stage_runs_as_a_non_root_user(image: str) -> None:
    final = parse(DOCKERFILES[image])[-1]
    users = final.all("USER")
    assert users, "no USER in the final stage: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    # The user exists in the image: created in the final stage with this uid.
    if user.isdigit():
        assert any(re.search(rf"useradd\b.*--uid {user}\b", run) for run in final.all("RUN")), user


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_build_tools_stay_in_the_build_stage(image: str) -> None:
    stages = parse(DOCKERFILES[image])
    assert len(stages) >= 2, "single-stage build: the build tools end up in the image"
    final = stages[-1]
    for run in final.all("RUN"):
        assert not BUILD_TOOLS.search(run), f"final stage builds something: {run}"
        assert not re.search(r"\b(apt-get|apk|yum|dnf) (install|add)\b", run), (
            f"final stage installs OS packages: {run}"
        )


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_python_packages_come_only_from_the_wheelhouse_at_the_constraints_versions(image: str) -> None:
    # One source of truth: the image installs what requirements/constraints.txt pins (the
    # wheelhouse scripts/build-images.sh makes from it), with the same file as constraints and
    # no index, so a build cannot pick another version; the final stage installs nothing.
    stages = parse(DOCKERFILES[image])
    installs = [
        r for s in stages for r in s.all("RUN") for part in r.split("&&") if re.search(r"\bpip install\b", part)
    ]
    assert installs, "no pip install"
    copies = [c for s in stages for c in s.all("COPY")]
    assert "requirements/constraints.txt /tmp/constraints.txt" in copies
    for run in installs:
        assert "--no-index" in run and "--find-links /tmp/wheels" in run and "-c /tmp/constraints.txt" in run, run
        assert not re.search(r"[A-Za-z0-9_.-]+==\d", run), f"a version written in the Dockerfile: {run}"
    assert not [r for r in stages[-1].all("RUN") if "pip install" in r], "the final stage installs packages"
    assert "--from=install /opt/mfed /opt/mfed" in stages[-1].all("COPY"), "the final stage copies the venv"


def test_the_torch_of_every_image_is_the_release_the_constraints_pin() -> None:
    constraints = dict(
        line.split("==", 1) for line in (REPO / "requirements" / "constraints.txt").read_text().split() if "==" in line
    )
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert "torch==" + constraints["torch"] in extras["trainer"]  # pyproject's pin agrees
    assert not any(d.startswith("torch") for d in extras["operator"] + PYPROJECT["project"]["dependencies"])
    script = (REPO / "scripts" / "build-images.sh").read_text()
    # The CPU wheelhouse resolves torch through the constraints; the CUDA one asks PyTorch's cu128
    # index for the same release (its version read from the constraints file, not written twice).
    assert "TORCH_VERSION=$(sed -n 's/^torch==\\(.*\\)$/\\1/p' requirements/constraints.txt)" in script
    assert "CUDA_INDEX=https://download.pytorch.org/whl/cu128" in script
    assert '"torch==$TORCH_VERSION+cu128"' in script
    assert "torch==" not in "".join(DOCKERFILES[i].read_text() for i in DOCKERFILES)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_entrypoint_is_a_console_script_of_the_package_and_its_function_exists(image: str) -> None:
    final = parse(DOCKERFILES[image])[-1]
    entrypoints = final.all("ENTRYPOINT")
    assert entrypoints, "no ENTRYPOINT"
    command = json.loads(entrypoints[-1])  # exec form: the program gets SIGTERM itself
    assert isinstance(command, list) and command
    scripts = PYPROJECT["project"]["scripts"]
    assert command[0] in scripts, f"{command[0]} is not a console script in pyproject.toml"
    module, _, function = scripts[command[0]].partition(":")
    assert module.split(".")[0] in PYPROJECT["tool"]["setuptools"]["packages"]
    assert callable(getattr(importlib.import_module(module), function))


def test_the_chart_runs_the_operator_as_the_images_user() -> None:
    final = parse(DOCKERFILES["operator"])[-1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert str(values["securityContext"]["runAsUser"]) == final.all("USER")[-1]


def test_the_parser_sees_a_bad_dockerfile_as_bad(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y \\\n  gcc\nENTRYPOINT mfed\n")
    (stage,) = parse(bad)
    assert stage.base == "python:latest" and not PINNED_TAG.search(stage.base)
    assert not PINNED_TAG.search("python:3.11-slim") and not DEBIAN_POINT_RELEASE.match("debian:12-slim")
    assert BUILD_TOOLS.search(stage.all("RUN")[0]) and not stage.all("USER")
