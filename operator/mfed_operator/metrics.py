"""Prometheus metrics, in the operator's own registry (served on MFED_OPERATOR_METRICS_PORT).

Label values are bounded sets (phases, reasons, tasks, directions); round and site names are
never labels, so the series count does not grow with the number of rounds.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from mfed_operator.domain.phases import Phase


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Gauge("mfed_rounds", "FederationRounds by phase", ["phase"], registry=r)
        self.transitions = Counter(
            "mfed_round_transitions_total", "Round phase transitions", ["phase", "reason"], registry=r
        )
        self.site_training_seconds = Histogram(
            "mfed_site_training_seconds",
            "Training time per site and round, as the trainer reports it",
            ["task"],
            registry=r,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf")),
        )
        self.bytes_moved = Counter(
            "mfed_storage_bytes_total", "Bytes the operator read from or wrote to S3", ["direction"], registry=r
        )
        self.aggregation_seconds = Histogram(
            "mfed_aggregation_seconds",
            "Wall time of one round's aggregation (read, validate, average, write)",
            registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, float("inf")),
        )
        self.jobs_created = Counter("mfed_jobs_created_total", "Jobs created", ["component"], registry=r)
        self.contributions = Counter(
            "mfed_contributions_total", "Verified site contributions by result", ["result", "reason"], registry=r
        )
        self.storage_errors = Counter(
            "mfed_storage_errors_total", "Failed storage operations (retried)", ["operation"], registry=r
        )
        self.reconcile_seconds = Histogram("mfed_reconcile_seconds", "Duration of one round reconciliation", registry=r)
        self.reconcile_errors = Counter(
            "mfed_reconcile_errors_total", "Reconciliations that raised", ["kind"], registry=r
        )
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        for phase in Phase:
            self.rounds.labels(phase.value).set(0)

    def observe_round(self, namespace: str, name: str, phase: str | None) -> None:
        """Track every round's phase; None removes it (deleted)."""
        with self._lock:
            key = (namespace, name)
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
            counts = {p.value: 0 for p in Phase}
            for value in self._phases.values():
                if value in counts:
                    counts[value] += 1
        for phase_name, count in counts.items():
            self.rounds.labels(phase_name).set(count)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        if port:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
