"""How the round compares with each site training alone: the Local baseline in status.

The sites score both models on their own test split (else validation) and report them in their
contribution manifests (baseline_federated, baseline_local, baseline_sign); this module only
averages what accepted sites reported. Per task: the sample-weighted mean of each, and the
relative gain of the means in percent (positive: the federation is better). The round's dm% is
the plain mean of the task gains (every task counts the same, as in the pilot's table).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

LOCAL = "local"
REQUIRED = ("baseline_federated", "baseline_local", "baseline_sign")


def relative_gain(federated: float, baseline: float, sign: float) -> float:
    """(federated - baseline) / |baseline| in percent, with `sign` -1 for lower-is-better metrics."""
    if baseline == 0:
        return 0.0
    return sign * (federated - baseline) / abs(baseline) * 100.0


def local_baseline_status(sites: Iterable[tuple[str, int, Mapping[str, float]]]) -> dict[str, Any] | None:
    """status.baselines.local from (task, samples, metrics) of the accepted sites; None when no
    site reported a baseline."""
    sums: dict[str, list[float]] = {}
    steps = seconds = 0.0
    for task, samples, metrics in sites:
        if not all(k in metrics for k in REQUIRED) or samples <= 0:
            continue
        acc = sums.setdefault(task, [0.0, 0.0, 0.0, 0.0, 0.0])  # weight, fed, local, sign, sites
        acc[0] += samples
        acc[1] += samples * metrics["baseline_federated"]
        acc[2] += samples * metrics["baseline_local"]
        acc[3] = metrics["baseline_sign"]
        acc[4] += 1
        steps += metrics.get("baseline_steps", 0.0)
        seconds += metrics.get("baseline_seconds", 0.0)
    if not sums:
        return None
    tasks: dict[str, Any] = {}
    for task, (weight, fed, local, sign, count) in sorted(sums.items()):
        federated, baseline = fed / weight, local / weight
        tasks[task] = {
            "federated": round(federated, 6),
            "baseline": round(baseline, 6),
            "gainPercent": round(relative_gain(federated, baseline, sign), 4),
            "sites": int(count),
        }
    dm = sum(t["gainPercent"] for t in tasks.values()) / len(tasks)
    return {
        "dmPercent": round(dm, 4),
        "tasks": tasks,
        # what the baseline cost the sites; it never leaves them, so nothing is uploaded for it
        "steps": int(steps),
        "seconds": round(seconds, 3),
        "bytesUploaded": 0,
    }


def dm_column(baseline: Mapping[str, Any] | None) -> str | None:
    """The printer column text, e.g. "+2.31"."""
    return None if baseline is None else f"{float(baseline['dmPercent']):+.2f}"
