"""One set of credentials for kopf and for the operator's own Kubernetes client.

In a cluster: the Pod's ServiceAccount token and CA, read by the kubernetes client's in-cluster
loader. Outside: a kubeconfig file (MFED_OPERATOR_KUBECONFIG, else the client's default lookup).

Why not kopf's own logins. `kopf.login_via_client` loads the credentials into the kubernetes
client's process-wide default Configuration and builds kopf's from a copy, so the operator's own
ApiClient would need a second load: two reads of a token file the kubelet may rewrite in between.
`kopf.login_with_service_account` hard-codes https://kubernetes.default.svc and ignores
KUBERNETES_SERVICE_HOST/PORT (the address the Pod is given; it also needs cluster DNS). Here one
load feeds both clients, and the scheme is parsed case-insensitively (`bearer_token`).

Token rotation. A bound ServiceAccount token is rewritten by the kubelet about hourly; the old
one stays valid for a while after that. Two paths pick the new one up:
- kopf re-runs the login handler when the API answers 401; `connect()` then reads the files
  again and the handler replaces the operator's own client too;
- the operator's own client re-reads the token file on its own (the in-cluster loader's
  `refresh_api_key_hook`, at most once a minute), because `auth_settings()` asks
  `get_api_key_with_prefix` on every request. That is why the Configuration built here is the
  one the ApiClient keeps, and why the token is taken through the same call.
"""

from __future__ import annotations

from typing import Any


class LoginError(Exception):
    """The credentials found cannot be used (e.g. an authorization scheme other than Bearer)."""


def bearer_token(configuration: Any) -> str | None:
    """The bare token of a kubernetes client Configuration, whichever loader filled it.

    The in-cluster loader stores `bearer <jwt>` (lower case) under "BearerToken", the kubeconfig
    loader `Bearer <jwt>` (older clients under "authorization"); kopf wants the token alone and
    adds its own "Bearer ". RFC 7235 section 2.1: the scheme is case-insensitive."""
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    if not header:
        return None
    scheme, _, token = str(header).strip().partition(" ")
    if not token:
        return scheme  # a bare token, no scheme
    if scheme.lower() != "bearer":
        raise LoginError(f"unsupported authorization scheme {scheme!r} in the client configuration (only Bearer)")
    return token.strip() or None


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
    token = bearer_token(configuration)
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
