"""Metric names the engine exports on ``/metrics`` and the typed ``EngineStats`` a reader gets.

The engine's collector emits these names; the operator (and anyone scraping) parses them back with
``parse_engine_stats`` (prometheus_client's own text parser). Counters are cumulative since the
engine started (rates are the reader's job); gauges are instantaneous.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["EngineStats", "M", "parse_engine_stats"]


class M:
    """Metric family names (counters without their ``_total`` suffix, as prometheus_client wants
    them when emitting; a sample's name is ``<family>_total``)."""

    # counters
    HITS = "kvcache_hits"
    MISSES = "kvcache_misses"
    HIT_TOKENS = "kvcache_hit_tokens"
    REQUESTED_TOKENS = "kvcache_requested_tokens"
    REQUESTS = "kvcache_requests"
    EVICTIONS = "kvcache_evictions"
    BYTES_IN = "kvcache_bytes_in"
    BYTES_OUT = "kvcache_bytes_out"
    PERSISTS = "kvcache_persists"
    PERSIST_FAILURES = "kvcache_persist_failures"
    PERSIST_FAILURES_BY_REASON = "kvcache_persist_failures_by_reason"
    QUARANTINED_SEGMENTS = "kvcache_quarantined_segments"
    # gauges
    CAPACITY_BLOCKS = "kvcache_capacity_blocks"
    USED_BLOCKS = "kvcache_used_blocks"
    MEMORY_PRESSURE = "kvcache_memory_pressure"
    COMPRESSION_RATIO = "kvcache_compression_ratio"
    MAX_TOKENS = "kvcache_max_tokens"
    BLOCK_TOKENS = "kvcache_block_tokens"
    HIT_RATE = "kvcache_hit_rate"
    READY = "kvcache_ready"
    PERSISTED_BLOCKS = "kvcache_persisted_blocks"
    LAST_PERSIST_TIMESTAMP = "kvcache_last_persist_timestamp_seconds"
    DEVICE_MEMORY_BYTES = "kvcache_device_memory_bytes"  # label kind: allocated|reserved|total
    INFO = "kvcache_info"  # labels codec, strategy, device, namespace
    # histogram
    OP_LATENCY_MS = "kvcache_op_latency_ms"  # label op


_COUNTER_FIELDS = {
    M.HITS: "hits",
    M.MISSES: "misses",
    M.HIT_TOKENS: "hit_tokens",
    M.REQUESTED_TOKENS: "requested_tokens",
    M.REQUESTS: "requests",
    M.EVICTIONS: "evictions",
    M.PERSISTS: "persists",
    M.PERSIST_FAILURES: "persist_failures",
    M.QUARANTINED_SEGMENTS: "quarantined_segments",
}
_GAUGE_FIELDS = {
    M.CAPACITY_BLOCKS: "capacity_blocks",
    M.USED_BLOCKS: "used_blocks",
    M.MEMORY_PRESSURE: "memory_pressure",
    M.COMPRESSION_RATIO: "compression_ratio",
    M.MAX_TOKENS: "max_tokens",
    M.BLOCK_TOKENS: "block_tokens",
    M.READY: "ready",
    M.LAST_PERSIST_TIMESTAMP: "last_persist_unix",
}


@dataclass(frozen=True)
class EngineStats:
    """One engine's ``/metrics`` at one instant, typed. Counters are cumulative since start."""

    hits: float = 0.0
    misses: float = 0.0
    hit_tokens: float = 0.0
    requested_tokens: float = 0.0
    requests: float = 0.0
    evictions: float = 0.0
    persists: float = 0.0
    persist_failures: float = 0.0
    quarantined_segments: float = 0.0
    persist_failures_by_reason: Mapping[str, float] = field(default_factory=dict)
    capacity_blocks: float = 0.0
    used_blocks: float = 0.0
    memory_pressure: float = 0.0
    compression_ratio: float = 1.0
    max_tokens: float = 0.0
    block_tokens: float = 0.0
    ready: float = 0.0
    last_persist_unix: float = 0.0
    device_memory_total: float = 0.0
    codec: str | None = None
    strategy: str | None = None
    device: str | None = None
    # cumulative (upper bound ms, count) of lookups, +Inf last
    lookup_latency_buckets: tuple[tuple[float, float], ...] = ()


def parse_engine_stats(text: str, *, latency_op: str = "lookup") -> EngineStats:
    """Parse Prometheus text into EngineStats (ValueError on text the parser refuses)."""
    values: dict[str, float] = {}
    reasons: dict[str, float] = {}
    info: dict[str, str] = {}
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            base = name.removesuffix("_total")
            if base == M.PERSIST_FAILURES_BY_REASON:
                reasons[labels.get("reason", "")] = value
            elif name.endswith("_total") and base in _COUNTER_FIELDS:
                values[_COUNTER_FIELDS[base]] = value
            elif name in _GAUGE_FIELDS:
                values[_GAUGE_FIELDS[name]] = value
            elif name == M.DEVICE_MEMORY_BYTES and labels.get("kind") == "total":
                values["device_memory_total"] = value
            elif name == M.INFO:
                info = {k: labels[k] for k in ("codec", "strategy", "device") if k in labels}
            elif name == f"{M.OP_LATENCY_MS}_bucket" and labels.get("op") == latency_op:
                buckets.append((float(labels["le"]), value))
    buckets.sort(key=lambda bucket: bucket[0])
    finite = {k: v for k, v in values.items() if not math.isnan(v)}
    return EngineStats(
        **finite,
        persist_failures_by_reason=reasons,
        codec=info.get("codec"),
        strategy=info.get("strategy"),
        device=info.get("device"),
        lookup_latency_buckets=tuple(buckets),
    )
