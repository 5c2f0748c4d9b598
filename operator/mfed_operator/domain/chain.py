"""The next FederationRound of a chain: same spec, starting from this round's model."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from mfed.naming import next_round_name
from mfed.resources.views import RoundView
from mfed_operator.domain.names import (
    API_VERSION,
    LABEL_CHAIN,
    LABEL_FEDERATION,
    LABEL_MANAGED_BY,
    LABEL_ROUND_NUMBER,
    MANAGED_BY,
    ROUND_KIND,
    label_value,
)


def build_next_round(r: RoundView, raw_spec: Mapping[str, Any], number: int) -> dict[str, Any]:
    """Round `number + 1`, named `<chain root>-r<N>` so a re-created object gets the same name.

    The user's labels are NOT copied: GitOps tools track objects by label (Argo CD's
    app.kubernetes.io/instance) and would prune generated rounds that are not in Git.
    """
    spec = copy.deepcopy(dict(raw_spec))
    spec["round"] = number + 1
    spec["initialModel"] = {"fromRound": r.name}
    spec["followUpRounds"] = r.follow_up_rounds - 1
    return {
        "apiVersion": API_VERSION,
        "kind": ROUND_KIND,
        "metadata": {
            "name": next_round_name(r.chain_root, number + 1),
            "namespace": r.namespace,
            "labels": {
                LABEL_FEDERATION: label_value(r.federation),
                LABEL_CHAIN: label_value(r.chain_root),
                LABEL_ROUND_NUMBER: str(number + 1),
                LABEL_MANAGED_BY: MANAGED_BY,
            },
        },
        "spec": spec,
    }
