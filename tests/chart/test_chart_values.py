"""values.yaml and values.schema.json: every value documented and typed; typos and wrong types fail
at install time with a message that names them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml

from tests.chart.tools import CHART, RELEASE, Helm, _values_file, validate_kubernetes

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
# Kubernetes objects passed through verbatim: their inner shape is Kubernetes' own, checked on the
# rendered Deployment by test_every_rendered_manifest_is_a_valid_kubernetes_object_old_and_new.
KUBERNETES_PASSTHROUGH = {"affinity.nodeAffinity", "affinity.podAffinity", "affinity.podAntiAffinity"}


def walk_schema(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk_schema(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from walk_schema(node["items"], f"{path}[]")


def leaf_paths(values: Any, schema: dict[str, Any] = SCHEMA, path: str = "") -> Iterator[str]:
    """Paths of the values, descending only where the schema lists properties (not into maps)."""
    properties = schema.get("properties")
    if isinstance(values, dict) and properties and values:
        for key, child in values.items():
            yield from leaf_paths(child, properties.get(key, {}), f"{path}.{key}" if path else key)
    else:
        yield path


BAD_VALUES = [
    ({"watchNamespace": ["a"]}, "watchNamespace"),  # typo at the top
    ({"image": {"tags": "1.0"}}, "tags"),  # typo one level down
    ({"trainer": {"s3": {"endpoints": "http://x"}}}, "endpoints"),  # typo three levels down
    ({"metrics": {"port": "9090"}}, "metrics"),  # a string where an integer belongs
    ({"watchNamespaces": "team-a,team-b"}, "watchNamespaces"),  # a string where a list belongs
    ({"image": {"digest": "a1" * 32}}, "digest"),  # a digest without its algorithm
    ({"operator": {"logLevel": "verbose"}}, "logLevel"),  # not one of the levels
    ({"extraEnv": {"MFED_OPERATOR_LOG_LEVEL": "DEBUG"}}, "MFED_OPERATOR_LOG_LEVEL"),  # bypasses the typed values
    ({"imagePullSecrets": [{"name": "regcred"}]}, "imagePullSecrets"),  # another chart's shape
    ({"operator": {"maxSitesPerRound": 1000}}, "maxSitesPerRound"),  # over the operator's bound
]


@pytest.mark.parametrize(("values", "named"), BAD_VALUES, ids=[name for _, name in BAD_VALUES])
def test_a_bad_value_is_rejected_by_the_schema_with_a_message_naming_it(
    helm: Helm, values: dict[str, Any], named: str
) -> None:
    result = helm.run("template", RELEASE, str(CHART), "--values", str(_values_file(values)), check=False)
    assert result.returncode != 0, f"helm {helm.major} accepted {values}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert named in result.stderr, result.stderr


def test_a_typo_in_a_set_flag_is_rejected_too(helm: Helm) -> None:
    result = helm.run("template", RELEASE, str(CHART), "--set", "metrics.serviceMonitor.enable=true", check=False)
    assert result.returncode != 0 and "enable" in result.stderr


def test_the_default_values_satisfy_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator(SCHEMA).validate(VALUES)


def test_every_object_in_the_schema_forbids_unknown_keys() -> None:
    loose = []
    for path, node in walk_schema(SCHEMA):
        if node.get("type") != "object" and "object" not in (node.get("type") or []):
            continue
        extra = node.get("additionalProperties")
        typed_map = isinstance(extra, dict) and "type" in extra  # labels, annotations, env, quantities
        if extra is not False and not typed_map and path not in KUBERNETES_PASSTHROUGH:
            loose.append(path or "(root)")
    assert loose == []


def test_every_schema_entry_is_described() -> None:
    undescribed = [
        path for path, node in walk_schema(SCHEMA) if path and not path.endswith("[]") and not node.get("description")
    ]
    assert undescribed == []


def test_values_yaml_and_the_schema_name_the_same_values() -> None:
    in_values = set(leaf_paths(VALUES))
    in_schema = {
        path
        for path, node in walk_schema(SCHEMA)
        if path
        and "[]" not in path
        and path not in KUBERNETES_PASSTHROUGH
        and not set(f"{path}.{k}" for k in node.get("properties") or {}) - KUBERNETES_PASSTHROUGH
    }
    assert in_values - in_schema == set(), "in values.yaml but not in the schema"
    assert in_schema - in_values == set(), "in the schema but not in values.yaml (undocumented)"


def test_every_value_has_a_comment_that_starts_with_its_name() -> None:
    lines = VALUES_TEXT.splitlines()
    problems = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9-]*):", line)
        if not match:
            continue
        key = match.group(2)
        # The comment block right above the key, first line first.
        block = []
        above = number - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            block.insert(0, lines[above].strip())
            above -= 1
        if not block or not block[0].startswith(f"# {key} "):
            problems.append(f"line {number + 1}: {key}")
    assert problems == []


def test_value_names_are_camel_case() -> None:
    for path in leaf_paths(VALUES):
        for part in path.split("."):
            assert re.fullmatch(r"[a-z][a-zA-Z0-9]*", part) or part == "ephemeral-storage", path


def test_the_kubernetes_schema_check_itself_rejects_unknown_fields_and_wrong_types() -> None:
    # The manifest validation would prove nothing if it let these through.
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}},
        },
    }
    validate_kubernetes(deployment)
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolcy"):
        validate_kubernetes(typo)
    wrong = json.loads(json.dumps(deployment))
    wrong["spec"]["replicas"] = "one"
    with pytest.raises(AssertionError, match="replicas"):
        validate_kubernetes(wrong)
