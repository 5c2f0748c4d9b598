"""Deterministic DNS-safe names: the operator names its child objects with them, and the
report walks a chain's rounds (`<root>`, `<root>-r2`, ...) in S3 with the same rule."""

from __future__ import annotations

import hashlib
import re

# The API group and version of SiteTask and FederationRound (the CRDs under crds/ say the same;
# tests/operator checks it).
GROUP = "mfed.dev"
VERSION = "v1alpha1"
FEDERATIONROUNDS = "federationrounds"
API_VERSION = f"{GROUP}/{VERSION}"
SITETASK_KIND = "SiteTask"
ROUND_KIND = "FederationRound"
# Labels a resource's view reads: the chain a round belongs to, and the Kueue queue of a site.
LABEL_CHAIN = f"{GROUP}/chain"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
_INVALID = re.compile(r"[^a-z0-9-]+")
MAX_DNS_LABEL = 63


def dns_name(*parts: str, max_length: int = MAX_DNS_LABEL) -> str:
    """Join parts into a DNS-1123 label; deterministic, with a hash suffix when it had to change.

    Names that are already valid and short enough come out unchanged (readable); any name that
    needed sanitising or truncating ends in `-<8 hex of sha256(original)>`, so two different
    inputs never collapse onto the same name.
    """
    original = "-".join(parts)
    cleaned = _INVALID.sub("-", original.lower()).strip("-")
    if cleaned == original and len(cleaned) <= max_length and cleaned:
        return cleaned
    digest = hashlib.sha256(original.encode()).hexdigest()[:8]
    head = cleaned[: max_length - len(digest) - 1].rstrip("-")
    return f"{head}-{digest}" if head else digest


def next_round_name(chain_root: str, round_number: int) -> str:
    """The name of round `round_number` (>= 2) of the chain that `chain_root` started."""
    return dns_name(chain_root, f"r{round_number}", max_length=253)
