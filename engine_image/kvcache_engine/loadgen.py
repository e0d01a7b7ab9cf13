"""``kvcache-engine bench``: replay a Mooncake trace against a running engine through
``KVCacheClient`` and report throughput, per-op latency percentiles, hit rate and errors.

Trace model: each request lists ``hash_ids``, prefix-chained ids of 512-token blocks (an id names
the whole prefix up to its block). Each id becomes one engine block of ``block_tokens`` token ids
derived from the id alone (:func:`block_tokens_of`), so two requests share cached leading blocks
exactly when they share leading ids. The geometry comes from the engine's ``GET /v1/config``.

Per request a worker does what an inference server does: ``lookup`` (cached leading tokens), a
``get`` of the cached prefix on a hit, and a ``put`` of the prompt when blocks are missing (the
client sends the chain; the engine stores the missing blocks and touches the rest). Payloads are
zeros from one reused buffer per worker, so the generator itself costs almost nothing.

Counting invariant: ``hit_blocks``/``requested_blocks`` in the report are the sums of what the
lookups answered, which is exactly what the engine adds to ``cache_hits``/``cache_hits +
cache_misses`` for those lookups (gets and puts do not count), so the two deltas are equal.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvcache_engine.contract import DTYPE_BYTES, KVCacheConfig, SyncAdminClient

if TYPE_CHECKING:
    import torch

    from kvcache_engine.client import KVCacheClient

__all__ = [
    "BenchReport",
    "block_tokens_of",
    "cmd_bench",
    "load_trace",
    "request_tokens",
    "run_bench",
]

OPS = ("lookup", "get", "put")


# --- the trace ----------------------------------------------------------------------------------


def load_trace(path: str | None = None, limit: int | None = None) -> list[list[int]]:
    """The trace's non-empty requests as lists of block ids (the first ``limit`` of them), read by
    :func:`kvcache_engine.replay.load_trace`. ``path`` None or ``"packaged"``: the trace shipped
    with the package. ValueError naming ``--trace`` when the file is missing, malformed or empty."""
    from kvcache_engine.replay import load_trace as read_trace

    source = None if path in (None, "packaged") else Path(str(path))
    if source is not None and not source.is_file():
        raise ValueError(
            f"--trace {path}: no such file (expected a Mooncake .jsonl or .jsonl.gz, or 'packaged')"
        )
    out: list[list[int]] = []
    try:
        for ids in read_trace(source):
            if ids:
                out.append(ids)
            if limit is not None and len(out) >= limit:
                break
    except ValueError as exc:
        raise ValueError(f"--trace {path}: {exc}") from None
    if not out:
        raise ValueError(f"--trace {path}: no request with hash_ids")
    return out


def block_tokens_of(block_id: int, block_tokens: int) -> list[int]:
    """The token ids standing for one trace block (distinct ids give distinct tokens)."""
    base = block_id * block_tokens
    return [(base + i) % 2_000_000_000 for i in range(block_tokens)]


def request_tokens(ids: Sequence[int], block_tokens: int) -> list[int]:
    """The prompt of one trace request: its blocks' tokens, in order."""
    return [t for block_id in ids for t in block_tokens_of(block_id, block_tokens)]


# --- measurements -------------------------------------------------------------------------------


def percentile(sorted_ms: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no samples)."""
    if not sorted_ms:
        return 0.0
    rank = max(1, -(-len(sorted_ms) * q // 100))
    return float(sorted_ms[int(rank) - 1])


@dataclass
class WorkerTally:
    """What one worker saw; merged by :meth:`BenchReport.build` (no locking: one owner)."""

    requests: int = 0
    requested_blocks: int = 0
    hit_blocks: int = 0
    stored_blocks: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})


@dataclass(frozen=True)
class BenchReport:
    """The result of one bench run. ``bytes_per_s`` counts get payloads received plus put payloads sent."""

    url: str
    concurrency: int
    seconds: float
    requests: int
    requests_per_s: float
    requested_blocks: int
    hit_blocks: int
    hit_rate: float
    stored_blocks: int
    bytes_in: int
    bytes_out: int
    bytes_per_s: float
    errors: int
    timeouts: int
    errors_by_op: dict[str, int]
    latency_ms: dict[str, dict[str, float]]

    @classmethod
    def build(cls, url: str, concurrency: int, seconds: float, tallies: Sequence[WorkerTally]) -> BenchReport:
        def total(name: str) -> int:
            return sum(int(getattr(t, name)) for t in tallies)

        errors_by_op = {op: sum(t.errors.get(op, 0) for t in tallies) for op in OPS}
        latency = {}
        for op in OPS:
            samples = sorted(x for t in tallies for x in t.latency_ms[op])
            latency[op] = {
                "count": len(samples),
                **{f"p{q}": round(percentile(samples, q), 3) for q in (50, 95, 99)},
            }
        requested, hits = total("requested_blocks"), total("hit_blocks")
        moved = total("bytes_in") + total("bytes_out")
        elapsed = max(seconds, 1e-9)
        return cls(
            url=url, concurrency=concurrency, seconds=round(seconds, 3), requests=total("requests"),
            requests_per_s=round(total("requests") / elapsed, 2), requested_blocks=requested, hit_blocks=hits,
            hit_rate=round(hits / requested, 4) if requested else 0.0, stored_blocks=total("stored_blocks"),
            bytes_in=total("bytes_in"), bytes_out=total("bytes_out"), bytes_per_s=round(moved / elapsed, 1),
            errors=sum(errors_by_op.values()), timeouts=total("timeouts"), errors_by_op=errors_by_op,
            latency_ms=latency,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- the workers --------------------------------------------------------------------------------


class _Schedule:
    """Hands out trace requests to the workers (looping over the trace) until ``requests`` were
    handed out or ``deadline`` passed. Thread-safe; ``done`` counts finished requests."""

    def __init__(self, trace: list[list[int]], requests: int | None, deadline: float | None) -> None:
        self.trace = trace
        self.requests = requests
        self.deadline = deadline
        self.done = 0
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> list[int] | None:
        with self._lock:
            if self.requests is not None and self._next >= self.requests:
                return None
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return None
            ids = self.trace[self._next % len(self.trace)]
            self._next += 1
            return ids

    def finish(self) -> None:
        with self._lock:
            self.done += 1


class _Worker:
    """One thread with its own client (strict: failures are counted, not hidden)."""

    def __init__(self, client: KVCacheClient, config: KVCacheConfig, schedule: _Schedule) -> None:
        self.client = client
        self.config = config
        self.schedule = schedule
        self.tally = WorkerTally()
        self.token_bytes = (
            2 * config.num_layers * config.num_kv_heads * config.head_dim * DTYPE_BYTES[config.dtype]
        )
        self._zeros: torch.Tensor | None = None

    def _kv(self, n_tokens: int) -> torch.Tensor:
        """Zeros ``[2, L, n, H, D]``: a contiguous view of the front of one growing buffer."""
        import torch

        cfg = self.config
        shape = (2, cfg.num_layers, n_tokens, cfg.num_kv_heads, cfg.head_dim)
        numel = 2 * cfg.num_layers * n_tokens * cfg.num_kv_heads * cfg.head_dim
        if self._zeros is None or self._zeros.numel() < numel:
            self._zeros = torch.zeros(numel, dtype=getattr(torch, cfg.dtype))
        return self._zeros[:numel].view(shape)

    def _timed(self, op: str, call: Callable[[], Any]) -> Any:
        from kvcache_engine.client import CacheTimeoutError, KVCacheClientError

        started = time.perf_counter()
        try:
            result = call()
        except KVCacheClientError as exc:
            self.tally.errors[op] = self.tally.errors.get(op, 0) + 1
            self.tally.timeouts += isinstance(exc, CacheTimeoutError)
            return None
        self.tally.latency_ms[op].append((time.perf_counter() - started) * 1000.0)
        return result

    def step(self, ids: list[int]) -> None:
        block = self.config.block_tokens
        tokens = request_tokens(ids, block)
        n = len(tokens)
        hit = self._timed("lookup", lambda: self.client.lookup(tokens))
        if hit is None:
            return
        t = self.tally
        t.requests += 1
        t.requested_blocks += n // block
        t.hit_blocks += hit // block
        if hit:
            kv = self._timed("get", lambda: self.client.get(tokens[:hit]))
            if kv is not None:
                t.bytes_out += kv.numel() * kv.element_size()
        if hit < n:
            stored = self._timed("put", lambda: self.client.put(tokens, self._kv(n), wait=True))
            if stored is not None:
                t.stored_blocks += stored
                t.bytes_in += n * self.token_bytes

    def run(self) -> None:
        while (ids := self.schedule.take()) is not None:
            self.step(ids)
            self.schedule.finish()


# --- orchestration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSpec:
    """What to run: ``requests`` or ``seconds`` (exactly one), ``timeout_s`` per lookup. With
    several ``urls`` each worker's client shards chains over them (rendezvous on the block at
    ``route_depth``; None: the engine's ``routeDepth``), as inference servers do."""

    urls: tuple[str, ...]
    token: str | None
    concurrency: int
    requests: int | None
    seconds: float | None
    trace: str | None
    timeout_s: float = 5.0
    route_depth: int | None = None


def run_bench(spec: BenchSpec, progress: Callable[[int], None] | None = None) -> BenchReport:
    """Replay the trace with ``spec.concurrency`` threads (one client each) and report.
    ``progress(done)`` is called about ten times a second from this thread."""
    from kvcache_engine.client import KVCacheClient

    trace = load_trace(spec.trace)
    config = KVCacheConfig.model_validate(SyncAdminClient(spec.urls[0], spec.token, timeout_s=30.0).config())
    if spec.route_depth is not None:
        config = config.model_copy(update={"route_depth": spec.route_depth})
    clients = [
        KVCacheClient(list(spec.urls), token=spec.token, config=config, timeout_s=spec.timeout_s, strict=True)
        for _ in range(spec.concurrency)
    ]
    started = time.monotonic()
    deadline = None if spec.seconds is None else started + spec.seconds
    schedule = _Schedule(trace, spec.requests, deadline)
    workers = [_Worker(c, config, schedule) for c in clients]
    threads = [threading.Thread(target=w.run, name=f"bench-{i}", daemon=True) for i, w in enumerate(workers)]
    try:
        for th in threads:
            th.start()
        while alive := [th for th in threads if th.is_alive()]:
            alive[0].join(timeout=0.1)
            if progress is not None:
                progress(schedule.done)
        elapsed = time.monotonic() - started
    finally:
        for c in clients:
            c.close()
    return BenchReport.build(" ".join(spec.urls), spec.concurrency, elapsed, [w.tally for w in workers])


def _report_table(report: BenchReport) -> Any:
    from rich.table import Table

    table = Table(
        title=f"kvcache-engine bench {report.url} ({report.concurrency} workers, {report.seconds:.1f} s)"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("requests", str(report.requests))
    table.add_row("requests/s", f"{report.requests_per_s:.1f}")
    table.add_row(
        "hit rate (client)", f"{report.hit_rate:.1%} ({report.hit_blocks}/{report.requested_blocks} blocks)"
    )
    table.add_row("stored blocks", str(report.stored_blocks))
    table.add_row("MiB/s (get + put)", f"{report.bytes_per_s / 2**20:.2f}")
    for op in OPS:
        lat = report.latency_ms[op]
        table.add_row(
            f"{op} ms p50/p95/p99",
            f"{lat['p50']:.2f} / {lat['p95']:.2f} / {lat['p99']:.2f} (n={lat['count']})",
        )
    errs = ", ".join(f"{op} {n}" for op, n in report.errors_by_op.items() if n) or "none"
    table.add_row("errors", f"{report.errors} ({errs})")
    table.add_row("timeouts", str(report.timeouts))
    return table


def cmd_bench(args: argparse.Namespace) -> int:
    """The CLI handler: exit 0, or 1 when any call failed (the report is printed either way)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvcache_engine.contract import resolve_token

    if args.requests is None and args.seconds is None:
        args.seconds = 10.0
    load_trace(args.trace, limit=1)  # fail on a bad --trace before touching the engine
    spec = BenchSpec(
        urls=tuple(args.url), token=resolve_token(args.token_file)[0], concurrency=args.concurrency,
        requests=args.requests, seconds=args.seconds, trace=args.trace, timeout_s=args.timeout,
        route_depth=args.route_depth,
    )  # fmt: skip
    err = Console(stderr=True)
    columns = (TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=args.json or not err.is_terminal) as bar:
        task = bar.add_task("bench", total=args.requests)
        report = run_bench(spec, lambda done: bar.update(task, completed=done))
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        Console().print(_report_table(report))
    return 1 if report.errors else 0
