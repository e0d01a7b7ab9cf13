"""Reading the engines' ``/metrics``: concurrent scrapes, counter rates, histogram quantiles.

Metrics are the operator's only view of the engines (names in docs/engine-api.md). A scrape
returns each pod's typed ``EngineStats`` (parsed by ``kvcache_engine.contract``). ``observe()``
turns two consecutive scrapes into one ``policy.Sample``: hit rate = Δ hit tokens / Δ requested
tokens, eviction rate = Δ evictions / Δt, p95 lookup latency from the Δ of the cumulative
histogram buckets. A counter that went down (the engine restarted) counts from zero. A pod that
does not answer within the timeout is reported as failed and left out of every figure; it is
never fatal.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvcache_engine.contract import (
    AdminClient,
    AdminError,
    EngineStats,
    HitRateCurve,
    LiveConfig,
    merge_curves,
)
from kvcache_operator.policy import Sample


@dataclass(frozen=True)
class PodScrape:
    """One pod's metrics at one instant (``error`` set, ``stats`` None, when the scrape failed)."""

    pod: str
    url: str
    stats: EngineStats | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.stats is not None


@dataclass(frozen=True)
class Scrape:
    """Every ready pod of one KVCache scraped at ``time_s`` (Unix seconds)."""

    time_s: float
    pods: Mapping[str, PodScrape]

    @property
    def failed(self) -> list[str]:
        return sorted(name for name, pod in self.pods.items() if not pod.ok)


async def scrape_pod(
    session: Any, pod: str, url: str, *, timeout_s: float, token: str | None = None
) -> PodScrape:
    """GET ``url``/metrics; any failure (timeout, refused, non-200, bad text) is a failed PodScrape."""
    try:
        stats = await AdminClient(session, url, token).stats(timeout_s=timeout_s)
    except AdminError as exc:
        return PodScrape(pod, url, error=str(exc))
    return PodScrape(pod, url, stats)


async def scrape_all(
    session: Any, targets: Mapping[str, str], *, timeout_s: float, token: str | None = None
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
    ok = {name: pod.stats for name, pod in current.pods.items() if pod.stats is not None and pod.ok}
    before = {
        name: pod.stats
        for name, pod in (previous.pods.items() if previous else ())
        if pod.stats is not None and pod.ok
    }
    both = [name for name in ok if name in before]
    d_hit = sum(_delta(ok[n].hit_tokens, before[n].hit_tokens) for n in both)
    d_req = sum(_delta(ok[n].requested_tokens, before[n].requested_tokens) for n in both)
    d_evict = sum(_delta(ok[n].evictions, before[n].evictions) for n in both)
    elapsed = current.time_s - previous.time_s if previous else 0.0
    pressures = [stats.memory_pressure for stats in ok.values()]
    sample = Sample(
        time_s=current.time_s,
        memory_pressure=sum(pressures) / len(pressures) if pressures else 0.0,
        hit_rate=d_hit / d_req if d_req > 0 else None,
        eviction_rate=d_evict / elapsed if elapsed > 0 else 0.0,
        p95_latency_ms=histogram_quantile(0.95, _bucket_delta(ok, before, both)),
        ready_replicas=len(ok),
        device_memory_total=int(min((stats.device_memory_total for stats in ok.values()), default=0)),
        curve=_merged_curve(ok),
    )
    return Observation(sample, tuple(current.failed), d_hit, d_req)


def _merged_curve(ok: Mapping[str, EngineStats]) -> HitRateCurve | None:
    """The ready engines' curves merged (capacities add), or None unless every one reports one
    (a partial merge would predict for a smaller cache than the one serving)."""
    curves = [stats.curve for stats in ok.values()]
    if not curves or any(c is None for c in curves):
        return None
    return merge_curves(c for c in curves if c is not None)


def _bucket_delta(
    ok: Mapping[str, EngineStats], before: Mapping[str, EngineStats], names: list[str]
) -> tuple[tuple[float, float], ...]:
    """Sum over pods of the per-bucket increase since the previous scrape (same bounds assumed)."""
    totals: dict[float, float] = {}
    for name in names:
        old = dict(before[name].lookup_latency_buckets)
        for bound, count in ok[name].lookup_latency_buckets:
            totals[bound] = totals.get(bound, 0.0) + _delta(count, old.get(bound, 0.0))
    return tuple(sorted(totals.items()))


# --- admin calls (the operator's only writes to engines) ----------------------------------------------


async def push_live(
    session: Any, url: str, desired: LiveConfig, *, token: str | None, timeout_s: float = 30.0
) -> LiveConfig:
    """Send one engine the live fields of ``desired`` that differ from what it runs (``GET /v1/config``,
    then ``POST /admin/config`` when something differs); returns what was sent (empty: nothing)."""
    client = AdminClient(session, url, token, timeout_s=timeout_s)
    changes = desired.diff(await client.live())
    if changes:
        await client.apply(changes, timeout_s=timeout_s)
    return changes


async def post_placement(
    session: Any, url: str, endpoints: list[str], *, token: str | None, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Tell one engine the replicas clients place chains over now, ``POST /admin/placement``."""
    return await AdminClient(session, url, token, timeout_s=timeout_s).placement(endpoints, url)


async def post_drain(
    session: Any,
    url: str,
    targets: list[str],
    *,
    token: str | None,
    only: list[str] | None = None,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Push a leaving replica's blocks to the replicas that own their chains, ``POST /admin/drain``;
    with ``only``: copy just the chains a joining replica owns among ``targets`` (the warm join)."""
    return await AdminClient(session, url, token).drain(targets, only=only, timeout_s=timeout_s)
