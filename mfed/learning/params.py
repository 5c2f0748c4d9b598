"""Checking a plugin's keyword parameters (`spec.encoder.params`, `spec.decoder.params`, ...).

Built-ins use these, and plugins may: an unknown or malformed parameter fails with the
architecture's name, the parameter and what is allowed, which the trainer reports as bad input
(exit code 2) instead of a stack trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ArchError(ValueError):
    """An architecture name or parameter is invalid, or two parts do not fit together."""


def with_defaults(params: Mapping[str, Any], defaults: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """`params` over `defaults`; a key `defaults` does not have is refused (`what`: "encoder 'x'")."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ArchError(f"{what} has no parameter {unknown[0]!r}; allowed: {', '.join(sorted(defaults)) or 'none'}")
    return {**defaults, **params}


def positive_int(params: Mapping[str, Any], name: str, *, what: str) -> int:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArchError(f"{what}: parameter {name!r} must be a positive integer, got {value!r}")
    return value


def int_list(params: Mapping[str, Any], name: str, *, what: str, allow_empty: bool = False) -> list[int]:
    value = params[name]
    if (
        not isinstance(value, list | tuple)
        or (not value and not allow_empty)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ArchError(f"{what}: parameter {name!r} must be a list of positive integers, got {value!r}")
    return [int(v) for v in value]
