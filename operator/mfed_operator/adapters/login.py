"""One set of credentials for kopf and for the operator's own Kubernetes client.

In a cluster: the Pod's ServiceAccount (token refreshed by the client). Outside: a kubeconfig
file (MFED_OPERATOR_KUBECONFIG, else the client's default lookup).
"""

from __future__ import annotations

from typing import Any


def connect(kubeconfig: str | None) -> tuple[Any, dict[str, Any]]:
    """A configured kubernetes ApiClient, and the same credentials as kopf.ConnectionInfo fields."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    token = None
    header = (configuration.api_key or {}).get("authorization") or (configuration.api_key or {}).get("BearerToken")
    if header:
        token = header.removeprefix("Bearer ").strip()
    info = dict(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme="Bearer" if token else None,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )
    return client.ApiClient(configuration), info
