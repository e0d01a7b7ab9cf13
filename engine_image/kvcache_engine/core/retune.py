"""Retune: live config changes while the cache serves (``reconfigure``, ``resize``).

A capacity or codec change rebuilds the primary pool online: the new pool is allocated before
any block is dropped (a pool that does not fit is refused and nothing changes), then the
hottest blocks that fit are kept, each with its parent, transcoded when the codec changed (the
CPU tier too). A strategy change re-seeds the new strategy in the old one's order. Rebuilds
first wait for in-flight zero-copy puts (:meth:`Reservations.quiesce`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pydantic import ValidationError

from kvcache_engine.contract.cache import ConfigError, KVCacheConfig, format_validation_error
from kvcache_engine.contract.live import LIVE_FIELDS
from kvcache_engine.contract.sizing import pool_blocks
from kvcache_engine.core.block_pool import BlockPool, payload_checksum
from kvcache_engine.core.compression import Codec
from kvcache_engine.core.curve import curve_entries_for
from kvcache_engine.core.eviction import LRUStrategy, make_strategy
from kvcache_engine.core.gc import BackgroundGC
from kvcache_engine.core.hashing import BlockHash
from kvcache_engine.core.reservations import Reservations
from kvcache_engine.core.slots import SlotAllocator
from kvcache_engine.core.state import EngineState, sized_by
from kvcache_engine.core.tiers import PRIMARY, SECONDARY, Tier, allocate_pool

__all__ = ["Retuner", "validated_config"]


def validated_config(cfg: KVCacheConfig, changes: dict[str, Any]) -> KVCacheConfig:
    """``cfg`` with ``changes`` (snake_case fields) applied and validated; ConfigError naming
    unknown or invalid fields."""
    unknown = sorted(set(changes) - set(KVCacheConfig.model_fields))
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
    try:
        return KVCacheConfig.model_validate({**cfg.model_dump(), **changes})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc


class Retuner:
    """reconfigure / resize of one engine, under its lock."""

    def __init__(
        self, state: EngineState, slots: SlotAllocator, reservations: Reservations, gc: BackgroundGC
    ) -> None:
        self._state = state
        self._slots = slots
        self._reservations = reservations
        self._gc = gc

    def reconfigure(self, **changes: Any) -> KVCacheConfig:
        """Apply live fields (config.LIVE_FIELDS); others raise ConfigError naming them. Returns
        a copy of the new effective config."""
        not_live = sorted(set(changes) - LIVE_FIELDS)
        if not_live:
            raise ConfigError(
                f"{', '.join(not_live)}: not live-reconfigurable (needs a restart); "
                f"live fields: {', '.join(sorted(LIVE_FIELDS))}"
            )
        st = self._state
        with st.lock:
            new = validated_config(st.config, changes)
            old = st.config
            if new.codec != old.codec or pool_blocks(new) != pool_blocks(old):
                self._reservations.quiesce()
                self._rebuild(new)
            elif new.cache_strategy != old.cache_strategy:
                st.config = new
                self._restrategize()
            st.config = new
            logging.getLogger("kvcache_engine").setLevel(new.log_level)
            self._gc.maybe_wake()
            return st.config.model_copy(deep=True)

    def resize(self, max_tokens: int) -> None:
        """Grow or shrink the primary tier online, keeping the hottest blocks that fit."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens: expected a non-negative int, got {max_tokens!r}")
        self.reconfigure(max_tokens=max_tokens)

    def _restrategize(self) -> None:
        tier = self._state.tiers[PRIMARY]
        order = list(tier.strategy.order())
        tier.strategy = make_strategy(self._state.config.cache_strategy, tier.pool.num_slots)
        for h in order:
            tier.strategy.insert(h)

    def _rebuild(self, new: KVCacheConfig) -> None:
        """New primary pool (new size and/or codec): keep the hottest primary blocks that fit,
        parents always kept with their children; drop the rest."""
        st = self._state
        tier = st.tiers[PRIMARY]
        slots = pool_blocks(new)
        # Allocated first: a pool that does not fit is refused before any block is dropped.
        new_codec = st.codec_for(new.codec)
        pool = allocate_pool(new_codec.layout, slots, st.device, sized_by=sized_by(new, slots))
        keep = self._keep_hottest(tier, slots)
        old_codec = st.codec
        st.config = new
        st.codec = new_codec
        strategy = make_strategy(new.cache_strategy, slots)
        for h in reversed(keep):  # coldest first, so the strategy's order is preserved
            e = st.entry(h)
            slot = pool.allocate()
            assert slot is not None, "keep never exceeds the new pool's slots"
            payload = tier.pool.read(e.slot)
            if old_codec is not st.codec:
                payload = st.codec.encode(old_codec.decode(payload))
                e.checksum = payload_checksum(payload)
            pool.write(slot, payload)
            e.slot = slot
            strategy.insert(h)
        st.tiers[PRIMARY] = Tier(PRIMARY, pool, strategy)
        if old_codec is not st.codec and len(st.tiers) > 1:
            self._transcode_lower(old_codec)
        st.curve.set_max_entries(curve_entries_for(st.pool_bytes()))

    def _keep_hottest(self, tier: Tier, slots: int) -> list[BlockHash]:
        """Drop all but the (at most ``slots``) hottest blocks of ``tier`` whose parent is kept or
        in another tier; returns the kept ones, hottest first."""
        st = self._state
        hottest_first = list(tier.strategy.order())[::-1]
        keep: list[BlockHash] = []
        kept: set[BlockHash] = set()
        for h in hottest_first:
            if len(keep) >= slots:
                break
            parent = st.entry(h).parent
            if parent is None or parent in kept or st.entry(parent).tier != PRIMARY:
                keep.append(h)
                kept.add(h)
        for h in hottest_first:
            if h not in kept and h in st.index:
                self._slots.drop(h, tier, reason="retune")
        return [h for h in keep if h in st.index]

    def _transcode_lower(self, old_codec: Codec) -> None:
        """Re-encode the CPU tier into the new codec (a new pool of the same byte budget)."""
        st = self._state
        lower = st.tiers[SECONDARY]
        budget = lower.pool.nbytes
        slots = max(1, budget // st.codec.layout.slot_bytes)
        pool = BlockPool(st.codec.layout, slots, torch.device("cpu"), pin_memory=st.config.pin_memory)
        strategy = LRUStrategy(slots)
        st.copier.host_sync()
        for h in [h for h in lower.strategy.order() if h in st.index][-slots:]:
            e = st.entry(h)
            payload = st.codec.encode(old_codec.decode(lower.pool.read(e.slot)))
            slot = pool.allocate()
            assert slot is not None
            pool.write(slot, payload)
            e.slot, e.checksum = slot, payload_checksum(payload)
            strategy.insert(h)
        for h in list(lower.strategy.order()):
            if h not in strategy and h in st.index:
                self._slots.drop(h, lower, reason="retune")
        st.tiers[SECONDARY] = Tier(SECONDARY, pool, strategy)
