"""The install docs can be copied and pasted: their commands name files that exist and values the
chart accepts, their manifests point at real paths, and their kustomize overlay renders."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from mfed_operator.config import OperatorConfig

from tests.chart.tools import CHART, DEPLOY, REPO, Helm, env_of, validate_kubernetes

DOCS = {
    "README.md": REPO / "README.md",
    "docs/install.md": REPO / "docs" / "install.md",
    "charts/mfed-operator/README.md": CHART / "README.md",
}
KUBECTL = Path(sys.executable).parent / "kubectl"
REPO_PATHS = re.compile(r"(?<![\w/.-])((?:charts|deploy|crds|examples|operator|trainer_image|docs)/[\w./-]*)")


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def commands(text: str) -> list[list[str]]:
    """The shell commands of the bash blocks, continuations joined, comments dropped."""
    out = []
    for block in blocks(text, "bash"):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_repository_path_the_docs_name_exists(doc: str) -> None:
    text = DOCS[doc].read_text()
    if doc == "README.md":  # only the install section: the rest of the README is not about installing
        text = text[text.index("<!-- install:start") : text.index("<!-- install:end -->")]
    missing = sorted({p.rstrip(".") for p in REPO_PATHS.findall(text) if not (REPO / p.rstrip(".")).exists()})
    assert missing == []


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_helm_install_in_the_docs_renders_with_the_chart(helm: Helm, doc: str) -> None:
    installs = [c for c in commands(DOCS[doc].read_text()) if c[:2] in (["helm", "install"], ["helm", "upgrade"])]
    for command in installs:
        args = [a for a in command[2:] if a not in ("--create-namespace", "--reuse-values")]
        result = helm.run("template", *args, check=False)
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
        deployment = next(d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "Deployment")
        OperatorConfig.from_env(env_of(deployment))


def test_the_docs_show_helm_installs_to_check() -> None:
    # The test above would pass on docs without any helm command; these have some.
    for doc in ("README.md", "docs/install.md", "charts/mfed-operator/README.md"):
        assert any(c[:2] == ["helm", "install"] for c in commands(DOCS[doc].read_text())), doc


def test_the_readme_shows_make_pilot_first_and_the_three_install_paths_below_the_quick_start() -> None:
    text = DOCS["README.md"].read_text()
    first_command = commands(text)[0]
    assert first_command[:2] == ["make", "pilot"]
    start, end = text.index("<!-- install:start"), text.index("<!-- install:end -->")
    assert text.index("## Quick start") < start < end
    section = text[start:end]
    assert "helm install mfed-operator charts/mfed-operator" in section
    assert "kubectl apply --server-side -k deploy/" in section
    assert "argocd" in section.lower() and "flux" in section.lower()
    assert "docs/install.md" in section


def test_the_gitops_manifests_in_the_docs_point_at_the_chart_and_deploy() -> None:
    docs = [d for b in blocks(DOCS["docs/install.md"].read_text(), "yaml") for d in yaml.safe_load_all(b) if d]
    kinds = {d.get("kind") for d in docs}
    assert {"Application", "GitRepository", "Kustomization", "HelmRelease"} <= kinds
    application = next(d for d in docs if d.get("kind") == "Application")
    assert (REPO / application["spec"]["source"]["path"] / "Chart.yaml").exists()
    values = application["spec"]["source"]["helm"]["valuesObject"]
    flux = next(d for d in docs if d.get("kind") == "Kustomization" and d["apiVersion"].startswith("kustomize.toolkit"))
    assert (REPO / flux["spec"]["path"] / "kustomization.yaml").exists()
    release = next(d for d in docs if d.get("kind") == "HelmRelease")
    assert (REPO / release["spec"]["chart"]["spec"]["chart"] / "Chart.yaml").exists()
    assert release["spec"]["upgrade"]["crds"] == "CreateReplace"
    # The values in the GitOps manifests are ones the chart's schema accepts.
    schema = json.loads((CHART / "values.schema.json").read_text())
    for given in (values, release["spec"]["values"]):
        jsonschema.Draft7Validator(schema).validate(given)


def test_the_kustomize_overlay_in_the_docs_renders_the_install_with_its_images(tmp_path: Path) -> None:
    text = DOCS["docs/install.md"].read_text()
    block = re.search(r"<!-- test: kustomize-overlay -->\n```yaml\n(.*?)```", text, re.S)
    assert block, "the overlay example lost its test marker"
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    overlay = yaml.safe_load(block.group(1))
    overlay["resources"] = ["../deploy"]  # the docs' placeholder path to this repository
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    result = subprocess.run([str(KUBECTL), "kustomize", str(tmp_path / "overlay")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(result.stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    validate_kubernetes(deployment)
    assert deployment["metadata"]["namespace"] == overlay["namespace"]
    pod = deployment["spec"]["template"]["spec"]
    image = overlay["images"][0]
    assert pod["containers"][0]["image"] == f"{image['newName']}@{image['digest']}"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    config = OperatorConfig.from_env(env_of(deployment))
    assert config.trainer_image.startswith("registry.example.com/mfed/mfed-trainer@sha256:")
