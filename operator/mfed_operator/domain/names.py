"""The API's identifiers, label keys, and deterministic DNS-safe names for child objects."""

from __future__ import annotations

import re

from mfed.naming import API_VERSION as API_VERSION  # re-exported: one definition in mfed
from mfed.naming import FEDERATIONROUNDS as FEDERATIONROUNDS
from mfed.naming import GROUP as GROUP
from mfed.naming import KUEUE_QUEUE_LABEL as KUEUE_QUEUE_LABEL
from mfed.naming import LABEL_CHAIN as LABEL_CHAIN
from mfed.naming import MAX_DNS_LABEL, dns_name
from mfed.naming import ROUND_KIND as ROUND_KIND
from mfed.naming import SITETASK_KIND as SITETASK_KIND
from mfed.naming import VERSION as VERSION

SITETASKS = "sitetasks"

MANAGED_BY = "mfed-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_FEDERATION = f"{GROUP}/federation"
LABEL_ROUND = f"{GROUP}/round"
LABEL_ROUND_NUMBER = f"{GROUP}/round-number"
LABEL_SITE = f"{GROUP}/site"
LABEL_TASK = f"{GROUP}/task"

COMPONENT_INIT = "init-model"
COMPONENT_SITE = "site-training"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_value(value: str) -> str:
    """A value usable as a label value (<= 63 chars, alphanumeric ends); hashed when not."""
    if len(value) <= MAX_DNS_LABEL and _LABEL_VALUE.match(value):
        return value
    return dns_name(value)


def site_job_name(round_name: str, site: str) -> str:
    return dns_name(round_name, site)


def init_job_name(round_name: str) -> str:
    return dns_name(round_name, "init")
