"""The client's Prometheus metrics. Module level: prometheus_client registries reject
duplicate names, so they are created once per process, whatever the number of clients."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "M_BREAKER_OPEN",
    "M_BYTES",
    "M_ERRORS",
    "M_HITS",
    "M_HIT_TOKENS",
    "M_LATENCY",
    "M_MISSES",
    "M_PUT_DROPPED",
    "M_REQUESTED_TOKENS",
    "M_REQUESTS",
    "M_TIMEOUTS",
]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
M_REQUESTS = Counter("kvcache_client_requests", "Client calls by operation and outcome.", ["op", "outcome"])
M_HITS = Counter("kvcache_client_hits", "Lookups/gets that found at least one cached block.")
M_MISSES = Counter("kvcache_client_misses", "Lookups/gets that found nothing cached (errors included).")
M_HIT_TOKENS = Counter("kvcache_client_hit_tokens", "Cached tokens reported to callers.")
M_REQUESTED_TOKENS = Counter("kvcache_client_requested_tokens", "Full-block tokens asked for.")
M_ERRORS = Counter("kvcache_client_errors", "Failed calls by operation and kind.", ["op", "kind"])
M_TIMEOUTS = Counter("kvcache_client_timeouts", "Calls that ran out of their deadline.", ["op"])
M_BYTES = Counter("kvcache_client_bytes", "Body bytes over the wire.", ["direction"])
M_LATENCY = Histogram(
    "kvcache_client_latency_seconds", "Client call latency.", ["op"], buckets=_LATENCY_BUCKETS
)
M_PUT_DROPPED = Counter("kvcache_client_put_dropped", "Puts dropped because the put queue was full.")
M_BREAKER_OPEN = Gauge("kvcache_client_breaker_open", "1 while an endpoint's breaker is open.", ["endpoint"])
