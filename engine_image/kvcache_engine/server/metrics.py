"""``/metrics``: the Prometheus view of the engine's stats and its persister, computed per
scrape (an unchecked collector: the families come from live stats, nothing is cached). Names come
from the contract (``kvcache_engine.contract.metrics.M``), which readers parse with."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from kvcache_engine.contract.metrics import M

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
            M.HITS: ("Blocks found by lookups.", st["cache_hits"]),
            M.MISSES: ("Blocks asked by lookups and not found.", st["cache_misses"]),
            M.HIT_TOKENS: ("Cached leading tokens found by lookups.", st["hit_tokens"]),
            M.REQUESTED_TOKENS: ("Full-block tokens asked by lookups.", st["requested_tokens"]),
            M.REQUESTS: ("Lookups served.", st["requests"]),
            M.EVICTIONS: ("Blocks evicted.", st["evictions"]),
            M.BYTES_IN: ("KV bytes received by puts.", st["bytes_in"]),
            M.BYTES_OUT: ("KV bytes sent by gets.", st["bytes_out"]),
            M.PERSIST_FAILURES: ("Persists that failed (any reason).", ps["persist_failures"]),
            M.PERSISTS: ("Persists that completed.", ps["persists"]),
            M.QUARANTINED_SEGMENTS: (
                "Persisted segments moved to quarantine.",
                ps["quarantined_segments"],
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=float(value))
        by_reason = CounterMetricFamily(
            M.PERSIST_FAILURES_BY_REASON, "Failed persists by reason.", labels=["reason"]
        )
        for reason, count in sorted(ps["persist_failures_by_reason"].items()):
            by_reason.add_metric([reason], float(count))
        yield by_reason
        gauges = {
            M.CAPACITY_BLOCKS: ("Block slots of the primary tier.", st["num_blocks"]),
            M.USED_BLOCKS: ("Occupied block slots of the primary tier.", st["used_blocks"]),
            M.MEMORY_PRESSURE: ("used_blocks / capacity_blocks (0..1).", st["memory_pressure"]),
            M.COMPRESSION_RATIO: ("Stored bytes / fp16 bytes achieved.", st["compression_ratio"]),
            M.MAX_TOKENS: ("Configured capacity in tokens.", st["max_tokens"]),
            M.BLOCK_TOKENS: ("Tokens per block.", st["block_tokens"]),
            M.HIT_RATE: ("hit_tokens / requested_tokens since start.", st["hit_rate"]),
            M.READY: (
                "1 once the persisted cache is loaded.",
                1.0 if self.server.ready.is_set() else 0.0,
            ),
            M.PERSISTED_BLOCKS: ("Blocks named by the manifest on disk.", ps["persisted_blocks"]),
            M.LAST_PERSIST_TIMESTAMP: (
                "Unix time of the last good persist.",
                ps["last_persist_unix"],
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        mem = GaugeMetricFamily(M.DEVICE_MEMORY_BYTES, "Device memory (0 on CPU).", labels=["kind"])
        for kind in ("allocated", "reserved", "total"):
            mem.add_metric([kind], float(st[f"device_memory_{kind}"]))
        yield mem
        info = GaugeMetricFamily(
            M.INFO, "Engine identity.", labels=["codec", "strategy", "device", "namespace"]
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
        yield from self._curve(st)

    @staticmethod
    def _curve(st: dict[str, Any]) -> Iterator[Metric]:
        """Miss reasons and the miss-ratio curve (contract.curve; families absent without one)."""
        misses = CounterMetricFamily(
            M.MISSES_BY_REASON,
            "Blocks asked by lookups and not served, by reason (never_seen/capacity/retune/cleared "
            "are estimated from the curve's sample; the others are exact).",
            labels=["reason"],
        )
        for reason, blocks in sorted(st["miss_reasons"].items()):
            misses.add_metric([reason], float(blocks))
        yield misses
        cost = {
            M.CURVE_SAMPLING_RATE: (
                "Share of block hashes the curve's shadow follows.",
                st["curve_sampling_rate"],
            ),
            M.CURVE_ENTRIES: ("Blocks the curve's shadow holds.", st["curve_entries"]),
            M.CURVE_MEMORY_BYTES: ("Bytes the curve's shadow holds.", st["curve_memory_bytes"]),
        }
        for name, (doc, value) in cost.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        curve = st.get("curve")
        if curve is None:
            return
        rates = GaugeMetricFamily(
            M.CURVE_HIT_RATE,
            "Predicted hit rate (blocks) of an LRU cache of multiple x capacity_blocks.",
            labels=["multiple"],
        )
        for label, rate in zip(curve["multiples"], curve["hit_rates"], strict=True):
            rates.add_metric([label], float(rate))
        yield rates
        scalars = {
            M.CURVE_CEILING: ("Predicted hit rate of an infinite cache.", curve["ceiling"]),
            M.CURVE_CAPACITY_BLOCKS: (
                "Capacity (blocks, all tiers) the multiples refer to.",
                curve["capacity_blocks"],
            ),
            M.CURVE_SAMPLES: ("Sampled block references behind the curve.", curve["samples"]),
            M.CURVE_WEIGHT_BLOCKS: ("Blocks asked by the lookups the curve covers.", curve["weight"]),
        }
        for name, (doc, value) in scalars.items():
            yield GaugeMetricFamily(name, doc, value=float(value))

    @staticmethod
    def _latency(hists: dict[str, Any]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(M.OP_LATENCY_MS, "Engine operation latency (ms).", labels=["op"])
        for op, h in sorted(hists.items()):
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(h["buckets"], h["counts"], strict=True):
                label = "+Inf" if math.isinf(float(bound)) else repr(float(bound))
                buckets.append((label, float(count)))
            if not buckets or buckets[-1][0] != "+Inf":
                buckets.append(("+Inf", float(h["count"])))
            fam.add_metric([op], buckets, float(h["sum"]))
        return fam
