"""Prometheus metrics of one server app (scraped at ``/metrics``).

Each app owns its registry: two apps in one process (tests, or an embedding
process) count their own work, and a new app starts from zero.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)


class Metrics:
    """The counters of one app, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # What the process is (memory, CPU, GC) is the same for every app; shown alongside.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self.reserves = Counter(
            "trapline_reserves_total",
            "Reserve calls that handed out at least one task",
            registry=r,
        )
        self.tasks_reserved = Counter(
            "trapline_tasks_reserved_total", "Tasks leased to workers", registry=r
        )
        self.results = Counter(
            "trapline_results_total", "Result items by outcome", ["status"], registry=r
        )
        self.lease_expiries = Counter(
            "trapline_lease_expiries_total",
            "Leases that lapsed without a result (redelivered or failed)",
            registry=r,
        )
        self.images_failed = Counter(
            "trapline_images_failed_total", "Images failed, by reason kind", ["reason"], registry=r
        )
        self.finalizations = Counter(
            "trapline_finalizations_total", "Jobs finished, by status", ["status"], registry=r
        )
        self.reconciler_lag = Gauge(
            "trapline_reconciler_lag_seconds",
            "Age of the oldest expired lease not yet handled",
            registry=r,
        )
        self.reconciler_sweep = Histogram(
            "trapline_reconciler_sweep_seconds", "Duration of one reconciler sweep", registry=r
        )

    def export(self) -> bytes:
        """The text exposition format of this app's registry."""
        return generate_latest(self.registry)
