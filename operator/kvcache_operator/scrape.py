"""Reading the engines' ``/metrics``: concurrent scrapes, counter rates, histogram quantiles.

Metrics are the operator's only view of the engines (names in docs/engine-api.md). A scrape
returns raw counter/gauge values per pod; ``observe()`` turns two consecutive scrapes into one
``policy.Sample``: hit rate = Δ hit tokens / Δ requested tokens, eviction rate = Δ evictions / Δt,
p95 lookup latency from the Δ of the cumulative histogram buckets. A counter that went down (the
engine restarted) counts from zero. A pod that does not answer within the timeout is reported
as failed and left out of every figure; it is never fatal.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kvcache_operator.policy import Sample

COUNTERS = (
    "kvcache_hit_tokens_total",
    "kvcache_requested_tokens_total",
    "kvcache_evictions_total",
    "kvcache_hits_total",
    "kvcache_misses_total",
    "kvcache_requests_total",
)
GAUGES = (
    "kvcache_memory_pressure",
    "kvcache_capacity_blocks",
    "kvcache_used_blocks",
    "kvcache_max_tokens",
    "kvcache_compression_ratio",
)
LATENCY_HISTOGRAM = "kvcache_op_latency_ms"
LATENCY_OP = "lookup"


@dataclass(frozen=True)
class PodScrape:
    """One pod's metrics at one instant (``error`` set when the scrape failed)."""

    pod: str
    url: str
    counters: Mapping[str, float] = field(default_factory=dict)
    gauges: Mapping[str, float] = field(default_factory=dict)
    device_memory_total: float = 0.0
    latency_buckets: tuple[tuple[float, float], ...] = ()  # (upper bound ms, cumulative count), +Inf last
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Scrape:
    """Every ready pod of one KVCache scraped at ``time_s`` (Unix seconds)."""

    time_s: float
    pods: Mapping[str, PodScrape]

    @property
    def failed(self) -> list[str]:
        return sorted(name for name, pod in self.pods.items() if not pod.ok)


def parse_metrics(pod: str, url: str, text: str) -> PodScrape:
    """Parse Prometheus text with prometheus_client's parser into a PodScrape."""
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}
    device_total = 0.0
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name in COUNTERS:
                counters[name] = counters.get(name, 0.0) + value
            elif name in GAUGES:
                gauges[name] = value
            elif name == "kvcache_device_memory_bytes" and labels.get("kind") == "total":
                device_total = value
            elif name == f"{LATENCY_HISTOGRAM}_bucket" and labels.get("op") == LATENCY_OP:
                buckets.append((float(labels["le"]), value))
    buckets.sort(key=lambda bucket: bucket[0])
    return PodScrape(pod, url, counters, gauges, device_total, tuple(buckets))


async def scrape_pod(
    session: aiohttp.ClientSession, pod: str, url: str, *, timeout_s: float, token: str | None = None
) -> PodScrape:
    """GET ``url``/metrics; any failure (timeout, refused, non-200, bad text) is a failed PodScrape."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with session.get(
            f"{url}/metrics", headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            if response.status != 200:
                return PodScrape(pod, url, error=f"HTTP {response.status}")
            return parse_metrics(pod, url, await response.text())
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return PodScrape(pod, url, error=f"{type(exc).__name__}: {exc}".rstrip(": "))


async def scrape_all(
    session: aiohttp.ClientSession, targets: Mapping[str, str], *, timeout_s: float, token: str | None = None
) -> Scrape:
    """Scrape every target (pod name -> base URL) concurrently; the whole call takes at most timeout_s."""
    started = time.time()
    results = await asyncio.gather(
        *(scrape_pod(session, pod, url, timeout_s=timeout_s, token=token) for pod, url in targets.items())
    )
    return Scrape(started, {result.pod: result for result in results})


def _delta(now: float, before: float) -> float:
    # A counter below its previous value means the engine restarted: it counts from zero.
    return now - before if now >= before else now


def histogram_quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets; None if empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass(frozen=True)
class Observation:
    """A Sample plus the per-pod detail the status shows."""

    sample: Sample
    failed_pods: tuple[str, ...]
    hit_tokens: float
    requested_tokens: float


def observe(previous: Scrape | None, current: Scrape) -> Observation:
    """Reduce two consecutive scrapes to the policy's Sample (rates need both; gauges only ``current``)."""
    ok = {name: pod for name, pod in current.pods.items() if pod.ok}
    before = {name: pod for name, pod in (previous.pods.items() if previous else ()) if pod.ok}
    both = [name for name in ok if name in before]
    d_hit = sum(
        _delta(
            ok[n].counters.get("kvcache_hit_tokens_total", 0.0),
            before[n].counters.get("kvcache_hit_tokens_total", 0.0),
        )
        for n in both
    )
    d_req = sum(
        _delta(
            ok[n].counters.get("kvcache_requested_tokens_total", 0.0),
            before[n].counters.get("kvcache_requested_tokens_total", 0.0),
        )
        for n in both
    )
    d_evict = sum(
        _delta(
            ok[n].counters.get("kvcache_evictions_total", 0.0),
            before[n].counters.get("kvcache_evictions_total", 0.0),
        )
        for n in both
    )
    elapsed = current.time_s - previous.time_s if previous else 0.0
    pressures = [pod.gauges.get("kvcache_memory_pressure", 0.0) for pod in ok.values()]
    sample = Sample(
        time_s=current.time_s,
        memory_pressure=sum(pressures) / len(pressures) if pressures else 0.0,
        hit_rate=d_hit / d_req if d_req > 0 else None,
        eviction_rate=d_evict / elapsed if elapsed > 0 else 0.0,
        p95_latency_ms=histogram_quantile(0.95, _bucket_delta(ok, before, both)),
        ready_replicas=len(ok),
        device_memory_total=int(min((pod.device_memory_total for pod in ok.values()), default=0)),
    )
    return Observation(sample, tuple(current.failed), d_hit, d_req)


def _bucket_delta(
    ok: Mapping[str, PodScrape], before: Mapping[str, PodScrape], names: list[str]
) -> tuple[tuple[float, float], ...]:
    """Sum over pods of the per-bucket increase since the previous scrape (same bounds assumed)."""
    totals: dict[float, float] = {}
    for name in names:
        old = dict(before[name].latency_buckets)
        for bound, count in ok[name].latency_buckets:
            totals[bound] = totals.get(bound, 0.0) + _delta(count, old.get(bound, 0.0))
    return tuple(sorted(totals.items()))


# --- admin calls (the operator's only writes to engines) ----------------------------------------------


class EngineError(Exception):
    """An engine admin call failed (refused, timed out, or answered an error)."""


async def _admin(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    token: str | None,
    timeout_s: float,
    body: Mapping[str, object] | None = None,
) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with session.request(
            method, url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            payload = await response.json(content_type=None)
            if response.status >= 400:
                raise EngineError(f"{method} {url}: HTTP {response.status}: {payload}")
            return dict(payload) if isinstance(payload, dict) else {"result": payload}
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise EngineError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc


async def get_config(
    session: aiohttp.ClientSession, url: str, *, token: str | None, timeout_s: float = 5.0
) -> dict[str, object]:
    """The engine's effective config (camelCase), ``GET /v1/config``."""
    payload = await _admin(session, "GET", f"{url}/v1/config", token=token, timeout_s=timeout_s)
    config = payload.get("config", payload)
    return dict(config) if isinstance(config, dict) else {}


async def post_config(
    session: aiohttp.ClientSession,
    url: str,
    changes: Mapping[str, object],
    *,
    token: str | None,
    timeout_s: float = 30.0,
) -> dict[str, object]:
    """Apply live fields without a restart, ``POST /admin/config``; returns the new effective config."""
    payload = await _admin(
        session, "POST", f"{url}/admin/config", token=token, timeout_s=timeout_s, body=dict(changes)
    )
    config = payload.get("config", payload)
    return dict(config) if isinstance(config, dict) else {}


async def post_drain(
    session: aiohttp.ClientSession,
    url: str,
    targets: list[str],
    *,
    token: str | None,
    timeout_s: float = 120.0,
) -> dict[str, object]:
    """Push a leaving replica's blocks to the replicas that own their chains, ``POST /admin/drain``."""
    return await _admin(
        session, "POST", f"{url}/admin/drain", token=token, timeout_s=timeout_s, body={"targets": targets}
    )
