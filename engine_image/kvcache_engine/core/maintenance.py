"""Maintenance of the stored blocks: clear, compact (defragment the slot range) and the
integrity check with its repair.

Invariants: clear keeps the counters (they are Prometheus counters); compact and validate first
wait for in-flight zero-copy puts (reserved slots are in use but not indexed yet) and for queued
tier copies; compact moves slots without changing any block's bytes or index entry otherwise;
repair drops a bad block with its whole subtree, so no dangling chain is left behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvcache_engine.core.hashing import BlockHash
from kvcache_engine.core.reservations import Reservations
from kvcache_engine.core.state import EngineState
from kvcache_engine.core.tiers import PRIMARY

__all__ = ["Maintenance"]


class Maintenance:
    """clear_cache / compact_cache / validate_cache_integrity of one engine."""

    def __init__(self, state: EngineState, reservations: Reservations) -> None:
        self._state = state
        self._reservations = reservations

    def clear(self) -> None:
        """Drop every block (counters keep growing; they are Prometheus counters)."""
        st = self._state
        with st.lock:
            for e in list(st.index):
                st.tiers[e.tier].pool.free(e.slot)
                st.curve.evicted(e.hash, "cleared")
            st.index.clear()
            for t in st.tiers:
                t.strategy.clear()

    def compact(self) -> dict[str, int]:
        """Move live blocks to the front of each pool; returns moved/used/free counts."""
        st = self._state
        with st.lock:
            self._reservations.quiesce()
            st.copier.host_sync()
            moved = 0
            for t in st.tiers:
                by_slot = {e.slot: e for e in st.index if e.tier == t.level}
                moves = t.pool.compact()
                for old, new in moves.items():
                    by_slot[old].slot = new
                moved += len(moves)
            pool = st.tiers[PRIMARY].pool
            return {"moved_blocks": moved, "used_blocks": pool.used, "free_blocks": pool.free_count}

    def validate(
        self, repair: bool = False, extra_errors: Callable[[], list[str]] | None = None
    ) -> dict[str, Any]:
        """Check every block's checksum against its slot, the index's chain links and slot
        ownership, and the strategies' bookkeeping; ``extra_errors`` (the persister's) are added
        under the same lock. ``repair`` drops corrupt and dangling blocks with their descendants.
        Returns the report of KVCacheEngine.validate_cache_integrity."""
        st = self._state
        with st.lock:
            self._reservations.quiesce()  # reserved slots are in use but not indexed yet
            st.copier.host_sync()
            errors = st.index.check()
            dangling = [e.hash for e in st.index if e.parent is not None and e.parent not in st.index]
            corrupt = self._check_blocks(errors)
            self._check_tiers(errors)
            if extra_errors is not None:
                errors.extend(extra_errors())
            repaired = self._repair(corrupt + dangling) if repair else 0
            return {
                "is_valid": not errors,
                "errors": errors,
                "checked_blocks": len(st.index) + repaired,
                "corrupt_blocks": len(corrupt),
                "dangling_blocks": len(dangling),
                "repaired_blocks": repaired,
            }

    def _check_blocks(self, errors: list[str]) -> list[BlockHash]:
        """Under the lock: each indexed block's slot ownership, checksum and strategy tracking
        (problems appended to ``errors``); returns the corrupt blocks."""
        st = self._state
        entries = list(st.index)
        actual: dict[BlockHash, str] = {}
        for t in st.tiers:  # checksums in batches per tier, on the tier's device
            held = [e for e in entries if e.tier == t.level and t.pool.in_use(e.slot)]
            sums = t.pool.checksums([e.slot for e in held])
            actual.update(zip((e.hash for e in held), sums, strict=True))
        corrupt: list[BlockHash] = []
        for e in entries:
            if not st.tiers[e.tier].pool.in_use(e.slot):
                errors.append(f"block {e.hash:016x}: slot {e.slot} of tier {e.tier} is marked free")
            elif actual[e.hash] != e.checksum:
                errors.append(f"block {e.hash:016x}: checksum mismatch (stored data corrupted)")
                corrupt.append(e.hash)
            if e.hash not in st.tiers[e.tier].strategy:
                errors.append(f"block {e.hash:016x}: not tracked by the tier {e.tier} eviction strategy")
        return corrupt

    def _check_tiers(self, errors: list[str]) -> None:
        """Under the lock: each tier's used slots and strategy size against its indexed blocks."""
        st = self._state
        for t in st.tiers:
            count = sum(1 for e in st.index if e.tier == t.level)
            if t.pool.used != count or len(t.strategy) != count:
                errors.append(
                    f"tier {t.level}: {count} indexed blocks but {t.pool.used} used slots and "
                    f"{len(t.strategy)} tracked by the strategy"
                )

    def _repair(self, bad: list[BlockHash]) -> int:
        st = self._state
        before = len(st.index)
        for h in bad:
            for node in st.index.subtree(h) if h in st.index else ():
                e = st.index.remove(node)
                tier = st.tiers[e.tier]
                if tier.pool.in_use(e.slot):
                    tier.pool.free(e.slot)
                tier.strategy.remove(node)
        return before - len(st.index)
