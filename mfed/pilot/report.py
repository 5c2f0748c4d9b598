"""Turning pilot runs into the numbers people read: per-task metrics, dm%, table, JSON, plot."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mfed.methods import Method
from mfed.pilot.records import MethodRun

METHOD_LABELS = {
    Method.LOCAL: "Local (no federation)",
    Method.TASK_FEDAVG: "Task-FedAvg (within-task only)",
    Method.ENCODER_FEDAVG: "Encoder-FedAvg (all sites)",
    Method.MFED: "M-Fed",
    Method.CAGRAD: "M-Fed + conflict-averse level 2",
    Method.GATED: "M-Fed + similarity gate",
    Method.MIX: "M-Fed + per-site mixing",
    Method.FALLBACK: "M-Fed + per-site fallback",
    Method.AUTO: "auto (recommended)",
    Method.CENTRALIZED: "Centralized (pooled data; ceiling, not deployable)",
}


def _weighted_by_task(scored: Iterable[tuple[MethodRun, str, float]]) -> dict[str, float]:
    """Per task, the mean of (run, site, value) over its sites, each weighted by the site's
    training samples when the run knows them (a cluster's chain), else equally (the pilot)."""
    values: dict[str, list[float]] = {}
    weights: dict[str, list[float]] = {}
    for run, site, value in scored:
        task = run.task_of(site)
        values.setdefault(task, []).append(value)
        weights.setdefault(task, []).append(float(run.site_samples.get(site, 1)))
    return {task: statistics.fmean(v, weights[task]) for task, v in sorted(values.items())}


def _mean_by_task(run: MethodRun, scores: Mapping[str, float]) -> dict[str, float]:
    return _weighted_by_task((run, site, value) for site, value in sorted(scores.items()))


def task_metrics(run: MethodRun) -> dict[str, float]:
    """Mean over a task's sites of each site's validation-selected test score."""
    return _mean_by_task(run, {site: selection.test for site, selection in run.sites.items()})


# The deployed model after the last round, and (two-track methods) each track's.
FINAL_VIEWS = ("deployed", "task", "shared")


def final_metrics(run: MethodRun, view: str) -> dict[str, float] | None:
    """Per task, the test score after the last round: no choice over rounds, so none of the
    validation noise of picking the best of many rounds on a small split. `view` "task" or
    "shared" is one track of a two-track method (None when not every site has tracks)."""
    last = run.curve[-1]
    if view == "deployed":
        return _deployed_after_last_round(run)
    if set(last.tracks) != set(last.test):
        return None
    return _mean_by_task(run, {site: tracks[view] for site, tracks in last.tracks.items()})


def _deployed_after_last_round(run: MethodRun) -> dict[str, float]:
    return _mean_by_task(run, run.curve[-1].test)


def delta_m(metrics: Mapping[str, float], local: Mapping[str, float], higher_is_better: Mapping[str, bool]) -> float:
    """dm% = (1/T) sum_t (-1)^{l_t} (M_t - M_t^Local) / M_t^Local * 100 (MFED.md)."""
    terms = []
    for task, baseline in local.items():
        sign = 1.0 if higher_is_better[task] else -1.0
        terms.append(sign * (metrics[task] - baseline) / baseline * 100.0)
    return statistics.fmean(terms)


def _mean_curve(runs: Sequence[MethodRun]) -> list[dict[str, Any]]:
    """Curve points averaged over seeds: per task, mean steps per site and mean test score
    (weighted by the sites' samples when known, as the table)."""
    points = []
    for index in range(min(len(r.curve) for r in runs)):
        steps: dict[str, list[int]] = {}
        for run in runs:
            point = run.curve[index]
            for site in point.test:
                steps.setdefault(run.task_of(site), []).append(point.steps[site])
        scored = ((run, site, value) for run in runs for site, value in run.curve[index].test.items())
        points.append(
            {
                "point": runs[0].curve[index].index,
                "steps": {t: statistics.fmean(v) for t, v in sorted(steps.items())},
                "metrics": _weighted_by_task(scored),
            }
        )
    return points


def protection_summary(seeds: Mapping[int, MethodRun]) -> dict[str, dict[str, float]]:
    """Per task, over seeds and the task's sites, what the selected models used: the share that
    deployed the shared track ("shared") and the mean start mix ("start_alpha"), when recorded."""
    values: dict[str, dict[str, list[float]]] = {}
    for run in seeds.values():
        for site, selection in sorted(run.sites.items()):
            for key in ("shared", "start_alpha"):
                if key in selection.evidence:
                    values.setdefault(run.task_of(site), {}).setdefault(key, []).append(selection.evidence[key])
    return {task: {k: statistics.fmean(v) for k, v in sorted(kv.items())} for task, kv in sorted(values.items())}


def summarize(
    runs: Sequence[MethodRun],
    config: Mapping[str, Any],
    higher_is_better: Mapping[str, bool],
    metric_names: Mapping[str, str],
    seconds: float,
) -> dict[str, Any]:
    """The results document: {"config", "methods": {m: {"metrics", "delta_m", "per_round", ...}}}."""
    by_method: dict[Method, dict[int, MethodRun]] = {}
    for run in runs:
        by_method.setdefault(run.method, {})[run.seed] = run
    local = by_method[Method.LOCAL]
    methods: dict[str, Any] = {}
    for method, seeds in by_method.items():
        per_seed = {seed: task_metrics(run) for seed, run in sorted(seeds.items())}
        dm_per_seed = {seed: delta_m(m, task_metrics(local[seed]), higher_is_better) for seed, m in per_seed.items()}
        tasks = sorted(next(iter(per_seed.values())))
        methods[method.value] = {
            "label": METHOD_LABELS[method],
            "metrics": {t: statistics.fmean(m[t] for m in per_seed.values()) for t in tasks},
            "metrics_std": {t: statistics.pstdev([m[t] for m in per_seed.values()]) for t in tasks},
            "metrics_per_seed": {str(s): m for s, m in per_seed.items()},
            "delta_m": statistics.fmean(dm_per_seed.values()),
            "delta_m_per_seed": {str(s): v for s, v in dm_per_seed.items()},
            "steps_per_site": max(max(r.steps_per_site.values()) for r in seeds.values()),
            # Traffic: mean bytes a site sent to the aggregator per round (delta + decoder files).
            "upload_bytes_per_site_round": statistics.fmean(r.upload_per_site_round() for r in seeds.values()),
            # What each site trained, as its trainer reported it: equal across methods by design.
            "site_steps": {str(s): dict(sorted(r.steps_per_site.items())) for s, r in sorted(seeds.items())},
            "selected": {
                str(s): {
                    site: {
                        "round": sel.round,
                        "steps": sel.steps,
                        "val": sel.val,
                        "test": sel.test,
                        **({"evidence": sel.evidence} if sel.evidence else {}),
                    }
                    for site, sel in sorted(r.sites.items())
                }
                for s, r in sorted(seeds.items())
            },
            "protection": protection_summary(seeds),
            "per_round": _mean_curve(list(seeds.values())),
            "final_round": _final_round(seeds, local, higher_is_better),
        }
    oracle = methods.get(Method.CENTRALIZED.value)
    if oracle is not None:
        for name, block in methods.items():
            if name not in (Method.LOCAL.value, Method.CENTRALIZED.value):
                block["share_of_oracle_gain"] = oracle_share(
                    block["metrics"], methods[Method.LOCAL.value]["metrics"], oracle["metrics"], higher_is_better
                )
    return {
        "config": dict(config),
        "tasks": {
            t: {"metric": metric_names[t], "higher_is_better": higher_is_better[t]} for t in sorted(higher_is_better)
        },
        "seconds": seconds,
        "methods": methods,
    }


# An oracle gain smaller than this (in the metric's units) leaves no gain to share.
NO_ORACLE_GAIN = 1e-6


def oracle_share(
    method: Mapping[str, float],
    local: Mapping[str, float],
    oracle: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> dict[str, float | None]:
    """Per task, (method - Local) / (oracle - Local) on the means over seeds: 1 = all the gain the
    pooled model found, 0 = none, negative = below Local. None where the oracle did not beat Local
    (no gain to share: the ratio would only mislead). The ratio reads the same for a metric where
    lower is better (both differences flip sign together)."""
    out: dict[str, float | None] = {}
    for task in sorted(method):
        gain = oracle[task] - local[task]
        better = gain if higher_is_better[task] else -gain
        out[task] = None if better < NO_ORACLE_GAIN else (method[task] - local[task]) / gain
    return out


def _final_round(
    seeds: Mapping[int, MethodRun], local: Mapping[int, MethodRun], higher_is_better: Mapping[str, bool]
) -> dict[str, Any]:
    """Per view (FINAL_VIEWS) present for every seed: mean test per task after the last round
    and dm% against Local's model after its last round (the same rule for both)."""
    out: dict[str, Any] = {}
    for view in FINAL_VIEWS:
        per_seed = {seed: final_metrics(run, view) for seed, run in sorted(seeds.items())}
        complete = {seed: m for seed, m in per_seed.items() if m is not None}
        if len(complete) < len(per_seed):
            continue
        tasks = sorted(next(iter(complete.values())))
        out[view] = {
            "metrics": {t: statistics.fmean(m[t] for m in complete.values()) for t in tasks},
            "delta_m": statistics.fmean(
                delta_m(m, _deployed_after_last_round(local[seed]), higher_is_better) for seed, m in complete.items()
            ),
        }
    return out


def _render(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def _oracle_lines(results: Mapping[str, Any], tasks: list[str]) -> list[str]:
    """Each method's gain over Local as a share of the pooled model's, per task."""
    shares = {m["label"]: m["share_of_oracle_gain"] for m in results["methods"].values() if "share_of_oracle_gain" in m}
    if not shares:
        return []
    rows = [["share of the centralized gain", *tasks]]
    for label, share in shares.items():
        rows.append([label, *("n/a" if share[t] is None else f"{100 * share[t]:.0f}%" for t in tasks)])
    note = (
        "(method - Local) / (centralized - Local) per task, n/a where centralized is not above Local; "
        "centralized pools every site's data: not deployable"
    )
    return ["", *_render(rows), note]


def _final_round_lines(results: Mapping[str, Any], tasks: list[str]) -> list[str]:
    """The models after the last round: what a site gets without choosing a round on its
    validation split, and for two-track methods what each track alone would have given."""
    labels = {"deployed": "", "task": ", task-level track", "shared": ", shared track"}
    rows = [["after the last round", *tasks, "dm% vs Local"]]
    for method in results["methods"].values():
        for view, block in (method.get("final_round") or {}).items():
            metrics = [f"{block['metrics'][t]:.2f}" for t in tasks]
            rows.append([method["label"] + labels[view], *metrics, f"{block['delta_m']:+.2f}"])
    if len(rows) == 1:
        return []
    return ["", *_render(rows), "no choice over rounds: the validation-selected round above is noisy on small splits"]


def format_table(results: Mapping[str, Any]) -> str:
    tasks = sorted(results["tasks"])
    header = [
        "method",
        *[f"{t} ({results['tasks'][t]['metric']})" for t in tasks],
        "dm% vs Local",
        "steps/site",
        "upload/site/round",
    ]
    rows = [header]
    for method in results["methods"].values():
        cells = [method["label"]]
        for t in tasks:
            value, spread = method["metrics"][t], method["metrics_std"][t]
            cells.append(f"{value:.2f}" + (f" ±{spread:.2f}" if len(method["metrics_per_seed"]) > 1 else ""))
        cells += [
            f"{method['delta_m']:+.2f}",
            str(method["steps_per_site"]),
            human_bytes(method.get("upload_bytes_per_site_round", 0.0)),
        ]
        rows.append(cells)
    lines = _render(rows)
    lines.append(_selection_line(results))
    lines += _oracle_lines(results, tasks)
    for method in results["methods"].values():
        protection = method.get("protection") or {}
        if any("shared" in v for v in protection.values()):
            used = ", ".join(f"{t} {100 * v['shared']:.0f}%" for t, v in protection.items() if "shared" in v)
            lines.append(f"{method['label']}: selected models on the shared track (per-site fallback): {used}")
        elif any("start_alpha" in v for v in protection.values()):
            used = ", ".join(f"{t} {v['start_alpha']:.2f}" for t, v in protection.items() if "start_alpha" in v)
            lines.append(f"{method['label']}: mean share of the shared encoder in the selected models: {used}")
    if results["config"].get("selection") != LAST_ROUND:  # otherwise the block repeats the table
        lines += _final_round_lines(results, tasks)
    return "\n".join(lines)


# config["selection"] of a report whose sites report the model of the last round: a cluster's
# chain, where each site deploys what its last round produced (the operator keeps no "best round").
LAST_ROUND = "last-round"


def _selection_line(results: Mapping[str, Any]) -> str:
    config = results["config"]
    if config.get("selection") == LAST_ROUND:
        rounds = config.get("rounds_in_chain", "?")
        return (
            f"chain {config.get('chain', '?')} ({rounds} rounds, source: {config.get('source', '?')}); "
            "every site's model after the last round, scored on its test split (else validation)"
        )
    seeds = ", ".join(next(iter(results["methods"].values()))["metrics_per_seed"])
    ties = config.get("select_ties", "latest")
    line = f"mean over seeds {seeds}; each site's model chosen on its own validation split (ties: {ties} round)"
    return line + _defence_line(config)


def _defence_line(config: Mapping[str, Any]) -> str:
    """What the federated methods aggregated under, and who attacked (docs/privacy.md)."""
    parts = []
    robust = config.get("robust") or {}
    if robust.get("rule", "mean") != "mean" or "normFactor" in robust or "minCosine" in robust:
        parts.append("rule " + ", ".join(f"{k}={v}" for k, v in robust.items()))
    privacy = config.get("privacy")
    if privacy:
        from mfed.privacy.ledger import chain_epsilon

        rounds = int(config.get("rounds", 0))
        mechanisms = [privacy["noiseMultiplier"]] + ([privacy["countNoise"]] if "targetQuantile" in privacy else [])
        epsilon = chain_epsilon(tuple((z, rounds) for z in mechanisms), privacy["delta"])
        parts.append(
            f"DP clip {privacy['clipNorm']:g} noise {privacy['noiseMultiplier']:g}: epsilon {epsilon:.3g} "
            f"at delta {privacy['delta']:g} after {rounds} rounds"
        )
    attack = config.get("attack")
    if attack:
        what = "never uploads (absent)" if attack["kind"] == "absent" else f"attacks ({attack['kind']})"
        parts.append(f"site {attack['site']} {what}: its own scores are left out")
    return ("\n" + "; ".join(parts)) if parts else ""


def human_bytes(count: float) -> str:
    """Decimal units, three significant digits: 0 B, 950 B, 412 kB, 1.23 MB."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 999.5 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 99.5 else f"{value:.3g} {unit}"
        value /= 1000.0
    raise AssertionError("unreachable")


def write_results(results: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def plot(results: Mapping[str, Any], path: Path) -> None:
    """One panel per task: mean test metric versus optimizer steps per site, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(results["tasks"])
    columns = min(2, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        for method in results["methods"].values():
            points = method["per_round"]
            ax.plot([p["steps"][task] for p in points], [p["metrics"][task] for p in points], label=method["label"])
        ax.set_title(
            f"{task}: {results['tasks'][task]['metric']} "
            f"({'higher' if results['tasks'][task]['higher_is_better'] else 'lower'} is better)"
        )
        ax.set_xlabel("optimizer steps per site")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    config = results["config"]
    if config.get("selection") == LAST_ROUND:
        fig.suptitle(f"mfed report: chain {config.get('chain', '')}, metric per round")
    else:
        fig.suptitle(f"mfed pilot: {config.get('scenario', '')} scenario, test metric per round")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
