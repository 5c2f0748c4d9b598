"""Mapping a checkpoint's keys onto a federation's model, with a report of everything that did
not fit. Pure: plain arrays and shapes in, arrays and a report out.

Rules are explicit prefix rewrites `SOURCE=TARGET`, the longest matching source prefix winning:
`backbone.=encoder.` puts `backbone.conv1.weight` at `encoder.conv1.weight`, `fc.=` drops the
checkpoint's own head. Targets are the model's names: `encoder.<p>` for the shared encoder,
`tasks.<task>.decoder.<p>` for a task group's decoder. Without rules every key must already be
a target name. A part (the encoder, or one task's decoder) that receives any key must receive
all of them; a part that receives none keeps its seeded initialisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


class MappingError(ValueError):
    """A prefix rule is malformed."""


@dataclass(frozen=True)
class Rule:
    source: str
    target: str  # empty: drop the matching keys

    @classmethod
    def parse(cls, text: str) -> Rule:
        source, sep, target = text.partition("=")
        if not sep:
            raise MappingError(
                f"{text!r} is not a prefix rule: use SOURCE=TARGET, e.g. backbone.=encoder. (or fc.= to drop)"
            )
        if target and not (target.startswith("encoder") or target.startswith("tasks.")):
            raise MappingError(
                f"{text!r}: the target must start with encoder. or tasks.<task>.decoder. (or be empty to drop the keys)"
            )
        return cls(source=source, target=target)


def part_of(target: str) -> str:
    """`encoder`, or `tasks.<task>.decoder`: the unit that is loaded all or nothing."""
    if target.startswith("encoder."):
        return "encoder"
    pieces = target.split(".")
    return ".".join(pieces[:3]) if len(pieces) > 3 and pieces[0] == "tasks" else target


@dataclass(frozen=True)
class MappingReport:
    loaded: Mapping[str, str] = field(default_factory=dict)  # target <- source
    dropped: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    misshaped: tuple[str, ...] = ()
    seeded_parts: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return bool(self.loaded) and not (self.unexpected or self.missing or self.misshaped)

    def render(self, limit: int = 20) -> str:
        lines = []
        for title, items in (
            ("unexpected (no rule maps them onto a model key)", self.unexpected),
            ("missing (the model needs them: a part is loaded all or nothing)", self.missing),
            ("mis-shaped", self.misshaped),
        ):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines += [f"  {item}" for item in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        if not self.loaded and not lines:
            lines.append("no key of the checkpoint reached the model: add --map rules (see --help)")
        if self.seeded_parts:
            lines.append(f"kept their seeded initialisation: {', '.join(self.seeded_parts)}")
        if self.dropped:
            lines.append(f"dropped by an empty rule: {len(self.dropped)} keys")
        return "\n".join(lines)


def _rewrite(key: str, rules: Sequence[Rule]) -> tuple[str | None, bool]:
    """(target or None when dropped, whether a rule matched)."""
    best: Rule | None = None
    for rule in rules:
        if key.startswith(rule.source) and (best is None or len(rule.source) > len(best.source)):
            best = rule
    if best is None:
        return (key, False) if not rules else (None, False)
    return ((best.target + key[len(best.source) :]) if best.target else None, True)


def map_weights(
    source: Mapping[str, np.ndarray], targets: Mapping[str, tuple[int, ...]], rules: Iterable[Rule]
) -> tuple[dict[str, np.ndarray], MappingReport]:
    """The checkpoint's arrays under the model's names (float32), and what did not fit."""
    rules = list(rules)
    loaded: dict[str, str] = {}
    values: dict[str, np.ndarray] = {}
    dropped, unexpected, misshaped = [], [], []
    for key in sorted(source):
        target, matched = _rewrite(key, rules)
        if target is None:
            if matched:
                dropped.append(key)
            else:
                unexpected.append(f"{key} (no --map rule matches it)")
            continue
        if target not in targets:
            unexpected.append(f"{key} -> {target}" if target != key else key)
            continue
        if target in loaded:
            unexpected.append(f"{key} -> {target} (already loaded from {loaded[target]})")
            continue
        array = np.asarray(source[key])
        if tuple(array.shape) != tuple(targets[target]):
            misshaped.append(f"{target} <- {key}: checkpoint {tuple(array.shape)}, model {tuple(targets[target])}")
            continue
        loaded[target] = key
        values[target] = np.ascontiguousarray(array, dtype=np.float32)
    reached = {part_of(t) for t in loaded} | {part_of(m.split(" ")[0]) for m in misshaped}
    missing = sorted(
        t for t in targets if part_of(t) in reached and t not in loaded and not _is_misshaped(t, misshaped)
    )
    seeded = sorted({part_of(t) for t in targets} - reached)
    report = MappingReport(
        loaded=loaded,
        dropped=tuple(dropped),
        unexpected=tuple(unexpected),
        missing=tuple(missing),
        misshaped=tuple(misshaped),
        seeded_parts=tuple(seeded),
    )
    return values, report


def _is_misshaped(target: str, misshaped: Sequence[str]) -> bool:
    return any(m.startswith(f"{target} <- ") for m in misshaped)
