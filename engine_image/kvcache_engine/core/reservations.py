"""Zero-copy puts: the server receives a put's bytes straight into pool slots reserved for it.

``reserve_put`` hands out free slots (never evicting: the bytes are not here yet, and a put
that never completes must not cost the cache a block), the caller writes each block's raw
payload into its slot, then ``commit_put`` indexes them (or ``release_put`` gives them back).

Invariants: a reserved slot is allocated in the pool but not indexed until its commit; every
reservation ends in exactly one commit or release; while a structural operation (pool rebuild,
compaction, validation) waits in :meth:`Reservations.quiesce`, no new reservation is granted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvcache_engine.core.block_pool import BlockPool
from kvcache_engine.core.gc import BackgroundGC
from kvcache_engine.core.hashing import BlockHash
from kvcache_engine.core.state import EngineState
from kvcache_engine.core.store import BlockStore, as_hashes
from kvcache_engine.core.tiers import PRIMARY

__all__ = ["PutReservation", "Reservations"]

_QUIESCE_TIMEOUT_S = 300.0  # longest wait for in-flight zero-copy puts (the server's bodies take <= 60 s)


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


class Reservations:
    """The outstanding reservations of one engine and the wait for them to end."""

    def __init__(self, state: EngineState, store: BlockStore, gc: BackgroundGC) -> None:
        self._state = state
        self._store = store
        self._gc = gc
        self._reserved: set[int] = set()
        self._done = threading.Condition(state.lock)
        self._quiescing = 0

    def reserve(self, hashes: Sequence[int], parent: BlockHash | None = None) -> PutReservation | None:
        """Free slots for the new blocks of the chain ``hashes``, or None (pool not raw rows, not
        enough free slots, or a structural operation waiting): see KVCacheEngine.reserve_put."""
        hs = as_hashes(hashes)
        st = self._state
        with st.lock:
            if not hs or not st.stores_raw_rows or self._quiescing:
                return None
            plan = self._store.plan_put_or_none(hs, parent, evict=False)
            if plan is None:
                return None
            present, new, slots = plan
            pool = st.tiers[PRIMARY].pool
            self._reserved.update(slots)
            rows = pool.storage.numpy().data.cast("B")
            width = pool.layout.slot_bytes
            targets: list[memoryview | None] = [None] * len(hs)
            for j, slot in enumerate(slots, start=present):
                targets[j] = rows[slot * width : (slot + 1) * width]
            return PutReservation(hs, parent, present, new, slots, targets, pool)

    def commit(self, res: PutReservation, checksums: Sequence[str] | None = None) -> int:
        """Index a reservation's blocks once their bytes are written; returns blocks newly stored.
        Without ``checksums`` they are computed here, outside the lock (the slots are the
        reservation's own). Blocks are dropped, not stored, when their predecessor was evicted
        meanwhile or another put stored them first."""
        t0 = time.perf_counter()
        if checksums is None:
            checksums = res.pool.checksums(res.slots) if res.slots else []
        elif len(checksums) != len(res.slots):
            raise ValueError(f"checksums: {len(checksums)} given for {len(res.slots)} reserved blocks")
        st = self._state
        with st.lock:
            if res.done:
                raise ValueError("reservation: already committed or released")
            self._end(res)
            linked = self._predecessor_cached(res)
            keep = self._leading_absent(res) if linked else 0
            for slot in res.slots[keep:]:
                res.pool.free(slot)
            if linked:
                stored = list(zip(res.new[:keep], res.slots[:keep], checksums[:keep], strict=True))
                self._store.link(res.hashes, res.parent, res.present, stored)
            st.latency.record("put", (time.perf_counter() - t0) * 1000)
            self._gc.maybe_wake()
            return keep

    def _predecessor_cached(self, res: PutReservation) -> bool:
        """Whether the block before the reserved ones is still cached (else it was evicted
        meanwhile, with its chain)."""
        prev = res.hashes[res.present - 1] if res.present else res.parent
        return prev is None or prev in self._state.index

    def _leading_absent(self, res: PutReservation) -> int:
        """How many reserved blocks, from the first, are still not cached (the rest were stored
        meanwhile by another put)."""
        keep = 0
        while keep < len(res.new) and res.new[keep] not in self._state.index:
            keep += 1
        return keep

    def release(self, res: PutReservation) -> None:
        """Give a reservation's slots back (its bytes never fully arrived); nothing is indexed."""
        with self._state.lock:
            if res.done:
                return
            for slot in res.slots:
                res.pool.free(slot)
            self._end(res)

    def _end(self, res: PutReservation) -> None:
        """Under the lock: mark ``res`` done and wake whoever waits in quiesce()."""
        res.done = True
        self._reserved.difference_update(res.slots)
        self._done.notify_all()

    def quiesce(self) -> None:
        """Under the lock: wait until no reservation is outstanding (new ones are refused
        meanwhile), before moving or rebuilding slots. A reservation lasts one request body (the
        server bounds it by its body timeout); a thread must not wait on its own reservation."""
        self._quiescing += 1
        try:
            ok = self._done.wait_for(lambda: not self._reserved, _QUIESCE_TIMEOUT_S)
        finally:
            self._quiescing -= 1
        if not ok:
            raise RuntimeError(
                f"{len(self._reserved)} slots still reserved by puts in flight after "
                f"{_QUIESCE_TIMEOUT_S:.0f} s: end each reserve_put with commit_put or release_put first"
            )
