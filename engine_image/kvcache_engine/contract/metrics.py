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

from kvcache_engine.contract.curve import HitRateCurve

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
    MISSES_BY_REASON = "kvcache_misses_by_reason"  # label reason (contract.curve.MISS_REASONS)
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
    # the miss-ratio curve (contract.curve): predicted hit rate at multiples of the capacity
    CURVE_HIT_RATE = "kvcache_curve_hit_rate"  # label multiple (contract.curve.multiple_label)
    CURVE_CEILING = "kvcache_curve_ceiling"
    CURVE_CAPACITY_BLOCKS = "kvcache_curve_capacity_blocks"
    CURVE_SAMPLES = "kvcache_curve_samples"
    CURVE_WEIGHT_BLOCKS = "kvcache_curve_weight_blocks"
    CURVE_SAMPLING_RATE = "kvcache_curve_sampling_rate"
    CURVE_ENTRIES = "kvcache_curve_entries"
    CURVE_MEMORY_BYTES = "kvcache_curve_memory_bytes"
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
    M.CURVE_SAMPLING_RATE: "curve_sampling_rate",
    M.CURVE_MEMORY_BYTES: "curve_memory_bytes",
}
_CURVE_SCALARS = {
    M.CURVE_CEILING: "ceiling",
    M.CURVE_CAPACITY_BLOCKS: "capacity_blocks",
    M.CURVE_SAMPLES: "samples",
    M.CURVE_WEIGHT_BLOCKS: "weight",
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
    # blocks missed by reason (contract.curve.MISS_REASONS; the shadow's are estimates)
    misses_by_reason: Mapping[str, float] = field(default_factory=dict)
    # the predicted hit-rate curve (None from an engine without one, or before the curve)
    curve: HitRateCurve | None = None
    curve_sampling_rate: float = 0.0
    curve_memory_bytes: float = 0.0


def parse_engine_stats(text: str, *, latency_op: str = "lookup") -> EngineStats:
    """Parse Prometheus text into EngineStats (ValueError on text the parser refuses)."""
    values: dict[str, float] = {}
    reasons: dict[str, float] = {}
    misses: dict[str, float] = {}
    curve_rates: dict[str, float] = {}
    curve_scalars: dict[str, float] = {}
    info: dict[str, str] = {}
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            base = name.removesuffix("_total")
            if base == M.PERSIST_FAILURES_BY_REASON:
                reasons[labels.get("reason", "")] = value
            elif base == M.MISSES_BY_REASON and name.endswith("_total"):
                misses[labels.get("reason", "")] = value
            elif name == M.CURVE_HIT_RATE:
                curve_rates[labels.get("multiple", "")] = value
            elif name in _CURVE_SCALARS:
                curve_scalars[_CURVE_SCALARS[name]] = value
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
        misses_by_reason=misses,
        curve=_curve(curve_rates, curve_scalars),
    )


def _curve(rates: dict[str, float], scalars: dict[str, float]) -> HitRateCurve | None:
    """The curve from its families (None when the engine reported none, or a partial one)."""
    if not rates or "capacity_blocks" not in scalars:
        return None
    return HitRateCurve.from_labels(
        scalars["capacity_blocks"],
        rates,
        ceiling=scalars.get("ceiling", 0.0),
        samples=scalars.get("samples", 0.0),
        weight=scalars.get("weight", 0.0),
    )
