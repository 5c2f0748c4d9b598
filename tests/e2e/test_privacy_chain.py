"""spec.privacy through the real operator, trainer and S3: a chain of three rounds whose budget
holds for two. Epsilon in the status is checked against dp-accounting called here; the models
against a numpy recomputation of the clipped mean from the uploads, the residual being noise of
the calibrated spread; the third round is refused before any of its sites trains.

What this does not check: that the noise is secret (the operator draws it from OS entropy) and
who can read the bucket (docs/privacy.md: the operator and S3 see the updates before noise).
"""

from __future__ import annotations

import json
import math
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from tests.e2e.conftest import Cluster, uploads_from_s3
from tests.e2e.oracle import tensors
from tests.e2e.test_federation import scaled_down_example

pytestmark = pytest.mark.slow
CLIP, NOISE, DELTA = 0.5, 0.6, 1e-4


def epsilon(rounds: int) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(NOISE), rounds)
    return float(accountant.get_epsilon(DELTA))


def private_chain(cluster: Cluster) -> list[dict[str, Any]]:
    objects = scaled_down_example(cluster, prefix="privacy")
    for obj in objects:
        if obj["kind"] == "FederationRound":
            budget = (epsilon(2) + epsilon(3)) / 2  # room for two rounds, not for a third
            obj["spec"]["privacy"] = {
                "clipNorm": CLIP,
                "noiseMultiplier": NOISE,
                "delta": DELTA,
                "epsilonBudget": budget,
            }
            obj["spec"]["followUpRounds"] = 2
    return objects


def standardized_noise(cluster: Cluster, status: dict[str, Any]) -> np.ndarray:
    """Every coordinate's move minus the clipped mean the uploads give, divided by the noise std it
    should carry: zC/m for a task group's own keys; sqrt(sum over groups of (w zC/m)^2) for the
    shared encoder, w = 1/groups (m-fed's uniform level 2). Pure calibrated noise has std 1."""
    base = tensors(cluster.s3_object(status["baseModel"]["uri"] + "/model.safetensors"))
    model = tensors(cluster.s3_object(status["globalModel"]["uri"] + "/model.safetensors"))
    groups: dict[str, list[dict[str, np.ndarray]]] = {}
    for u in uploads_from_s3(cluster, status):
        task = u.manifest["task"]
        change = {(k if k in base else f"tasks.{task}.{k}"): v.astype(np.float64) for k, v in u.delta.items()}
        change |= {f"tasks.{task}.{k}": v - base[f"tasks.{task}.{k}"] for k, v in u.decoder.items()}
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in change.values()))
        groups.setdefault(task, []).append({k: v * min(1.0, CLIP / norm) for k, v in change.items()})
    shared_std = math.sqrt(sum((NOISE * CLIP / len(members) / len(groups)) ** 2 for members in groups.values()))
    out = []
    for key in sorted(base):
        moved = model[key].astype(np.float64) - base[key]
        if key.startswith("encoder."):
            mean = sum(sum(u[key] for u in members) / len(members) for members in groups.values()) / len(groups)
            out.append(((moved - mean) / shared_std).ravel())
        else:
            members = groups[key.split(".")[1]]
            mean = sum(u[key] for u in members) / len(members)
            out.append(((moved - mean) / (NOISE * CLIP / len(members))).ravel())
    return np.concatenate(out)


def test_a_private_chain_reports_epsilon_and_stops_at_its_budget(cluster: Cluster) -> None:
    cluster.apply(*private_chain(cluster))
    for name, rounds in (("fashion-mnist", 1), ("fashion-mnist-r2", 2)):
        status = cluster.wait_phase(name, "Succeeded", "Failed", timeout=240)
        assert status["phase"] == "Succeeded", status
        privacy = status["privacy"]
        assert privacy["rounds"] == rounds and privacy["unprotectedRounds"] == 0
        assert privacy["epsilon"] == pytest.approx(epsilon(rounds), rel=1e-5)
        assert privacy["delta"] == DELTA and privacy["noiseMultiplier"] == NOISE
        manifest = json.loads(cluster.s3_object(status["globalModel"]["uri"] + "/manifest.json"))
        assert manifest["aggregation"]["privacy"]["releases"] == [[NOISE, rounds]]
        noise = standardized_noise(cluster, status)
        # thousands of coordinates: the sample std of unit noise is within 5% of 1
        assert noise.size > 2000 and abs(noise.std() - 1) < 0.05, (noise.size, noise.std())
        assert abs(noise.mean()) < 5 / math.sqrt(noise.size)

    third = cluster.wait_phase("fashion-mnist-r3", "Failed", "Succeeded", timeout=120)
    assert third["phase"] == "Failed", third
    ready = next(c for c in third["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "PrivacyBudgetExceeded", ready
    assert f"{epsilon(3):.3g}" in ready["message"] and "spec.privacy.epsilonBudget" in ready["message"]
    # refused before training: no Job of the third round ever existed
    assert not [j for j in cluster.jobs() if "fashion-mnist-r3" in j["metadata"]["name"]]
    assert all(s["phase"] in ("Pending", "Cancelled") for s in third.get("sites") or [])
