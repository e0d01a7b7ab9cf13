"""The engine's online miss-ratio curve: a sampled LRU shadow of its block stream (torch-free).

What it predicts: the hit rate (blocks served / blocks asked by lookups) an LRU cache of any
size would have had on the lookups this engine served, with the engine's prefix-chain rule: a
block counts as a hit at size C only if every block before it in the request (that the shadow
sees) also hits at C. Its ceiling is the hit rate of an infinite cache (every block seen before).
The engine's LFU and ADAPTIVE strategies are modelled as LRU (a stack algorithm: one pass gives
every size); docs/benchmarks.md reports how far the engine's own strategies are from it.

How: SHARDS (Waldspurger et al., FAST '15), fixed-size variant. A block is sampled when its
hash is below a threshold ``T`` (block hashes are blake2b digests, already uniform; the replay
tools mix their synthetic ids first): every reference to a sampled block is seen, none to the
others, so stack distances among sampled blocks, divided by the rate ``R = T / 2**64``, estimate
the full stream's. The shadow holds at most ``max_entries`` blocks: when a new one would exceed
that, the largest sampled hash leaves and ``T`` drops to it (the histogram is rescaled to the new
rate), so memory stays fixed however large the working set grows. The sampled count is corrected
towards its expectation (SHARDS_adj): the difference, mostly one hot block sampled or not, goes
to distance 0.

Stack distances come from a Fenwick tree over access times: the distance of a block is the number
of sampled blocks accessed since its last access. A request's blocks are measured against the
state before the request, then touched tail first (the engine's order: a parent is always more
recent than its children).

Cost: a lookup or put none of whose hashes is below ``T`` pays one ``min()`` over its hashes; a
sampled block pays O(log max_entries) Python steps. ``max_rate`` caps ``R`` so that sampled work
stays within a few percent of a lookup (docs/benchmarks.md).

Miss reasons: the shadow remembers, for its sampled blocks, that the engine evicted them (to
make room, by a retune, or by a clear); a sampled block a lookup missed is classified by that
mark, or as never seen when the shadow never saw it, and counted at ``1 / R`` (an estimate with
the curve's precision).

Invariants: ``len(entries) <= max_entries``; every entry's hash is below the threshold; the
Fenwick tree holds exactly one mark per entry, at its last access time; histogram weights and
``expected`` are in units of sampled references at the current rate.
"""

from __future__ import annotations

import heapq
import math
import sys
from collections.abc import Sequence

from kvcache_engine.contract.curve import CURVE_MULTIPLES, HitRateCurve

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_RATE",
    "ENTRY_BYTES",
    "ShadowCurve",
    "curve_entries_for",
    "mix_id",
]

_SPACE = 1 << 64
DEFAULT_MAX_ENTRIES = 32768
"""Fixed cap on the blocks the shadow remembers, whatever the pool's size."""
DEFAULT_MAX_RATE = 1 / 64
"""Largest sampling rate: the share of blocks whose references do the O(log n) work."""
ENTRY_BYTES = 400
"""Upper bound of the shadow's bytes per entry (dict slot + key + time, heap slot, two Fenwick
slots, histogram share); tests measure it with tracemalloc."""
MEMORY_SHARE = 0.01
"""The shadow may use at most this share of the pool's bytes."""
_MIN_ENTRIES = 64
_BINS_PER_OCTAVE = 8
_DECAY_AT = float(1 << 40)
"""Halve every weight when ``expected`` passes this (sampled references): the curve follows a
changing workload while old references keep half their say per period."""

_NEVER_SEEN, _CAPACITY = "never_seen", "capacity"


def _tag(parent: int | None) -> int:
    """A parent's 8-bit tag (0 for a root): enough to see a block re-parented (255 to 1 odds
    of missing it), at no memory cost (stored in the time's low bits)."""
    return 0 if parent is None else parent % 255 + 1


def curve_entries_for(pool_bytes: int, max_entries: int = DEFAULT_MAX_ENTRIES) -> int:
    """Entries the shadow of a pool of ``pool_bytes`` may hold: ``MEMORY_SHARE`` of its bytes,
    at most ``max_entries``; 0 (no curve) when that is under 64 entries (a toy pool)."""
    n = min(max_entries, int(pool_bytes * MEMORY_SHARE) // ENTRY_BYTES)
    return n if n >= _MIN_ENTRIES else 0


def mix_id(i: int) -> int:
    """splitmix64 finaliser: a bijection of 64-bit ints that makes sequential ids (a trace's)
    look like hashes to the sampler."""
    z = (i + 0x9E3779B97F4A7C15) % _SPACE
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % _SPACE
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % _SPACE
    return z ^ (z >> 31)


class _Fenwick:
    """Counts of marks over times ``1..size``: add and prefix sums in O(log size)."""

    __slots__ = ("size", "tree")

    def __init__(self, size: int) -> None:
        self.size = size
        self.tree = [0] * (size + 1)

    def add(self, i: int, delta: int) -> None:
        tree, n = self.tree, self.size
        while i <= n:
            tree[i] += delta
            i += i & -i

    def prefix(self, i: int) -> int:
        """Marks at times ``1..i``."""
        tree, s = self.tree, 0
        while i > 0:
            s += tree[i]
            i &= i - 1
        return s

    def rebuild(self, marks: int) -> None:
        """Exactly one mark at each of the times ``1..marks`` (linear construction)."""
        tree = [0] * (self.size + 1)
        for i in range(1, marks + 1):
            tree[i] += 1
            j = i + (i & -i)
            if j <= self.size:
                tree[j] += tree[i]
        self.tree = tree


class ShadowCurve:
    """The sampled LRU shadow of one engine's block stream (see the module docstring). Not
    thread-safe: the engine calls it under its lock."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_rate: float = DEFAULT_MAX_RATE) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries: expected >= 0, got {max_entries}")
        if not 0 < max_rate <= 1:
            raise ValueError(f"max_rate: expected in (0, 1], got {max_rate}")
        self.max_entries = max_entries
        self.threshold = min(_SPACE, int(max_rate * _SPACE)) if max_entries else 0
        self._last: dict[int, int] = {}  # sampled hash -> last access time << 8 | parent tag
        self._heap: list[int] = []  # -hash of every entry (largest hash on top)
        self._marks: dict[int, str] = {}  # sampled hash -> why the engine evicted it
        self._time = 0
        self._fen = _Fenwick(max(16, 2 * max_entries))
        self._bins: list[float] = []  # weight by log2 bin of the scaled prefix-chain distance
        self._cold = 0.0  # sampled references never seen before (or after an unseen prefix block)
        self._sampled = 0.0  # sampled references recorded (bins + cold)
        self.expected = 0.0  # sampled references expected at the rates in force (SHARDS_adj)
        self.requested = 0.0  # blocks asked by lookups, decayed with the weights
        self.miss_reasons: dict[str, float] = {}  # cumulative estimated missed blocks by reason

    @property
    def rate(self) -> float:
        return self.threshold / _SPACE

    @property
    def entries(self) -> int:
        return len(self._last)

    # -- the stream

    def lookup(self, hashes: Sequence[int], hit: int) -> None:
        """A lookup of ``hashes`` (root first) that found its first ``hit`` blocks cached."""
        n = len(hashes)
        self.expected += n * self.threshold / _SPACE
        self.requested += n
        if n and min(hashes) < self.threshold:
            self._sampled_lookup(hashes, hit)
        if self.expected > _DECAY_AT:
            self._scale(0.5, decay=True)

    def stored(self, hashes: Sequence[int], parent: int | None = None) -> None:
        """A put stored or touched ``hashes`` (root first; the first one's parent is ``parent``):
        they are now the most recent blocks, the root most recent of all. As in the engine, a
        block already known under another parent stops the chain there."""
        if not hashes or min(hashes) >= self.threshold:
            return
        t, last = self.threshold, self._last
        chain: list[tuple[int, int]] = []
        prev = parent
        for h in hashes:
            if h < t:
                tag = _tag(prev)
                v = last.get(h)
                if v is not None and v & 0xFF != tag:
                    break
                chain.append((h, tag))
            prev = h
        for h, tag in reversed(chain):
            if h < self.threshold:  # touching may have lowered it
                self._marks.pop(h, None)
                self._touch(h, tag)

    def evicted(self, h: int, reason: str = _CAPACITY) -> None:
        """The engine dropped ``h`` (``capacity``, ``retune`` or ``cleared``)."""
        if h < self.threshold and h in self._last:
            self._marks[h] = reason

    # -- predictions

    def hit_rate(self, capacity_blocks: float) -> float:
        """Predicted hit rate of an LRU cache of ``capacity_blocks`` blocks."""
        if self.expected <= 0 or capacity_blocks <= 0:
            return 0.0
        hits = self._adjustment() + self._weight_below(capacity_blocks)
        return min(1.0, max(0.0, hits / self.expected))

    def ceiling(self) -> float:
        """Predicted hit rate of an infinite cache."""
        if self.expected <= 0:
            return 0.0
        return min(1.0, max(0.0, (self.expected - self._cold) / self.expected))

    def curve(self, capacity_blocks: float) -> HitRateCurve | None:
        """The wire form at ``CURVE_MULTIPLES x capacity_blocks`` (None without capacity)."""
        if capacity_blocks <= 0 or not self.max_entries:
            return None
        ceiling = self.ceiling()
        rates: list[float] = []
        for m in CURVE_MULTIPLES:  # monotone and under the ceiling despite the adjustment's clamp
            rates.append(min(ceiling, max(rates[-1] if rates else 0.0, self.hit_rate(m * capacity_blocks))))
        return HitRateCurve(float(capacity_blocks), tuple(rates), ceiling, self.expected, self.requested)

    def memory_bytes(self) -> int:
        """Bytes held by the shadow's containers (the entry budget assumes ENTRY_BYTES each)."""
        size = sys.getsizeof
        ints = 32 * (2 * len(self._last) + len(self._heap) + self._fen.size)
        return (
            size(self._last) + size(self._heap) + size(self._marks) + size(self._fen.tree)
            + size(self._bins) + ints + 100 * len(self._marks)
        )  # fmt: skip

    def set_max_entries(self, max_entries: int) -> None:
        """A new entry cap (the pool was resized): shrinks by lowering the threshold."""
        self.max_entries = max(0, max_entries)
        while len(self._last) > self.max_entries:
            self._drop_largest()
        if not self.max_entries:
            self.threshold = 0
        if 2 * self.max_entries > self._fen.size:
            self._fen = _Fenwick(2 * self.max_entries)
            self._compact()

    # -- internals

    def _sampled_lookup(self, hashes: Sequence[int], hit: int) -> None:
        t, rate, last, fen = self.threshold, self.rate, self._last, self._fen
        live = len(last)
        run = 0.0  # the prefix-chain distance: the largest distance so far along the chain
        seen: list[int] = []
        reasons = self.miss_reasons
        for i, h in enumerate(hashes):
            if h >= t:
                continue
            v = last.get(h)
            at = None if v is None else v >> 8
            if at is None or run == math.inf or v & 0xFF != _tag(hashes[i - 1] if i else None):
                run = math.inf  # unseen, or stored under another parent: a cache stops there
            else:
                run = max(run, (live - fen.prefix(at)) / rate)
                seen.append(h)
            self._record(run)
            if i >= hit:
                why = _NEVER_SEEN if at is None else self._marks.get(h, _CAPACITY)
                reasons[why] = reasons.get(why, 0.0) + 1 / rate
        for h in reversed(seen):  # the leading blocks a cache would have served, tail first
            self._touch(h, last[h] & 0xFF)

    def _record(self, distance: float) -> None:
        self._sampled += 1.0
        if distance == math.inf:
            self._cold += 1.0
            return
        b = int(_BINS_PER_OCTAVE * math.log2(1.0 + distance))
        bins = self._bins
        if b >= len(bins):
            bins.extend([0.0] * (b + 1 - len(bins)))
        bins[b] += 1.0

    def _weight_below(self, capacity: float) -> float:
        """Recorded weight at distances below ``capacity`` (linear inside the straddling bin)."""
        total = 0.0
        for b, w in enumerate(self._bins):
            lo = 2 ** (b / _BINS_PER_OCTAVE) - 1
            hi = 2 ** ((b + 1) / _BINS_PER_OCTAVE) - 1
            if hi <= capacity:
                total += w
            else:
                if lo < capacity:
                    total += w * (capacity - lo) / (hi - lo)
                break
        return total

    def _adjustment(self) -> float:
        """SHARDS_adj: sampled references expected but not recorded (or recorded too many),
        counted at distance 0."""
        return self.expected - self._sampled

    def _touch(self, h: int, tag: int) -> None:
        last, fen = self._last, self._fen
        v = last.get(h)
        if v is not None:
            fen.add(v >> 8, -1)
        else:
            heapq.heappush(self._heap, -h)
        if self._time >= fen.size:
            self._compact()
            if v is not None:  # its mark was moved by the compaction; take it off again
                fen.add(last[h] >> 8, -1)
        self._time += 1
        last[h] = self._time << 8 | tag
        fen.add(self._time, 1)
        if len(last) > self.max_entries:
            self._drop_largest()

    def _compact(self) -> None:
        """Renumber the entries' times ``1..n`` in their order (when the time runs out)."""
        last = self._last
        order = sorted(last, key=last.__getitem__)
        for i, h in enumerate(order, 1):
            last[h] = i << 8 | last[h] & 0xFF
        self._time = len(order)
        self._fen.rebuild(len(order))

    def _drop_largest(self) -> None:
        """Lower the threshold to the largest sampled hash (it leaves) and rescale the weights."""
        h = -heapq.heappop(self._heap)
        self._fen.add(self._last.pop(h) >> 8, -1)
        self._marks.pop(h, None)
        old = self.threshold
        self.threshold = h
        if old:
            self._scale(h / old, decay=False)

    def _scale(self, factor: float, *, decay: bool) -> None:
        """Multiply the recorded weights: a lower rate (new references count at it) or a decay
        (old references lose half their say; ``requested`` decays with them, miss reasons are
        counters and never do)."""
        self._bins = [w * factor for w in self._bins]
        self._cold *= factor
        self._sampled *= factor
        self.expected *= factor
        if decay:
            self.requested *= factor
