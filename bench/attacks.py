"""One bad site of eight, and what the aggregation rule lets through; and what DP costs.

The pilot's default scenario (4 tasks x 2 sites, equal compute: 600 steps per site), M-Fed beside
Local, every site's model chosen on its own validation split. `--mode attacks` runs, per seed:
M-Fed clean with the mean and with the robust rule, then with site `--site` attacking (the pilot's
--attack: sign-flip, scale x100, shuffled labels) under each rule, and once with the site absent
(it never uploads: the best any rule that refuses it can give the others). The attacker's own
scores are left out of every row, clean ones included, so each row is over the same honest sites.
Printed per task: the mean over seeds and its std, the largest gap to the clean mean run and to
the run without the attacker, and dm% vs Local.

`--mode dp` runs M-Fed under site-level DP at each noise multiplier of `--noise` (clip norm
`--clip`), prints dm% vs Local against the chain's epsilon (dp-accounting, delta 1e-5, all rounds
composed) and draws it as dp.png.

    python bench/attacks.py --mode attacks --seeds 0,1,2,3,4 [--rule median] [--site cls10-0]
    python bench/attacks.py --mode attacks --rule mean --norm-factor 3 --min-cosine 0   (screens, then the mean)
    python bench/attacks.py --mode dp --seeds 0,1,2 --noise 0.3,1,3 --clip 0.1
ends with `worst_robust_gap=<points> attack=<kind>` (attacks) or `epsilon=<e> dm_percent=<d>` per level (dp).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mfed.aggregation.robust import RobustRule, RobustSettings
from mfed.methods import Method
from mfed.pilot.attacks import Attack, AttackKind
from mfed.pilot.config import PilotConfig
from mfed.pilot.records import MethodRun
from mfed.pilot.report import delta_m, task_metrics
from mfed.privacy.ledger import chain_epsilon
from mfed.privacy.settings import PrivacySettings

DELTA = 1e-5


@dataclass(frozen=True)
class Variant:
    name: str
    config: PilotConfig


def honest(run: MethodRun, attacker: str) -> MethodRun:
    """The run without the attacker's own scores (a clean run gets the same cut)."""
    run.sites.pop(attacker, None)
    return run


def run_all(variants: list[Variant], seeds: list[int], attacker: str) -> dict[str, Any]:
    from mfed.pilot.runner import SitePool, higher_is_better, run_method, site_data

    base = variants[0].config
    directions = higher_is_better(base)
    out: dict[str, dict[int, dict[str, float]]] = {v.name: {} for v in variants}
    local: dict[int, dict[str, float]] = {}
    with SitePool(min(2, base.site_count)) as pool:
        for seed in seeds:
            data = site_data(base, seed)
            started = time.perf_counter()
            local[seed] = task_metrics(
                honest(run_method(Method.LOCAL, base, seed, data, directions, _no, pool), attacker)
            )
            for v in variants:
                run = honest(run_method(Method.MFED, v.config, seed, data, directions, _no, pool), attacker)
                out[v.name][seed] = task_metrics(run)
            print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return {"local": local, "variants": out, "directions": directions}


def _no() -> None:
    pass


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(results: dict[str, Any], seeds: list[int]) -> dict[str, dict[str, Any]]:
    local, directions = results["local"], results["directions"]
    tasks = sorted(local[seeds[0]])
    rows: dict[str, dict[str, Any]] = {}
    header = f"{'M-Fed':<28}" + "".join(f"{t:>16}" for t in tasks)
    print(header + f"{'dm% vs Local':>16}")
    for name, per_seed in results["variants"].items():
        cells = {t: _mean_std([per_seed[s][t] for s in seeds]) for t in tasks}
        dm = _mean_std([delta_m(per_seed[s], local[s], directions) for s in seeds])
        rows[name] = {"tasks": cells, "dm": dm}
        print(
            f"{name:<28}"
            + "".join(f"{m:>10.2f} ±{sd:>4.2f}" for m, sd in cells.values())
            + f"{dm[0]:>+10.2f} ±{dm[1]:>4.2f}"
        )
    local_cells = {t: _mean_std([local[s][t] for s in seeds]) for t in tasks}
    print(f"{'Local':<28}" + "".join(f"{m:>10.2f} ±{sd:>4.2f}" for m, sd in local_cells.values()))
    return rows


def attacks(args: argparse.Namespace, seeds: list[int]) -> None:
    rule = RobustSettings(rule=RobustRule(args.rule), norm_factor=args.norm_factor, min_cosine=args.min_cosine)
    if rule.is_default:
        raise SystemExit("the robust run needs --rule median|trimmed-mean, --norm-factor or --min-cosine")
    label = "+".join(f"{k}={v}" if k != "rule" else str(v) for k, v in rule.to_dict().items())
    base = _base(args)
    variants = [Variant("clean, mean", base)]
    if not args.skip_clean_robust:
        variants.append(Variant(f"clean, {label}", replace(base, robust=rule)))
    # the floor: the federation without the attacker, the best any rule that refuses it can give
    floor = "absent (no upload), mean"
    variants.append(Variant(floor, replace(base, attack=Attack(kind=AttackKind.ABSENT, site=args.site))))
    kinds = [AttackKind(k) for k in args.attacks.split(",")]
    for kind in kinds:
        attack = Attack(kind=kind, site=args.site)
        if not args.robust_only:
            variants.append(Variant(f"{kind.value}, mean", replace(base, attack=attack)))
        variants.append(Variant(f"{kind.value}, {label}", replace(base, attack=attack, robust=rule)))
    results = run_all(variants, seeds, args.site)
    print(f"\nsite {args.site} attacks; honest sites only; mean ± std over seeds {','.join(map(str, seeds))}")
    rows = report(results, seeds)
    clean = rows["clean, mean"]["tasks"]
    worst = (0.0, "")
    for kind in kinds:
        for rule_name in (label,) if args.robust_only else ("mean", label):
            cells = rows[f"{kind.value}, {rule_name}"]["tasks"]
            gap = max(abs(cells[t][0] - clean[t][0]) for t in clean)
            to_floor = max(abs(cells[t][0] - rows[floor]["tasks"][t][0]) for t in clean)
            print(
                f"largest per-task gap to clean mean, {kind.value}, {rule_name}: {gap:.2f} points "
                f"(to the federation without the attacker: {to_floor:.2f})"
            )
            if rule_name == label:
                worst = max(worst, (gap, kind.value))
    _save(args.out / "attacks.json", rows)
    print(f"worst_robust_gap={worst[0]:.2f} attack={worst[1]}")


def _base(args: argparse.Namespace) -> PilotConfig:
    """The default pilot; --quick: its smoke-test size (2 rounds, 2 sites per task)."""
    from mfed.pilot.config import QUICK

    if args.quick:
        return replace(PilotConfig(), **{**QUICK, "sites_per_task": 2})
    return replace(PilotConfig(), sites_per_task=args.sites_per_task)


def dp(args: argparse.Namespace, seeds: list[int]) -> None:
    base = _base(args)
    noises = [float(z) for z in args.noise.split(",")]
    variants = [Variant("no DP", base)] + [
        Variant(f"DP z={z:g}", replace(base, privacy=PrivacySettings(clip_norm=args.clip, noise_multiplier=z)))
        for z in noises
    ]
    results = run_all(variants, seeds, attacker="")
    print(f"\nclip norm {args.clip:g}; mean ± std over seeds {','.join(map(str, seeds))}")
    rows = report(results, seeds)
    points = []
    for z in noises:
        epsilon = chain_epsilon(((z, base.rounds),), DELTA)
        points.append((epsilon, rows[f"DP z={z:g}"]["dm"], z))
        print(f"epsilon={epsilon:.4g} dm_percent={rows[f'DP z={z:g}']['dm'][0]:+.2f} noise={z:g}")
    _save(args.out / "dp.json", {"rows": rows, "points": points, "clip": args.clip, "delta": DELTA})
    _plot(points, rows["no DP"]["dm"], args.out / "dp.png", args.clip)


def _plot(
    points: list[tuple[float, tuple[float, float], float]], plain: tuple[float, float], path: Path, clip: float
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points], marker="o")
    for epsilon, (dm, _sd), z in points:
        ax.annotate(f"z={z:g}", (epsilon, dm), textcoords="offset points", xytext=(5, 5))
    ax.axhline(plain[0], linestyle="--", label=f"M-Fed without DP ({plain[0]:+.2f})")
    ax.axhline(0.0, color="grey", linewidth=0.8, label="Local")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon after 30 rounds (delta {DELTA:g}, clip {clip:g})")
    ax.set_ylabel("dm% vs Local")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _save(path: Path, body: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["attacks", "dp"], default="attacks")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--rule", default="median", choices=[r.value for r in RobustRule])
    parser.add_argument("--norm-factor", type=float, help="the robust run's norm screen (x the median norm)")
    parser.add_argument("--min-cosine", type=float, help="the robust run's direction screen (cosine threshold)")
    parser.add_argument("--attacks", default="scale,sign-flip,shuffled-labels")
    parser.add_argument("--site", default="cls10-0")
    parser.add_argument("--noise", default="0.3,1,3")
    parser.add_argument("--clip", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-attacks"))
    parser.add_argument("--robust-only", action="store_true", help="attacked runs under the robust rule only")
    parser.add_argument("--skip-clean-robust", action="store_true", help="no clean run under the robust rule")
    parser.add_argument("--sites-per-task", type=int, default=2, help="sites per task group (default 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke-test size run (numbers mean nothing)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    (attacks if args.mode == "attacks" else dp)(args, seeds)


if __name__ == "__main__":
    main()
