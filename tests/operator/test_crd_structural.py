"""Every copy of the CRDs passes what kube-apiserver checks when a CRD is created.

The first CRDs were refused by a real API server (a `description` under the root `metadata`)
while every test passed: the emulated API takes any CRD. tests/support/crd_schema.py restates
the server's structural-schema, extension, printer-column and CEL-cost rules with their sources;
this runs them on the source (crds/), the chart's copy and the plain manifests' copy, so no
install path ships a CRD the server would refuse.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.crd_schema import rule_cost_errors, structural_errors

REPO = Path(__file__).resolve().parents[2]
COPIES = sorted(
    [*REPO.glob("crds/*.yaml"), *REPO.glob("charts/mfed-operator/crds/*.yaml"), *REPO.glob("deploy/crds/*.yaml")]
)


def _crd(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def test_every_install_path_carries_both_crds() -> None:
    names = sorted(str(p.relative_to(REPO)) for p in COPIES)
    assert names == sorted(
        f"{folder}/mfed.dev_{plural}.yaml"
        for folder in ("crds", "charts/mfed-operator/crds", "deploy/crds")
        for plural in ("federationrounds", "sitetasks")
    )


@pytest.mark.parametrize("path", COPIES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_api_server_would_accept_the_crd(path: Path) -> None:
    assert structural_errors(_crd(path)) == []


@pytest.mark.parametrize("path", COPIES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_rule_reads_bounded_values_and_stays_within_the_cost_budget(path: Path) -> None:
    errors, costs = rule_cost_errors(_crd(path))
    assert errors == []
    assert costs and max(costs.values()) < 10_000_000 and sum(costs.values()) < 100_000_000


def _root(crd: dict[str, Any]) -> dict[str, Any]:
    root: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return root


# Each mistake the checker must catch, with what the API server says (the sources are in
# tests/support/crd_schema.py). The first is the one that broke the first install.
MISTAKES = [
    (lambda r: r["properties"]["metadata"].update(description="Standard object metadata."), "must not specify anything other than name and generateName"),
    (lambda r: r["properties"]["spec"]["properties"]["federation"].pop("type"), "must not be empty for specified object fields"),
    (lambda r: r["properties"]["spec"].update(additionalProperties={"type": "string"}), "additionalProperties and properties are mutual exclusive"),
    (lambda r: r["properties"]["status"]["properties"]["conditions"]["items"]["required"].remove("type"), "a list-map key must have a default or be required"),
    (lambda r: r["properties"]["status"]["properties"]["conditions"].pop("x-kubernetes-list-map-keys"), "must not be empty if x-kubernetes-list-type is map"),
    (lambda r: r["properties"]["spec"]["properties"]["federation"].update(default="demo"), "carry no defaults"),
    (lambda r: r["properties"]["spec"]["properties"]["federation"].update({"x-kubernetes-preserve-unknown-fields": False}), "must be true or undefined"),
    (lambda r: r.update(additionalProperties=True), "must not be used at the root"),
    (lambda r: r["properties"]["spec"]["x-kubernetes-validations"][0].update(message="two\nlines"), "must not contain line breaks"),
    (lambda r: r["properties"]["spec"].update(anyOf=[{"type": "object", "required": ["federation"]}]), "anyOf[0].type: Forbidden: must be empty to be structural"),
]  # fmt: skip


@pytest.mark.parametrize(("mistake", "refusal"), MISTAKES)
def test_the_checker_refuses_what_the_api_server_refuses(mistake: Any, refusal: str) -> None:
    crd = copy.deepcopy(_crd(REPO / "crds" / "mfed.dev_sitetasks.yaml"))
    mistake(_root(crd))
    errors = structural_errors(crd)
    assert any(refusal in e for e in errors), errors


def test_a_rule_under_an_unbounded_list_or_reading_an_unbounded_string_is_refused() -> None:
    crd = copy.deepcopy(_crd(REPO / "crds" / "mfed.dev_sitetasks.yaml"))
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    del spec["env"]["maxItems"]
    del spec["data"]["properties"]["pvc"]["properties"]["path"]["maxLength"]
    errors, _ = rule_cost_errors(crd)
    assert any("runs once per element of" in e and "properties[env]" in e for e in errors), errors
    assert any("reads self (a string: add maxLength)" in e and "properties[path]" in e for e in errors), errors


def test_a_rule_reading_a_field_the_schema_does_not_declare_is_refused() -> None:
    crd = copy.deepcopy(_crd(REPO / "crds" / "mfed.dev_sitetasks.yaml"))
    data = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["data"]
    data["x-kubernetes-validations"].append({"rule": "self.demo.shardIndx >= 0", "message": "typo"})
    errors, _ = rule_cost_errors(crd)
    assert any("reads self.demo.shardIndx, which the schema does not declare" in e for e in errors), errors
