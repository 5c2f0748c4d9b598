"""The operator's process-wide collaborators, created at startup and handed around in kopf's memo."""

from __future__ import annotations

from dataclasses import dataclass, field

import kopf

from mfed.registry import Catalog, builtin_catalog
from mfed_operator.adapters.kube import Kube
from mfed_operator.config import OperatorConfig
from mfed_operator.executor import Executor
from mfed_operator.metrics import Metrics
from mfed_operator.wakeups import Wakeups


@dataclass
class Runtime:
    config: OperatorConfig
    # Plugin names from the installed distributions' entry-point metadata plus the declared ones
    # (MFED_OPERATOR_PLUGINS): read once, never imported (the operator image has no torch).
    plugins: Catalog = field(default_factory=builtin_catalog)
    metrics: Metrics = field(default_factory=Metrics)
    kube: Kube | None = None
    executor: Executor | None = None
    # Rounds are reconciled when something they depend on changes (a Job, a SiteTask, the round
    # itself, the round they start from), coalesced per round; the timer is the safety net.
    wakeups: Wakeups = field(default_factory=Wakeups)

    def require_kube(self) -> Kube:
        if self.kube is None:
            raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
        return self.kube

    def require_executor(self) -> Executor:
        if self.executor is None:
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        return self.executor
