"""The operator's own Prometheus metrics, served on a port of their own.

A private registry (not prometheus_client's global one) so that several operators in one
process (tests, benchmarks) do not collide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


@dataclass
class OperatorMetrics:
    """Reconciles, errors, decisions by kind, scrape latency, managed caches."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.reconciles = Counter(
            "kvcache_operator_reconciles_total",
            "Reconcile passes by result",
            ["result"],
            registry=self.registry,
        )
        self.errors = Counter(
            "kvcache_operator_errors_total", "Failures by stage", ["stage"], registry=self.registry
        )
        self.decisions = Counter(
            "kvcache_operator_decisions_total",
            "Policy decisions",
            ["kind", "mode", "applied"],
            registry=self.registry,
        )
        self.actions = Counter(
            "kvcache_operator_child_actions_total",
            "Child creates/patches/deletes",
            ["verb", "kind"],
            registry=self.registry,
        )
        self.scrape_seconds = Histogram(
            "kvcache_operator_scrape_duration_seconds",
            "Time to scrape every ready engine of one KVCache",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.scrape_failures = Counter(
            "kvcache_operator_scrape_failures_total", "Engines that did not answer", registry=self.registry
        )
        self.reconcile_seconds = Histogram(
            "kvcache_operator_reconcile_duration_seconds",
            "Duration of one reconcile pass",
            registry=self.registry,
        )
        self.caches = Gauge(
            "kvcache_operator_managed_caches", "KVCaches this operator reconciles", registry=self.registry
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve /metrics on ``port`` in a daemon thread; returns the server (``shutdown()`` it)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
