"""Eviction strategies: small classes chosen by a config string (torch-free).

A strategy only orders block hashes; the engine owns the blocks. The engine touches a chain tail
first and its root last, so a parent is always more recent (and, for LFU, at least as frequent)
than its children: every strategy below therefore evicts chain tails before their parents, and
the engine drops any descendants of a victim with it, so no block outlives its parent.

All operations are O(1) except where noted (LFU's victim scans frequency buckets in order only
when the coldest bucket holds nothing but protected blocks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection, Iterator

from kvcache_engine.contract.cache import CacheStrategy
from kvcache_engine.core.hashing import BlockHash

__all__ = [
    "STRATEGIES",
    "AdaptiveStrategy",
    "EvictionStrategy",
    "LFUStrategy",
    "LRUStrategy",
    "make_strategy",
]

_NONE: frozenset[BlockHash] = frozenset()


class EvictionStrategy(ABC):
    """Orders the blocks of one tier for eviction. ``capacity`` is the tier's slot count."""

    name: str = ""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity

    def set_capacity(self, capacity: int) -> None:
        """The tier was resized (ARC bounds its ghost lists by it)."""
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity

    @abstractmethod
    def insert(self, h: BlockHash) -> None:
        """A block was stored (counts as its first access)."""

    @abstractmethod
    def touch(self, h: BlockHash) -> None:
        """A stored block was accessed."""

    @abstractmethod
    def remove(self, h: BlockHash) -> None:
        """A block left the tier for a reason other than eviction (clear, cascade, demotion)."""

    def evicted(self, h: BlockHash) -> None:
        """A block was evicted by this strategy's choice (ARC remembers it as a ghost)."""
        self.remove(h)

    @abstractmethod
    def order(self) -> Iterator[BlockHash]:
        """Every tracked block, coldest (next to evict) first. O(n)."""

    @abstractmethod
    def __contains__(self, h: object) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def clear(self) -> None: ...

    def victim(self, protected: Collection[BlockHash] = _NONE) -> BlockHash | None:
        """The next block to evict that is not in ``protected``, or None. Does not remove it."""
        for h in self.order():
            if h not in protected:
                return h
        return None


class LRUStrategy(EvictionStrategy):
    """Least recently used first. One ordered dict, oldest at the front."""

    name = "LRU"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._od: OrderedDict[BlockHash, None] = OrderedDict()

    def insert(self, h: BlockHash) -> None:
        self._od[h] = None
        self._od.move_to_end(h)

    def touch(self, h: BlockHash) -> None:
        if h in self._od:
            self._od.move_to_end(h)

    def remove(self, h: BlockHash) -> None:
        self._od.pop(h, None)

    def order(self) -> Iterator[BlockHash]:
        return iter(self._od)

    def __contains__(self, h: object) -> bool:
        return h in self._od

    def __len__(self) -> int:
        return len(self._od)

    def clear(self) -> None:
        self._od.clear()


class LFUStrategy(EvictionStrategy):
    """Least frequently used first; ties broken by recency (least recent first).

    Blocks live in per-frequency ordered dicts; ``_min`` is the lowest non-empty frequency.
    """

    name = "LFU"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._freq: dict[BlockHash, int] = {}
        self._buckets: dict[int, OrderedDict[BlockHash, None]] = {}
        self._min = 0

    def _add(self, h: BlockHash, f: int) -> None:
        self._freq[h] = f
        self._buckets.setdefault(f, OrderedDict())[h] = None

    def _drop(self, h: BlockHash) -> int:
        f = self._freq.pop(h)
        bucket = self._buckets[f]
        del bucket[h]
        if not bucket:
            del self._buckets[f]
        return f

    def insert(self, h: BlockHash) -> None:
        if h in self._freq:
            self.touch(h)
            return
        self._add(h, 1)
        self._min = 1

    def touch(self, h: BlockHash) -> None:
        if h not in self._freq:
            return
        f = self._drop(h)
        self._add(h, f + 1)
        if self._min == f and f not in self._buckets:
            self._min = f + 1

    def remove(self, h: BlockHash) -> None:
        if h in self._freq:
            f = self._drop(h)
            if f == self._min and f not in self._buckets:
                self._min = min(self._buckets, default=0)

    def frequency(self, h: BlockHash) -> int:
        """Accesses counted for ``h`` (0 when untracked)."""
        return self._freq.get(h, 0)

    def order(self) -> Iterator[BlockHash]:
        if self._min in self._buckets:
            yield from list(self._buckets[self._min])
        for f in sorted(self._buckets):
            if f != self._min:
                yield from list(self._buckets[f])

    def victim(self, protected: Collection[BlockHash] = _NONE) -> BlockHash | None:
        bucket = self._buckets.get(self._min)
        if bucket is not None:
            for h in bucket:  # fast path: no copy of the bucket
                if h not in protected:
                    return h
        return super().victim(protected)

    def __contains__(self, h: object) -> bool:
        return h in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def clear(self) -> None:
        self._freq.clear()
        self._buckets.clear()
        self._min = 0


class AdaptiveStrategy(EvictionStrategy):
    """ARC (Megiddo & Modha): T1 holds blocks seen once, T2 blocks seen again; B1/B2 are ghost
    lists of hashes recently evicted from each. A ghost hit in B1 grows the target size ``p`` of
    T1 (recency was undervalued), one in B2 shrinks it (frequency was). Ghosts hold no data and
    are bounded by ``|T1| + |B1| <= c`` and ``|T1| + |T2| + |B1| + |B2| <= 2c``.

    Unlike the paper, ``p`` starts at c/2 rather than 0: with no history yet, neither recency
    nor frequency is favoured, and steps of one block per ghost hit take a whole trace to move a
    large cache away from the frequency-only start (on the conversation trace, a cold p=0 costs
    1.5 points of hit rate at 30k blocks; c/2 beats LRU at every budget we replay).
    """

    name = "ADAPTIVE"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._t1: OrderedDict[BlockHash, None] = OrderedDict()
        self._t2: OrderedDict[BlockHash, None] = OrderedDict()
        self._b1: OrderedDict[BlockHash, None] = OrderedDict()
        self._b2: OrderedDict[BlockHash, None] = OrderedDict()
        self.p = capacity / 2

    def insert(self, h: BlockHash) -> None:
        if h in self._t1 or h in self._t2:
            self.touch(h)
            return
        if h in self._b1:
            self.p = min(float(self.capacity), self.p + max(len(self._b2) / len(self._b1), 1.0))
            del self._b1[h]
            self._t2[h] = None
        elif h in self._b2:
            self.p = max(0.0, self.p - max(len(self._b1) / len(self._b2), 1.0))
            del self._b2[h]
            self._t2[h] = None
        else:
            self._t1[h] = None
        self._trim_ghosts()

    def touch(self, h: BlockHash) -> None:
        if h in self._t1:
            del self._t1[h]
            self._t2[h] = None
        elif h in self._t2:
            self._t2.move_to_end(h)

    def remove(self, h: BlockHash) -> None:
        self._t1.pop(h, None)
        self._t2.pop(h, None)

    def evicted(self, h: BlockHash) -> None:
        if h in self._t1:
            del self._t1[h]
            self._b1[h] = None
        elif h in self._t2:
            del self._t2[h]
            self._b2[h] = None
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        c = self.capacity
        while self._b1 and len(self._t1) + len(self._b1) > c:
            self._b1.popitem(last=False)
        while self._b2 and len(self._t1) + len(self._t2) + len(self._b1) + len(self._b2) > 2 * c:
            self._b2.popitem(last=False)

    def _lists(self) -> tuple[OrderedDict[BlockHash, None], OrderedDict[BlockHash, None]]:
        # REPLACE: take from T1 while it exceeds its target size, else from T2.
        if self._t1 and (len(self._t1) > self.p or not self._t2):
            return self._t1, self._t2
        return self._t2, self._t1

    def order(self) -> Iterator[BlockHash]:
        first, second = self._lists()
        yield from list(first)
        yield from list(second)

    def victim(self, protected: Collection[BlockHash] = _NONE) -> BlockHash | None:
        for od in self._lists():
            for h in od:
                if h not in protected:
                    return h
        return None

    def set_capacity(self, capacity: int) -> None:
        old = self.capacity
        super().set_capacity(capacity)
        self.p = self.p * capacity / old if old else capacity / 2
        self._trim_ghosts()

    def ghosts(self) -> tuple[int, int]:
        """Sizes of the ghost lists (B1, B2)."""
        return len(self._b1), len(self._b2)

    def __contains__(self, h: object) -> bool:
        return h in self._t1 or h in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def clear(self) -> None:
        for od in (self._t1, self._t2, self._b1, self._b2):
            od.clear()
        self.p = self.capacity / 2


STRATEGIES: dict[str, type[EvictionStrategy]] = {
    "LRU": LRUStrategy,
    "LFU": LFUStrategy,
    "ADAPTIVE": AdaptiveStrategy,
}


def make_strategy(name: str | CacheStrategy, capacity: int) -> EvictionStrategy:
    """The strategy named ``name`` (case-insensitive; ``CacheStrategy`` members accepted).
    Raises ValueError naming ``cache_strategy`` and listing the supported values."""
    key = name.value if isinstance(name, CacheStrategy) else str(name).rsplit(".", 1)[-1].upper()
    cls = STRATEGIES.get(key)
    if cls is None:
        raise ValueError(f"cache_strategy: unknown strategy {name!r}; supported: {', '.join(STRATEGIES)}")
    return cls(capacity)
