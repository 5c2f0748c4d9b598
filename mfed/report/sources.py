"""Where a chain's numbers come from: the FederationRounds' status through the Kubernetes API,
or the contribution manifests the sites wrote to S3. Both give a `Chain` of accepted sites per
finished round, with what each site reported; mfed.report.chain turns it into the report.

Only finished rounds are read: through the API the chain is followed by `status.nextRound`
until a round that has not Succeeded; in S3, round after round by the chain's naming rule
(`<first>`, `<first>-r2`, ...) until a round without a global model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mfed.artifacts.layout import MANIFEST_FILE, global_prefix, join, site_prefix
from mfed.artifacts.manifest import ContributionManifest
from mfed.methods import Method
from mfed.model_store import read_global_manifest
from mfed.naming import FEDERATIONROUNDS, GROUP, VERSION, next_round_name
from mfed.report.chain import Chain, ChainRound, ReportError, SiteRound
from mfed.storage import Storage

ACCEPTED = "Accepted"
SUCCEEDED = "Succeeded"
# A chain longer than this is a loop in status.nextRound, not a federation.
MAX_ROUNDS = 10_000


def chain_from_objects(first: str, get: Callable[[str], Mapping[str, Any] | None]) -> Chain:
    """Follow `status.nextRound` from the FederationRound `first`; `get(name)` returns the
    object (None when it does not exist). Stops before the first round that has not Succeeded."""
    obj = get(first)
    if obj is None:
        raise ReportError(f"FederationRound {first!r} not found (is the namespace right? -n NAMESPACE)")
    method_text = str(((obj.get("spec") or {}).get("training") or {}).get("method") or "m-fed")
    rounds: list[ChainRound] = []
    name: str | None = first
    while name is not None and len(rounds) < MAX_ROUNDS:
        current = obj if name == first else get(name)
        if current is None:
            break
        status = current.get("status") or {}
        if status.get("phase") != SUCCEEDED:
            if not rounds:
                raise ReportError(
                    f"FederationRound {name}: phase {status.get('phase') or 'Pending'}, not Succeeded yet; "
                    "the report reads finished rounds"
                )
            break
        rounds.append(ChainRound(name=name, sites=tuple(_status_sites(status))))
        name = status.get("nextRound")
    return Chain(root=first, method=Method.parse(method_text), source="kubernetes", rounds=tuple(rounds))


def _status_sites(status: Mapping[str, Any]) -> list[SiteRound]:
    out = []
    for entry in status.get("sites") or []:
        if entry.get("phase") != ACCEPTED:
            continue
        metrics = {k: float(v) for k, v in (entry.get("metrics") or {}).items()}
        out.append(
            SiteRound(
                site=str(entry["site"]),
                task=str(entry.get("task") or ""),
                metrics=metrics,
                upload_bytes=int(metrics.get("upload_bytes", 0)),
                samples=int(entry.get("samples") or 0),
            )
        )
    return out


def read_chain_kubernetes(first: str, namespace: str, kubeconfig: str | None = None) -> Chain:
    """The chain through the Kubernetes API: a kubeconfig (`--kubeconfig`, $KUBECONFIG or
    ~/.kube/config), else the Pod's service account when run in a cluster."""
    try:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException
        from kubernetes.config.config_exception import ConfigException
    except ImportError:
        raise ReportError(
            "reading through the Kubernetes API needs the kubernetes client: pip install 'mfed[operator]' "
            "(or read the artifacts in S3: --artifacts s3://BUCKET/PREFIX/FEDERATION)"
        ) from None
    try:
        config.load_kube_config(config_file=kubeconfig)
    except (ConfigException, FileNotFoundError):
        if kubeconfig is not None:
            raise ReportError(f"--kubeconfig {kubeconfig}: not a usable kubeconfig") from None
        config.load_incluster_config()
    api = client.CustomObjectsApi()

    def get(name: str) -> Mapping[str, Any] | None:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, FEDERATIONROUNDS, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise ReportError(f"reading FederationRound {namespace}/{name}: HTTP {exc.status} {exc.reason}") from None
        return dict(obj)

    return chain_from_objects(first, get)


def read_chain_s3(first: str, federation_root: str, method: Method, storage: Storage | None = None) -> Chain:
    """The chain from the artifacts: `federation_root` is the folder holding its round folders
    (`<spec.storage root>/<federation>`). Each round's accepted sites are the contributors its
    global model names; their numbers are in their contribution manifests."""
    storage = storage or Storage()
    rounds: list[ChainRound] = []
    number = 1
    while number <= MAX_ROUNDS:
        name = first if number == 1 else next_round_name(first, number)
        prefix = join(federation_root, name)
        if not storage.exists(join(global_prefix(prefix), MANIFEST_FILE)):
            if number == 1:
                raise ReportError(f"no global model at {global_prefix(prefix)} (is the folder right?)")
            break  # the chain's last finished round was the one before
        model = read_global_manifest(storage, global_prefix(prefix))
        sites = []
        for contributor in model.contributors:
            raw = storage.read(join(site_prefix(prefix, contributor.site), MANIFEST_FILE))
            manifest = ContributionManifest.from_json(raw)
            sites.append(
                SiteRound(
                    site=manifest.site,
                    task=manifest.task,
                    metrics=dict(manifest.metrics),
                    upload_bytes=manifest.delta.size + manifest.decoder.size,
                    samples=manifest.samples,
                    metric_name=str(manifest.trainer.get("metric") or "score"),
                )
            )
        rounds.append(ChainRound(name=name, sites=tuple(sites)))
        number += 1
    return Chain(root=first, method=method, source="s3", rounds=tuple(rounds))
