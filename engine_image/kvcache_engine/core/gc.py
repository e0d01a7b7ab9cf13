"""Background eviction: a thread, started the first time occupancy passes ``gc_threshold``,
evicts down to the threshold in batches, so a put rarely has to evict inline (a put into a full
pool still evicts inline rather than wait).

Invariants: at most one GC thread per engine; it takes the engine lock per batch (never across
batches) and holds the collector only weakly between rounds, so an engine dropped without
close() is still collected (the thread then ends within ``_GC_IDLE_S``); after close() no
thread runs and none is started.
"""

from __future__ import annotations

import threading
import weakref

from kvcache_engine.core.slots import SlotAllocator
from kvcache_engine.core.state import EngineState
from kvcache_engine.core.tiers import PRIMARY

__all__ = ["BackgroundGC"]

_GC_BATCH = 64
_GC_IDLE_S = 2.0


def _gc_loop(ref: weakref.ReferenceType[BackgroundGC]) -> None:
    """The thread's body: wait while under the threshold, else run one batch; end when the
    collector is closed or gone."""
    while True:
        gc = ref()
        if gc is None:
            return
        with gc.state.lock:
            if gc.closed:
                return
            if not gc.over_threshold():
                gc.wakeup.wait(_GC_IDLE_S)
                del gc
                continue
        gc.run(limit=_GC_BATCH)  # the lock is released between batches
        del gc


class BackgroundGC:
    """Eviction down to ``gc_threshold``: on demand (:meth:`run`) and in the background
    (:meth:`maybe_wake`, called after every operation that may fill the pool)."""

    def __init__(self, state: EngineState, slots: SlotAllocator) -> None:
        self.state = state
        self._slots = slots
        self.wakeup = threading.Condition(state.lock)
        self.thread: threading.Thread | None = None
        self.closed = False

    def over_threshold(self) -> bool:
        pool = self.state.tiers[PRIMARY].pool
        cfg = self.state.config
        return cfg.enable_gc and pool.used > cfg.gc_threshold * pool.num_slots

    def maybe_wake(self) -> None:
        """Under the lock: start the thread (once) or wake it when occupancy is over the threshold."""
        if not self.over_threshold() or self.closed:
            return
        if self.thread is None:
            self.thread = threading.Thread(
                target=_gc_loop, args=(weakref.ref(self),), name="kvcache-gc", daemon=True
            )
            self.thread.start()
        self.wakeup.notify()

    def run(self, limit: int | None = None) -> int:
        """Evict until occupancy is at most gc_threshold (or ``limit`` victims); returns victims."""
        with self.state.lock:
            tier = self.state.tiers[PRIMARY]
            done = 0
            demoted: list[tuple[int, int]] = []
            while self.over_threshold() and (limit is None or done < limit):
                victim = tier.strategy.victim()
                if victim is None:
                    break
                self._slots.evict(victim, tier, (), demoted)
                done += 1
            self._slots.flush_demotions(demoted)
            return done

    def close(self) -> None:
        """Stop the thread (waits up to 5 s for a batch in progress); no thread starts afterwards."""
        with self.state.lock:
            self.closed = True
            self.wakeup.notify_all()
            thread = self.thread
        if thread is not None:
            thread.join(timeout=5)
