"""Validate a custom resource the way kube-apiserver does on create and update, offline.

Two parts, like the server: the openAPIV3Schema (with jsonschema; stricter than the server,
which prunes unknown fields where this reports them) and every `x-kubernetes-validations` rule,
compiled and evaluated by a real CEL implementation (PyPI `common-expression-language`).

How rules are applied, as the Kubernetes documentation ("Validation rules") describes it:
- `self` is the value at the rule's schema node; a rule on an absent optional field does not run;
  a rule under `items` or `additionalProperties` runs once per element;
- numbers are doubles where the schema says `number` and ints where it says `integer`;
- at the root, `self.metadata` holds only `name` and `generateName`;
- a transition rule (one that reads `oldSelf`) runs only on an update, and only where the old
  object has a value at the same, correlatable path (object fields and list-map items by key).
What this does not reproduce: cel-go's type checking against the schema at CRD creation (the
field references of each rule are resolved against the schema instead: crd_schema.rule_cost_errors),
Kubernetes' CEL library extensions (the rules here use only standard CEL), and runtime cost.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cel
import jsonschema

TRANSITION = re.compile(r"\boldSelf\b")


@dataclass(frozen=True)
class Rule:
    path: str  # the schema node's place in an object, e.g. spec.data or spec.env[]
    rule: str
    message: str
    program: Any  # the compiled cel.Program

    @property
    def transition(self) -> bool:
        return bool(TRANSITION.search(self.rule))


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """openAPIV3Schema -> JSON Schema that rejects unknown fields (except where preserved)."""
    out = copy.deepcopy(dict(schema))

    def walk(node: dict[str, Any]) -> None:
        node.pop("x-kubernetes-validations", None)
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        for child in (node.get("properties") or {}).values():
            walk(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])

    walk(out)
    out["properties"]["metadata"] = {"type": "object"}
    return out


def rules_of(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any], Mapping[str, Any]]]:
    """(object path, schema node, rule entry) for every rule, compiled or not."""
    for entry in schema.get("x-kubernetes-validations") or []:
        yield path, schema, entry
    for name, child in (schema.get("properties") or {}).items():
        yield from rules_of(child, f"{path}.{name}" if path else name)
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(schema.get(key), Mapping):
            yield from rules_of(schema[key], path + suffix)


class CRDValidator:
    """One version's schema and compiled rules; `errors(obj, old)` lists every refusal."""

    def __init__(self, crd: Mapping[str, Any], version: int = 0) -> None:
        self.schema = crd["spec"]["versions"][version]["schema"]["openAPIV3Schema"]
        self._json = jsonschema.Draft4Validator(strict_schema(self.schema))
        self.rules = [
            Rule(path=path, rule=entry["rule"], message=entry.get("message", ""), program=cel.compile(entry["rule"]))
            for path, _, entry in rules_of(self.schema)
        ]
        self._by_path: dict[str, list[Rule]] = {}
        for rule in self.rules:
            self._by_path.setdefault(rule.path, []).append(rule)

    def errors(self, obj: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> list[str]:
        found = [f"{_field_path(e.absolute_path)}: {e.message}" for e in self._json.iter_errors(obj)]
        root = dict(obj)
        root["metadata"] = {k: v for k, v in (obj.get("metadata") or {}).items() if k in ("name", "generateName")}
        old_root = None
        if old is not None:
            old_root = dict(old)
            old_root["metadata"] = {
                k: v for k, v in (old.get("metadata") or {}).items() if k in ("name", "generateName")
            }
        found += self._evaluate(self.schema, root, old_root, "", "")
        return found

    def _evaluate(self, schema: Mapping[str, Any], value: Any, old: Any, rule_path: str, object_path: str) -> list[str]:
        errors = []
        typed = _typed(schema, value)
        typed_old = _typed(schema, old) if old is not None else None
        for rule in self._by_path.get(rule_path, []):
            if rule.transition and typed_old is None:
                continue
            context = cel.Context()
            context.add_variable("self", typed)
            if typed_old is not None:
                context.add_variable("oldSelf", typed_old)
            try:
                ok = rule.program.execute(context)
            except Exception as exc:  # the server reports a rule that cannot be evaluated as invalid too
                errors.append(f"{object_path or '(root)'}: Invalid value: rule {rule.rule!r} failed: {exc}")
                continue
            if ok is not True:
                errors.append(f"{object_path or '(root)'}: Invalid value: {_kind(value)!r}: {rule.message}")
        for name, child in (schema.get("properties") or {}).items():
            if isinstance(value, Mapping) and name in value and not (rule_path == "" and name == "metadata"):
                child_old = old.get(name) if isinstance(old, Mapping) else None
                sub = f"{rule_path}.{name}" if rule_path else name
                where = f"{object_path}.{name}" if object_path else name
                errors += self._evaluate(child, value[name], child_old, sub, where)
        items = schema.get("items")
        if isinstance(items, Mapping) and isinstance(value, list):
            keys = schema.get("x-kubernetes-list-map-keys") if schema.get("x-kubernetes-list-type") == "map" else None
            for index, item in enumerate(value):
                errors += self._evaluate(
                    items, item, _correlated(item, old, keys), f"{rule_path}[]", f"{object_path}[{index}]"
                )
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping) and isinstance(value, Mapping):
            for key, item in value.items():
                item_old = old.get(key) if isinstance(old, Mapping) else None
                errors += self._evaluate(extra, item, item_old, f"{rule_path}{{}}", f"{object_path}[{key}]")
        return errors


def _field_path(parts: Iterable[Any]) -> str:
    """A jsonschema error path as the API server prints a field: spec.env[0].name."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _correlated(item: Any, old: Any, keys: list[str] | None) -> Any:
    """The old list item an item corresponds to: only list-map items correlate (by their keys)."""
    if not keys or not isinstance(old, list) or not isinstance(item, Mapping):
        return None
    return next((o for o in old if isinstance(o, Mapping) and all(o.get(k) == item.get(k) for k in keys)), None)


def _typed(schema: Mapping[str, Any], value: Any) -> Any:
    """The value as CEL sees it under this schema: `number` fields are doubles."""
    if value is None:
        return None
    kind = schema.get("type")
    if kind == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, Mapping):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), Mapping) else {}
        return {k: _typed(properties.get(k, extra or {}), v) for k, v in value.items()}
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), Mapping) else {}
        return [_typed(items, v) for v in value]
    return value


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)
