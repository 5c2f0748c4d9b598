"""What kube-apiserver checks when a CRD is created, done offline: structural-schema rules and
the CEL cost limits.

The emulated API accepts any CRD, so these rules are restated here from their sources
(kubernetes/kubernetes, staging/src/k8s.io/apiextensions-apiserver, read at 1.36):
- S: `pkg/apiserver/schema/validation.go` (`validateStructuralInvariants`,
  `validateStructuralMetadataInvariants`, `validateNestedValueValidation`);
- V: `pkg/apis/apiextensions/validation/validation.go` (`validateCustomResourceDefinitionValidation`,
  `ValidateCustomResourceDefinitionOpenAPISchema`, `validateSimpleJSONPath`, printer columns);
- D: the Kubernetes documentation, "Specifying a structural schema" and "Validation rules" ->
  "Resource use by validation functions" (tasks/extend-kubernetes/custom-resources/
  custom-resource-definitions).
Each check below names its source. A check that is stricter than the server says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# V: allowedFieldsAtRootSchema (with the status subresource), in JSON spelling.
ALLOWED_AT_ROOT = {
    "description", "type", "format", "title", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "multipleOf", "required",
    "items", "properties", "externalDocs", "example", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
}  # fmt: skip
# V: ValidateCustomResourceDefinitionOpenAPISchema refuses these keywords outright.
UNSUPPORTED = {
    "id": "id is not supported",
    "$ref": "$ref is not supported",
    "definitions": "definitions is not supported",
    "dependencies": "dependencies is not supported",
    "patternProperties": "patternProperties is not supported",
    "additionalItems": "additionalItems is not supported",
}
JUNCTORS = ("anyOf", "allOf", "oneOf", "not")
# S: validateNestedValueValidation: what a value validation under a junctor may not specify.
FORBIDDEN_UNDER_JUNCTOR = (
    "type", "description", "title", "default", "nullable", "externalDocs", "additionalProperties",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource", "x-kubernetes-int-or-string",
    "x-kubernetes-list-map-keys", "x-kubernetes-list-type", "x-kubernetes-map-type", "x-kubernetes-validations",
)  # fmt: skip
SCALARS = {"string", "integer", "number", "boolean"}
PRINTER_TYPES = {"integer", "number", "string", "boolean", "date"}  # V: printerColumnDatatypes
PRINTER_FORMATS = {"int32", "int64", "float", "double", "byte", "date", "date-time", "password"}

# The CEL cost limits (apiextensions-apiserver validation.go, apiserver pkg/apis/cel/config.go).
STATIC_ESTIMATED_COST_LIMIT = 10_000_000  # per expression, after multiplying by its cardinality
STATIC_ESTIMATED_CRD_COST_LIMIT = 100_000_000  # all expressions of one schema together


@dataclass(frozen=True)
class Node:
    """One schema node and where it is: `path` as the API server prints it, `level` root/field/item."""

    path: str
    schema: Mapping[str, Any]
    level: str  # "root", "field" or "item"
    # the enclosing lists and maps, outermost first: (path, schema) of each
    collections: tuple[tuple[str, Mapping[str, Any]], ...] = ()


def nodes(schema: Mapping[str, Any], path: str = "openAPIV3Schema") -> Iterator[Node]:
    """Every node of the structural part of `schema` (not inside anyOf/allOf/oneOf/not)."""
    yield from _walk(schema, path, "root", ())


def _walk(schema: Mapping[str, Any], path: str, level: str, collections: tuple[Any, ...]) -> Iterator[Node]:
    yield Node(path, schema, level, collections)
    for name, child in (schema.get("properties") or {}).items():
        yield from _walk(child, f"{path}.properties[{name}]", "field", collections)
    items = schema.get("items")
    if isinstance(items, Mapping):
        yield from _walk(items, f"{path}.items", "item", (*collections, (path, schema)))
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        yield from _walk(extra, f"{path}.additionalProperties", "field", (*collections, (path, schema)))


def structural_errors(crd: Mapping[str, Any]) -> list[str]:
    """Every reason kube-apiserver would refuse this CRD's schemas and printer columns."""
    errors: list[str] = []
    for index, version in enumerate(crd["spec"]["versions"]):
        where = f"spec.versions[{index}]"
        schema = version["schema"]["openAPIV3Schema"]
        errors += _root_errors(schema, where, "status" in (version.get("subresources") or {}))
        for node in nodes(schema, f"{where}.schema.openAPIV3Schema"):
            errors += _node_errors(node)
        for column_index, column in enumerate(version.get("additionalPrinterColumns") or []):
            errors += _column_errors(column, f"{where}.additionalPrinterColumns[{column_index}]")
    return errors


def _root_errors(schema: Mapping[str, Any], where: str, status_subresource: bool) -> list[str]:
    errors = []
    path = f"{where}.schema.openAPIV3Schema"
    if schema.get("type") != "object":
        errors.append(f"{path}.type: must be object at the root (S: validateStructuralInvariants)")
    if "additionalProperties" in schema:
        errors.append(f"{path}.additionalProperties: Forbidden: must not be used at the root (S)")
    if schema.get("nullable"):
        errors.append(f"{path}.nullable: Forbidden: nullable cannot be true at the root (V)")
    if status_subresource:
        extra = sorted(set(schema) - ALLOWED_AT_ROOT)
        if extra:
            errors.append(
                f"{path}: only {sorted(ALLOWED_AT_ROOT)} are allowed at the root with status, not {extra} (V)"
            )
    properties = schema.get("properties") or {}
    for name in ("apiVersion", "kind"):
        if name in properties and properties[name].get("type") != "string":
            errors.append(f"{path}.properties[{name}].type: must be string (S)")
    if "metadata" in properties:
        errors += _root_metadata_errors(properties["metadata"], f"{path}.properties[metadata]")
    return errors


def _root_metadata_errors(metadata: Mapping[str, Any], path: str) -> list[str]:
    """S: validateStructuralMetadataInvariants. At the root, metadata may be `type: object` and
    may restrict name and generateName; anything else (a description included) is Forbidden,
    because the server fills metadata itself. This is the rule the first CRDs broke."""
    if metadata.get("type") not in (None, "object"):
        return [f"{path}.type: must be object (S)"]
    rest = {k: v for k, v in metadata.items() if k not in ("type", "properties")}
    properties = set(metadata.get("properties") or {})
    if rest or properties - {"name", "generateName"}:
        return [
            f"{path}: Forbidden: must not specify anything other than name and generateName, but metadata is "
            f"implicitly specified (S; found {sorted(rest) + sorted(properties - {'name', 'generateName'})})"
        ]
    return []


def _node_errors(node: Node) -> list[str]:
    s, path = node.schema, node.path
    errors = [f"{path}.{key}: Forbidden: {why} (V)" for key, why in UNSUPPORTED.items() if key in s]
    int_or_string = bool(s.get("x-kubernetes-int-or-string"))
    preserve = s.get("x-kubernetes-preserve-unknown-fields")
    kind = s.get("type")
    if preserve is not None and preserve is not True:
        errors.append(f"{path}.x-kubernetes-preserve-unknown-fields: must be true or undefined (V)")
    if kind is None and not int_or_string and not preserve and node.level != "root":
        what = "specified array items" if node.level == "item" else "specified object fields"
        errors.append(f"{path}.type: Required: must not be empty for {what} (S: validateStructuralInvariants)")
    if kind == "null":
        errors.append(f"{path}.type: Forbidden: type cannot be set to null, use nullable as an alternative (V)")
    if kind == "array" and not isinstance(s.get("items"), Mapping):
        errors.append(f"{path}.items: must be specified, as one schema object and not an array (S, V)")
    if s.get("uniqueItems"):
        errors.append(f"{path}.uniqueItems: Forbidden: uniqueItems cannot be set to true (V: quadratic)")
    if s.get("properties") and "additionalProperties" in s and s["additionalProperties"] is not True:
        errors.append(
            f"{path}.additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive (V)"
        )
    if int_or_string:
        if preserve:
            errors.append(
                f"{path}.x-kubernetes-preserve-unknown-fields: must be false if x-kubernetes-int-or-string is true (S)"
            )
        if s.get("x-kubernetes-embedded-resource"):
            errors.append(
                f"{path}.x-kubernetes-embedded-resource: must be false if x-kubernetes-int-or-string is true (S)"
            )
        if kind is not None:
            errors.append(
                f"{path}.type: must be empty with x-kubernetes-int-or-string (S: the anyOf pattern gives the types)"
            )
        if s.get("anyOf") not in (None, [{"type": "integer"}, {"type": "string"}]):
            errors.append(f"{path}.anyOf: with x-kubernetes-int-or-string it must be exactly [integer, string] (S)")
    if s.get("x-kubernetes-embedded-resource") and (kind != "object" or not (preserve or s.get("properties"))):
        errors.append(
            f"{path}: x-kubernetes-embedded-resource needs type object and properties or preserve-unknown-fields (S)"
        )
    errors += _list_and_map_type_errors(s, path)
    errors += _junctor_errors(s, path, int_or_string)
    errors += _rule_shape_errors(node)
    if "default" in s:
        errors += _default_errors(node)
    return errors


def _list_and_map_type_errors(s: Mapping[str, Any], path: str) -> list[str]:
    """V: the x-kubernetes-list-type / list-map-keys / map-type checks."""
    errors = []
    list_type, keys = s.get("x-kubernetes-list-type"), s.get("x-kubernetes-list-map-keys") or []
    if "x-kubernetes-map-type" in s and s.get("type") != "object":
        errors.append(f"{path}.type: must be object if x-kubernetes-map-type is specified (V)")
    if list_type is not None and s.get("type") != "array":
        errors.append(f"{path}.type: must be array if x-kubernetes-list-type is specified (V)")
    if keys and list_type != "map":
        errors.append(f"{path}.x-kubernetes-list-type: must be map if x-kubernetes-list-map-keys is non-empty (V)")
    items = s.get("items") if isinstance(s.get("items"), Mapping) else {}
    if list_type == "set" and (
        items.get("x-kubernetes-list-type", "atomic") != "atomic" or items.get("type") == "object"
    ):
        errors.append(f"{path}.items: must be atomic (a scalar) as item of a list with x-kubernetes-list-type=set (V)")
    if list_type == "map":
        if not keys:
            errors.append(f"{path}.x-kubernetes-list-map-keys: must not be empty if x-kubernetes-list-type is map (V)")
        if items.get("type") != "object":
            errors.append(f"{path}.items.type: must be object if parent array's x-kubernetes-list-type is map (V)")
        properties, required = items.get("properties") or {}, set(items.get("required") or [])
        if len(set(keys)) != len(keys):
            errors.append(f"{path}.x-kubernetes-list-map-keys: must not contain duplicate entries (V)")
        for key in keys:
            if key not in properties:
                errors.append(
                    f"{path}.x-kubernetes-list-map-keys: entries must all be names of item properties ({key}) (V)"
                )
                continue
            if properties[key].get("type") not in SCALARS:
                errors.append(f"{path}.items.properties[{key}].type: must be a scalar type for a list-map key (V)")
            if key not in required and "default" not in properties[key]:
                errors.append(
                    f"{path}.items.properties[{key}].default: Required: a list-map key must have a default or be required (V)"
                )
            if properties[key].get("nullable"):
                errors.append(
                    f"{path}.items.properties[{key}].nullable: Forbidden: a list-map key cannot be nullable (V)"
                )
    return errors


def _junctor_errors(s: Mapping[str, Any], path: str, int_or_string: bool) -> list[str]:
    """S: value validations under anyOf/allOf/oneOf/not may only restrict, never define structure."""
    errors = []
    for junctor in JUNCTORS:
        entries = s.get(junctor)
        if entries is None or (junctor == "anyOf" and int_or_string):
            continue
        for i, entry in enumerate([entries] if junctor == "not" else entries):
            for nested_path, nested in _value_validations(entry, f"{path}.{junctor}[{i}]"):
                errors += [
                    f"{nested_path}.{k}: Forbidden: must be empty to be structural (S)"
                    for k in FORBIDDEN_UNDER_JUNCTOR
                    if k in nested
                ]
                if "metadata" in (nested.get("properties") or {}):
                    errors.append(
                        f"{nested_path}.properties[metadata]: Forbidden: must not be specified in a nested context (S)"
                    )
    return errors


def _value_validations(entry: Mapping[str, Any], path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield path, entry
    for name, child in (entry.get("properties") or {}).items():
        yield from _value_validations(child, f"{path}.properties[{name}]")
    if isinstance(entry.get("items"), Mapping):
        yield from _value_validations(entry["items"], f"{path}.items")


def _rule_shape_errors(node: Node) -> list[str]:
    """V: the shape of each x-kubernetes-validations entry (the rule itself is compiled by CEL)."""
    errors = []
    for i, rule in enumerate(node.schema.get("x-kubernetes-validations") or []):
        where = f"{node.path}.x-kubernetes-validations[{i}]"
        text, message = rule.get("rule"), rule.get("message")
        if not text:
            errors.append(f"{where}.rule: Required: rule is not specified (V)")
        if message is not None and not message.strip():
            errors.append(f"{where}.message: must be non-empty if specified (V)")
        if message and re.search(r"[\n\r]", message):
            errors.append(f"{where}.message: must not contain line breaks (V)")
        if text and re.search(r"[\n\r]", text) and not message:
            errors.append(f"{where}.message: Required: message must be specified if rule contains line breaks (V)")
        if text and "oldSelf" in text:
            for collection_path, collection in node.collections:
                atomic = collection.get("type") == "array" and collection.get("x-kubernetes-list-type") != "map"
                if atomic:
                    errors.append(
                        f"{where}.rule: oldSelf cannot be used on the uncorrelatable portion of the schema within {collection_path} (V)"
                    )
    return errors


def _default_errors(node: Node) -> list[str]:
    """V/D: a default must not sit in metadata and must already be what the server would store
    (pruned: no unknown fields; the server refuses a default it would prune). Stricter than the
    server: this project sets no schema defaults at all (GitOps tools would see drift)."""
    return [f"{node.path}.default: this project's CRDs carry no defaults (the operator defaults unset fields)"]


def _column_errors(column: Mapping[str, Any], path: str) -> list[str]:
    """V: validateCustomResourceColumnDefinition."""
    errors = []
    if not column.get("name"):
        errors.append(f"{path}.name: Required")
    if column.get("type") not in PRINTER_TYPES:
        errors.append(f"{path}.type: must be one of {sorted(PRINTER_TYPES)}")
    if "format" in column and column["format"] not in PRINTER_FORMATS:
        errors.append(f"{path}.format: must be one of {sorted(PRINTER_FORMATS)}")
    json_path = column.get("jsonPath")
    if not json_path or not str(json_path).startswith("."):
        errors.append(f"{path}.jsonPath: Required: a JSONPath that starts with '.'")
    return errors


# --- what a rule reads, and what it may cost -------------------------------------------------

REFERENCE = re.compile(r"(?<![\w.])([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)*)")
PRESENCE = re.compile(r"has\(\s*$")
MACRO = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\.(?:exists|all|exists_one|filter|map)\(\s*([A-Za-z_]\w*)\s*,")
MEMBER_FUNCTIONS = {"size", "exists", "all", "filter", "map", "exists_one", "contains", "startsWith", "endsWith"}
ITERATING = {"exists", "all", "filter", "map", "exists_one"}
# D: at the root only metadata.name and metadata.generateName are visible to rules; the API
# server bounds them itself (a name is at most 253 characters).
ROOT_METADATA = {"name": {"type": "string", "maxLength": 253}, "generateName": {"type": "string", "maxLength": 253}}


def _resolve(
    start: Mapping[str, Any] | None, parts: list[str], root: bool
) -> tuple[list[str], Mapping[str, Any] | None]:
    schema, walked = start, []
    for part in parts:
        if part in MEMBER_FUNCTIONS or schema is None:
            break
        if schema.get("x-kubernetes-preserve-unknown-fields") and part not in (schema.get("properties") or {}):
            break  # inside a preserved subtree the server knows no fields either: dyn
        if root and walked == ["metadata"]:
            schema = ROOT_METADATA.get(part)
        else:
            schema = (schema.get("properties") or {}).get(part)
        walked.append(part)
    return walked, schema


def rule_references(node: Node, rule: str) -> list[tuple[str, Mapping[str, Any] | None, bool]]:
    """Each value the rule reads, as (path, the schema it resolves to); None when the schema
    declares no such field (cel-go's type check refuses it: undefined field). `has(x.f)` only
    tests presence and reads nothing; a macro's variable (`e` in `self.env.exists(e, e.name ...)`)
    stands for one item of the list it ranges over, and the list itself is only iterated (the
    third element: True when the value is read whole, False when only iterated)."""
    root = node.level == "root"
    bindings: dict[str, tuple[str, Mapping[str, Any] | None]] = {
        "self": ("self", node.schema),
        "oldSelf": ("oldSelf", node.schema),
    }
    for match in MACRO.finditer(rule):
        base, variable = match.group(1).split("."), match.group(2)
        if base[0] in bindings:
            name, start = bindings[base[0]]
            walked, collection = _resolve(start, base[1:], root and base[0] in ("self", "oldSelf"))
            items = collection.get("items") if collection is not None else None
            bindings[variable] = (".".join([name, *walked]) + "[]", items if isinstance(items, Mapping) else None)
    out = []
    for match in REFERENCE.finditer(rule):
        head, parts = match.group(1), [p for p in match.group(2).split(".") if p]
        if head not in bindings or PRESENCE.search(rule[: match.start()]):
            continue
        if head not in ("self", "oldSelf") and not parts:
            continue  # the macro's variable alone: its uses are counted where they read fields
        name, start = bindings[head]
        walked, schema = _resolve(start, parts, root and head in ("self", "oldSelf"))
        iterated = len(parts) > len(walked) and parts[len(walked)] in ITERATING
        out.append((".".join([name, *walked]), schema, not iterated))
    return out


def _unbounded(schema: Mapping[str, Any], path: str) -> Iterator[str]:
    """Strings without maxLength, lists without maxItems, maps without maxProperties, in a value
    a rule reads whole. A preserved (x-kubernetes-preserve-unknown-fields) subtree has no schema
    to bound: the server types it dyn and bounds it by the request size (3 MiB) at run time."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or schema.get("x-kubernetes-int-or-string"):
        return
    kind = schema.get("type")
    if kind == "string" and "maxLength" not in schema and "enum" not in schema:
        yield f"{path} (a string: add maxLength)"
    if kind == "array":
        if "maxItems" not in schema:
            yield f"{path} (a list: add maxItems)"
        if isinstance(schema.get("items"), Mapping):
            yield from _unbounded(schema["items"], f"{path}[]")
    if kind == "object":
        if isinstance(schema.get("additionalProperties"), Mapping):
            if "maxProperties" not in schema:
                yield f"{path} (a map: add maxProperties)"
            yield from _unbounded(schema["additionalProperties"], f"{path}{{}}")
        for name, child in (schema.get("properties") or {}).items():
            yield from _unbounded(child, f"{path}.{name}")


def _size(schema: Mapping[str, Any]) -> int:
    """An upper bound on the elements a rule may traverse in a value of this schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return 1
    kind = schema.get("type")
    if kind == "string":
        return (
            1 + int(schema.get("maxLength") or max((len(str(e)) for e in schema.get("enum") or [""]), default=0)) // 10
        )
    if kind == "array":
        items = schema.get("items") if isinstance(schema.get("items"), Mapping) else {}
        return 1 + int(schema.get("maxItems") or 0) * _size(items)
    if kind == "object":
        total = 1 + sum(_size(c) for c in (schema.get("properties") or {}).values())
        if isinstance(schema.get("additionalProperties"), Mapping):
            total += int(schema.get("maxProperties") or 0) * _size(schema["additionalProperties"])
        return total
    return 1


def rule_cost_errors(crd: Mapping[str, Any]) -> tuple[list[str], dict[str, int]]:
    """D/V: what kube-apiserver refuses at CRD creation for cost, in a simplified, stricter model.

    The server estimates each rule's cost from the sizes its schema allows (maxLength, maxItems,
    maxProperties; an unbounded one is sized from the 3 MiB request limit), multiplies it by the
    rule's cardinality (the product of maxItems/maxProperties of the lists and maps it sits in) and
    refuses a rule over 10^7 or a schema whose rules sum over 10^8 (validation.go,
    getExpressionCost, StaticEstimated*CostLimit). Here: every value a rule reads must be
    bounded, every enclosing list or map too, each rule is costed as (1 + the elements it may
    traverse: a string counts one per 10 characters, as cel-go charges 0.1 per character) times
    a factor of 2 for the operators, times its cardinality. Returns the errors and each rule's cost."""
    errors: list[str] = []
    costs: dict[str, int] = {}
    for index, version in enumerate(crd["spec"]["versions"]):
        for node in nodes(version["schema"]["openAPIV3Schema"], f"spec.versions[{index}]"):
            for i, entry in enumerate(node.schema.get("x-kubernetes-validations") or []):
                where = f"{node.path}.x-kubernetes-validations[{i}]"
                cardinality = 1
                for collection_path, collection in node.collections:
                    bound = collection.get("maxItems" if collection.get("type") == "array" else "maxProperties")
                    if bound is None:
                        errors.append(
                            f"{where}: runs once per element of {collection_path}, which has no maxItems/maxProperties"
                        )
                    cardinality *= int(bound or 1)
                traversed = 0
                for field_path, schema, whole in rule_references(node, entry["rule"]):
                    if schema is None:
                        errors.append(f"{where}: reads {field_path}, which the schema does not declare")
                    elif whole:
                        errors += [f"{where}: reads {problem}" for problem in _unbounded(schema, field_path)]
                        traversed += _size(schema)
                    elif "maxItems" not in schema:  # iterated: its items' reads are counted on their own
                        errors.append(f"{where}: iterates {field_path} (a list: add maxItems)")
                    else:
                        traversed += int(schema["maxItems"])
                cost = 2 * (1 + traversed) * cardinality
                costs[where] = cost
                if cost > STATIC_ESTIMATED_COST_LIMIT:
                    errors.append(f"{where}: estimated rule cost {cost} exceeds {STATIC_ESTIMATED_COST_LIMIT}")
    if sum(costs.values()) > STATIC_ESTIMATED_CRD_COST_LIMIT:
        errors.append(f"estimated rule cost total {sum(costs.values())} exceeds {STATIC_ESTIMATED_CRD_COST_LIMIT}")
    return errors, costs
