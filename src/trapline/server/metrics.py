"""Prometheus metrics of a server process (scraped at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RESERVES = Counter("trapline_reserves_total", "Reserve calls that handed out at least one task")
TASKS_RESERVED = Counter("trapline_tasks_reserved_total", "Tasks leased to workers")
RESULTS = Counter("trapline_results_total", "Result items by outcome", ["status"])
LEASE_EXPIRIES = Counter(
    "trapline_lease_expiries_total", "Leases that lapsed without a result (redelivered or failed)"
)
IMAGES_FAILED = Counter("trapline_images_failed_total", "Images failed, by reason kind", ["reason"])
FINALIZATIONS = Counter("trapline_finalizations_total", "Jobs finished, by status", ["status"])
RECONCILER_LAG = Gauge(
    "trapline_reconciler_lag_seconds", "Age of the oldest expired lease not yet handled"
)
RECONCILER_SWEEP = Histogram(
    "trapline_reconciler_sweep_seconds", "Duration of one reconciler sweep"
)
