"""A fleet of engine replicas replayed offline: the engines' bookkeeping, their miss-ratio curves
and the client's placement, without KV bytes (``kvcache-operator simulate`` drives it).

Each replica is the replay's :class:`~kvcache_engine.replay.ReplayCache` (the real prefix index,
eviction strategy and slot free list) with the engine's curve shadow fed exactly as the engine
feeds it; one trace hash id is one block (mixed with :func:`~kvcache_engine.core.curve.mix_id`
into a hash-like identity, a bijection). A request goes to the replica the client would pick
(``route_key`` + rendezvous over the replicas' URLs), is looked up there, then put. A new
replica starts empty; a leaving one hands its blocks to their new owners first (the operator's
drain). Each replica reports the typed ``EngineStats`` an engine's ``/metrics`` parse to.

Invariants: replicas hold at most their capacity; the fleet's counters only grow; a replica's
curve capacity is its slot count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvcache_engine.contract import EngineStats, rendezvous_owner, route_key
from kvcache_engine.contract.curve import MOVED_WINDOW_S
from kvcache_engine.core.curve import DEFAULT_MAX_RATE, ShadowCurve, mix_id
from kvcache_engine.core.hashing import BlockHash
from kvcache_engine.core.prefix_index import BlockEntry
from kvcache_engine.replay import ReplayCache

__all__ = ["Fleet", "FleetReplica"]


def _owned_by(endpoint: str, members: list[str]) -> Callable[[int], bool]:
    """Whether ``endpoint`` owns a chain's route key among ``members``."""
    return lambda key: rendezvous_owner(key, members) == endpoint


@dataclass
class FleetReplica:
    """One replica: its URL (placement identity), its bookkeeping and curve."""

    endpoint: str
    cache: ReplayCache
    capacity: int

    @property
    def curve(self) -> ShadowCurve:
        assert self.cache.curve is not None
        return self.cache.curve


class Fleet:
    """Replicas of ``capacity`` blocks each (after compression), ``strategy`` eviction, placed by
    ``route_depth``; curves with ``curve_entries`` entries at most ``curve_rate``."""

    def __init__(
        self,
        *,
        capacity: int,
        strategy: str,
        block_tokens: int,
        route_depth: int,
        codec: str = "none",
        compression_ratio: float = 1.0,
        curve_entries: int = 32768,
        curve_rate: float = DEFAULT_MAX_RATE,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: expected >= 1 block per replica, got {capacity}")
        self.capacity = capacity
        self.strategy = strategy.upper()
        self.block_tokens = block_tokens
        self.route_depth = route_depth
        self.codec = codec
        self.compression_ratio = compression_ratio
        self.curve_entries = curve_entries
        self.curve_rate = curve_rate
        self.replicas: list[FleetReplica] = []
        self.requests = 0
        self.requested = 0  # blocks asked over the whole run
        self.hits = 0
        self._before: list[str] = []  # the replica set before the last change ...
        self._changed_at: float | None = None  # ... and when it changed (trace seconds)

    # -- membership

    def scale_to(self, endpoints: Sequence[str], now: float | None = None) -> int:
        """Replicas become exactly ``endpoints`` (a StatefulSet's ordinals: new ones start empty,
        leaving ones hand their blocks to their chains' owners among the others first) at trace
        time ``now``. Returns the blocks handed over."""
        if self.replicas and [r.endpoint for r in self.replicas] != list(endpoints):
            self._before, self._changed_at = [r.endpoint for r in self.replicas], now
        keep = [r for r in self.replicas if r.endpoint in endpoints]
        leaving = [r for r in self.replicas if r.endpoint not in endpoints]
        known = {r.endpoint for r in keep}
        keep += [self._new_replica(e) for e in endpoints if e not in known]
        self.replicas = sorted(keep, key=lambda r: list(endpoints).index(r.endpoint))
        moved = sum(self._drain(r) for r in leaving)
        members = [r.endpoint for r in self.replicas]
        for r in self.replicas:  # what the operator tells the engines (POST /admin/placement)
            r.curve.retain(_owned_by(r.endpoint, members))
        return moved

    def _new_replica(self, endpoint: str) -> FleetReplica:
        curve = ShadowCurve(self.curve_entries, self.curve_rate, route_depth=self.route_depth)
        return FleetReplica(endpoint, ReplayCache(self.capacity, self.strategy, curve), self.capacity)

    def _drain(self, leaving: FleetReplica) -> int:
        """Push the leaving replica's blocks, parents first, to the owner of each block's chain."""
        if not self.replicas:
            return 0
        endpoints = [r.endpoint for r in self.replicas]
        by_endpoint = {r.endpoint: r for r in self.replicas}
        moved = 0
        for h, parent, key in self._blocks_parents_first(leaving.cache):
            if by_endpoint[rendezvous_owner(key, endpoints)].cache.add(h, parent):
                moved += 1
        return moved

    def _blocks_parents_first(self, cache: ReplayCache) -> Iterable[tuple[BlockHash, BlockHash | None, int]]:
        """(hash, parent, route key of its chain) of every block, parents before children."""
        depth: dict[BlockHash, int] = {}
        key_of: dict[BlockHash, int] = {}
        entries = list(cache.index)
        pending = {e.hash: e for e in entries}
        ordered = []
        while pending:
            progressed = False
            for h, e in list(pending.items()):
                if e.parent is None or e.parent in depth:
                    depth[h] = 1 if e.parent is None else depth[e.parent] + 1
                    # the route key is the block at route_depth (a shorter chain: its last block)
                    key_of[h] = h if depth[h] <= self.route_depth else key_of[e.parent]  # type: ignore[index]
                    ordered.append((h, e.parent, key_of[h]))
                    del pending[h]
                    progressed = True
            if not progressed:  # orphans cannot be indexed; never happens (the index forbids them)
                break
        return ordered

    # -- traffic

    def serve(self, ids: Sequence[int], now: float = 0.0) -> int:
        """One request (a trace's hash ids, root first) at trace time ``now``: lookup then put on
        its owner; the hits. Like the client, the lookup says ``moved`` when the chain's owner
        changed with the replica set within MOVED_WINDOW_S."""
        hashes = [BlockHash(mix_id(i)) for i in ids]
        if not hashes or not self.replicas:
            return 0
        key = route_key(hashes, self.route_depth)
        owner = rendezvous_owner(key, [r.endpoint for r in self.replicas])
        cache = next(r for r in self.replicas if r.endpoint == owner).cache
        moved = (
            self._changed_at is not None
            and now - self._changed_at < MOVED_WINDOW_S
            and bool(self._before)
            and rendezvous_owner(key, self._before) != owner
        )
        hit = cache.lookup(hashes, moved=moved)
        cache.put(hashes)
        self.requests += 1
        self.requested += len(hashes)
        self.hits += hit
        return hit

    # -- live changes

    def resize(self, capacity: int, codec: str, compression_ratio: float) -> None:
        """Every replica to ``capacity`` blocks (a live retune: the codec or maxTokens changed),
        keeping its hottest blocks with their parents, as the engine's rebuild does; the curve
        remembers the others as dropped by a retune."""
        self.capacity, self.codec, self.compression_ratio = capacity, codec, compression_ratio
        for r in self.replicas:
            old = r.cache
            kept = self._keep_hottest(old, capacity)
            if old.curve is not None:
                for e in old.index:
                    if e.hash not in kept:
                        old.curve.evicted(e.hash, "retune")
            new = ReplayCache(capacity, self.strategy, old.curve)
            new.requested, new.hits, new.evictions = old.requested, old.hits, old.evictions
            for h, parent in kept.items():  # hottest first = parents first
                slot = new.pool.allocate()
                assert slot is not None, "kept never exceeds the new capacity"
                new.index.add(BlockEntry(h, parent, 0, slot, ""))
            for h in reversed(kept):  # coldest first: the strategy keeps the old order
                new.strategy.insert(h)
            r.cache, r.capacity = new, capacity

    @staticmethod
    def _keep_hottest(cache: ReplayCache, capacity: int) -> dict[BlockHash, BlockHash | None]:
        """The hottest blocks that fit, each with its parent: hash -> parent, hottest first
        (a parent is hotter than its children, so it comes first)."""
        kept: dict[BlockHash, BlockHash | None] = {}
        for h in reversed(list(cache.strategy.order())):
            if len(kept) >= capacity:
                break
            e = cache.index.get(h)
            if e is not None and (e.parent is None or e.parent in kept):
                kept[h] = e.parent
        return kept

    # -- what the engines report

    def stats(self) -> dict[str, EngineStats]:
        """Each replica's EngineStats, as the operator's scrape parses them from /metrics."""
        return {r.endpoint: self._stats(r) for r in self.replicas}

    def _stats(self, r: FleetReplica) -> EngineStats:
        c, bt = r.cache, self.block_tokens
        used = len(c.index)
        curve = r.curve.curve(r.capacity, requested_blocks=c.requested)
        return EngineStats(
            hits=c.hits,
            misses=c.requested - c.hits,
            hit_tokens=c.hits * bt,
            requested_tokens=c.requested * bt,
            evictions=c.evictions,
            capacity_blocks=r.capacity,
            used_blocks=used,
            memory_pressure=used / r.capacity,
            compression_ratio=self.compression_ratio,
            block_tokens=bt,
            ready=1.0,
            codec=self.codec,
            strategy=self.strategy,
            device="cpu",
            misses_by_reason=dict(r.curve.miss_reasons),
            curve=curve,
            curve_sampling_rate=r.curve.rate,
            curve_memory_bytes=r.curve.memory_bytes(),
        )
