"""KVCacheEngine: the block store behind the HTTP service (the seed's UltraAdaptiveKVCacheEngine).

Data plane: ``put(tokens, kv)`` stores the full blocks of a prompt's KV, ``lookup(tokens)`` counts
the cached leading tokens, ``get(tokens)`` returns their KV. The public KV layout is
``[2, num_layers, num_tokens, num_kv_heads, head_dim]`` (keys then values) in the config's dtype.

Concurrency: one re-entrant lock guards the index, pools, strategies and counters; every public
method takes it, so concurrent callers see each operation atomically. A background thread (started
the first time occupancy passes ``gc_threshold``) evicts down to the threshold, so a put rarely has
to evict inline; a put into a full pool still evicts inline rather than wait.

Invariants: a block is indexed iff it occupies exactly one slot of one tier; every indexed block's
parent is indexed (evicting a block evicts its descendants); each tier's strategy tracks exactly
that tier's blocks; counters only grow.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
import weakref
from array import array
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from kvcache_engine.config import (
    DTYPE_BYTES,
    LIVE_FIELDS,
    ConfigError,
    KVCacheConfig,
    format_validation_error,
    pool_blocks,
)
from kvcache_engine.core.block_pool import BlockPool, StoredBlock, payload_checksum
from kvcache_engine.core.compression import Codec, make_codec, torch_dtype
from kvcache_engine.core.eviction import LRUStrategy, make_strategy
from kvcache_engine.core.hashing import BlockHash, chain_hashes
from kvcache_engine.core.prefix_index import BlockEntry, PrefixIndex
from kvcache_engine.core.tiers import PRIMARY, SECONDARY, Tier, TierCopier, allocate_pool, resolve_device

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["LATENCY_BUCKETS_MS", "KVCacheEngine"]

log = logging.getLogger("kvcache_engine")

LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
)  # fmt: skip
"""Upper bounds (ms) of the latency histograms; +Inf is appended in get_stats()."""

_RECENT_LATENCIES = 4096
# Access history for analytics.CacheAnalyzer: the last lookups' chains (root first, truncated),
# as compact arrays: at most 1024 * 128 * 8 bytes = 1 MiB.
_ACCESS_HISTORY = 1024
_ACCESS_HISTORY_BLOCKS = 128
_GC_BATCH = 64
_GC_IDLE_S = 2.0
_IMPORT_CHUNK = 256
_QUIESCE_TIMEOUT_S = 300.0  # longest wait for in-flight zero-copy puts (the server's bodies take <= 60 s)
_MAX_HASH = 2**64


def _as_tokens(tokens: Any) -> list[int]:
    """``tokens`` as a list of ints. Raises ValueError naming ``tokens``."""
    if isinstance(tokens, torch.Tensor):
        if (
            tokens.dim() != 1
            or tokens.dtype.is_floating_point
            or tokens.dtype.is_complex
            or tokens.dtype == torch.bool
        ):
            raise ValueError(
                f"tokens: expected a 1-D integer tensor, got {tokens.dtype} of shape {list(tokens.shape)}"
            )
        return [int(t) for t in tokens.tolist()]
    if isinstance(tokens, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ValueError("tokens: expected a list of ints")
        return list(tokens)
    raise ValueError(f"tokens: expected a list of ints or a 1-D integer tensor, got {type(tokens).__name__}")


def _as_hashes(hashes: Any) -> list[BlockHash]:
    if isinstance(hashes, (str, bytes)) or not isinstance(hashes, Iterable):
        raise ValueError(f"hashes: expected a sequence of block hashes, got {type(hashes).__name__}")
    out = list(hashes)
    for h in out:
        if not isinstance(h, int) or isinstance(h, bool) or not 0 <= h < _MAX_HASH:
            raise ValueError(f"hashes: each must be an unsigned 64-bit int, got {h!r}")
    return [BlockHash(h) for h in out]


class _Latency:
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


def _sized_by(cfg: KVCacheConfig, slots: int) -> str:
    """The config field that sets the primary pool's size, for allocation errors."""
    field = (
        f"memory_pool_size={cfg.memory_pool_size}"
        if cfg.memory_pool_size is not None
        else f"max_tokens={cfg.max_tokens}"
    )
    return f"{field} ({slots} blocks of {cfg.block_bytes_stored()} bytes, codec {cfg.codec})"


def _gc_loop(ref: weakref.ReferenceType[KVCacheEngine]) -> None:
    """Background eviction. Holds the engine only weakly between rounds, so an engine dropped
    without close() is still collected (the thread then ends within _GC_IDLE_S)."""
    while True:
        engine = ref()
        if engine is None:
            return
        with engine._lock:
            if engine._closed:
                return
            if not engine._over_threshold():
                engine._gc_wakeup.wait(_GC_IDLE_S)
                del engine
                continue
        engine.run_gc(limit=_GC_BATCH)  # the lock is released between batches
        del engine


@dataclass
class PutReservation:
    """Pool slots reserved for a put whose bytes the caller writes in place (reserve_put).

    ``targets[j]`` is the writable byte view of block ``j``'s slot, or None when block j needs
    no bytes (already cached, or no slot was free); the caller fills each target with the
    block's raw payload, then calls commit_put (or release_put when the bytes never came)."""

    hashes: list[BlockHash]
    parent: BlockHash | None
    present: int  # leading blocks already cached at reservation
    new: list[BlockHash]  # hashes[present : present + len(slots)]
    slots: list[int]
    targets: list[memoryview | None]
    pool: BlockPool
    done: bool = False


class KVCacheEngine:
    """A KV block store: pool(s), prefix index, eviction, compression, tiers, stats.

    ``KVCacheEngine(config, **overrides)``: overrides are config fields (snake_case). When
    ``persistence_path`` is set and ``load_on_start``, the persisted cache is loaded.
    """

    def __init__(
        self, config: KVCacheConfig | None = None, *, load_on_start: bool = True, **overrides: Any
    ) -> None:
        cfg = config if config is not None else KVCacheConfig()
        if overrides:
            cfg = self._validated(cfg, overrides)
        self._config = cfg.model_copy(deep=True)
        self._lock = threading.RLock()
        self._gc_wakeup = threading.Condition(self._lock)
        # Zero-copy puts (reserve_put ... commit_put): slots allocated but not yet indexed, and
        # the structural operations (pool rebuild, compact, validate) waiting for them to end.
        self._reserved: set[int] = set()
        self._reservations_done = threading.Condition(self._lock)
        self._quiescing = 0
        self._gc_thread: threading.Thread | None = None
        self._closed = False
        self.device: torch.device = resolve_device(cfg.device)
        self._copier = TierCopier(self.device, cfg.non_blocking)
        self._index = PrefixIndex()
        self._clock = 0
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "cache_hits", "cache_misses", "hit_tokens", "requested_tokens", "requests", "evictions",
                "bytes_in", "bytes_out", "demotions", "promotions", "prefetches", "import_rejected",
            ),
            0,
        )  # fmt: skip
        self._latency = _Latency()
        self._history: deque[tuple[array[int], int]] = deque(maxlen=_ACCESS_HISTORY)
        self._codecs: dict[str, Codec] = {}
        self._codec = self._codec_for(cfg.codec)
        self._tiers: list[Tier] = []
        self._build_tiers(cfg)
        self._persister: Any = None
        self._runner: Any = None
        if cfg.persistence_path and load_on_start:
            self.load()

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _validated(cfg: KVCacheConfig, changes: dict[str, Any]) -> KVCacheConfig:
        unknown = sorted(set(changes) - set(KVCacheConfig.model_fields))
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        try:
            return KVCacheConfig.model_validate({**cfg.model_dump(), **changes})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc)) from exc

    def _codec_for(self, name: str) -> Codec:
        codec = self._codecs.get(name)
        if codec is None:
            c = self._config
            codec = make_codec(
                name, num_layers=c.num_layers, block_tokens=c.block_tokens,
                num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=c.dtype,
            )  # fmt: skip
            self._codecs[name] = codec
        return codec

    def _build_tiers(self, cfg: KVCacheConfig) -> None:
        slots = pool_blocks(cfg)
        layout = self._codec.layout
        primary = allocate_pool(layout, slots, self.device, sized_by=_sized_by(cfg, slots))
        self._tiers = [Tier(PRIMARY, primary, make_strategy(cfg.cache_strategy, slots))]
        if cfg.cpu_tier_tokens and self.device.type == "cuda":
            cpu_slots = max(
                1, (cfg.cpu_tier_tokens // cfg.block_tokens) * cfg.block_bytes_fp16() // layout.slot_bytes
            )
            sized_by = (
                f"cpu_tier_tokens={cfg.cpu_tier_tokens} ({cpu_slots} blocks of {layout.slot_bytes} bytes)"
            )
            pool = allocate_pool(
                layout, cpu_slots, torch.device("cpu"), pin_memory=cfg.pin_memory, sized_by=sized_by
            )
            self._tiers.append(Tier(SECONDARY, pool, LRUStrategy(cpu_slots)))
        elif cfg.cpu_tier_tokens:
            log.info(
                "cpu_tier_tokens=%d ignored: the primary tier is already on the CPU", cfg.cpu_tier_tokens
            )
        if cfg.enable_prefetch and len(self._tiers) == 1:
            log.info("enable_prefetch has no effect without a CUDA tier backed by a CPU tier")

    # ------------------------------------------------------------------ public properties

    @property
    def config(self) -> KVCacheConfig:
        """A copy of the effective config (change it with reconfigure())."""
        return self._config.model_copy(deep=True)

    @property
    def codec(self) -> str:
        return self._codec.name

    def __enter__(self) -> KVCacheEngine:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------ input validation

    def _check_kv(self, kv: Any, num_tokens: int) -> torch.Tensor:
        c = self._config
        expected = (2, c.num_layers, num_tokens, c.num_kv_heads, c.head_dim)
        if not isinstance(kv, torch.Tensor):
            raise ValueError(f"kv: expected a tensor of shape {list(expected)}, got {type(kv).__name__}")
        if tuple(kv.shape) != expected:
            raise ValueError(
                f"kv: expected shape {list(expected)} (2, layers, tokens, kv_heads, head_dim), "
                f"got {list(kv.shape)}"
            )
        if kv.dtype != self._codec.dtype:
            raise ValueError(f"kv: expected dtype {self._codec.dtype}, got {kv.dtype}")
        return kv

    def block_hashes(self, tokens: Any) -> list[BlockHash]:
        """Chained hashes of the full blocks of ``tokens`` under this engine's namespace."""
        return chain_hashes(self._config.namespace, _as_tokens(tokens), self._config.block_tokens)

    # ------------------------------------------------------------------ data plane

    def put(self, tokens: Any, kv: torch.Tensor) -> int:
        """Store the full blocks of ``tokens`` with their KV; returns blocks newly stored
        (already cached ones are touched). Raises ValueError naming ``tokens`` or ``kv``."""
        toks = _as_tokens(tokens)
        bt = self._config.block_tokens
        if len(toks) < bt:
            raise ValueError(
                f"tokens: need at least block_tokens={bt} tokens to store a block, got {len(toks)}"
            )
        kv = self._check_kv(kv, len(toks))
        hashes = chain_hashes(self._config.namespace, toks, bt)
        return self._put_chain(hashes, kv[:, :, : len(hashes) * bt], None)

    def put_blocks_raw(
        self, hashes: Sequence[BlockHash], kv: torch.Tensor, parent: BlockHash | None = None
    ) -> int:
        """Store a chain given its hashes (``hashes[0]``'s parent is ``parent``, None for a root);
        ``kv`` holds ``len(hashes) * block_tokens`` tokens. Nothing is stored when ``parent`` is
        not cached. Returns blocks newly stored."""
        hs = _as_hashes(hashes)
        if not hs:
            raise ValueError("hashes: need at least one block hash")
        kv = self._check_kv(kv, len(hs) * self._config.block_tokens)
        return self._put_chain(hs, kv, parent)

    def put_rows(
        self,
        hashes: Sequence[BlockHash],
        rows: torch.Tensor,
        checksums: Sequence[str] | None = None,
        parent: BlockHash | None = None,
    ) -> int:
        """Store a chain given as its blocks' raw payloads: ``rows`` uint8 ``[len(hashes),
        slot_bytes]`` on the CPU, row j = block j's ``[2, L, block_tokens, H, D]`` bytes (codec
        ``none``'s slot rows). Evicts as needed, like put_blocks_raw, and copies each new block's
        row into its slot as is. ``checksums``: the rows' checksums when the caller folded them in
        as it wrote them (block_pool.ScatterSums), else they are computed here. When the pool does
        not store raw rows (the codec changed meanwhile) the rows are encoded as put_blocks_raw
        would. Returns blocks newly stored."""
        hs = _as_hashes(hashes)
        c = self._config
        width = c.block_tokens * self._token_elems() * DTYPE_BYTES[c.dtype]
        if not hs or rows.dtype != torch.uint8 or tuple(rows.shape) != (len(hs), width):
            raise ValueError(
                f"rows: expected uint8 [{len(hs)}, {width}] for {len(hs)} blocks, got "
                f"{rows.dtype} {list(rows.shape)}"
            )
        if checksums is not None and len(checksums) != len(hs):
            raise ValueError(f"checksums: {len(checksums)} given for {len(hs)} blocks")
        t0 = time.perf_counter()
        with self._lock:
            if not self.stores_raw_rows:
                shape = (len(hs), 2, c.num_layers, c.block_tokens, c.num_kv_heads, c.head_dim)
                blocks = rows.view(torch_dtype(c.dtype)).reshape(shape)
                kv = blocks.permute(1, 2, 0, 3, 4, 5).reshape(2, c.num_layers, -1, c.num_kv_heads, c.head_dim)
                return self._put_chain(hs, kv, parent)
            plan = self._plan_put(hs, parent)
            assert plan is not None  # evicting plans always exist
            present, new, slots = plan
            sums: list[str] = []
            if new:
                part = rows[present : present + len(new)]
                pool = self._tiers[PRIMARY].pool
                pool.write_rows(slots, part)
                sums = (
                    list(checksums[present : present + len(new)]) if checksums else pool.row_checksums(part)
                )
            self._link(hs, parent, present, list(zip(new, slots, sums, strict=True)))
            self._latency.record("put", (time.perf_counter() - t0) * 1000)
            self._maybe_gc()
            return len(new)

    def _put_chain(self, hashes: list[BlockHash], kv: torch.Tensor, parent: BlockHash | None) -> int:
        t0 = time.perf_counter()
        bt = self._config.block_tokens
        with self._lock:
            plan = self._plan_put(hashes, parent)
            assert plan is not None  # evicting plans always exist
            present, new, slots = plan
            checksums: list[str] = []
            if new:
                start = present * bt
                c = self._config
                span = kv[:, :, start : start + len(new) * bt]
                shape = (2, c.num_layers, len(new), bt, c.num_kv_heads, c.head_dim)
                blocks = span.reshape(shape).permute(2, 0, 1, 3, 4, 5)
                payload = self._codec.encode_for_store(
                    blocks.to(self.device, non_blocking=self._config.non_blocking)
                )
                pool = self._tiers[PRIMARY].pool
                # One batched write and one batched checksum (on the device, one host sync).
                checksums = pool.row_checksums(pool.store(slots, payload))
            self._link(hashes, parent, present, list(zip(new, slots, checksums, strict=True)))
            self._latency.record("put", (time.perf_counter() - t0) * 1000)
            self._maybe_gc()
            return len(new)

    def _plan_put(
        self, hashes: list[BlockHash], parent: BlockHash | None, *, evict: bool = True
    ) -> tuple[int, list[BlockHash], list[int]] | None:
        """Under the lock: (leading blocks already cached, hashes to store, their slots). Stores
        nothing when ``parent`` is not cached. Slots come free or by evicting unprotected blocks;
        with ``evict=False``, None when the free slots do not cover every new block."""
        if parent is not None and parent not in self._index:
            return 0, [], []
        present = self._index.leading(hashes, parent)
        new = hashes[present:]
        if new and new[0] in self._index:
            # The hash exists under another parent: a 64-bit collision. Keep the stored chain.
            log.warning("block %016x already cached with a different parent; not stored", new[0])
            new = []
        if not evict and len(new) > self._tiers[PRIMARY].pool.free_count:
            return None
        # The cached prefix (and a given parent's whole chain) must survive the evictions.
        protected = set(hashes[:present]) | set(self._ancestors_of({parent}))
        slots = self._allocate_slots(len(new), protected)
        return present, new[: len(slots)], slots

    def _link(
        self,
        hashes: list[BlockHash],
        parent: BlockHash | None,
        present: int,
        stored: list[tuple[BlockHash, int, str]],
    ) -> None:
        """Under the lock: index the blocks just stored after the cached prefix ((hash, slot,
        checksum) each, in chain order) and touch the chain."""
        prev = hashes[present - 1] if present else parent
        for h, slot, checksum in stored:
            self._index.add(BlockEntry(h, prev, PRIMARY, slot, checksum))
            prev = h
        new = {h for h, _, _ in stored}
        for h in reversed(hashes[: present + len(stored)]):
            self._touch(h, inserted=h in new)
        self._counters["bytes_in"] += len(stored) * self._codec.stored_bytes()

    # -- zero-copy puts: the server receives a put's bytes straight into the pool's slots

    @property
    def stores_raw_rows(self) -> bool:
        """True when a block's stored payload is its raw KV bytes ``[2, L, block_tokens, H, D]``
        in a CPU pool (codec ``none``): then reserve_put can hand out slots to write into."""
        pool = self._tiers[PRIMARY].pool
        return self._codec.name == "none" and pool.rows_are_payload and pool.device.type == "cpu"

    def reserve_put(self, hashes: Sequence[int], parent: BlockHash | None = None) -> PutReservation | None:
        """Reserve free slots for a put of the chain ``hashes`` whose bytes the caller will write
        in place (no staging copy). Never evicts: the bytes are not here yet, and a put that
        never completes must not cost the cache a block (background GC keeps free slots). None
        when the pool does not store raw rows, the free slots do not cover the new blocks, or a
        pool rebuild, compaction or validation is waiting: use put_blocks_raw then. Every
        reservation must end in commit_put or release_put."""
        hs = _as_hashes(hashes)
        with self._lock:
            if not hs or not self.stores_raw_rows or self._quiescing:
                return None
            plan = self._plan_put(hs, parent, evict=False)
            if plan is None:
                return None
            present, new, slots = plan
            pool = self._tiers[PRIMARY].pool
            self._reserved.update(slots)
            rows = pool.storage.numpy().data.cast("B")
            width = pool.layout.slot_bytes
            targets: list[memoryview | None] = [None] * len(hs)
            for j, slot in enumerate(slots, start=present):
                targets[j] = rows[slot * width : (slot + 1) * width]
            return PutReservation(hs, parent, present, new, slots, targets, pool)

    def commit_put(self, res: PutReservation, checksums: Sequence[str] | None = None) -> int:
        """Index a reservation's blocks once their bytes are written; returns blocks newly stored.
        ``checksums``: the reserved blocks' checksums when the writer folded them in as it wrote
        (block_pool.ScatterSums), else they are computed here, outside the lock (the slots are
        the reservation's own). Blocks are dropped, not stored, when their predecessor was
        evicted meanwhile or another put stored them first."""
        t0 = time.perf_counter()
        if checksums is None:
            checksums = res.pool.checksums(res.slots) if res.slots else []
        elif len(checksums) != len(res.slots):
            raise ValueError(f"checksums: {len(checksums)} given for {len(res.slots)} reserved blocks")
        with self._lock:
            if res.done:
                raise ValueError("reservation: already committed or released")
            res.done = True
            self._reserved.difference_update(res.slots)
            self._reservations_done.notify_all()
            prev = res.hashes[res.present - 1] if res.present else res.parent
            linked = prev is None or prev in self._index  # else evicted meanwhile, with its chain
            keep = 0
            while linked and keep < len(res.new) and res.new[keep] not in self._index:
                keep += 1
            for slot in res.slots[keep:]:
                res.pool.free(slot)
            if linked:
                stored = list(zip(res.new[:keep], res.slots[:keep], checksums[:keep], strict=True))
                self._link(res.hashes, res.parent, res.present, stored)
            self._latency.record("put", (time.perf_counter() - t0) * 1000)
            self._maybe_gc()
            return keep

    def release_put(self, res: PutReservation) -> None:
        """Give a reservation's slots back (its bytes never fully arrived); nothing is indexed."""
        with self._lock:
            if res.done:
                return
            res.done = True
            for slot in res.slots:
                res.pool.free(slot)
            self._reserved.difference_update(res.slots)
            self._reservations_done.notify_all()

    def _quiesce(self) -> None:
        """Under the lock: wait until no reservation is outstanding (new ones are refused
        meanwhile), before moving or rebuilding slots. A reservation lasts one request body (the
        server bounds it by its body timeout); a thread must not wait on its own reservation."""
        self._quiescing += 1
        try:
            ok = self._reservations_done.wait_for(lambda: not self._reserved, _QUIESCE_TIMEOUT_S)
        finally:
            self._quiescing -= 1
        if not ok:
            raise RuntimeError(
                f"{len(self._reserved)} slots still reserved by puts in flight after "
                f"{_QUIESCE_TIMEOUT_S:.0f} s: end each reserve_put with commit_put or release_put first"
            )

    def lookup(self, tokens: Any) -> int:
        """Cached leading tokens of ``tokens`` (a multiple of block_tokens). Counts as a request."""
        return self.lookup_hashes(self.block_hashes(tokens)) * self._config.block_tokens

    def lookup_hashes(self, hashes: Sequence[BlockHash]) -> int:
        """Leading cached blocks of this chain. Counts as a request (hits, misses, tokens)."""
        hs = _as_hashes(hashes)
        t0 = time.perf_counter()
        bt = self._config.block_tokens
        with self._lock:
            n = self._index.leading(hs)
            for h in reversed(hs[:n]):
                self._touch(h)
            c = self._counters
            c["requests"] += 1
            c["requested_tokens"] += len(hs) * bt
            c["hit_tokens"] += n * bt
            c["cache_hits"] += n
            c["cache_misses"] += len(hs) - n
            self._history.append((array("Q", hs[:_ACCESS_HISTORY_BLOCKS]), min(n, _ACCESS_HISTORY_BLOCKS)))
            self._prefetch(hs, n)
            self._latency.record("lookup", (time.perf_counter() - t0) * 1000)
            return n

    def get(self, tokens: Any) -> torch.Tensor:
        """KV of the cached prefix of ``tokens``: ``[2, L, n, H, D]`` with n = lookup(tokens)
        (possibly 0), config dtype, on the CPU."""
        return self.get_hashes(self.block_hashes(tokens))

    def get_hashes(self, hashes: Sequence[BlockHash], out: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded KV of the leading cached blocks of this chain, ``[2, L, n * T, H, D]``.

        ``out`` (optional): a contiguous CPU buffer of the config dtype with at least that many
        elements; the result is then decoded straight into its front and returned as a view of it
        (the server reuses warm staging buffers this way instead of faulting in fresh pages)."""
        hs = _as_hashes(hashes)
        t0 = time.perf_counter()
        with self._lock:
            n = self._index.leading(hs)
            entries = [self._entry(h) for h in hs[:n]]
            need = n * self._config.block_tokens * self._token_elems()
            if out is not None and entries and out.numel() >= need:
                out = self._decode_entries(entries, self._front(out, n))
            else:
                out = self._decode_entries(entries)
            for h in reversed(hs[:n]):
                self._touch(h)
            self._prefetch(hs, n)
            self._counters["bytes_out"] += out.numel() * out.element_size()
            self._latency.record("get", (time.perf_counter() - t0) * 1000)
            return out

    def _entry(self, h: BlockHash) -> BlockEntry:
        e = self._index.get(h)
        assert e is not None, "caller checked the index under the lock"
        return e

    def _token_elems(self) -> int:
        c = self._config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim

    def _front(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        """The front of ``buf`` as a ``[2, L, n * T, H, D]`` view. Raises ValueError naming ``out``
        unless ``buf`` is a contiguous CPU buffer of the config dtype."""
        c = self._config
        if buf.dtype != self._codec.dtype or buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError(f"out: expected a contiguous CPU {self._codec.dtype} buffer")
        dst = buf.view(-1)[: n * c.block_tokens * self._token_elems()]
        return dst.view(2, c.num_layers, n * c.block_tokens, c.num_kv_heads, c.head_dim)

    def _decode_entries(self, entries: list[BlockEntry], out: torch.Tensor | None = None) -> torch.Tensor:
        """Gather the slots of ``entries`` onto the primary device (one gather), decode them in one
        pass into the sequence layout, return on the CPU: in ``out`` (a ``[2, L, n * T, H, D]``
        CPU tensor, e.g. the server's warm staging buffer) when given."""
        c = self._config
        if not entries:
            return torch.empty((2, c.num_layers, 0, c.num_kv_heads, c.head_dim), dtype=self._codec.dtype)
        self._copier.sync()  # queued tier copies land before the gathers below read the slots
        primary = self._tiers[PRIMARY].pool
        if all(e.tier == PRIMARY for e in entries):  # one gather (a view when the slots are consecutive)
            rows = primary.storage
            slots = [e.slot for e in entries]
            if slots != list(range(slots[0], slots[0] + len(slots))):
                rows = rows.index_select(0, torch.tensor(slots, dtype=torch.long, device=self.device))
            else:
                rows = rows[slots[0] : slots[0] + len(slots)]
        else:  # some blocks sit in the CPU tier: assemble the rows on the device
            rows = torch.empty(
                (len(entries), primary.layout.slot_bytes), dtype=torch.uint8, device=self.device
            )
            for i, e in enumerate(entries):
                rows[i].copy_(self._tiers[e.tier].pool.storage[e.slot], non_blocking=True)
        payload = primary.views(rows)
        if self.device.type == "cpu":
            return self._codec.decode_sequence(payload, out)  # [2, L, n * T, H, D], one pass
        decoded = self._codec.decode_sequence(payload)
        # Into the caller's buffer, else pinned host memory (about twice as fast as a pageable
        # copy); then wait for it.
        host = out if out is not None else torch.empty(decoded.shape, dtype=decoded.dtype, pin_memory=True)
        host.copy_(decoded, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host

    def _touch(self, h: BlockHash, inserted: bool = False) -> None:
        e = self._entry(h)
        self._clock += 1
        e.hits += 1
        e.last_access = self._clock
        strategy = self._tiers[e.tier].strategy
        if inserted:
            strategy.insert(h)
        else:
            strategy.touch(h)

    # ------------------------------------------------------------------ slots, eviction, tiers

    def _allocate_slots(self, count: int, protected: Collection[BlockHash]) -> list[int]:
        """Up to ``count`` primary slots, evicting unprotected blocks as needed (they demote to the
        CPU tier when there is one). Blocks not yet in the strategy cannot be chosen."""
        tier = self._tiers[PRIMARY]
        slots: list[int] = []
        demoted: list[tuple[int, int]] = []
        while len(slots) < count:
            slot = tier.pool.allocate()
            if slot is None:
                victim = tier.strategy.victim(protected)
                if victim is None:
                    break
                self._evict(victim, tier, protected, demoted)
                continue
            slots.append(slot)
        self._flush_demotions(demoted)
        # Ascending: slots freed by evicting a whole chain come back in stack order (descending
        # or mixed); sorted, they are usually one consecutive run, which BlockPool.store writes
        # in place (no staging copy, no indexed copy) and later gets read as one view.
        slots.sort()
        return slots

    def _flush_demotions(self, demoted: list[tuple[int, int]]) -> None:
        """Queue the (primary slot, CPU-tier slot) copies of the blocks just demoted as one batch,
        then order later default-stream work (the writes reusing the freed slots) after them."""
        if demoted:
            src, dst = self._tiers[PRIMARY].pool, self._tiers[SECONDARY].pool
            self._copier.copy_many(src, [s for s, _ in demoted], dst, [d for _, d in demoted])
        self._copier.sync()

    def _evict(
        self, h: BlockHash, tier: Tier, protected: Collection[BlockHash], demoted: list[tuple[int, int]]
    ) -> None:
        """Move ``h`` down a tier, or drop it (and its descendants) from the last tier. A demotion's
        slot copy is appended to ``demoted`` (the caller flushes them with _flush_demotions before
        the freed primary slot is written)."""
        if tier.level == PRIMARY and len(self._tiers) > 1:
            lower = self._tiers[SECONDARY]
            slot = lower.pool.allocate()
            while slot is None:
                victim = lower.strategy.victim(protected)
                if victim is None:
                    break
                self._drop(victim, lower)
                slot = lower.pool.allocate()
            if slot is not None and h in self._index:
                e = self._entry(h)
                demoted.append((e.slot, slot))
                tier.pool.free(e.slot)
                tier.strategy.evicted(h)
                e.tier, e.slot = SECONDARY, slot
                lower.strategy.insert(h)
                self._counters["demotions"] += 1
                return
        self._drop(h, tier)

    def _drop(self, h: BlockHash, tier: Tier) -> None:
        """Remove ``h`` and its descendants from the cache (descendants first)."""
        for node in self._index.subtree(h):
            e = self._index.remove(node)
            t = self._tiers[e.tier]
            t.pool.free(e.slot)
            if node == h and t is tier:
                t.strategy.evicted(node)
            else:
                t.strategy.remove(node)
            self._counters["evictions"] += 1

    def _prefetch(self, hashes: list[BlockHash], hit: int) -> None:
        """Promote the hit blocks held by the CPU tier, then the most recent descendants of the
        last hit block, up to prefetch_size, with non_blocking host->device copies."""
        if not self._config.enable_prefetch or len(self._tiers) < 2 or hit == 0:
            return
        budget = self._config.prefetch_size
        wanted = [h for h in hashes[:hit] if self._entry(h).tier == SECONDARY][:budget]
        node = hashes[hit - 1]
        while len(wanted) < budget:
            kids = self._index.children(node)
            if not kids:
                break
            node = max(kids, key=lambda k: self._entry(k).last_access)
            if self._entry(node).tier == SECONDARY:
                wanted.append(node)
                self._counters["prefetches"] += 1
        protected = set(hashes[:hit]) | set(wanted)
        upper, lower = self._tiers[PRIMARY], self._tiers[SECONDARY]
        for h in wanted:
            slots = self._allocate_slots(1, protected)
            if not slots or h not in self._index or self._entry(h).tier != SECONDARY:
                if slots:
                    upper.pool.free(slots[0])
                break
            e = self._entry(h)
            self._copier.copy(lower.pool, e.slot, upper.pool, slots[0])
            lower.pool.free(e.slot)
            lower.strategy.remove(h)
            e.tier, e.slot = PRIMARY, slots[0]
            upper.strategy.insert(h)
            self._counters["promotions"] += 1
        self._copier.sync()

    # ------------------------------------------------------------------ background gc

    def _over_threshold(self) -> bool:
        pool = self._tiers[PRIMARY].pool
        return self._config.enable_gc and pool.used > self._config.gc_threshold * pool.num_slots

    def _maybe_gc(self) -> None:
        if not self._over_threshold() or self._closed:
            return
        if self._gc_thread is None:
            self._gc_thread = threading.Thread(
                target=_gc_loop, args=(weakref.ref(self),), name="kvcache-gc", daemon=True
            )
            self._gc_thread.start()
        self._gc_wakeup.notify()

    def run_gc(self, limit: int | None = None) -> int:
        """Evict until occupancy is at most gc_threshold (or ``limit`` victims); returns victims."""
        with self._lock:
            tier = self._tiers[PRIMARY]
            done = 0
            demoted: list[tuple[int, int]] = []
            while self._over_threshold() and (limit is None or done < limit):
                victim = tier.strategy.victim()
                if victim is None:
                    break
                self._evict(victim, tier, (), demoted)
                done += 1
            self._flush_demotions(demoted)
            return done

    # ------------------------------------------------------------------ block-level API

    def cached_hashes(self) -> list[BlockHash]:
        """Every stored block, parents before children."""
        with self._lock:
            return self._index.topological()

    def export_blocks(self, hashes: Iterable[BlockHash] | None = None) -> Iterator[StoredBlock]:
        """Consistent copies of the given (None: all) cached blocks, parents before children.
        Each block is copied under the lock; unknown hashes are skipped."""
        with self._lock:
            order = self._index.topological()
        if hashes is not None:
            wanted = set(_as_hashes(hashes))
            order = [h for h in order if h in wanted]
        for h in order:
            with self._lock:
                e = self._index.get(h)
                if e is None:
                    continue
                self._copier.host_sync()
                pool = self._tiers[e.tier].pool
                payload = {
                    k: v.detach().to("cpu", copy=True).contiguous() for k, v in pool.read(e.slot).items()
                }
                block = StoredBlock(h, e.parent, self._codec.name, payload, e.checksum, e.hits, e.last_access)
            yield block

    def import_blocks(self, blocks: Iterable[StoredBlock]) -> int:
        """Store verified copies: a block whose checksum, codec or geometry does not match, or
        whose parent is absent, is skipped (rejections are counted in stats' import_rejected and
        logged). Blocks in another codec are transcoded. Returns blocks newly stored. Blocks are
        taken in chunks, each chunk under the lock."""
        stored = 0
        chunk: list[StoredBlock] = []
        for block in blocks:
            chunk.append(block)
            if len(chunk) == _IMPORT_CHUNK:
                stored += self._import_chunk(chunk)
                chunk = []
        if chunk:
            stored += self._import_chunk(chunk)
        return stored

    def _import_chunk(self, chunk: list[StoredBlock]) -> int:
        with self._lock:
            accepted: list[tuple[StoredBlock, dict[str, torch.Tensor]]] = []
            incoming: set[BlockHash] = set()
            for block in chunk:
                if block.hash in self._index or block.hash in incoming:
                    continue
                if (
                    block.parent is not None
                    and block.parent not in self._index
                    and block.parent not in incoming
                ):
                    log.debug("import: block %016x skipped, parent %016x absent", block.hash, block.parent)
                    continue
                payload = self._verified_payload(block)
                if payload is None:
                    self._counters["import_rejected"] += 1
                    continue
                accepted.append((block, payload))
                incoming.add(block.hash)
            # Existing ancestors of the chunk stay put while slots are found (new blocks are not in
            # any strategy yet, so they cannot be chosen either).
            ancestors = self._ancestors_of({b.parent for b, _ in accepted} - incoming - {None})
            slots = self._allocate_slots(len(accepted), set(ancestors))
            pool = self._tiers[PRIMARY].pool
            stored: list[BlockHash] = []
            for (block, payload), slot in zip(accepted, slots, strict=False):
                if block.parent is not None and block.parent not in self._index:
                    pool.free(slot)  # its parent did not fit
                    continue
                pool.write(slot, payload)
                checksum = block.checksum if block.codec == self._codec.name else payload_checksum(payload)
                self._index.add(
                    BlockEntry(
                        block.hash, block.parent, PRIMARY, slot, checksum, block.hits, block.last_access
                    )
                )
                self._clock = max(self._clock, block.last_access)
                stored.append(block.hash)
            # Children first, then the existing ancestors from the deepest to the root: every
            # parent ends up at least as hot as its children.
            for h in reversed(stored):
                self._tiers[PRIMARY].strategy.insert(h)
            for h in ancestors:
                self._tiers[self._entry(h).tier].strategy.touch(h)
            self._counters["bytes_in"] += len(stored) * self._codec.stored_bytes()
            return len(stored)

    def _ancestors_of(self, parents: set[BlockHash | None]) -> list[BlockHash]:
        """The given indexed blocks and all their ancestors, each once, deeper ones first."""
        seen: set[BlockHash] = set()
        out: list[BlockHash] = []
        for p in parents:
            node = p
            chain: list[BlockHash] = []
            while node is not None and node not in seen and node in self._index:
                seen.add(node)
                chain.append(node)
                node = self._entry(node).parent
            out.extend(chain)
        return out

    def _verified_payload(self, block: StoredBlock) -> dict[str, torch.Tensor] | None:
        try:
            codec = self._codec_for(block.codec)
            codec.check_payload(block.payload)
        except ValueError as exc:
            log.warning("import: block %016x rejected: %s", block.hash, exc)
            return None
        if payload_checksum(block.payload) != block.checksum:
            log.warning("import: block %016x rejected: checksum mismatch", block.hash)
            return None
        if codec is self._codec:
            return block.payload
        return self._codec.encode(codec.decode(block.payload))

    # ------------------------------------------------------------------ admin

    def reconfigure(self, **changes: Any) -> KVCacheConfig:
        """Apply live fields (config.LIVE_FIELDS); others raise ConfigError naming them.
        Capacity or codec changes rebuild the pool online, keeping the hottest blocks that fit."""
        not_live = sorted(set(changes) - LIVE_FIELDS)
        if not_live:
            raise ConfigError(
                f"{', '.join(not_live)}: not live-reconfigurable (needs a restart); "
                f"live fields: {', '.join(sorted(LIVE_FIELDS))}"
            )
        with self._lock:
            new = self._validated(self._config, changes)
            old = self._config
            if new.codec != old.codec or pool_blocks(new) != pool_blocks(old):
                self._quiesce()
                self._rebuild(new)
            elif new.cache_strategy != old.cache_strategy:
                self._config = new
                self._restrategize()
            self._config = new
            logging.getLogger("kvcache_engine").setLevel(new.log_level)
            self._maybe_gc()
            return self.config

    def resize(self, max_tokens: int) -> None:
        """Grow or shrink the primary tier online, keeping the hottest blocks that fit."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens: expected a non-negative int, got {max_tokens!r}")
        self.reconfigure(max_tokens=max_tokens)

    def _restrategize(self) -> None:
        tier = self._tiers[PRIMARY]
        order = list(tier.strategy.order())
        tier.strategy = make_strategy(self._config.cache_strategy, tier.pool.num_slots)
        for h in order:
            tier.strategy.insert(h)

    def _rebuild(self, new: KVCacheConfig) -> None:
        """New primary pool (new size and/or codec): keep the hottest primary blocks that fit,
        parents always kept with their children; drop the rest."""
        tier = self._tiers[PRIMARY]
        slots = pool_blocks(new)
        # Allocated first: a pool that does not fit is refused before any block is dropped.
        new_codec = self._codec_for(new.codec)
        pool = allocate_pool(new_codec.layout, slots, self.device, sized_by=_sized_by(new, slots))
        hottest_first = list(tier.strategy.order())[::-1]
        keep: list[BlockHash] = []
        kept: set[BlockHash] = set()
        for h in hottest_first:
            if len(keep) >= slots:
                break
            parent = self._entry(h).parent
            if parent is None or parent in kept or self._entry(parent).tier != PRIMARY:
                keep.append(h)
                kept.add(h)
        for h in hottest_first:
            if h not in kept and h in self._index:
                self._drop(h, tier)
        keep = [h for h in keep if h in self._index]
        old_codec = self._codec
        self._config = new
        self._codec = new_codec
        strategy = make_strategy(new.cache_strategy, slots)
        for h in reversed(keep):  # coldest first, so the strategy's order is preserved
            e = self._entry(h)
            slot = pool.allocate()
            assert slot is not None, "keep never exceeds the new pool's slots"
            payload = tier.pool.read(e.slot)
            if old_codec is not self._codec:
                payload = self._codec.encode(old_codec.decode(payload))
                e.checksum = payload_checksum(payload)
            pool.write(slot, payload)
            e.slot = slot
            strategy.insert(h)
        self._tiers[PRIMARY] = Tier(PRIMARY, pool, strategy)
        if old_codec is not self._codec and len(self._tiers) > 1:
            self._transcode_lower(old_codec)

    def _transcode_lower(self, old_codec: Codec) -> None:
        """Re-encode the CPU tier into the new codec (a new pool of the same byte budget)."""
        lower = self._tiers[SECONDARY]
        budget = lower.pool.nbytes
        slots = max(1, budget // self._codec.layout.slot_bytes)
        pool = BlockPool(self._codec.layout, slots, torch.device("cpu"), pin_memory=self._config.pin_memory)
        strategy = LRUStrategy(slots)
        self._copier.host_sync()
        for h in [h for h in lower.strategy.order() if h in self._index][-slots:]:
            e = self._entry(h)
            payload = self._codec.encode(old_codec.decode(lower.pool.read(e.slot)))
            slot = pool.allocate()
            assert slot is not None
            pool.write(slot, payload)
            e.slot, e.checksum = slot, payload_checksum(payload)
            strategy.insert(h)
        for h in list(lower.strategy.order()):
            if h not in strategy and h in self._index:
                self._drop(h, lower)
        self._tiers[SECONDARY] = Tier(SECONDARY, pool, strategy)

    def clear_cache(self) -> None:
        """Drop every block (counters keep growing; they are Prometheus counters)."""
        with self._lock:
            for e in list(self._index):
                self._tiers[e.tier].pool.free(e.slot)
            self._index.clear()
            for t in self._tiers:
                t.strategy.clear()

    def compact_cache(self) -> dict[str, int]:
        """Move live blocks to the front of each pool; returns moved/used/free counts."""
        with self._lock:
            self._quiesce()
            self._copier.host_sync()
            moved = 0
            for t in self._tiers:
                by_slot = {e.slot: e for e in self._index if e.tier == t.level}
                moves = t.pool.compact()
                for old, new in moves.items():
                    by_slot[old].slot = new
                moved += len(moves)
            pool = self._tiers[PRIMARY].pool
            return {"moved_blocks": moved, "used_blocks": pool.used, "free_blocks": pool.free_count}

    def validate_cache_integrity(self, repair: bool = False) -> dict[str, Any]:
        """Check every block's checksum against its slot, the index's chain links and slot
        ownership, and the strategies' bookkeeping. ``repair`` drops corrupt and dangling blocks
        (with their descendants). Returns ``{'is_valid', 'errors', 'checked_blocks',
        'corrupt_blocks', 'dangling_blocks', 'repaired_blocks'}``."""
        with self._lock:
            self._quiesce()  # reserved slots are in use but not indexed yet
            self._copier.host_sync()
            errors = self._index.check()
            dangling = [e.hash for e in self._index if e.parent is not None and e.parent not in self._index]
            corrupt: list[BlockHash] = []
            entries = list(self._index)
            actual: dict[BlockHash, str] = {}
            for t in self._tiers:  # checksums in batches per tier, on the tier's device
                held = [e for e in entries if e.tier == t.level and t.pool.in_use(e.slot)]
                sums = t.pool.checksums([e.slot for e in held])
                actual.update(zip((e.hash for e in held), sums, strict=True))
            for e in entries:
                if not self._tiers[e.tier].pool.in_use(e.slot):
                    errors.append(f"block {e.hash:016x}: slot {e.slot} of tier {e.tier} is marked free")
                elif actual[e.hash] != e.checksum:
                    errors.append(f"block {e.hash:016x}: checksum mismatch (stored data corrupted)")
                    corrupt.append(e.hash)
                if e.hash not in self._tiers[e.tier].strategy:
                    errors.append(f"block {e.hash:016x}: not tracked by the tier {e.tier} eviction strategy")
            for t in self._tiers:
                count = sum(1 for e in self._index if e.tier == t.level)
                if t.pool.used != count or len(t.strategy) != count:
                    errors.append(
                        f"tier {t.level}: {count} indexed blocks but {t.pool.used} used slots and "
                        f"{len(t.strategy)} tracked by the strategy"
                    )
            if self._persister is not None:
                errors.extend(self._persister.integrity_errors())
            repaired = self._repair(corrupt + dangling) if repair else 0
            return {
                "is_valid": not errors,
                "errors": errors,
                "checked_blocks": len(self._index) + repaired,
                "corrupt_blocks": len(corrupt),
                "dangling_blocks": len(dangling),
                "repaired_blocks": repaired,
            }

    def _repair(self, bad: list[BlockHash]) -> int:
        before = len(self._index)
        for h in bad:
            for node in self._index.subtree(h) if h in self._index else ():
                e = self._index.remove(node)
                tier = self._tiers[e.tier]
                if tier.pool.in_use(e.slot):
                    tier.pool.free(e.slot)
                tier.strategy.remove(node)
        return before - len(self._index)

    def access_history(self) -> list[tuple[tuple[int, ...], int]]:
        """The last lookups, oldest first: (chain hashes root first, truncated; leading hit blocks)."""
        with self._lock:
            return [(tuple(hashes), hit) for hashes, hit in self._history]

    def get_stats(self) -> dict[str, Any]:
        """Counters, gauges and latency figures (every key always present)."""
        with self._lock:
            c = self._config
            primary = self._tiers[PRIMARY].pool
            lower = self._tiers[SECONDARY].pool if len(self._tiers) > 1 else None
            stats: dict[str, Any] = dict(self._counters)
            stats.update(self._latency.summary())
            requested = stats["requested_tokens"]
            stats.update(
                hit_rate=stats["hit_tokens"] / requested if requested else 0.0,
                num_blocks=primary.num_slots,
                used_blocks=primary.used,
                memory_pressure=primary.used / primary.num_slots if primary.num_slots else 0.0,
                compression_ratio=self._codec.stored_bytes() / c.block_bytes_fp16(),
                codec=self._codec.name,
                cache_strategy=c.cache_strategy.value,
                max_tokens=c.max_tokens,
                block_tokens=c.block_tokens,
                cached_blocks=len(self._index),
                pool_bytes=primary.nbytes + (lower.nbytes if lower is not None else 0),
                pool_fragmentation=primary.fragmentation,
                device=str(self.device),
                cpu_tier_blocks=lower.num_slots if lower is not None else 0,
                cpu_tier_used_blocks=lower.used if lower is not None else 0,
                **self._device_memory(),
            )
            if self._persister is not None:
                stats.update(self._persister.stats())
            return stats

    def _device_memory(self) -> dict[str, int]:
        if self.device.type != "cuda":
            return {"device_memory_allocated": 0, "device_memory_reserved": 0, "device_memory_total": 0}
        return {
            "device_memory_allocated": int(torch.cuda.memory_allocated(self.device)),
            "device_memory_reserved": int(torch.cuda.memory_reserved(self.device)),
            "device_memory_total": int(torch.cuda.get_device_properties(self.device).total_memory),
        }

    def close(self) -> None:
        """Stop background threads (gc, and the persister's when one exists)."""
        with self._lock:
            self._closed = True
            self._gc_wakeup.notify_all()
            thread = self._gc_thread
        if thread is not None:
            thread.join(timeout=5)
        persister = self._persister
        if persister is not None and hasattr(persister, "close"):
            persister.close()

    # ------------------------------------------------------------------ delegations

    def _get_persister(self) -> Any:
        if self._persister is None:
            from kvcache_engine.persistence import Persister

            self._persister = Persister(self)
        return self._persister

    def _get_runner(self) -> Any:
        if self._runner is None:
            from kvcache_engine.inference import ModelRunner

            self._runner = ModelRunner(self)
        return self._runner

    def persist(self) -> bool:
        """Write the cache to persistence_path (see kvcache_engine.persistence)."""
        return bool(self._get_persister().persist())

    def load(self) -> int:
        """Load the persisted cache; returns blocks loaded."""
        return int(self._get_persister().load())

    def restore_from_backup(self, path: str | Path) -> int:
        """Load a backup archive/directory; returns blocks restored."""
        return int(self._get_persister().restore_from_backup(path))

    async def process_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one request through the configured model, reusing cached KV (kvcache_engine.inference)."""
        result: dict[str, Any] = await self._get_runner().process_request(request)
        return result

    def process_request_sync(self, request: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._get_runner().process_request_sync(request)
        return result

    async def process_batch_optimized(
        self, requests: list[dict[str, Any]], batch_size: int = 20
    ) -> list[dict[str, Any]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        result: list[dict[str, Any]] = await self._get_runner().process_batch_optimized(requests, batch_size)
        return result
