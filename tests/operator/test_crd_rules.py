"""Every CEL validation rule of the CRDs, compiled and evaluated, on valid and invalid resources.

The emulated API validates nothing, so this is where an invalid SiteTask or FederationRound is
refused as kube-apiserver refuses it on `kubectl apply`: the openAPIV3Schema (jsonschema) and
each `x-kubernetes-validations` rule run by a real CEL implementation (tests/support/
cel_validation.py says how rules are bound and what is not reproduced). Each case asserts the
one error it causes, with the field it names and the fix its message gives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cel_validation import CRDValidator, rules_of
from tests.support.manifests import EXAMPLES, load_kustomization

CRDS = Path(__file__).resolve().parents[2] / "crds"
Change = Callable[[dict[str, Any]], Any]


def _validator(plural: str) -> CRDValidator:
    return CRDValidator(yaml.safe_load((CRDS / f"mfed.dev_{plural}.yaml").read_text()))


VALIDATORS = {"SiteTask": _validator("sitetasks"), "FederationRound": _validator("federationrounds")}
EXAMPLE_OBJECTS = [o for o in load_kustomization(EXAMPLES / "fashion-mnist") if o["kind"] in VALIDATORS]


def _example(kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(o for o in EXAMPLE_OBJECTS if o["kind"] == kind))


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    change: Change
    path: str  # the field the error names
    message: str  # a part of the message: what is wrong and the fix
    old_change: Change | None = None  # an update: the object before it, changed by this from the example

    def objects(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        new = _example(self.kind)
        self.change(new)
        if self.old_change is None:
            return new, None
        old = _example(self.kind)
        self.old_change(old)
        return new, old


def _set(path: str, value: Any) -> Change:
    def change(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = obj
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return change


def _drop(path: str) -> Change:
    def change(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = obj
        for part in parents:
            node = node[part]
        del node[last]

    return change


def _both(*changes: Change) -> Change:
    def change(obj: dict[str, Any]) -> None:
        for c in changes:
            c(obj)

    return change


def _unchanged(obj: dict[str, Any]) -> None:
    return None


ENV_VALUE = {"name": "X", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
BOTH_REFS = {"secretKeyRef": {"name": "s", "key": "k"}, "configMapKeyRef": {"name": "c", "key": "k"}}
ST, FR = "SiteTask", "FederationRound"
CASES = [
    # SiteTask: CEL rules
    Case("site name over 63 characters", ST, _set("metadata.name", "s" * 75), "(root)", "metadata.name is the site name and must be at most 63 characters"),
    Case("two data sources", ST, _set("spec.data.s3", {"uri": "s3://b/k.npz"}), "spec.data", "set exactly one of spec.data.demo"),
    Case("no data source", ST, _set("spec.data", {}), "spec.data", "set exactly one of spec.data.demo"),
    Case("shard index past the count", ST, _set("spec.data.demo.shardIndex", 8), "spec.data.demo", "shardIndex must be smaller than shardCount"),
    Case("pvc path with ..", ST, _set("spec.data", {"pvc": {"claimName": "c", "path": "a/../../etc/x.npz"}}), "spec.data.pvc.path", "must stay inside the volume; remove '..'"),
    Case("pvc test path with ..", ST, _set("spec.data", {"pvc": {"claimName": "c", "path": "a.npz", "testPath": "../t.npz"}}), "spec.data.pvc.testPath", "spec.data.pvc.testPath must stay inside the volume"),
    Case("index outside the image folder", ST, _set("spec.data", {"pvc": {"claimName": "c", "path": "img", "format": "image-folder", "index": "../x.csv"}}), "spec.data.pvc.index", "must stay inside the image folder"),
    Case("an index for an .npz", ST, _set("spec.data", {"pvc": {"claimName": "c", "path": "a.npz", "index": "x.csv"}}), "spec.data.pvc", "spec.data.pvc.index applies to format image-folder only"),
    Case("a typo'd flip", ST, _set("spec.data.augment", {"flip": "sideways"}), "spec.data.augment.flip", "'sideways' is not one of"),
    Case("a plugin format without its reader", ST, _set("spec.data", {"pvc": {"claimName": "c", "path": "d", "format": "plugin"}}), "spec.data.pvc", "spec.data.pvc.dataset names the mfed.datasets reader"),
    Case("skipping bad records of an .npz", ST, _set("spec.data", {"pvc": {"claimName": "c", "path": "a.npz", "onBadRecord": "skip"}}), "spec.data.pvc", "apply to format image-folder or tar-shards"),
    Case("a shard cache for an S3 .npz", ST, _set("spec.data", {"s3": {"uri": "s3://b/a.npz", "cacheMiB": 64}}), "spec.data.s3", "cacheMiB apply to format image-folder or tar-shards"),
    Case("an index for S3 shards", ST, _set("spec.data", {"s3": {"uri": "s3://b/shards", "format": "tar-shards", "index": "x.csv"}}), "spec.data.s3", "spec.data.s3.index applies to format image-folder only"),
    Case("an S3 index outside the prefix", ST, _set("spec.data", {"s3": {"uri": "s3://b/img", "format": "image-folder", "index": "../x.csv"}}), "spec.data.s3.index", "must stay under the prefix"),
    Case("env sets MFED_SPEC", ST, _set("spec.env", [{"name": "MFED_SPEC", "value": "{}"}]), "spec.env", "must not set MFED_SPEC, MFED_S3_* or AWS_*"),
    Case("env sets AWS credentials", ST, _set("spec.env", [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]), "spec.env", "(the operator sets them from the FederationRound); remove those entries"),
    Case("env entry with value and valueFrom", ST, _set("spec.env", [ENV_VALUE]), "spec.env[0]", "set exactly one of value or valueFrom"),
    Case("env entry with neither", ST, _set("spec.env", [{"name": "X"}]), "spec.env[0]", "set exactly one of value or valueFrom"),
    Case("env valueFrom with two refs", ST, _set("spec.env", [{"name": "X", "valueFrom": BOTH_REFS}]), "spec.env[0].valueFrom", "set exactly one of secretKeyRef or configMapKeyRef"),
    Case("federation changed", ST, _set("spec.federation", "other"), "spec", "spec.federation is immutable; delete this SiteTask and create one", _unchanged),
    Case("task changed", ST, _set("spec.task.name", "cls100"), "spec", "spec.task.name is immutable; a site that changes task must be a new SiteTask", _unchanged),
    # SiteTask: schema
    Case("no federation", ST, _drop("spec.federation"), "spec", "'federation' is a required property"),
    Case("no task", ST, _drop("spec.task"), "spec", "'task' is a required property"),
    Case("typo'd toleration operator", ST, _set("spec.placement", {"tolerations": [{"key": "gpu", "operator": "Equals"}]}), "spec.placement.tolerations[0].operator", "'Equals' is not one of ['Exists', 'Equal']"),
    Case("negative shard index", ST, _set("spec.data.demo.shardIndex", -1), "spec.data.demo.shardIndex", "-1 is less than the minimum of 0"),
    Case("too many GPUs", ST, _set("spec.resources.gpu", 17), "spec.resources.gpu", "17 is greater than the maximum of 16"),
    Case("federation not a DNS label", ST, _set("spec.federation", "Fashion_MNIST"), "spec.federation", "does not match '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'"),
    # FederationRound: CEL rules
    Case("two initial models", FR, _set("spec.initialModel.fromRound", "r0"), "spec.initialModel", "set exactly one of spec.initialModel.seed"),
    Case("no initial model", FR, _set("spec.initialModel", {}), "spec.initialModel", "set exactly one of spec.initialModel.seed"),
    Case("depth sharing without a depth", FR, _drop("spec.encoder.sharing.depth"), "spec.encoder.sharing", "spec.encoder.sharing.depth is required with mode depth"),
    Case("a depth with mode all", FR, _set("spec.encoder.sharing.mode", "all"), "spec.encoder.sharing", "and not allowed otherwise"),
    Case("prefixes mode without prefixes", FR, _set("spec.encoder.sharing", {"mode": "prefixes"}), "spec.encoder.sharing", "spec.encoder.sharing.prefixes must list parameter prefixes with mode prefixes"),
    Case("In without values", FR, _set("spec.siteSelector.matchExpressions", [{"key": "k", "operator": "In"}]), "spec.siteSelector.matchExpressions[0]", "values must be non-empty for In/NotIn"),
    Case("Exists with values", FR, _set("spec.siteSelector.matchExpressions", [{"key": "k", "operator": "Exists", "values": ["a"]}]), "spec.siteSelector.matchExpressions[0]", "empty for Exists/DoesNotExist"),
    Case("round federation changed", FR, _set("spec.federation", "other"), "spec", "spec.federation is immutable; create a new FederationRound instead", _unchanged),
    Case("round number set later", FR, _set("spec.round", 3), "spec", "spec.round is immutable", _unchanged),
    Case("site selector changed", FR, _set("spec.siteSelector", {}), "spec", "spec.siteSelector is immutable once the round exists", _unchanged),
    Case("encoder changed", FR, _set("spec.encoder.name", "resnet"), "spec", "spec.encoder is immutable; create a new FederationRound (or chain)", _unchanged),
    Case("training changed", FR, _set("spec.training.epochs", 2), "spec", "spec.training is immutable once the round exists", _unchanged),
    Case("storage changed", FR, _set("spec.storage.bucket", "other-bucket"), "spec", "spec.storage is immutable; create a new FederationRound", _unchanged),
    Case("initial model changed", FR, _set("spec.initialModel.seed", 1), "spec", "spec.initialModel is immutable", _unchanged),
    Case("weighting changed", FR, _set("spec.aggregation.weighting", "samples"), "spec", "spec.aggregation.weighting is immutable once the round exists (it decides the model)", _unchanged),
    Case("level-2 rule added later", FR, _set("spec.aggregation.level2Rule", "cagrad"), "spec", "spec.aggregation.level2Rule is immutable once the round exists", _unchanged),
    Case("CAGrad radius changed", FR, _set("spec.aggregation.cagradC", 0.5), "spec", "spec.aggregation.cagradC is immutable", _set("spec.aggregation.cagradC", 0.4)),
    Case("gate threshold removed", FR, _unchanged, "spec", "spec.aggregation.gateThreshold is immutable", _set("spec.aggregation.gateThreshold", 0.1)),
    Case("robust rule added later", FR, _set("spec.aggregation.rule", "median"), "spec", "spec.aggregation.rule is immutable once the round exists", _unchanged),
    Case("trim changed", FR, _set("spec.aggregation.trim", 0.3), "spec", "spec.aggregation.trim is immutable", _set("spec.aggregation.trim", 0.2)),
    Case("norm screen dropped", FR, _unchanged, "spec", "spec.aggregation.normFactor is immutable", _set("spec.aggregation.normFactor", 3)),
    Case("direction screen loosened", FR, _set("spec.aggregation.minCosine", -0.5), "spec", "spec.aggregation.minCosine is immutable", _set("spec.aggregation.minCosine", 0)),
    Case("a cosine of 1", FR, _set("spec.aggregation.minCosine", 1), "spec.aggregation.minCosine", "greater than or equal to the maximum of 1"),
    Case("privacy loosened mid-round", FR, _set("spec.privacy", {"clipNorm": 1.0, "noiseMultiplier": 0.5}), "spec", "spec.privacy is immutable once the round exists", _set("spec.privacy", {"clipNorm": 1.0, "noiseMultiplier": 1.0})),
    Case("privacy without noise", FR, _set("spec.privacy", {"clipNorm": 1.0, "noiseMultiplier": 0}), "spec.privacy.noiseMultiplier", "less than or equal to the minimum of 0"),
    Case("privacy without a clip norm", FR, _set("spec.privacy", {"noiseMultiplier": 1.0}), "spec.privacy", "'clipNorm' is a required property"),
    Case("a typo'd robust rule", FR, _set("spec.aggregation.rule", "medain"), "spec.aggregation.rule", "'medain' is not one of"),
    Case("baselines changed", FR, _set("spec.evaluation", {"baselines": []}), "spec.evaluation", "spec.evaluation is immutable once the round exists", _set("spec.evaluation", {"baselines": ["local"]})),
    # FederationRound: schema
    Case("typo'd baseline", FR, _set("spec.evaluation", {"baselines": ["locl"]}), "spec.evaluation.baselines[0]", "'locl' is not one of ['local']"),
    Case("no storage", FR, _drop("spec.storage"), "spec", "'storage' is a required property"),
    Case("typo'd method", FR, _set("spec.training.method", "fedprox"), "spec.training.method", "'fedprox' is not one of"),
    Case("negative follow-up rounds", FR, _set("spec.followUpRounds", -1), "spec.followUpRounds", "-1 is less than the minimum of 0"),
    Case("a quorum of zero", FR, _set("spec.aggregation.minSites", 0), "spec.aggregation.minSites", "0 is less than the minimum of 1"),
    Case("inline credentials", FR, _set("spec.storage.secretAccessKey", "inline!"), "spec.storage", "Additional properties are not allowed ('secretAccessKey' was unexpected)"),
    Case("too many label values", FR, _set("spec.siteSelector.matchExpressions", [{"key": "k", "operator": "In", "values": [str(i) for i in range(33)]}]), "spec.siteSelector.matchExpressions[0].values", "is too long"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_an_invalid_resource_is_refused_naming_the_field_and_the_fix(case: Case) -> None:
    new, old = case.objects()
    errors = VALIDATORS[case.kind].errors(new, old)
    assert len(errors) == 1, errors
    path, _, message = errors[0].partition(": ")
    assert path == case.path and case.message in message, errors[0]


def test_there_are_at_least_25_invalid_resources_and_every_rule_is_broken_by_one() -> None:
    assert len(CASES) >= 25
    broken = set()
    for case in CASES:
        for error in VALIDATORS[case.kind].errors(*case.objects()):
            broken.add(error.partition(": Invalid value: ")[2].partition(": ")[2])
    rules = {rule.message for validator in VALIDATORS.values() for rule in validator.rules}
    assert rules - broken == set()


@pytest.mark.parametrize("obj", EXAMPLE_OBJECTS, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_example_is_accepted_on_create_and_on_an_unchanged_update(obj: dict[str, Any]) -> None:
    validator = VALIDATORS[obj["kind"]]
    assert validator.errors(obj) == []
    assert validator.errors(obj, copy.deepcopy(obj)) == []


def test_every_rule_compiles_and_the_validators_hold_all_of_them() -> None:
    for kind, plural in ((ST, "sitetasks"), (FR, "federationrounds")):
        schema = yaml.safe_load((CRDS / f"mfed.dev_{plural}.yaml").read_text())["spec"]["versions"][0]
        declared = list(rules_of(schema["schema"]["openAPIV3Schema"]))
        assert len(VALIDATORS[kind].rules) == len(declared) > 0


def test_a_mutable_field_may_change_on_update() -> None:
    new, old = _example(FR), _example(FR)
    new["spec"]["followUpRounds"] = 3
    new["spec"]["aggregation"]["minSites"] = 4
    assert VALIDATORS[FR].errors(new, old) == []


def test_transition_rules_do_not_run_on_create() -> None:
    # immutability rules read oldSelf: on create there is none, so a fresh object is never "changed"
    obj = _example(FR)
    obj["spec"]["aggregation"]["level2Rule"] = "cagrad"
    assert VALIDATORS[FR].errors(obj) == []


def _both_sources(obj: dict[str, Any]) -> None:
    _both(_set("spec.data.s3", {"uri": "s3://b/k.npz"}), _set("spec.data.pvc", {"claimName": "c", "path": "x.npz"}))(
        obj
    )


def test_three_data_sources_are_refused_by_the_same_rule() -> None:
    obj = _example(ST)
    _both_sources(obj)
    errors = VALIDATORS[ST].errors(obj)
    assert len(errors) == 1 and errors[0].startswith("spec.data: ") and "set exactly one of" in errors[0]
