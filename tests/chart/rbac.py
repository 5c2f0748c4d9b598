"""Kubernetes RBAC semantics for the chart's tests: what permission each API request needs, and
whether a rendered (Cluster)Role grants it.

A request needs (verb, apiGroup, resource, subresource) like the API server's authorizer computes
it: the verb from the HTTP method (GET on a name is `get`, on a collection `list`, or `watch`
with ?watch=true; POST `create`; PATCH `patch`; PUT `update`; DELETE `delete` or
`deletecollection`). Creating an object whose ownerReferences set blockOwnerDeletion also needs
`update` on the owner's `finalizers` subresource: the OwnerReferencesPermissionEnforcement
admission plugin (on in every conformant cluster) checks it. Discovery (GET /api, /apis,
/apis/<group>/<version>) is a non-resource URL every authenticated user may read through the
built-in `system:discovery` ClusterRole, so no role of ours has to grant it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tests.support.kubeapi import PLURALS, LoggedRequest

DISCOVERY = re.compile(r"^/(api|apis)(/[^/]+){0,2}/?$")


@dataclass(frozen=True, order=True)
class Permission:
    verb: str
    group: str
    resource: str  # with the subresource, as RBAC writes it: "federationrounds/status"

    def __str__(self) -> str:
        return f"{self.verb} {self.group or 'core'}/{self.resource}"


@dataclass(frozen=True)
class Need:
    """A permission one request needs, and which request (for messages)."""

    permission: Permission
    namespace: str | None
    request: str
    name: str | None = None  # the object's name, for rules restricted by resourceNames


@dataclass(frozen=True)
class Grant:
    """A permission a rule grants; `names` from resourceNames (None: any name)."""

    permission: Permission
    names: frozenset[str] | None = None


def _verb(r: LoggedRequest) -> str:
    method = r.method.upper()
    if method == "GET":
        if r.name:
            return "get"
        return "watch" if str(r.params.get("watch", "")).lower() in ("true", "1") else "list"
    if method == "DELETE":
        return "delete" if r.name else "deletecollection"
    verbs = {"POST": "create", "PATCH": "patch", "PUT": "update"}
    if method not in verbs:
        raise AssertionError(f"no RBAC verb for {method} {r.path}")
    return verbs[method]


def _owner_finalizers(r: LoggedRequest) -> Iterable[Permission]:
    data = r.data if isinstance(r.data, Mapping) else {}
    for owner in (data.get("metadata") or {}).get("ownerReferences") or []:
        if owner.get("blockOwnerDeletion"):
            group = owner["apiVersion"].rpartition("/")[0]
            yield Permission("update", group, f"{PLURALS[owner['kind']]}/finalizers")


def needs(requests: Iterable[LoggedRequest]) -> tuple[list[Need], list[str]]:
    """The permissions the requests need, and the discovery paths they read (no role needed)."""
    out: list[Need] = []
    discovery: list[str] = []
    for r in requests:
        label = f"{r.method} {r.path}" + (
            f"?{'&'.join(f'{k}={v}' for k, v in sorted(r.params.items()))}" if r.params else ""
        )
        if r.plural is None:
            if r.method.upper() != "GET" or not DISCOVERY.match(r.path):
                raise AssertionError(f"an API call that is neither a resource nor discovery: {label}")
            discovery.append(r.path)
            continue
        resource = r.plural + (f"/{r.subresource}" if r.subresource else "")
        out.append(Need(Permission(_verb(r), r.group or "", resource), r.namespace, label, r.name))
        if _verb(r) in ("create", "patch", "update"):
            out.extend(Need(p, r.namespace, label + " (ownerReferences)") for p in _owner_finalizers(r))
    return out, discovery


def grants(rules: Iterable[Mapping[str, Any]]) -> list[Grant]:
    """Every (verb, group, resource) the rules grant, spelled out (no wildcards allowed)."""
    out = []
    for rule in rules:
        names = frozenset(rule["resourceNames"]) if rule.get("resourceNames") else None
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), rule
                    out.append(Grant(Permission(verb, group, resource), names))
    return out


def granted(rules: Iterable[Mapping[str, Any]]) -> set[Permission]:
    """The permissions the rules grant, for some name or all."""
    return {g.permission for g in grants(rules)}


# RBAC docs: resourceNames cannot restrict create, list, watch or deletecollection (the request
# carries no name to check), so a rule with resourceNames grants those verbs to nothing.
NAMED_VERBS = {"get", "update", "patch", "delete"}


def allows(rules: Iterable[Mapping[str, Any]], need: Need) -> bool:
    return any(
        g.permission == need.permission
        and (g.names is None or (need.permission.verb in NAMED_VERBS and need.name in g.names))
        for g in grants(rules)
    )
