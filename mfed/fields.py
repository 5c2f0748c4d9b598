"""Reading typed fields out of JSON-like mappings, with errors that name the field and the fix.

Every document that crosses a process boundary (round spec, manifests, pilot configs) is parsed
through this, so a bad value always reports its full dotted path.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Mapping, Sequence
from typing import Any


class FieldError(ValueError):
    """A field is missing, has the wrong type, or is out of range."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class Fields:
    """A view over one JSON object that knows where it sits in the document."""

    def __init__(self, data: object, path: builtins.str) -> None:
        if not isinstance(data, Mapping):
            raise FieldError(path, f"must be an object, got {type(data).__name__}")
        self._data: Mapping[builtins.str, Any] = data
        self.path = path

    def where(self, name: builtins.str) -> builtins.str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: builtins.str) -> builtins.bool:
        return self._data.get(name) is not None

    def reject_unknown(self, allowed: Sequence[builtins.str]) -> None:
        unknown = sorted(set(self._data) - set(allowed))
        if unknown:
            raise FieldError(self.where(unknown[0]), f"unknown field; allowed fields are {', '.join(allowed)}")

    def raw(self, name: builtins.str, default: Any = None) -> Any:
        return self._data.get(name, default)

    def obj(self, name: builtins.str, *, required: builtins.bool = True) -> Fields:
        value = self._data.get(name)
        if value is None:
            if required:
                raise FieldError(self.where(name), "is required")
            value = {}
        return Fields(value, self.where(name))

    def mapping(self, name: builtins.str) -> dict[builtins.str, Any]:
        value = self._data.get(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise FieldError(self.where(name), "must be an object")
        return dict(value)

    def str(
        self, name: builtins.str, default: builtins.str | None = None, *, choices: Sequence[builtins.str] = ()
    ) -> builtins.str:
        value = self._data.get(name, default)
        if value is None:
            raise FieldError(self.where(name), "is required")
        if not isinstance(value, str):
            raise FieldError(self.where(name), f"must be a string, got {value!r}")
        if choices and value not in choices:
            raise FieldError(self.where(name), f"is {value!r}; use one of {', '.join(choices)}")
        return value

    def opt_str(self, name: builtins.str) -> builtins.str | None:
        return None if self._data.get(name) is None else self.str(name)

    def int(
        self, name: builtins.str, default: builtins.int | None = None, *, minimum: builtins.int | None = None
    ) -> builtins.int:
        value = self._data.get(name, default)
        if value is None:
            raise FieldError(self.where(name), "is required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(self.where(name), f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise FieldError(self.where(name), f"is {value}; it must be at least {minimum}")
        return value

    def opt_int(self, name: builtins.str, *, minimum: builtins.int | None = None) -> builtins.int | None:
        return None if self._data.get(name) is None else self.int(name, minimum=minimum)

    def float(
        self,
        name: builtins.str,
        default: builtins.float | None = None,
        *,
        minimum: builtins.float | None = None,
        maximum: builtins.float | None = None,
        exclusive_minimum: builtins.bool = False,
    ) -> builtins.float:
        value = self._data.get(name, default)
        if value is None:
            raise FieldError(self.where(name), "is required")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FieldError(self.where(name), f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise FieldError(self.where(name), "must be a finite number")
        if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
            bound = "greater than" if exclusive_minimum else "at least"
            raise FieldError(self.where(name), f"is {value}; it must be {bound} {minimum}")
        if maximum is not None and value > maximum:
            raise FieldError(self.where(name), f"is {value}; it must be at most {maximum}")
        return value

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._data.get(name, default)
        if not isinstance(value, bool):
            raise FieldError(self.where(name), f"must be true or false, got {value!r}")
        return value

    def str_list(self, name: builtins.str) -> tuple[builtins.str, ...]:
        value = self._data.get(name) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise FieldError(self.where(name), "must be a list of strings")
        return tuple(value)

    def int_list(self, name: builtins.str) -> tuple[builtins.int, ...]:
        value = self._data.get(name) or []
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise FieldError(self.where(name), "must be a list of integers")
        return tuple(value)
