"""``kvcache-operator simulate``: a KVCache's autoscaler replayed against a trace, offline.

A Mooncake-format trace (one JSON object per line: ``timestamp`` in ms, ``hash_ids``) is replayed
through the engines' own bookkeeping, one replica each (``kvcache_engine.fleet``: the real prefix
index, eviction strategy and miss-ratio-curve shadow; the client's placement), on a virtual clock
taken from the trace. Every ``spec.metrics.scrapeInterval`` of trace time the fleet is scraped
into the typed ``EngineStats`` the operator reads, reduced by the operator's own
``scrape.observe`` and decided on by its own ``policy.decide`` (``Auto`` decisions applied:
replicas added empty, leaving ones drained to the owners of their chains; tuning applied live,
a new codec resizing every replica). One trace hash id is one engine block; a replica holds the
blocks its pool holds (``maxTokens / blockTokens`` times the codec's factor).

This module is the import contract's declared exception: it drives the engine package
(``kvcache_engine.fleet``) and therefore needs the engine's dependencies (torch); the operator
itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvcache_engine.contract import LiveConfig, pool_blocks, pool_bytes
from kvcache_engine.contract.sizing import achieved_compression_ratio
from kvcache_engine.core.curve import curve_entries_for
from kvcache_engine.fleet import Fleet
from kvcache_engine.replay import load_timed_trace
from kvcache_operator import api, policy, resources, scrape
from kvcache_operator.validation import parse_duration

__all__ = ["SimDecision", "SimPoint", "SimResult", "run_command", "simulate"]

SAMPLE_HISTORY_S = 4 * 3600  # as the controller keeps


@dataclass(frozen=True)
class SimDecision:
    """A decision the policy made at trace time ``t`` (seconds from the first request)."""

    t: float
    kind: str
    action: str
    reason: str
    applied: bool


@dataclass(frozen=True)
class SimPoint:
    """The fleet at one scrape: size, the measured and the predicted hit rate."""

    t: float
    replicas: int
    capacity_blocks: int
    hit_rate: float | None  # over the last scrape interval
    predicted_hit_rate: float | None  # the merged curve at the current capacity
    predicted_ceiling: float | None


@dataclass
class SimResult:
    """What ``simulate`` returns (``--json`` prints ``summary()``)."""

    final_replicas: int
    final_capacity_blocks: int
    hit_rate: float
    hit_rate_last_quarter: float
    block_hours: float
    predicted_hit_rate: float | None
    predicted_ceiling: float | None
    requests: int
    requested_blocks: int
    blocks_per_replica: int
    decisions: list[SimDecision] = field(default_factory=list)
    points: list[SimPoint] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["decisions"] = [
            {"t": round(d.t, 1), "kind": d.kind, "action": d.action, "reason": d.reason, "applied": d.applied}
            for d in self.decisions
        ]
        del out["points"]
        return out


class _Run:
    """The operator's control loop over the fleet, on trace time."""

    def __init__(self, kvc: api.KVCache, curve_rate: float | None) -> None:
        self.kvc = kvc
        self.overrides = LiveConfig()
        self.config = resources.engine_config(kvc)
        self.interval = float(parse_duration(kvc.spec.metrics.scrape_interval))
        extra = {} if curve_rate is None else {"curve_rate": curve_rate}
        self.fleet = Fleet(
            capacity=pool_blocks(self.config),
            strategy=self.config.cache_strategy.value,
            block_tokens=self.config.block_tokens,
            route_depth=self.config.route_depth,
            codec=self.config.codec,
            compression_ratio=achieved_compression_ratio(self.config),
            curve_entries=curve_entries_for(pool_bytes(self.config)),
            **extra,
        )
        self.fleet.scale_to(self._endpoints(kvc.spec.replicas))
        self.samples: deque[policy.Sample] = deque()
        self.last: scrape.Scrape | None = None
        self.last_scale_s: float | None = None
        self.last_tune_s: float | None = None
        self.decisions: list[SimDecision] = []
        self.points: list[SimPoint] = []
        self.block_hours = 0.0
        self.curve_now: policy.CapacityPlan | None = None

    def _endpoints(self, n: int) -> list[str]:
        return [resources.pod_url(self.kvc, i) for i in range(n)]

    def scrape(self, now: float, t0: float) -> None:
        """One control pass at trace time ``now``: scrape, observe, decide, act."""
        stats = self.fleet.stats()
        pods = {url: scrape.PodScrape(url, url, s) for url, s in stats.items()}
        current = scrape.Scrape(time_s=now, pods=pods)
        if self.last is not None:
            self.block_hours += self._capacity() * (now - self.last.time_s) / 3600
        observation = scrape.observe(self.last, current)
        self.last = current
        if observation.sample.ready_replicas > 0:
            self.samples.append(observation.sample)
        while self.samples and self.samples[0].time_s < now - SAMPLE_HISTORY_S:
            self.samples.popleft()
        replicas = len(self.fleet.replicas)
        proposals = policy.decide(
            policy.PolicyInput(
                autoscaling=self.kvc.spec.autoscaling,
                tuning=self.kvc.spec.tuning,
                samples=tuple(self.samples),
                current_replicas=replicas,
                live=policy.TunedConfig(
                    self.config.max_tokens, self.config.use_compression, self.config.compression_ratio
                ),
                fp16_bytes_per_token=2.0
                * self.config.num_layers
                * self.config.num_kv_heads
                * self.config.head_dim
                * 2,
                now_s=now,
                last_scale_s=self.last_scale_s,
                last_tune_s=self.last_tune_s,
            )
        )
        plan = proposals.plan
        self.curve_now = plan
        self.points.append(
            SimPoint(
                now - t0,
                replicas,
                self._capacity(),
                observation.sample.hit_rate,
                plan.predicted_hit_rate if plan is not None else None,
                plan.ceiling if plan is not None else None,
            )
        )
        if proposals.scale is not None:
            self.last_scale_s = now  # DryRun starts the cooldown too (as the controller does)
            self._record(proposals.scale, now - t0)
            if proposals.scale.applied and proposals.scale.to_replicas is not None:
                self.fleet.scale_to(self._endpoints(proposals.scale.to_replicas), now)
        if proposals.tune is not None:
            self.last_tune_s = now
            self._record(proposals.tune, now - t0)
            if proposals.tune.applied:
                self._retune(dict(proposals.tune.changes))

    def _retune(self, changes: dict[str, Any]) -> None:
        self.overrides = resources.as_live(changes).over(self.overrides)
        self.config = resources.engine_config(self.kvc, self.overrides)
        self.fleet.resize(
            pool_blocks(self.config), self.config.codec, achieved_compression_ratio(self.config)
        )

    def _record(self, d: policy.Decision, t: float) -> None:
        self.decisions.append(SimDecision(t, d.kind, d.action, d.reason, d.applied))

    def _capacity(self) -> int:
        return sum(r.capacity for r in self.fleet.replicas)


def simulate(
    kvc: api.KVCache, trace: Iterable[tuple[float, Sequence[int]]], *, curve_rate: float | None = None
) -> SimResult:
    """Replay ``trace`` ((seconds, hash ids) per request, in time order) against ``kvc``'s
    autoscaler and engines; ``curve_rate``: the curves' largest sampling rate (default: the
    engines')."""
    run = _Run(kvc, curve_rate)
    requests = list(trace)
    if not requests:
        raise ValueError("trace: no request to replay")
    t0, t_end = requests[0][0], requests[-1][0]
    quarter = t0 + 0.75 * (t_end - t0)
    next_scrape = t0 + run.interval
    late_hits = late_asked = 0
    for t, ids in requests:
        while t >= next_scrape:
            run.scrape(next_scrape, t0)
            next_scrape += run.interval
        hit = run.fleet.serve(ids, t)
        if t >= quarter:
            late_hits, late_asked = late_hits + hit, late_asked + len(ids)
    run.scrape(max(next_scrape, t_end), t0)
    fleet, plan = run.fleet, run.curve_now
    capacity = run._capacity()
    return SimResult(
        final_replicas=len(fleet.replicas),
        final_capacity_blocks=capacity,
        hit_rate=fleet.hits / fleet.requested if fleet.requested else 0.0,
        hit_rate_last_quarter=late_hits / late_asked if late_asked else 0.0,
        block_hours=run.block_hours,
        predicted_hit_rate=plan.predicted_at(capacity) if plan is not None else None,
        predicted_ceiling=plan.ceiling if plan is not None else None,
        requests=fleet.requests,
        requested_blocks=fleet.requested,
        blocks_per_replica=fleet.capacity,
        decisions=run.decisions,
        points=run.points,
    )


# --- the command -------------------------------------------------------------------------------------


def _load_kvcache(path: str) -> api.KVCache:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    docs = [d for d in yaml.safe_load_all(text) if d]
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == "KVCache"]
    if len(found) != 1:
        raise api.SpecError(f"{path}: expected one KVCache, found {len(found)}")
    return api.parse_kvcache(found[0])


def run_command(args: argparse.Namespace) -> int:
    try:
        kvc = _load_kvcache(args.filename)
        result = simulate(kvc, load_timed_trace(args.trace), curve_rate=args.curve_rate)
    except (OSError, ValueError, api.SpecError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.summary()))
    else:
        _print_table(result)
    if args.plot:
        plot(result, args.plot)
    return 0


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _print_table(result: SimResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    summary = Table(title="kvcache-operator simulate")
    for col in (
        "replicas",
        "capacity (blocks)",
        "hit rate",
        "last quarter",
        "predicted",
        "ceiling",
        "block-hours",
    ):
        summary.add_column(col, justify="right")
    summary.add_row(
        str(result.final_replicas),
        f"{result.final_capacity_blocks:,}",
        _pct(result.hit_rate),
        _pct(result.hit_rate_last_quarter),
        _pct(result.predicted_hit_rate),
        _pct(result.predicted_ceiling),
        f"{result.block_hours:,.0f}",
    )
    console.print(summary)
    decisions = Table(title="decisions")
    for col in ("t (s)", "kind", "applied", "action", "reason"):
        decisions.add_column(col)
    for d in result.decisions:
        decisions.add_row(f"{d.t:.0f}", d.kind, "yes" if d.applied else "no", d.action, d.reason)
    console.print(decisions)


def plot(result: SimResult, path: str) -> None:
    """Capacity (blocks) and the measured and predicted hit rates over trace time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [p.t / 60 for p in result.points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.step(t, [p.capacity_blocks for p in result.points], where="post")
    top.set_ylabel("capacity (blocks)")
    measured = [math.nan if p.hit_rate is None else p.hit_rate for p in result.points]
    predicted = [math.nan if p.predicted_hit_rate is None else p.predicted_hit_rate for p in result.points]
    ceiling = [math.nan if p.predicted_ceiling is None else p.predicted_ceiling for p in result.points]
    bottom.plot(t, measured, label="measured (per interval)", alpha=0.6)
    bottom.plot(t, predicted, label="predicted by the curve")
    bottom.plot(t, ceiling, label="predicted ceiling", linestyle="--")
    bottom.set_ylabel("hit rate")
    bottom.set_xlabel("trace time (min)")
    bottom.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
