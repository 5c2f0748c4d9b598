"""The CRDs are documented, and every example and generated object validates against them.

The emulated API does no validation, so the schemas are tested here: examples and generated
objects go through the CRDs' openAPIV3Schema with jsonschema (stricter than the API server:
unknown fields are errors here, where Kubernetes would silently prune them) and their CEL rules
(tests/operator/test_crd_rules.py), and the Jobs the operator builds through the official
Kubernetes schemas (kubernetes-validate). What the API server checks of the CRDs themselves
is in tests/operator/test_crd_structural.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from mfed_operator.domain.chain import build_next_round

from tests.operator.builders import round_body, round_view
from tests.support.cel_validation import strict_schema
from tests.support.manifests import EXAMPLES, load_kustomization

CRDS = Path(__file__).resolve().parents[2] / "crds"
K8S_VERSION = "1.30"


def crd(plural: str) -> dict[str, Any]:
    return dict(yaml.safe_load((CRDS / f"mfed.dev_{plural}.yaml").read_text()))


def validator(plural: str) -> jsonschema.Draft4Validator:
    schema = crd(plural)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(strict_schema(schema))


def schema_nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in (node.get("properties") or {}).items():
        found += schema_nodes(child, f"{path}.{name}")
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(node.get(key), dict):
            found += schema_nodes(node[key], path + suffix)
    return found


@pytest.mark.parametrize("plural", ["sitetasks", "federationrounds"])
def test_crd_schema_is_structural_documented_and_has_no_defaults(plural: str) -> None:
    definition = crd(plural)
    assert definition["spec"]["group"] == "mfed.dev"
    version = definition["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert definition["spec"]["names"]["shortNames"]
    assert version["additionalPrinterColumns"]
    for path, node in schema_nodes(version["schema"]["openAPIV3Schema"]):
        if path == ".metadata":
            # the API server refuses any keyword but `type` there (test_crd_structural.py)
            assert node == {"type": "object"}, f"{plural}.metadata must be exactly {{type: object}}"
            continue
        assert isinstance(node.get("description"), str) and node["description"], f"{plural}{path} lacks a description"
        assert "default" not in node, f"{plural}{path} has a schema default (GitOps drift)"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{plural}{path} has no type"
        for rule in node.get("x-kubernetes-validations") or []:
            assert rule.get("message"), f"{plural}{path}: CEL rule {rule['rule']!r} has no message"


def test_every_example_validates_against_its_crd_or_the_kubernetes_schema() -> None:
    objects = load_kustomization(EXAMPLES / "fashion-mnist")
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == ["FederationRound", "Namespace", "Secret", "SiteTask"]
    assert sum(o["kind"] == "SiteTask" for o in objects) == 8
    assert len({o["spec"]["task"]["name"] for o in objects if o["kind"] == "SiteTask"}) == 4
    rounds = [o for o in objects if o["kind"] == "FederationRound"]
    assert len(rounds) == 1 and rounds[0]["spec"]["followUpRounds"] + 1 == 10
    for obj in objects:
        if obj["kind"] == "SiteTask":
            validator("sitetasks").validate(obj)
        elif obj["kind"] == "FederationRound":
            validator("federationrounds").validate(obj)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_generated_objects_validate_too() -> None:
    validator("federationrounds").validate(round_body())
    next_round = build_next_round(round_view(followUpRounds=3), round_body(followUpRounds=3)["spec"], 1)
    validator("federationrounds").validate(next_round)
    for name in ("site-job", "init-job"):
        import json

        job = json.loads((Path(__file__).parent / "golden" / f"{name}.json").read_text())
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["spec"].pop("storage"), "'storage' is a required property"),
        (lambda s: s["spec"]["training"].update(method="fedprox"), "'fedprox' is not one of"),
        (lambda s: s["spec"].update(federation="Not_A_Dns_Name"), "does not match"),
        (lambda s: s["spec"]["storage"].update(secretAccessKey="inline!"), "Additional properties"),
        (lambda s: s["spec"]["aggregation"].update(minSites=0), "less than the minimum"),
    ],
)
def test_invalid_rounds_are_rejected_by_the_schema(change: Any, message: str) -> None:
    body = round_body()
    change(body)
    errors = [e.message for e in validator("federationrounds").iter_errors(body)]
    assert any(message in e for e in errors), errors
