"""``/metrics``: the Prometheus view of the engine's stats and its persister, computed per
scrape (an unchecked collector: the families come from live stats, nothing is cached)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from kvcache_engine.server.app import EngineServer

__all__ = ["EngineCollector"]


class EngineCollector:
    """Prometheus view of ``engine.get_stats()`` and the persister, computed per scrape."""

    def __init__(self, server: EngineServer) -> None:
        self.server = server

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families come from live stats

    def collect(self) -> Iterator[Metric]:
        st = self.server.engine.get_stats()
        ps = self.server.persister.stats()
        counters = {
            "kvcache_hits": ("Blocks found by lookups.", st["cache_hits"]),
            "kvcache_misses": ("Blocks asked by lookups and not found.", st["cache_misses"]),
            "kvcache_hit_tokens": ("Cached leading tokens found by lookups.", st["hit_tokens"]),
            "kvcache_requested_tokens": ("Full-block tokens asked by lookups.", st["requested_tokens"]),
            "kvcache_requests": ("Lookups served.", st["requests"]),
            "kvcache_evictions": ("Blocks evicted.", st["evictions"]),
            "kvcache_bytes_in": ("KV bytes received by puts.", st["bytes_in"]),
            "kvcache_bytes_out": ("KV bytes sent by gets.", st["bytes_out"]),
            "kvcache_persist_failures": ("Persists that failed (any reason).", ps["persist_failures"]),
            "kvcache_persists": ("Persists that completed.", ps["persists"]),
            "kvcache_quarantined_segments": (
                "Persisted segments moved to quarantine.",
                ps["quarantined_segments"],
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=float(value))
        by_reason = CounterMetricFamily(
            "kvcache_persist_failures_by_reason", "Failed persists by reason.", labels=["reason"]
        )
        for reason, count in sorted(ps["persist_failures_by_reason"].items()):
            by_reason.add_metric([reason], float(count))
        yield by_reason
        gauges = {
            "kvcache_capacity_blocks": ("Block slots of the primary tier.", st["num_blocks"]),
            "kvcache_used_blocks": ("Occupied block slots of the primary tier.", st["used_blocks"]),
            "kvcache_memory_pressure": ("used_blocks / capacity_blocks (0..1).", st["memory_pressure"]),
            "kvcache_compression_ratio": ("Stored bytes / fp16 bytes achieved.", st["compression_ratio"]),
            "kvcache_max_tokens": ("Configured capacity in tokens.", st["max_tokens"]),
            "kvcache_block_tokens": ("Tokens per block.", st["block_tokens"]),
            "kvcache_hit_rate": ("hit_tokens / requested_tokens since start.", st["hit_rate"]),
            "kvcache_ready": (
                "1 once the persisted cache is loaded.",
                1.0 if self.server.ready.is_set() else 0.0,
            ),
            "kvcache_persisted_blocks": ("Blocks named by the manifest on disk.", ps["persisted_blocks"]),
            "kvcache_last_persist_timestamp_seconds": (
                "Unix time of the last good persist.",
                ps["last_persist_unix"],
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        mem = GaugeMetricFamily("kvcache_device_memory_bytes", "Device memory (0 on CPU).", labels=["kind"])
        for kind in ("allocated", "reserved", "total"):
            mem.add_metric([kind], float(st[f"device_memory_{kind}"]))
        yield mem
        info = GaugeMetricFamily(
            "kvcache_info", "Engine identity.", labels=["codec", "strategy", "device", "namespace"]
        )
        info.add_metric(
            [
                str(st["codec"]),
                str(st["cache_strategy"]),
                str(st["device"]),
                self.server.engine.config.namespace,
            ],
            1.0,
        )
        yield info
        yield self._latency(st.get("latency_histograms", {}))

    @staticmethod
    def _latency(hists: dict[str, Any]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily("kvcache_op_latency_ms", "Engine operation latency (ms).", labels=["op"])
        for op, h in sorted(hists.items()):
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(h["buckets"], h["counts"], strict=True):
                label = "+Inf" if math.isinf(float(bound)) else repr(float(bound))
                buckets.append((label, float(count)))
            if not buckets or buckets[-1][0] != "+Inf":
                buckets.append(("+Inf", float(h["count"])))
            fam.add_metric([op], buckets, float(h["sum"]))
        return fam
