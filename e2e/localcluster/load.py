"""Load generator: replays the packaged conversation trace through ``KVCacheClient``.

The trace (``kvcache_engine/data/conversation_trace.jsonl.gz``, Mooncake format) lists for each
request the chained ids of its blocks: an id names the whole prefix up to its block. Each id
becomes ``block_tokens`` token ids derived from it, so two requests share cached prefixes exactly
when they share leading ids. Per request the generator does what an inference server does:
``lookup`` (how much is cached), then ``put`` of the whole prompt (the engine stores the missing
blocks and touches the rest).

Every request of this trace starts with the same block (id 0, a system prompt); it is replayed
as is. Chains are placed on replicas by their block at depth ``route_depth`` (default 2, see
:func:`kvcache_engine.wire.route_key`), so they spread over the replicas while block 0 is
stored once on each.

Counting: ``LoadStats`` adds up what the lookups returned (requested full-block tokens and hit
tokens), which is exactly what the engines count for lookups, so the two can be compared.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvcache_engine.contract import KVCacheConfig
from kvcache_engine.loadgen import load_trace, request_tokens


@dataclass
class LoadStats:
    """What the load generator saw (cumulative; ``snapshot()`` for a consistent copy)."""

    requests: int = 0
    requested_tokens: int = 0
    hit_tokens: int = 0
    stored_blocks: int = 0
    started_at: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requested: int, hit: int, stored: int) -> None:
        with self._lock:
            self.requests += 1
            self.requested_tokens += requested
            self.hit_tokens += hit
            self.stored_blocks += stored

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {
                "requests": self.requests,
                "requested_tokens": self.requested_tokens,
                "hit_tokens": self.hit_tokens,
                "stored_blocks": self.stored_blocks,
                "hit_rate": self.hit_tokens / self.requested_tokens if self.requested_tokens else 0.0,
            }


class TraceLoad:
    """Replays the trace at ``rate_rps`` (0: as fast as it goes) against the engines ``endpoints()``
    returns; ``puts=False`` only looks up (the caches do not change), ``loop`` repeats the trace.

    The endpoint list is re-read every ``refresh_s`` (scale-out and scale-in change it); a new
    client is built when it changes. Runs in a thread: ``start()``, ``stop()``; or ``run(n)``.
    """

    def __init__(
        self,
        endpoints: Callable[[], list[str]],
        token: Callable[[], str | None],
        config: KVCacheConfig,
        *,
        rate_rps: float = 40.0,
        limit: int | None = None,
        refresh_s: float = 1.0,
        timeout_s: float = 2.0,
        loop: bool = True,
        puts: bool = True,
    ) -> None:
        self.endpoints = endpoints
        self.token = token
        self.config = config
        self.rate_rps = rate_rps
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.loop = loop
        self.puts = puts
        self.trace = load_trace(limit=limit)
        self.stats = LoadStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._client_endpoints: list[str] = []
        self._kv_cache: dict[int, Any] = {}
        self.error: BaseException | None = None

    # -- client
    def _ensure_client(self) -> Any:
        from kvcache_engine.client import KVCacheClient

        wanted = sorted(self.endpoints())
        if self._client is None or wanted != self._client_endpoints:
            if self._client is not None:
                self._client.close()
            self._client = (
                KVCacheClient(
                    wanted,
                    token=self.token(),
                    config=self.config,
                    timeout_s=self.timeout_s,
                    min_bandwidth_mib_s=5.0,
                )
                if wanted
                else None
            )
            self._client_endpoints = wanted
        return self._client

    def _kv(self, n_tokens: int) -> Any:
        import torch

        if n_tokens not in self._kv_cache:
            cfg = self.config
            dtype = getattr(torch, cfg.dtype)
            shape = (2, cfg.num_layers, n_tokens, cfg.num_kv_heads, cfg.head_dim)
            gen = torch.Generator().manual_seed(n_tokens)
            self._kv_cache[n_tokens] = torch.randn(shape, generator=gen).to(dtype)
        return self._kv_cache[n_tokens]

    # -- one request
    def requests(self) -> Iterator[list[int]]:
        while True:
            yield from self.trace
            if not self.loop:
                return

    def step(self, ids: Sequence[int]) -> None:
        client = self._ensure_client()
        if client is None:
            return
        block = self.config.block_tokens
        tokens = request_tokens(ids, block)
        n = len(tokens) // block * block
        hit = client.lookup(tokens)
        stored = client.put(tokens[:n], self._kv(n), wait=True) if self.puts else 0
        self.stats.add(n, hit, stored)

    # -- driving
    def run(self, n_requests: int | None = None, duration_s: float | None = None) -> dict[str, float]:
        """Replay in this thread until ``n_requests``, ``duration_s`` or ``stop()``."""
        try:
            return self._replay(n_requests, duration_s)
        finally:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _replay(self, n_requests: int | None, duration_s: float | None) -> dict[str, float]:
        interval = 1.0 / self.rate_rps if self.rate_rps > 0 else 0.0
        next_at = time.monotonic()
        deadline = None if duration_s is None else time.monotonic() + duration_s
        last_refresh = 0.0
        for i, ids in enumerate(self.requests()):
            if self._stop.is_set() or (n_requests is not None and i >= n_requests):
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            if time.monotonic() - last_refresh > self.refresh_s:
                self._ensure_client()
                last_refresh = time.monotonic()
            self.step(ids)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()  # behind schedule: do not burst to catch up
        return self.stats.snapshot()

    def start(self) -> TraceLoad:
        def _main() -> None:
            try:
                self.run()
            except BaseException as exc:  # surfaced by stop()
                self.error = exc

        self._thread = threading.Thread(target=_main, name="trace-load", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, check: bool = True) -> dict[str, float]:
        """Stop the replay thread; with ``check`` a failure of the thread is raised here."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if check and self.error is not None:
            raise RuntimeError("load generator failed") from self.error
        return self.stats.snapshot()
