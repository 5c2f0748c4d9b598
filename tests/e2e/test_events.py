"""The operator reacts to events, not to its timer: measured on the request log of the emulated API.

With a long resync (60 s, as a cluster would run it), every step after a round's last site Job
completes (verify the uploads, aggregate, succeed, create the chained round, create its Jobs)
must follow within a fraction of one resync interval. On the timer alone these are separate
ticks: last Job done -> Succeeded takes at least two, so this test fails if the event path
silently regresses to the timer. What the emulator does not show: a real API server's watch
latency (milliseconds in a healthy cluster) and its request-rate limits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from mfed_operator.domain.names import LABEL_ROUND

from tests.e2e.conftest import Cluster
from tests.e2e.test_federation import scaled_down_example
from tests.support.kubeapi import LoggedRequest

pytestmark = pytest.mark.slow

RESYNC_SECONDS = 60
# The slack for one reaction (reading S3, aggregating four small uploads, a few API calls) on a
# loaded 2-core CI machine; a timer tick would be up to RESYNC_SECONDS, two ticks at least that.
REACTION_SECONDS = RESYNC_SECONDS / 4


def _completes_a_job(r: LoggedRequest) -> bool:
    if not (r.method == "PATCH" and r.plural == "jobs" and r.subresource == "status" and isinstance(r.data, dict)):
        return False
    conditions = ((r.data or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions)


def _round_phase_set(r: LoggedRequest, name: str, phase: str) -> bool:
    if not (r.method == "PATCH" and r.plural == "federationrounds" and r.name == name):
        return False
    return isinstance(r.data, dict) and (r.data.get("status") or {}).get("phase") == phase


def _at(r: LoggedRequest) -> float:
    assert r.at is not None
    return r.at


def test_a_job_completing_wakes_its_round_at_once_not_at_the_next_resync(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(MFED_OPERATOR_RESYNC_SECONDS=str(RESYNC_SECONDS))
    cluster.apply(*scaled_down_example(cluster, prefix="events"))
    first = cluster.wait_phase("fashion-mnist", "Succeeded", "Failed", timeout=300)
    assert first["phase"] == "Succeeded", first
    second = cluster.wait_phase("fashion-mnist-r2", "Succeeded", "Failed", timeout=300)
    assert second["phase"] == "Succeeded", second

    log = cluster.api.requests()
    round_of_job = {j["metadata"]["name"]: j["metadata"]["labels"][LABEL_ROUND] for j in cluster.jobs()}
    gaps: dict[str, float] = {}
    for name in ("fashion-mnist", "fashion-mnist-r2"):
        done = [_at(r) for r in log if _completes_a_job(r) and round_of_job.get(r.name or "") == name]
        succeeded = [_at(r) for r in log if _round_phase_set(r, name, "Succeeded")]
        assert done and succeeded, (name, len(done), len(succeeded))
        # (every later status patch carries the phase too: the first one is the transition)
        gaps[f"{name}: last Job done -> Succeeded"] = min(succeeded) - max(done)
        reasons = [e["reason"] for e in cluster.events(name)]
        assert reasons.count("Succeeded") == 1 and reasons.count("Aggregating") == 1, reasons
    succeeded_first = min(_at(r) for r in log if _round_phase_set(r, "fashion-mnist", "Succeeded"))
    next_jobs = [
        _at(r)
        for r in log
        if r.method == "POST"
        and r.plural == "jobs"
        and ((r.data or {}).get("metadata") or {}).get("labels", {}).get(LABEL_ROUND) == "fashion-mnist-r2"
    ]
    assert next_jobs
    gaps["fashion-mnist Succeeded -> first Job of fashion-mnist-r2"] = min(next_jobs) - succeeded_first
    print({k: round(v, 2) for k, v in gaps.items()})
    slow: dict[str, Any] = {k: v for k, v in gaps.items() if not 0 <= v < REACTION_SECONDS}
    assert not slow, f"reactions slower than {REACTION_SECONDS}s with a {RESYNC_SECONDS}s resync: {slow}"
