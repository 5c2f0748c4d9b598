"""`mfed pilot`: a whole federation on one machine, every method side by side."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mfed.pilot.config import PilotConfig


def run_pilot(
    config: PilotConfig, out_dir: Path, *, show_progress: bool = True, workers: int | None = None
) -> dict[str, Any]:
    """Run every method for every seed; write results.json and metrics.png under `out_dir`.

    `workers` processes train a round's sites side by side (None: one per core, at most one per
    site; 0: in this process, one after the other)."""
    import torch
    from tqdm import tqdm

    from mfed.learning.encoders import build_encoder, input_spec_of
    from mfed.learning.tasks import build_task
    from mfed.pilot.report import format_table, plot, summarize, write_results
    from mfed.pilot.runner import (
        SitePool,
        higher_is_better,
        run_method,
        site_data,
        total_site_rounds,
    )

    # Deterministic kernels: the same seed gives the same numbers on the same machine.
    torch.use_deterministic_algorithms(True, warn_only=True)
    directions = higher_is_better(config)
    shape = input_spec_of(build_encoder(config.encoder))
    tasks = {t: config.task_definition(t)[0] for t in config.tasks}
    metric_names = {t: build_task(spec.type, spec.params, shape).metric_name for t, spec in tasks.items()}
    if workers is None:
        workers = min(os.cpu_count() or 1, config.site_count)
    started = time.perf_counter()
    runs = []
    with (
        SitePool(workers) as pool,
        tqdm(total=total_site_rounds(config), unit="site-round", disable=not show_progress, dynamic_ncols=True) as bar,
    ):
        for seed in config.seeds:
            data = site_data(config, seed)
            for method in config.methods:
                bar.set_description(f"seed {seed} {method.value}")
                runs.append(run_method(method, config, seed, data, directions, lambda: bar.update(1), pool))
    results = summarize(runs, config.to_dict(), directions, metric_names, time.perf_counter() - started)
    write_results(results, out_dir / "results.json")
    plot(results, out_dir / "metrics.png")
    results["table"] = format_table(results)
    return results
