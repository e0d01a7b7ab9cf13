"""Slots and tier movement: allocation with inline eviction, demotion to the CPU tier, drops
(a block with its descendants) and promotion (prefetch).

Every method runs under the engine lock (the caller holds it). Invariants kept: a block leaves
the index together with its whole subtree; a demoted block keeps its index entry and moves to
exactly one slot of the lower tier; a freed primary slot is written again only after the
demotion copies out of it were flushed (:meth:`SlotAllocator.flush_demotions`).
"""

from __future__ import annotations

from collections.abc import Collection

from kvcache_engine.core.hashing import BlockHash
from kvcache_engine.core.state import EngineState
from kvcache_engine.core.tiers import PRIMARY, SECONDARY, Tier

__all__ = ["SlotAllocator"]


class SlotAllocator:
    """Finds primary slots for new blocks and moves blocks between tiers."""

    def __init__(self, state: EngineState) -> None:
        self._state = state

    def allocate(self, count: int, protected: Collection[BlockHash]) -> list[int]:
        """Up to ``count`` primary slots, evicting unprotected blocks as needed (they demote to the
        CPU tier when there is one). Blocks not yet in the strategy cannot be chosen."""
        tier = self._state.tiers[PRIMARY]
        slots: list[int] = []
        demoted: list[tuple[int, int]] = []
        while len(slots) < count:
            slot = tier.pool.allocate()
            if slot is None:
                victim = tier.strategy.victim(protected)
                if victim is None:
                    break
                self.evict(victim, tier, protected, demoted)
                continue
            slots.append(slot)
        self.flush_demotions(demoted)
        # Ascending: slots freed by evicting a whole chain come back in stack order (descending
        # or mixed); sorted, they are usually one consecutive run, which BlockPool.store writes
        # in place (no staging copy, no indexed copy) and later gets read as one view.
        slots.sort()
        return slots

    def flush_demotions(self, demoted: list[tuple[int, int]]) -> None:
        """Queue the (primary slot, CPU-tier slot) copies of the blocks just demoted as one batch,
        then order later default-stream work (the writes reusing the freed slots) after them."""
        st = self._state
        if demoted:
            src, dst = st.tiers[PRIMARY].pool, st.tiers[SECONDARY].pool
            st.copier.copy_many(src, [s for s, _ in demoted], dst, [d for _, d in demoted])
        st.copier.sync()

    def evict(
        self, h: BlockHash, tier: Tier, protected: Collection[BlockHash], demoted: list[tuple[int, int]]
    ) -> None:
        """Move ``h`` down a tier, or drop it (and its descendants) from the last tier. A demotion's
        slot copy is appended to ``demoted`` (the caller flushes them with flush_demotions before
        the freed primary slot is written)."""
        st = self._state
        if tier.level == PRIMARY and len(st.tiers) > 1:
            lower = st.tiers[SECONDARY]
            slot = lower.pool.allocate()
            while slot is None:
                victim = lower.strategy.victim(protected)
                if victim is None:
                    break
                self.drop(victim, lower)
                slot = lower.pool.allocate()
            if slot is not None and h in st.index:
                e = st.entry(h)
                demoted.append((e.slot, slot))
                tier.pool.free(e.slot)
                tier.strategy.evicted(h)
                e.tier, e.slot = SECONDARY, slot
                lower.strategy.insert(h)
                st.counters.demotions += 1
                return
        self.drop(h, tier)

    def drop(self, h: BlockHash, tier: Tier, reason: str = "capacity") -> None:
        """Remove ``h`` and its descendants from the cache (descendants first); ``reason`` (the
        curve's miss reason: ``capacity`` or ``retune``) is remembered for sampled blocks."""
        st = self._state
        for node in st.index.subtree(h):
            st.curve.evicted(node, reason)
            e = st.index.remove(node)
            t = st.tiers[e.tier]
            t.pool.free(e.slot)
            if node == h and t is tier:
                t.strategy.evicted(node)
            else:
                t.strategy.remove(node)
            st.counters.evictions += 1

    def prefetch(self, hashes: list[BlockHash], hit: int) -> None:
        """Promote the hit blocks held by the CPU tier, then the most recent descendants of the
        last hit block, up to prefetch_size, with non_blocking host->device copies."""
        st = self._state
        if not st.config.enable_prefetch or len(st.tiers) < 2 or hit == 0:
            return
        wanted = self._prefetch_candidates(hashes, hit, st.config.prefetch_size)
        protected = set(hashes[:hit]) | set(wanted)
        upper, lower = st.tiers[PRIMARY], st.tiers[SECONDARY]
        for h in wanted:
            slots = self.allocate(1, protected)
            if not slots or h not in st.index or st.entry(h).tier != SECONDARY:
                if slots:
                    upper.pool.free(slots[0])
                break
            e = st.entry(h)
            st.copier.copy(lower.pool, e.slot, upper.pool, slots[0])
            lower.pool.free(e.slot)
            lower.strategy.remove(h)
            e.tier, e.slot = PRIMARY, slots[0]
            upper.strategy.insert(h)
            st.counters.promotions += 1
        st.copier.sync()

    def _prefetch_candidates(self, hashes: list[BlockHash], hit: int, budget: int) -> list[BlockHash]:
        """The hit blocks the CPU tier holds (at most ``budget``), then, walking down from the last
        hit through the most recently used child, the ones the CPU tier holds (each counted as a
        prefetch) until ``budget`` blocks are wanted or the chain ends."""
        st = self._state
        wanted = [h for h in hashes[:hit] if st.entry(h).tier == SECONDARY][:budget]
        node = hashes[hit - 1]
        while len(wanted) < budget:
            kids = st.index.children(node)
            if not kids:
                break
            node = max(kids, key=lambda k: st.entry(k).last_access)
            if st.entry(node).tier == SECONDARY:
                wanted.append(node)
                st.counters.prefetches += 1
        return wanted
