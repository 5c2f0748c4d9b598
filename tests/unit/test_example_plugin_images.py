"""Static checks of the example plugin's Dockerfiles (no Docker engine here): they build FROM
mfed's images given as build arguments, install only the plugin's own wheel without
dependencies or an index, and run as the base image's non-root user."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.chart.test_images import DOCKERFILES, Stage, parse
from tests.support.plugin import EXAMPLE_PLUGIN

IMAGES = {"Dockerfile": "trainer", "Dockerfile.operator": "operator"}


def _args(path: Path) -> dict[str, str]:
    """ARG NAME=default lines before the first FROM (the only ones FROM can use)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("FROM"):
            break
        if match := re.fullmatch(r"ARG (\w+)=(\S+)", line.strip()):
            out[match.group(1)] = match.group(2)
    return out


def _stages(path: Path, tmp: Path) -> list[Stage]:
    """The stages, read by the project's Dockerfile parser once the leading ARGs are set aside."""
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("FROM"))
    body = tmp / path.name
    body.write_text(
        "\n".join(line for line in lines[:first] if not line.startswith("ARG")) + "\n" + "\n".join(lines[first:])
    )
    return parse(body)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_the_plugin_image_builds_from_mfeds_image_as_a_build_argument(name: str, tmp_path: Path) -> None:
    path = EXAMPLE_PLUGIN / name
    args = _args(path)
    stages = _stages(path, tmp_path)
    assert len(stages) == 2, "a build stage for the wheel, a final stage that installs it"
    for stage in stages:
        variable = re.fullmatch(r"\$\{(\w+)\}", stage.base)
        assert variable and variable.group(1) in args, f"FROM {stage.base} is not a declared build argument"
    assert args[variable.group(1)].startswith(f"mfed-{IMAGES[name]}:")


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_the_plugin_is_installed_from_its_wheel_only_and_the_image_keeps_the_bases_user(
    name: str, tmp_path: Path
) -> None:
    path = EXAMPLE_PLUGIN / name
    build, final = _stages(path, tmp_path)
    for copied in [c.split()[0] for c in build.all("COPY")]:
        assert (EXAMPLE_PLUGIN / copied).exists(), copied
    installs = [r for r in final.all("RUN") if "pip install" in r]
    assert installs and all("--no-deps" in r and "--no-index" in r for r in installs), installs
    base_user = parse(DOCKERFILES[IMAGES[name]])[-1].all("USER")[-1]
    assert final.all("USER")[-1] == base_user  # back to mfed's non-root uid after installing as root
    assert not final.all("ENTRYPOINT"), "the base image's entrypoint (mfed-trainer / mfed-operator) stays"
