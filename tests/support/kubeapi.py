"""A Kubernetes API for tests: kmock's emulator, made closer to a real API server, on loopback.

kmock stores and serves objects, but assigns no uid/resourceVersion/generation, has no status
subresource isolation and turns a failed JSON-patch `test` (or any JSON patch that does not
apply, e.g. `add` under a missing parent) into a 500 where the API server answers 422. `Emulator` adds those,
because the operator relies on them (kopf's optimistic concurrency, observedGeneration). It
still does no schema validation, label selection or garbage collection, like INFRA.md says.
The server runs in its own thread and event loop; tests talk to it over HTTP (`KubeClient`).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import gzip
import importlib.resources
import json
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.test_utils
import attrs
import kmock
import yaml
from kmock._internal import dicts as kmock_dicts  # the emulator's own merge/JSON-patch semantics

from tests.support.tls import ServerCertificate

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"

PLURALS = {
    "Secret": "secrets",
    "ConfigMap": "configmaps",
    "Job": "jobs",
    "Event": "events",
    "Namespace": "namespaces",
    "SiteTask": "sitetasks",
    "FederationRound": "federationrounds",
    "PersistentVolumeClaim": "persistentvolumeclaims",
}
CLUSTER_SCOPED = {"namespaces"}
# The bearer token in the kubeconfig that `write_kubeconfig` writes (the operator's identity).
KUBECONFIG_TOKEN = "test-token"


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """uid, resourceVersion, generation, creationTimestamp, status isolation, 422 on stale patches."""

    _rv: int = attrs.field(default=100, init=False)
    status_resources: set[str] = attrs.field(factory=set)
    # When set, a request whose bearer token is not in it gets 401, as from a real API server
    # after a token stopped being valid (kmock checks no credentials at all).
    accepted_tokens: set[str] | None = attrs.field(default=None)
    # When each request arrived (monotonic seconds, by the id of kmock's logged request): tests
    # measure how fast the operator reacts to what the kubelet reports.
    arrivals: dict[int, float] = attrs.field(factory=dict)
    # kmock matches every request against its reactions by scanning its WHOLE request log
    # (`request in view` iterates the log), so each request costs O(requests so far): at a
    # hundred sites the emulator, not the operator, was the bottleneck (seconds a request).
    # None of the emulator's reactions depends on earlier requests (no slices or counts), so the
    # finished requests move to this archive and kmock's live log holds only those in flight.
    archive: list[kmock.Request] = attrs.field(factory=list)
    _order: dict[int, int] = attrs.field(factory=dict)
    _in_flight: set[int] = attrs.field(factory=set)

    def logged(self) -> list[kmock.Request]:
        """Every request so far, archived and live, in arrival order."""
        return sorted([*self.archive, *self._requests], key=lambda r: self._order.get(id(r), 0))

    def _archive_finished(self) -> None:
        keep = [r for r in self._requests if id(r) in self._in_flight]
        if len(keep) != len(self._requests):
            self.archive.extend(r for r in self._requests if id(r) not in self._in_flight)
            self._requests[:] = keep

    async def _handle(self, request: kmock.Request) -> Any:
        self.arrivals[id(request)] = time.monotonic()
        self._order[id(request)] = len(self._order)
        self._in_flight.add(id(request))
        self._archive_finished()
        try:
            return await self._handle_request(request)
        finally:
            self._in_flight.discard(id(request))

    async def _handle_request(self, request: kmock.Request) -> Any:
        if self.accepted_tokens is not None and _bearer(request.headers) not in self.accepted_tokens:
            raise kmock.KubernetesError(status=401, reason="Unauthorized", message="Unauthorized")
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            self._prepare(request)
        return await super()._handle(request)

    def _has_status(self, request: kmock.Request) -> bool:
        return request.resource is not None and request.resource.plural in self.status_resources

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _prepare(self, request: kmock.Request) -> None:
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            if request.namespace and not meta.get("namespace"):
                meta["namespace"] = request.namespace
            meta.setdefault("uid", str(uuid.uuid4()))
            meta["resourceVersion"] = self._next_rv()
            meta["generation"] = 1
            meta["creationTimestamp"] = _now()
            if self._has_status(request):
                data.pop("status", None)  # ignored on create, as with a status subresource
            if request.resource.plural == "secrets" and "stringData" in data:
                encoded = {k: base64.b64encode(str(v).encode()).decode() for k, v in data.pop("stringData").items()}
                data["data"] = {**(data.get("data") or {}), **encoded}
            return
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            return  # kmock answers 404
        current = self._objects[key].raw
        status_only = request.subresource == "status"
        if isinstance(data, dict):
            # Optimistic concurrency, as the API server does for a patch or update that names a
            # resourceVersion (on the status subresource too): 409 unless it is the current one.
            wanted = (data.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != current.get("metadata", {}).get("resourceVersion"):
                raise kmock.KubernetesError(
                    status=409,
                    reason="Conflict",
                    message="the object has been modified; please apply your changes to the latest version",
                )
            if self._has_status(request):
                if status_only:
                    for name in [k for k in data if k != "status"]:
                        del data[name]
                else:
                    data.pop("status", None)
            after = kmock_dicts.patch_dict(copy.deepcopy(current), data)
            meta = data.setdefault("metadata", {})
        elif isinstance(data, list):
            for op in data:
                if (
                    op.get("op") == "test"
                    and op.get("path") == "/metadata/resourceVersion"
                    and op.get("value") != current.get("metadata", {}).get("resourceVersion")
                ):
                    raise kmock.KubernetesError(
                        status=422, reason="Invalid", message="the object has been modified (resourceVersion)"
                    )
            if self._has_status(request):
                keep = [
                    op
                    for op in data
                    if op.get("op") == "test" or (op.get("path", "").startswith("/status") == status_only)
                ]
                data[:] = keep
            try:
                after = kmock_dicts.patch_dict(copy.deepcopy(current), [o for o in data if o.get("op") != "test"])
            except Exception as exc:  # kmock answers 500; the API server 422 (handlers/patch.go, jsonPatcher)
                raise kmock.KubernetesError(status=422, reason="Invalid", message=f"json patch: {exc}") from None
            meta = None
        else:
            return
        generation = int(current.get("metadata", {}).get("generation") or 1)
        if not status_only and after.get("spec") != current.get("spec"):
            generation += 1
        rv = self._next_rv()
        if meta is not None:
            meta["resourceVersion"] = rv
            meta["generation"] = generation
        else:
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
            data.append({"op": "add", "path": "/metadata/generation", "value": generation})


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    action: str | None
    plural: str | None
    namespace: str | None
    name: str | None
    subresource: str | None
    data: Any
    # Who made the call (the bearer token; tests, the kubelet and the operator use different
    # ones) and the query string (`watch=true` tells a watch from a list). For RBAC checks.
    token: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    authorization: str | None = None  # the Authorization header exactly as sent
    group: str | None = None
    version: str | None = None
    at: float | None = None  # when it arrived (time.monotonic() of the test process)


def _authorization(headers: Mapping[str, str]) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == "authorization"), None)


def _bearer(headers: Mapping[str, str]) -> str | None:
    """The token of a well-formed `Bearer <token>` header; None for anything else (so a doubled
    `Bearer bearer <jwt>` is no token at all, as a real API server sees it)."""
    scheme, _, token = (_authorization(headers) or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


class LoopThread:
    """An asyncio loop in a daemon thread; `run` submits a coroutine and waits (bounded)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kubeapi-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class KubeAPI:
    """The emulator served on 127.0.0.1 (free port), with the CRDs and built-in kinds declared.

    With `tls` (a ServerCertificate), it serves https with that certificate, as a Pod's
    in-cluster login requires."""

    def __init__(self, tls: ServerCertificate | None = None) -> None:
        self._loop = LoopThread()
        self.emulator: Emulator | None = None
        self._server: kmock.Server | None = None
        self.url = ""
        self.tls = tls

    def start(self) -> KubeAPI:
        async def start() -> str:
            emulator = Emulator()
            # kmock's own load_bundled() uses a deprecated importlib API (warnings are errors here).
            bundled = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
            emulator.resources.load_data(gzip.decompress(bundled))
            for path in sorted(CRD_DIR.glob("*.yaml")):
                crd = yaml.safe_load(path.read_text())
                names = crd["spec"]["names"]
                for version in crd["spec"]["versions"]:
                    key = f"{crd['spec']['group']}/{version['name']}/{names['plural']}"
                    subresources = set((version.get("subresources") or {}).keys())
                    emulator.resources[key] = kmock.ResourceInfo(
                        kind=names["kind"],
                        singular=names["singular"],
                        namespaced=crd["spec"]["scope"] == "Namespaced",
                        verbs={"get", "list", "watch", "create", "patch", "delete", "update"},
                        shortnames=set(names.get("shortNames", [])),
                        subresources=subresources,
                    )
                    if "status" in subresources:
                        emulator.status_resources.add(names["plural"])
            emulator.status_resources.add("jobs")
            await emulator.__aenter__()
            server = kmock.Server(emulator, server_cls=_tls_server(self.tls)) if self.tls else kmock.Server(emulator)
            await server.__aenter__()
            self.emulator, self._server = emulator, server
            return str(server.url).rstrip("/")

        self.url = self._loop.run(start())
        return self

    def stop(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                await self._server.__aexit__(None, None, None)
            if self.emulator is not None:
                await self.emulator.__aexit__(None, None, None)

        try:
            self._loop.run(stop(), timeout=15)
        finally:
            self._loop.stop()

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": KUBECONFIG_TOKEN}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def requests(self) -> list[LoggedRequest]:
        """The request log (every API call anyone made), oldest first."""

        async def snapshot() -> list[LoggedRequest]:
            assert self.emulator is not None
            out = []
            seen: set[int] = set()
            for r in self.emulator.logged():
                if id(r) in seen:
                    continue
                seen.add(id(r))
                out.append(
                    LoggedRequest(
                        method=str(r.method.value if r.method else ""),
                        path=str(r.url.path),
                        action=r.action.value if r.action else None,
                        plural=r.resource.plural if r.resource else None,
                        namespace=r.namespace,
                        name=r.name,
                        subresource=r.subresource,
                        data=copy.deepcopy(r.data),
                        token=_bearer(r.headers),
                        params=dict(r.params),
                        authorization=_authorization(r.headers),
                        group=r.resource.group if r.resource else None,
                        version=r.resource.version if r.resource else None,
                        at=self.emulator.arrivals.get(id(r)),
                    )
                )
            return out

        return self._loop.run(snapshot())

    def client(self) -> KubeClient:
        return KubeClient(self.url, ssl_context=self.tls.client_context() if self.tls else None)

    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def accept_only(self, *tokens: str) -> None:
        """From now on, answer 401 to any request without one of these bearer tokens."""
        assert self.emulator is not None
        self.emulator.accepted_tokens = set(tokens)


def _tls_server(certificate: ServerCertificate) -> type[aiohttp.test_utils.RawTestServer]:
    """kmock's server class, started with an SSL context (kmock itself has no TLS option)."""

    class TLSServer(aiohttp.test_utils.RawTestServer):
        async def start_server(self, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
            await super().start_server(loop=loop, ssl=certificate.server_context(), **kwargs)

        async def close(self) -> None:
            # A TLS connection's close waits for the peer's close_notify (up to 30 s) before the
            # socket is closed; the loop stops before that, leaking the socket. Abort instead.
            server = self.runner.server if self.runner is not None else None
            for handler in server.connections if server is not None else []:
                if handler.transport is not None:
                    handler.transport.abort()
            await super().close()

    return TLSServer


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class KubeClient:
    """A tiny JSON client over urllib, with timeouts; enough for tests and the test kubelet."""

    def __init__(self, base_url: str, timeout: float = 10, ssl_context: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.ssl_context = ssl_context

    @staticmethod
    def path(
        api_version: str,
        plural: str,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> str:
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        parts = [base]
        if namespace and plural not in CLUSTER_SCOPED:
            parts.append(f"namespaces/{namespace}")
        parts.append(plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, "Authorization": "Bearer test"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.ssl_context) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                parsed = json.loads(payload)
            except ValueError:
                parsed = payload.decode(errors="replace")
            raise ApiError(exc.code, parsed) from None
        return json.loads(text) if text else None

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        plural = PLURALS[obj["kind"]]
        ns = obj.get("metadata", {}).get("namespace")
        return dict(self.request("POST", self.path(obj["apiVersion"], plural, ns), dict(obj)))

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.request("GET", self.path(api_version, plural, namespace, name)))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        body = self.request("GET", self.path(api_version, plural, namespace))
        items = list((body or {}).get("items") or [])
        return [i for i in items if namespace is None or i.get("metadata", {}).get("namespace") == namespace]

    def patch(
        self,
        api_version: str,
        plural: str,
        namespace: str | None,
        name: str,
        patch: Any,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        return dict(
            self.request(
                "PATCH",
                self.path(api_version, plural, namespace, name, subresource),
                patch,
                content_type="application/merge-patch+json",
            )
        )

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> None:
        try:
            self.request("DELETE", self.path(api_version, plural, namespace, name), {"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status != 404:
                raise

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        secret = self.get("v1", "secrets", namespace, name)
        if secret is None:
            raise KeyError(f"Secret {namespace}/{name} not found")
        if key in (secret.get("stringData") or {}):
            return str(secret["stringData"][key])
        return base64.b64decode(secret["data"][key]).decode()


@contextmanager
def running_kubeapi(tls: ServerCertificate | None = None) -> Iterator[KubeAPI]:
    api = KubeAPI(tls).start()
    try:
        yield api
    finally:
        api.stop()
