"""Typed engine statistics: the counters, the latency record, the access history, and the
``get_stats()`` dictionary assembled from them.

Invariants: counters only grow (they are Prometheus counters; clear_cache keeps them); the
latency histograms are per op (put, lookup, get) and cumulative only in :meth:`Latency.summary`;
every key of :func:`collect_stats` is always present.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvcache_engine.contract.curve import MISS_REASONS
from kvcache_engine.core.tiers import PRIMARY, SECONDARY

if TYPE_CHECKING:
    from kvcache_engine.core.state import EngineState

__all__ = ["LATENCY_BUCKETS_MS", "AccessHistory", "Counters", "Latency", "collect_stats", "curve_stats"]

LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
)  # fmt: skip
"""Upper bounds (ms) of the latency histograms; +Inf is appended in get_stats()."""

_RECENT_LATENCIES = 4096
# Access history for analytics.CacheAnalyzer: the last lookups' chains (root first, truncated),
# as compact arrays: at most 1024 * 128 * 8 bytes = 1 MiB.
_ACCESS_HISTORY = 1024
_ACCESS_HISTORY_BLOCKS = 128


@dataclass(slots=True)
class Counters:
    """The engine's monotonic counters, in the order get_stats() lists them."""

    cache_hits: int = 0
    cache_misses: int = 0
    hit_tokens: int = 0
    requested_tokens: int = 0
    requests: int = 0
    evictions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    demotions: int = 0
    promotions: int = 0
    prefetches: int = 0
    import_rejected: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Latency:
    """Recent latencies (for percentiles) and per-op cumulative histograms (for Prometheus)."""

    def __init__(self) -> None:
        self.recent: deque[float] = deque(maxlen=_RECENT_LATENCIES)
        self.hist: dict[str, list[int]] = {
            op: [0] * (len(LATENCY_BUCKETS_MS) + 1) for op in ("put", "lookup", "get")
        }
        self.sums: dict[str, float] = dict.fromkeys(self.hist, 0.0)

    def record(self, op: str, ms: float) -> None:
        self.recent.append(ms)
        self.hist[op][bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self.sums[op] += ms

    def summary(self) -> dict[str, Any]:
        values = sorted(self.recent)

        def pct(q: float) -> float:
            return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)] if values else 0.0

        hist = {}
        for op, counts in self.hist.items():
            cumulative, total = [], 0
            for c in counts:
                total += c
                cumulative.append(total)
            hist[op] = {
                "buckets": [*LATENCY_BUCKETS_MS, math.inf],
                "counts": cumulative,
                "sum": self.sums[op],
                "count": total,
            }
        return {
            "avg_latency": sum(values) / len(values) if values else 0.0,
            "p50_latency": pct(0.50),
            "p95_latency": pct(0.95),
            "p99_latency": pct(0.99),
            "latency_histograms": hist,
        }


class AccessHistory:
    """The last lookups, oldest first: each chain's hashes (root first, truncated to
    ``_ACCESS_HISTORY_BLOCKS``) and its leading hit blocks (capped likewise)."""

    def __init__(self) -> None:
        self._items: deque[tuple[array[int], int]] = deque(maxlen=_ACCESS_HISTORY)

    def record(self, hashes: Sequence[int], hit: int) -> None:
        self._items.append((array("Q", hashes[:_ACCESS_HISTORY_BLOCKS]), min(hit, _ACCESS_HISTORY_BLOCKS)))

    def snapshot(self) -> list[tuple[tuple[int, ...], int]]:
        return [(tuple(hashes), hit) for hashes, hit in self._items]


def collect_stats(state: EngineState) -> dict[str, Any]:
    """Counters, gauges and latency figures of the engine (under its lock; persistence keys are
    the facade's to add)."""
    with state.lock:
        c = state.config
        primary = state.tiers[PRIMARY].pool
        lower = state.tiers[SECONDARY].pool if len(state.tiers) > 1 else None
        stats: dict[str, Any] = state.counters.as_dict()
        stats.update(state.latency.summary())
        requested = stats["requested_tokens"]
        stats.update(
            hit_rate=stats["hit_tokens"] / requested if requested else 0.0,
            num_blocks=primary.num_slots,
            used_blocks=primary.used,
            memory_pressure=primary.used / primary.num_slots if primary.num_slots else 0.0,
            compression_ratio=state.codec.stored_bytes() / c.block_bytes_fp16(),
            codec=state.codec.name,
            cache_strategy=c.cache_strategy.value,
            max_tokens=c.max_tokens,
            block_tokens=c.block_tokens,
            cached_blocks=len(state.index),
            pool_bytes=primary.nbytes + (lower.nbytes if lower is not None else 0),
            pool_fragmentation=primary.fragmentation,
            device=str(state.device),
            cpu_tier_blocks=lower.num_slots if lower is not None else 0,
            cpu_tier_used_blocks=lower.used if lower is not None else 0,
            **device_memory(state.device),
        )
        stats.update(curve_stats(state))
        return stats


def curve_stats(state: EngineState) -> dict[str, Any]:
    """The miss-ratio curve at the engine's capacity (``curve``: None without one), the
    estimated and exact miss reasons (blocks, cumulative) and the shadow's own cost."""
    shadow = state.curve
    c = state.counters
    curve = shadow.curve(state.capacity_blocks(), requested_blocks=c.cache_hits + c.cache_misses)
    reasons = dict.fromkeys(MISS_REASONS, 0.0)
    for source in (shadow.miss_reasons, state.exact_miss_reasons):
        for reason, blocks in source.items():
            reasons[reason] = reasons.get(reason, 0.0) + blocks
    return {
        "curve": curve.to_dict() if curve is not None else None,
        "miss_reasons": reasons,
        "curve_entries": shadow.entries,
        "curve_max_entries": shadow.max_entries,
        "curve_memory_bytes": shadow.memory_bytes(),
        "curve_sampling_rate": shadow.rate,
    }


def device_memory(device: torch.device) -> dict[str, int]:
    """Allocated, reserved and total bytes of a CUDA device (zeros on the CPU)."""
    if device.type != "cuda":
        return {"device_memory_allocated": 0, "device_memory_reserved": 0, "device_memory_total": 0}
    return {
        "device_memory_allocated": int(torch.cuda.memory_allocated(device)),
        "device_memory_reserved": int(torch.cuda.memory_reserved(device)),
        "device_memory_total": int(torch.cuda.get_device_properties(device).total_memory),
    }
