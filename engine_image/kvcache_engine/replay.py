"""Trace replay: hit rate of the engine's index and eviction code on a Mooncake-format trace.

A trace is one JSON object per line (optionally gzipped) with ``hash_ids``: the chained ids of
the request's 512-token blocks (an id names the whole prefix up to its block). Each request is
looked up (a block hits only if every block before it hit), then stored, exactly as the engine's
``lookup_hashes`` + ``put_blocks_raw`` do: the real PrefixIndex, eviction strategy and slot free
list, with 16-byte slots standing in for the KV (the bookkeeping is real, the tensors tiny).

The budget is ``capacity_blocks`` fp16 blocks; with a codec, as many compressed blocks fit as
those bytes allow: ``floor(N * fp16_block_bytes / stored_block_bytes)``, the stored bytes being
the codec's exact payload for a 512-token block (REPLAY_GEOMETRY).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch

from kvcache_engine.contract import payload_layout
from kvcache_engine.core.block_pool import BlockPool
from kvcache_engine.core.compression import CODECS
from kvcache_engine.core.curve import ShadowCurve
from kvcache_engine.core.eviction import STRATEGIES, EvictionStrategy, make_strategy
from kvcache_engine.core.hashing import BlockHash
from kvcache_engine.core.prefix_index import BlockEntry, PrefixIndex

__all__ = [
    "REPLAY_GEOMETRY",
    "ReplayCache",
    "ReplayResult",
    "effective_capacity",
    "load_timed_trace",
    "load_trace",
    "replay",
    "run_replay_command",
]

REPLAY_GEOMETRY: dict[str, int] = {"num_layers": 1, "block_tokens": 512, "num_kv_heads": 1, "head_dim": 128}
"""The block a Mooncake hash id stands for (512 tokens); the codec ratio only depends on the
token and channel counts, so one layer and one head give the same bytes per fp16 byte."""

DEFAULT_TRACE = "conversation_trace.jsonl.gz"


@dataclass(frozen=True)
class ReplayResult:
    """Outcome of one replay (hit_rate = hit_blocks / requested_blocks)."""

    hit_rate: float
    requests: int
    requested_blocks: int
    hit_blocks: int
    capacity_blocks: int
    capacity_blocks_effective: int
    strategy: str
    codec: str
    evictions: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def effective_capacity(capacity_blocks: int, codec: str = "none") -> int:
    """Compressed blocks that fit in ``capacity_blocks`` fp16 blocks of REPLAY_GEOMETRY."""
    if capacity_blocks < 0:
        raise ValueError(f"capacity_blocks: must be >= 0, got {capacity_blocks}")
    if codec not in CODECS:
        raise ValueError(f"codec: unknown codec {codec!r}; supported: {', '.join(CODECS)}")
    g = REPLAY_GEOMETRY
    fp16 = 2 * g["num_layers"] * g["block_tokens"] * g["num_kv_heads"] * g["head_dim"] * 2
    stored = payload_layout(codec, dtype="float16", **g).slot_bytes
    return capacity_blocks * fp16 // stored


def _open_trace(path: str | Path | None) -> IO[bytes]:
    if path is None:
        return importlib.resources.files("kvcache_engine").joinpath("data", DEFAULT_TRACE).open("rb")
    return Path(path).open("rb")


def load_trace(path: str | Path | None = None) -> Iterator[list[int]]:
    """The ``hash_ids`` of each request, in file order (gzip detected by its magic bytes; the
    default is the packaged conversation trace). Raises ValueError naming the line on bad data."""
    for _, ids in load_timed_trace(path):
        yield ids


def load_timed_trace(path: str | Path | None = None) -> Iterator[tuple[float, list[int]]]:
    """(``timestamp`` in seconds, ``hash_ids``) of each request, in file order (Mooncake traces
    give milliseconds; a request without one takes the previous one's). See load_trace."""
    with _open_trace(path) as raw:
        data = raw.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    t = 0.0
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            ids = doc["hash_ids"]
            stamp = doc.get("timestamp", t * 1000)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"trace line {lineno}: expected a JSON object with hash_ids ({exc})") from None
        if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"trace line {lineno}: hash_ids must be a list of non-negative ints")
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or stamp < 0:
            raise ValueError(f"trace line {lineno}: timestamp must be a non-negative number of milliseconds")
        t = stamp / 1000
        yield t, ids


class ReplayCache:
    """The engine's bookkeeping for one tier: index, strategy, slot free list; with a ``curve``
    (the engine's miss-ratio-curve shadow) fed as the engine feeds it."""

    def __init__(self, capacity: int, strategy: str, curve: ShadowCurve | None = None) -> None:
        layout = payload_layout("none", num_layers=1, block_tokens=1, num_kv_heads=1, head_dim=1)
        self.pool = BlockPool(layout, capacity, torch.device("cpu"))
        self.strategy: EvictionStrategy = make_strategy(strategy, capacity)
        self.strategy_name = strategy
        self.index = PrefixIndex()
        self.evictions = 0
        self.curve = curve
        self.requested = 0  # blocks asked by lookups
        self.hits = 0  # ... and found

    def lookup(self, hashes: list[BlockHash], *, moved: bool = False) -> int:
        n = self.index.leading(hashes)
        for h in reversed(hashes[:n]):
            self.strategy.touch(h)
        self.requested += len(hashes)
        self.hits += n
        if self.curve is not None:
            self.curve.lookup(hashes, n, moved=moved)
        return n

    def put(self, hashes: list[BlockHash]) -> None:
        present = self.index.leading(hashes)
        protected = set(hashes[:present])
        prev = hashes[present - 1] if present else None
        stored = present
        for h in hashes[present:]:
            slot = self._allocate(protected)
            if slot is None:
                break
            self.index.add(BlockEntry(h, prev, 0, slot, ""))
            protected.add(h)
            prev = h
            stored += 1
        for i in range(stored - 1, -1, -1):  # tail first: parents end up hotter than children
            if i >= present:
                self.strategy.insert(hashes[i])
            else:
                self.strategy.touch(hashes[i])
        if self.curve is not None and stored:
            self.curve.stored(hashes[:stored])

    def add(self, h: BlockHash, parent: BlockHash | None) -> bool:
        """Store one block whose parent is cached (or a root), as an import does: False when it is
        there already, its parent is not, or no slot can be made."""
        if h in self.index or (parent is not None and parent not in self.index):
            return False
        ancestors: set[BlockHash] = set()
        node = parent
        while node is not None:  # the parent's whole chain survives the evictions
            ancestors.add(node)
            entry = self.index.get(node)
            node = entry.parent if entry is not None else None
        slot = self._allocate(ancestors)
        if slot is None or (parent is not None and parent not in self.index):
            return False
        if slot is None:
            return False
        self.index.add(BlockEntry(h, parent, 0, slot, ""))
        self.strategy.insert(h)
        if self.curve is not None:
            self.curve.imported([(h, parent)])
        return True

    def _allocate(self, protected: set[BlockHash]) -> int | None:
        slot = self.pool.allocate()
        while slot is None:
            victim = self.strategy.victim(protected)
            if victim is None:
                return None
            for node in self.index.subtree(victim):
                if self.curve is not None:
                    self.curve.evicted(node, "capacity")
                entry = self.index.remove(node)
                self.pool.free(entry.slot)
                if node == victim:
                    self.strategy.evicted(node)
                else:
                    self.strategy.remove(node)
                self.evictions += 1
            slot = self.pool.allocate()
        return slot


def replay(
    requests: Iterable[list[int]], capacity_blocks: int, strategy: str = "lru", codec: str = "none"
) -> ReplayResult:
    """Replay ``requests`` (lists of chained block ids) through a cache of ``capacity_blocks``
    fp16 blocks (see effective_capacity). Raises ValueError naming a bad argument."""
    strategy_name = strategy.upper()
    if strategy_name not in STRATEGIES:
        raise ValueError(
            f"strategy: unknown strategy {strategy!r}; supported: {', '.join(s.lower() for s in STRATEGIES)}"
        )
    capacity = effective_capacity(capacity_blocks, codec)
    cache = ReplayCache(capacity, strategy_name)
    t0 = time.perf_counter()
    n_requests = requested = hit = 0
    for ids in requests:
        hashes = [BlockHash(i) for i in ids]
        n_requests += 1
        requested += len(hashes)
        hit += cache.lookup(hashes)
        cache.put(hashes)
    return ReplayResult(
        hit_rate=hit / requested if requested else 0.0,
        requests=n_requests,
        requested_blocks=requested,
        hit_blocks=hit,
        capacity_blocks=capacity_blocks,
        capacity_blocks_effective=capacity,
        strategy=strategy.lower(),
        codec=codec,
        evictions=cache.evictions,
        seconds=time.perf_counter() - t0,
    )


def run_replay_command(args: argparse.Namespace) -> int:
    """``kvcache-engine replay``: print the hit rate (or a JSON object with --json)."""
    result = replay(load_trace(args.trace), args.capacity_blocks, args.strategy, args.codec)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(
        f"{result.strategy}/{result.codec} budget={result.capacity_blocks} fp16 blocks "
        f"(effective {result.capacity_blocks_effective}): hit_rate={result.hit_rate:.4f} "
        f"({result.hit_blocks}/{result.requested_blocks} blocks, {result.requests} requests, "
        f"{result.evictions} evictions, {result.seconds:.1f}s)"
    )
    return 0
