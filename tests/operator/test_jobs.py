"""Golden tests of the pure Job builders: the exact Jobs the operator creates.

Regenerate after an intended change with MFED_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from mfed_operator.domain.jobs import build_init_job, build_site_job
from mfed_operator.domain.names import dns_name, init_job_name, site_job_name

from mfed.resources.method_settings import init_spec, round_spec
from tests.operator.builders import CONFIG, round_view, site

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, value: Any) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    if os.environ.get("MFED_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with MFED_UPDATE_GOLDEN=1 once and review it"
    assert text == path.read_text(), f"{name} differs from {path}; if intended, regenerate and review"


def gpu_site_body_overrides() -> dict[str, Any]:
    return {
        "labels": {"kueue.x-k8s.io/queue-name": "gpu-queue", "team": "vision"},
        "env": [
            {"name": "OMP_NUM_THREADS", "value": "4"},
            {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "token"}}},
        ],
        "data": {"pvc": {"claimName": "site-data", "path": "train.npz", "testPath": "test.npz"}},
    }


def gpu_site() -> Any:
    view = site("hospital-b.example", "rot4", **gpu_site_body_overrides())
    from dataclasses import replace

    from mfed.resources.views import Toleration

    return replace(
        view,
        gpu=2,
        cpu="8",
        memory="32Gi",
        node_selector={"gpu": "h100"},
        tolerations=(Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),),
        priority_class="federated-training",
        runtime_class="nvidia",
        service_account="trainer",
        image_pull_secrets=("registry",),
        affinity={"nodeAffinity": {}},
    )


def test_site_job_matches_the_golden_file() -> None:
    r = round_view(
        storage={
            "endpoint": "https://s3.internal:9000",
            "bucket": "models",
            "prefix": "fl",
            "region": "eu-west-1",
            "pathStyle": False,
            "caBundle": {"configMapName": "s3-ca", "key": "ca.crt"},
            "credentialsSecret": {"name": "s3-creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"},
        },
        aggregation={"deadlineSeconds": 900},
    )
    s = gpu_site()
    spec = round_spec(r, s, 3, "s3://models/fl/fed/r0/global", "s3://models/fl/fed/r0/sites/x/decoder.safetensors")
    job = build_site_job(r, s, spec, site_job_name(r.name, s.name), CONFIG)
    check_golden("site-job", job)


def test_init_job_matches_the_golden_file() -> None:
    r = round_view()
    job = build_init_job(r, init_spec(r, [site("a"), site("b"), site("c", "rot4")]), init_job_name(r.name), CONFIG)
    check_golden("init-job", job)


def test_site_job_is_safe_and_tells_the_job_controller_how_to_fail() -> None:
    r = round_view()
    s = site("a")
    job = build_site_job(r, s, round_spec(r, s, 1, "s3://b/g", None), "r1-a", CONFIG)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    assert job["spec"]["backoffLimit"] == CONFIG.job_backoff_limit
    assert job["spec"]["suspend"] is False  # only Kueue-queued sites start suspended
    creds = [e for e in container["env"] if e["name"].startswith("AWS_") and "valueFrom" in e]
    assert [e["valueFrom"]["secretKeyRef"]["name"] for e in creds] == ["s3-credentials", "s3-credentials"]
    assert not any("value" in e and "secret" in str(e.get("value")).lower() for e in creds)


def test_kueue_sites_start_suspended_and_their_pods_do_not_carry_the_queue_label() -> None:
    r = round_view()
    s = gpu_site()
    job = build_site_job(r, s, round_spec(r, s, 1, "s3://b/g", None), "r1-x", CONFIG)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    assert "team" not in job["metadata"]["labels"]  # the SiteTask's own labels are not copied


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("round-1", "site-a"), "round-1-site-a"),
        (("Round_1", "site.a"), None),  # sanitised, so hashed
        (("r" * 40, "s" * 40), None),  # too long, so hashed
    ],
)
def test_child_names_are_dns_labels_and_deterministic(parts: tuple[str, str], expected: str | None) -> None:
    name = dns_name(*parts)
    assert name == dns_name(*parts)
    assert len(name) <= 63 and name == name.lower() and name[0].isalnum() and name[-1].isalnum()
    assert all(c.isalnum() or c == "-" for c in name)
    if expected is not None:
        assert name == expected
    else:
        assert name != "-".join(parts)


def test_different_inputs_never_collapse_onto_one_hashed_name() -> None:
    assert dns_name("a" * 60, "x") != dns_name("a" * 60, "y")
    assert dns_name("site.a") != dns_name("site-a")
