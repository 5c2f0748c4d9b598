"""Kubernetes label selectors, evaluated client-side (never trust the API server to filter)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mfed.fields import FieldError, Fields

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values  # NotIn


@dataclass(frozen=True)
class LabelSelector:
    """An empty selector matches everything (as in Kubernetes)."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.expressions
        )

    @classmethod
    def parse(cls, f: Fields) -> LabelSelector:
        f.reject_unknown(["matchLabels", "matchExpressions"])
        labels = tuple(sorted((str(k), str(v)) for k, v in f.mapping("matchLabels").items()))
        requirements = []
        for i, item in enumerate(f.raw("matchExpressions") or []):
            r = Fields(item, f"{f.path}.matchExpressions[{i}]")
            operator = r.str("operator", choices=OPERATORS)
            values = r.str_list("values")
            if operator in ("In", "NotIn") and not values:
                raise FieldError(f"{r.path}.values", f"must not be empty for operator {operator}")
            if operator in ("Exists", "DoesNotExist") and values:
                raise FieldError(f"{r.path}.values", f"must be empty for operator {operator}")
            requirements.append(Requirement(r.str("key"), operator, values))
        return cls(labels, tuple(requirements))
