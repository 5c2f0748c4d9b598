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


def parse(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: FROM, then (keyword, arguments) with continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert match, f"{path}: cannot read FROM {args}"
            stages.append(Stage(base=match.group(1), alias=match.group(2)))
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
def test_python_dependencies_are_pinned_and_the_final_stage_downloads_nothing(image: str) -> None:
    # Reproducible: the build stage resolves with the project's constraints file, and the final
    # stage installs only the wheels built there (--no-index), so two builds install the same
    # versions whatever PyPI holds that day.
    stages = parse(DOCKERFILES[image])
    resolving = [
        r for s in stages[:-1] for r in s.all("RUN") if re.search(r"pip (wheel|install)", r) and "--no-deps" not in r
    ]
    assert resolving, "no build step resolves the dependencies"
    assert all("-c requirements/constraints.txt" in r for r in resolving), resolving
    for run in stages[-1].all("RUN"):
        if re.search(r"\bpip install\b", run):
            assert "--no-index" in run, f"final stage installs from the network: {run}"


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
