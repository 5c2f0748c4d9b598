"""The example plugin (examples/plugin) installed into the test interpreter's environment, and
throw-away plugin distributions on sys.path, both found by the real importlib.metadata."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from mfed import registry
from tests.support.manifests import EXAMPLES

EXAMPLE_PLUGIN = EXAMPLES / "plugin"


def install_example_plugin() -> None:
    """`pip install examples/plugin` into this venv, as a user would (the packaging itself is
    what is tested: its pyproject, its entry points). No index, no dependencies: mfed and torch
    are already there. Subprocesses (the trainer Jobs, the operator) see it too. Built from a copy:
    setuptools leaves build/ and *.egg-info next to the sources it builds."""
    with tempfile.TemporaryDirectory(prefix="mfed-plugin-") as tmp:
        source = Path(tmp) / "plugin"
        shutil.copytree(EXAMPLE_PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        _pip_install(source)
    registry.refresh()


def _pip_install(source: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--force-reinstall",
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )


def fake_distribution(root: Path, name: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
    """A minimal installed distribution under `root` (put `root` on sys.path): METADATA,
    entry_points.txt and its modules, exactly what pip would leave in site-packages."""
    dist = root / f"{name.replace('-', '_')}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
