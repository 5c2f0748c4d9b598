"""The recommended cross-task method (`method: auto`) through the real operator, trainer and S3:
one site per task, two chained rounds. The global models are recomputed in numpy from the
uploads (two tracks per site, task-level copies, CAGrad weights found by brute force)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from mfed.learning.protection import MIN_CHOICE_SAMPLES
from tests.e2e.conftest import Cluster, uploads_from_s3
from tests.e2e.oracle import (
    TwoTrackContribution,
    assert_models_equal,
    cagrad_by_grid,
    expected_global_two_track,
    tensors,
)
from tests.e2e.test_federation import scaled_down_example

pytestmark = pytest.mark.slow
SITES = ("cls10-a", "rot4-a")


def auto_federation(cluster: Cluster) -> list[dict[str, Any]]:
    objects = []
    for obj in scaled_down_example(cluster):
        if obj["kind"] == "SiteTask" and obj["metadata"]["name"] not in SITES:
            continue
        if obj["kind"] == "FederationRound":
            obj["spec"]["training"] = {"method": "auto", "batchSize": 32}
            obj["spec"]["encoder"].pop("sharing", None)
            obj["spec"]["aggregation"]["minSites"] = 2
        objects.append(obj)
    return objects


def two_track_uploads(cluster: Cluster, status: dict[str, Any]) -> list[TwoTrackContribution]:
    return [
        TwoTrackContribution(
            task=u.manifest["task"],
            samples=int(u.manifest["samples"]),
            start_mix=float(u.manifest.get("startMix", {}).get("encoder.", 0.0)),
            delta=u.delta,
            decoder=u.decoder,
        )
        for u in uploads_from_s3(cluster, status)
    ]


def test_auto_trains_two_tracks_per_site_and_aggregates_conflict_averse(cluster: Cluster) -> None:
    cluster.apply(*auto_federation(cluster))
    first = cluster.wait_phase("fashion-mnist", "Succeeded", "Failed", timeout=180)
    assert first["phase"] == "Succeeded", first
    second = cluster.wait_phase("fashion-mnist-r2", "Succeeded", "Failed", timeout=180)
    assert second["phase"] == "Succeeded", second

    for status in (first, second):
        assert [s["site"] for s in status["sites"]] == list(SITES)
        for site in status["sites"]:
            # each site's choice and its evidence (its own validation split) are in the status
            metrics = site["metrics"]
            assert metrics["deploy_shared"] in (0.0, 1.0)
            assert {"val_after", "val_after_shared"} <= set(metrics)
            # both tasks score accuracy (higher is better); a tie keeps the task-level track, and
            # so does a validation split too small to decide on
            enough = metrics["val_samples"] >= MIN_CHOICE_SAMPLES
            assert metrics["deploy_shared"] == float(enough and metrics["val_after_shared"] > metrics["val_after"])

        uploads = two_track_uploads(cluster, status)
        for u in uploads:  # both tracks uploaded
            assert any(k.startswith("shared.encoder.") for k in u.delta)
            assert any(k.startswith("shared.decoder.") for k in u.decoder)
        global_uri = status["globalModel"]["uri"]
        manifest = json.loads(cluster.s3_object(global_uri + "/manifest.json"))
        aggregation = manifest["aggregation"]
        assert aggregation["level2Rule"] == "cagrad"
        weights = aggregation["level2Weights"]
        by_task = {u.task: {k: v for k, v in u.delta.items() if k.startswith("shared.")} for u in uploads}
        expected_weights = cagrad_by_grid([by_task["cls10"], by_task["rot4"]], c=0.4)
        np.testing.assert_allclose([weights["cls10"], weights["rot4"]], expected_weights, atol=2e-3)

        base = tensors(cluster.s3_object(status["baseModel"]["uri"] + "/model.safetensors"))
        for prefix in ("encoder.", "tasks.cls10.encoder.", "tasks.rot4.encoder."):  # task-level copies
            assert any(k.startswith(prefix) for k in base), prefix
        model = tensors(cluster.s3_object(global_uri + "/model.safetensors"))
        assert_models_equal(model, expected_global_two_track(base, uploads, weights))

    # round 2's sites start their shared track from their own round-1 shared decoder
    for site in second["sites"]:
        assert site["previousDecoder"].endswith(f"/fashion-mnist/sites/{site['site']}/decoder.safetensors")
