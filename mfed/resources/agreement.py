"""What the sites a round selects must agree on: its encoder, and per task the task's type,
parameters and decoder. The operator waits on these (a site admin can fix them); the pilot
refuses to start on them. One check, so both say the same."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mfed.resources.views import RoundView, SiteTaskView
from mfed.spec import ArchSpec


@dataclass(frozen=True)
class Disagreement:
    reason: str  # EncoderMismatch, TaskMismatch or DecoderMismatch: the status condition's reason
    message: str


def arch_text(arch: ArchSpec) -> str:
    return f"{arch.name} {dict(arch.params)}"


def site_disagreements(r: RoundView, sites: Sequence[SiteTaskView]) -> list[Disagreement]:
    found: list[Disagreement] = []
    by_task: dict[str, SiteTaskView] = {}
    for site in sorted(sites, key=lambda s: s.name):
        if site.encoder is not None and site.encoder != r.encoder:
            found.append(
                Disagreement(
                    "EncoderMismatch",
                    f"SiteTask {site.name} pins encoder "
                    f"{arch_text(site.encoder)} but the round uses {arch_text(r.encoder)}; "
                    "make them equal or remove spec.encoder from the SiteTask",
                )
            )
        first = by_task.setdefault(site.task_name, site)
        if first is site:
            continue
        if (first.task_type, dict(first.task_params)) != (site.task_type, dict(site.task_params)):
            found.append(
                Disagreement(
                    "TaskMismatch",
                    f"sites {first.name} and {site.name} both train task "
                    f"{site.task_name} but with different type/params ({first.task_type} "
                    f"{dict(first.task_params)} vs {site.task_type} {dict(site.task_params)}); "
                    "make spec.task equal at every site of a task",
                )
            )
        if first.decoder != site.decoder:
            found.append(
                Disagreement(
                    "DecoderMismatch",
                    f"sites {first.name} ({arch_text(first.decoder)}) and "
                    f"{site.name} ({arch_text(site.decoder)}) of task {site.task_name} disagree "
                    "on the decoder; use the same spec.decoder for every site of a task",
                )
            )
    return found
