"""EngineState: the one mutable state behind a ``KVCacheEngine``, shared by its parts.

Every part (store, slots, reservations, gc, transfer, retune, maintenance, stats) holds this
object and reads the current ``config``, ``codec`` and ``tiers`` through it, never a copy: retune
replaces them (it never mutates a config or a codec in place).

Invariants, under ``lock`` (re-entrant; every public engine method takes it): a block is
indexed iff it occupies exactly one slot of one tier; every indexed block's parent is indexed
(evicting a block evicts its descendants); each tier's strategy tracks exactly that tier's
blocks; counters only grow.
"""

from __future__ import annotations

import logging
import threading

import torch

from kvcache_engine.contract.cache import KVCacheConfig
from kvcache_engine.contract.sizing import pool_blocks
from kvcache_engine.core.compression import Codec, make_codec
from kvcache_engine.core.curve import ShadowCurve, curve_entries_for
from kvcache_engine.core.eviction import LRUStrategy, make_strategy
from kvcache_engine.core.hashing import BlockHash
from kvcache_engine.core.prefix_index import BlockEntry, PrefixIndex
from kvcache_engine.core.stats import AccessHistory, Counters, Latency
from kvcache_engine.core.tiers import (
    PRIMARY,
    SECONDARY,
    Tier,
    TierCopier,
    allocate_pool,
    resolve_device,
)

__all__ = ["CURVE_CPU_SHARE", "EngineState", "sized_by"]

log = logging.getLogger("kvcache_engine")

CURVE_CPU_SHARE = 0.04
"""The curve's sampled work may take this share of the lookups' time, or 1 % of the process's idle
time when more (it lowers its sampling rate to stay under it): with the unsampled check, within
5 % of lookup throughput."""


def sized_by(cfg: KVCacheConfig, slots: int) -> str:
    """The config field that sets the primary pool's size, for allocation errors."""
    field = (
        f"memory_pool_size={cfg.memory_pool_size}"
        if cfg.memory_pool_size is not None
        else f"max_tokens={cfg.max_tokens}"
    )
    return f"{field} ({slots} blocks of {cfg.block_bytes_stored()} bytes, codec {cfg.codec})"


class EngineState:
    """Config, lock, device, tiers (pools + strategies), prefix index, codecs, clock and stats
    of one engine. Built from a validated config; allocates the pools (PoolAllocationError when
    they do not fit)."""

    def __init__(self, cfg: KVCacheConfig) -> None:
        self.config = cfg.model_copy(deep=True)
        self.lock = threading.RLock()
        self.device: torch.device = resolve_device(cfg.device)
        self.copier = TierCopier(self.device, cfg.non_blocking)
        self.index = PrefixIndex()
        self.clock = 0
        self.counters = Counters()
        self.latency = Latency()
        self.history = AccessHistory()
        self._codecs: dict[str, Codec] = {}
        self.codec = self.codec_for(cfg.codec)
        self.tiers: list[Tier] = []
        self._build_tiers(cfg)
        # The miss-ratio curve's shadow, within 1 % of the pools' bytes and a share of lookup CPU.
        self.curve = ShadowCurve(
            curve_entries_for(self.pool_bytes()), cpu_share=CURVE_CPU_SHARE, route_depth=cfg.route_depth
        )
        self.exact_miss_reasons: dict[str, int] = {}  # blocks missed for reasons seen exactly

    def codec_for(self, name: str) -> Codec:
        """The codec ``name`` for this engine's geometry (made once, then cached)."""
        codec = self._codecs.get(name)
        if codec is None:
            c = self.config
            codec = make_codec(
                name, num_layers=c.num_layers, block_tokens=c.block_tokens,
                num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=c.dtype,
            )  # fmt: skip
            self._codecs[name] = codec
        return codec

    def _build_tiers(self, cfg: KVCacheConfig) -> None:
        slots = pool_blocks(cfg)
        layout = self.codec.layout
        primary = allocate_pool(layout, slots, self.device, sized_by=sized_by(cfg, slots))
        self.tiers = [Tier(PRIMARY, primary, make_strategy(cfg.cache_strategy, slots))]
        if cfg.cpu_tier_tokens and self.device.type == "cuda":
            cpu_slots = max(
                1, (cfg.cpu_tier_tokens // cfg.block_tokens) * cfg.block_bytes_fp16() // layout.slot_bytes
            )
            sized = f"cpu_tier_tokens={cfg.cpu_tier_tokens} ({cpu_slots} blocks of {layout.slot_bytes} bytes)"
            pool = allocate_pool(
                layout, cpu_slots, torch.device("cpu"), pin_memory=cfg.pin_memory, sized_by=sized
            )
            self.tiers.append(Tier(SECONDARY, pool, LRUStrategy(cpu_slots)))
        elif cfg.cpu_tier_tokens:
            log.info(
                "cpu_tier_tokens=%d ignored: the primary tier is already on the CPU", cfg.cpu_tier_tokens
            )
        if cfg.enable_prefetch and len(self.tiers) == 1:
            log.info("enable_prefetch has no effect without a CUDA tier backed by a CPU tier")

    # -- queries under the lock

    def pool_bytes(self) -> int:
        """Bytes of every tier's pool."""
        return sum(t.pool.nbytes for t in self.tiers)

    def capacity_blocks(self) -> int:
        """Blocks the engine can hold (every tier): what a lookup can find."""
        return sum(t.pool.num_slots for t in self.tiers)

    def entry(self, h: BlockHash) -> BlockEntry:
        """The index entry of ``h``; the caller checked the index under the lock."""
        e = self.index.get(h)
        assert e is not None, "caller checked the index under the lock"
        return e

    def token_elems(self) -> int:
        """KV elements of one token: ``2 * num_layers * num_kv_heads * head_dim``."""
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim

    @property
    def stores_raw_rows(self) -> bool:
        """True when a block's stored payload is its raw KV bytes ``[2, L, block_tokens, H, D]``
        in a CPU pool (codec ``none``): then reserve_put can hand out slots to write into."""
        pool = self.tiers[PRIMARY].pool
        return self.codec.name == "none" and pool.rows_are_payload and pool.device.type == "cpu"

    def ancestors_of(self, parents: set[BlockHash | None]) -> list[BlockHash]:
        """The given indexed blocks and all their ancestors, each once, deeper ones first."""
        seen: set[BlockHash] = set()
        out: list[BlockHash] = []
        for p in parents:
            node = p
            chain: list[BlockHash] = []
            while node is not None and node not in seen and node in self.index:
                seen.add(node)
                chain.append(node)
                node = self.entry(node).parent
            out.extend(chain)
        return out

    def touch(self, h: BlockHash, inserted: bool = False) -> None:
        """Count an access to ``h`` (hits, clock) and tell its tier's strategy (insert when new)."""
        e = self.entry(h)
        self.clock += 1
        e.hits += 1
        e.last_access = self.clock
        strategy = self.tiers[e.tier].strategy
        if inserted:
            strategy.insert(h)
        else:
            strategy.touch(h)
