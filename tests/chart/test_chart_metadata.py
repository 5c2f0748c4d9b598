"""The chart's metadata, CRD copies and README promises."""

from __future__ import annotations

import re
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

import mfed
from tests.chart.tools import (
    CHART,
    NEWEST_KUBERNETES,
    OLDEST_KUBERNETES,
    REPO,
    Helm,
    load_yaml_docs,
    validate_kubernetes,
)

CHART_YAML = yaml.safe_load((CHART / "Chart.yaml").read_text())
CRD_FILES = sorted((REPO / "crds").glob("*.yaml"))


def test_app_version_is_the_operator_version_in_every_place_it_is_written() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert CHART_YAML["appVersion"] == mfed.__version__ == pyproject["project"]["version"]


def test_the_chart_is_a_v2_application_chart_for_the_kubernetes_versions_it_is_tested_against() -> None:
    assert CHART_YAML["apiVersion"] == "v2" and CHART_YAML["type"] == "application"
    assert CHART_YAML["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", CHART_YAML["version"])
    assert CHART_YAML["kubeVersion"] == f">={OLDEST_KUBERNETES}.0-0"


def test_the_charts_crds_are_byte_identical_to_the_top_level_crds() -> None:
    assert CRD_FILES, "no CRDs in crds/"
    chart_copies = sorted((CHART / "crds").glob("*"))
    assert [p.name for p in chart_copies] == [p.name for p in CRD_FILES], "run `make deploy-manifests`"
    for source, copy in zip(CRD_FILES, chart_copies, strict=True):
        assert copy.read_bytes() == source.read_bytes(), f"{copy} differs from {source}: run `make deploy-manifests`"


@pytest.mark.parametrize("path", CRD_FILES, ids=[p.name for p in CRD_FILES])
def test_each_crd_is_a_valid_apiextensions_v1_object_old_and_new(path: Path) -> None:
    (crd,) = load_yaml_docs(path)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    for version in (OLDEST_KUBERNETES, NEWEST_KUBERNETES):
        validate_kubernetes(crd, version)
    # The operator needs the status subresource on every served version (status patches).
    assert all("status" in (v.get("subresources") or {}) for v in crd["spec"]["versions"] if v["served"])


def test_the_chart_readme_says_helm_upgrade_does_not_upgrade_crds_and_gives_the_command_that_does() -> None:
    readme = (CHART / "README.md").read_text()
    assert "`helm upgrade` does not upgrade CRDs" in readme
    command = "kubectl apply --server-side --force-conflicts -f charts/mfed-operator/crds/"
    assert command in readme
    assert (REPO / command.rsplit(" ", 1)[1]).is_dir()


def test_every_template_helper_is_namespaced_by_the_chart_name() -> None:
    defined = re.findall(r'define "([^"]+)"', (CHART / "templates" / "_helpers.tpl").read_text())
    assert defined
    assert [name for name in defined if not name.startswith("mfed-operator.")] == []
    for template in (CHART / "templates").glob("*"):
        assert "define " not in template.read_text() or template.name == "_helpers.tpl", template


def test_the_packaged_chart_carries_its_crds_schema_and_readme(helm4: Helm, tmp_path: Path) -> None:
    helm4.run("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("mfed-operator-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    expected = {f"mfed-operator/crds/{p.name}" for p in CRD_FILES} | {
        "mfed-operator/Chart.yaml",
        "mfed-operator/values.yaml",
        "mfed-operator/values.schema.json",
        "mfed-operator/README.md",
        "mfed-operator/templates/NOTES.txt",
        "mfed-operator/templates/deployment.yaml",
    }
    assert expected <= names
    assert archive.name == f"mfed-operator-{CHART_YAML['version']}.tgz"
