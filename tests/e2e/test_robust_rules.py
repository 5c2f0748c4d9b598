"""spec.aggregation.rule and normFactor through the real operator, trainer and S3, with one site
of six uploading 100 x its honest delta (well-formed: only the rules can catch it).

Two federations side by side: with the norm screen, the attacker is Rejected (NormOutlier) and the
model is the mean of the others (the numpy oracle); with the median and no screen, the attacker is
aggregated and the model is the numpy coordinate median, which stays near the honest sites' mean
while the plain mean of the same uploads is pulled far away (the honest comparison).

What this does not check: attackers who scale by less than normFactor, or collude (a median of
three resists one attacker per task group, not two).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from tests.e2e.conftest import Cluster, check_global_model, uploads_from_s3
from tests.e2e.oracle import Contribution, assert_models_equal, expected_global, tensors
from tests.e2e.test_failures import _rewrite_delta, new_round, sites

pytestmark = pytest.mark.slow
SCALE = 100.0


def _federation(cluster: Cluster, tag: str) -> None:
    sites(
        cluster,
        tag,
        [(f"{tag}-cls10-{i}", "cls10", "classification") for i in "abc"]
        + [(f"{tag}-rot4-{i}", "rot4", "rotation") for i in "abc"],
    )


def _median_oracle(base: dict[str, np.ndarray], uploads: list[Any]) -> dict[str, np.ndarray]:
    """np.median within each task group, then across the groups, per coordinate."""
    groups: dict[str, list[Any]] = {}
    for u in uploads:
        groups.setdefault(u.manifest["task"], []).append(u)
    out = {}
    for key, value in base.items():
        if key.startswith("encoder."):
            per_group = [
                np.median(np.stack([u.delta[key] for u in g]).astype(np.float64), axis=0) for g in groups.values()
            ]
            out[key] = (value + np.median(np.stack(per_group), axis=0)).astype(np.float32)
            continue
        _, task, part, rest = key.split(".", 3)
        values = np.stack([(u.decoder if part == "decoder" else u.delta)[f"{part}.{rest}"] for u in groups[task]])
        median = np.median(values.astype(np.float64), axis=0)
        out[key] = (median if part == "decoder" else value + median).astype(np.float32)
    return out


def test_one_scaled_site_is_screened_out_or_outvoted_by_the_median(cluster: Cluster) -> None:
    cluster.secret()
    for tag in ("screen", "median"):
        _federation(cluster, tag)

    def attack(job: dict[str, Any], code: int) -> None:
        site = job["metadata"]["labels"].get("mfed.dev/site", "")
        if code == 0 and site.endswith("-cls10-c"):
            tag = site.split("-")[0]
            prefix = f"s3://mfed/federations/{tag}/{tag}-round/sites/{site}"
            _rewrite_delta(cluster, prefix, lambda t: {k: (SCALE * v).astype(np.float32) for k, v in t.items()})

    cluster.kubelet.on_exit = attack
    new_round(cluster, "screen-round", "screen", aggregation={"normFactor": 3, "minSites": 5, "deadlineSeconds": 300})
    new_round(cluster, "median-round", "median", aggregation={"rule": "median", "minSites": 6, "deadlineSeconds": 300})

    screened = cluster.wait_phase("screen-round", "Succeeded", "Failed", timeout=240)
    assert screened["phase"] == "Succeeded", screened
    attacker = next(s for s in screened["sites"] if s["site"] == "screen-cls10-c")
    assert (attacker["phase"], attacker["reason"]) == ("Rejected", "NormOutlier"), attacker
    assert "median norm" in attacker["message"]
    assert sum(s["phase"] == "Accepted" for s in screened["sites"]) == 5
    check_global_model(cluster, screened)  # the mean of the five honest sites

    median = cluster.wait_phase("median-round", "Succeeded", "Failed", timeout=240)
    assert median["phase"] == "Succeeded", median
    assert all(s["phase"] == "Accepted" for s in median["sites"])  # no screen: the attacker is in
    manifest = json.loads(cluster.s3_object(median["globalModel"]["uri"] + "/manifest.json"))
    assert manifest["aggregation"]["robust"] == {"rule": "median"}
    base = tensors(cluster.s3_object(median["baseModel"]["uri"] + "/model.safetensors"))
    model = tensors(cluster.s3_object(median["globalModel"]["uri"] + "/model.safetensors"))
    uploads = uploads_from_s3(cluster, median)
    assert_models_equal(model, _median_oracle(base, uploads))

    def contributions(us: list[Any]) -> list[Contribution]:
        return [
            Contribution(task=u.manifest["task"], samples=int(u.manifest["samples"]), delta=u.delta, decoder=u.decoder)
            for u in us
        ]

    honest = expected_global(base, contributions([u for u in uploads if not u.manifest["site"].endswith("-cls10-c")]))
    plain = expected_global(base, contributions(uploads))
    key = (
        "encoder.stages.0.0.weight"
        if "encoder.stages.0.0.weight" in base
        else sorted(k for k in base if k.startswith("encoder."))[0]
    )
    off_median = float(np.abs(model[key] - honest[key]).max())
    off_mean = float(np.abs(plain[key] - honest[key]).max())
    assert off_mean > 10 * off_median, (off_mean, off_median)


def test_a_sign_flipped_site_is_refused_by_the_direction_screen(cluster: Cluster) -> None:
    """The screen compares each site with the median of every OTHER site's shared-encoder update
    (all task groups), so it also works where a group has too few sites to outvote one.

    What this does not check: a site whose update points the same way as everyone's but was
    trained on wrong labels (its direction is honest; docs/results.md section 9)."""
    cluster.secret()
    _federation(cluster, "flip")

    def attack(job: dict[str, Any], code: int) -> None:
        site = job["metadata"]["labels"].get("mfed.dev/site", "")
        if code == 0 and site == "flip-cls10-c":
            prefix = f"s3://mfed/federations/flip/flip-round/sites/{site}"
            _rewrite_delta(cluster, prefix, lambda t: {k: (-v).astype(np.float32) for k, v in t.items()})

    cluster.kubelet.on_exit = attack
    new_round(cluster, "flip-round", "flip", aggregation={"minCosine": 0, "minSites": 5, "deadlineSeconds": 300})
    status = cluster.wait_phase("flip-round", "Succeeded", "Failed", timeout=240)
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    by_site = {s["site"]: s for s in status["sites"]}
    assert (by_site["flip-cls10-c"]["phase"], by_site["flip-cls10-c"]["reason"]) == ("Rejected", "DirectionOutlier")
    assert "cosine" in by_site["flip-cls10-c"]["message"]
    assert sum(s["phase"] == "Accepted" for s in status["sites"]) == 5
    check_global_model(cluster, status)  # the mean of the five it kept
