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
that, the largest sampled hash leaves and ``T`` drops to it (references recorded from then on
weigh more, in proportion), so memory stays fixed however large the working set grows. The
sampled count is corrected towards its expectation (SHARDS_adj): the difference, mostly one hot
block sampled or not, goes to distance 0.

Stack distances come from a Fenwick tree over access times: the distance of a block is the number
of sampled blocks accessed since its last access. A request's blocks are measured against the
state before the request, then touched tail first (the engine's order: a parent is always more
recent than its children).

Cost: a lookup or put none of whose hashes is below ``T`` pays one ``min()`` over its hashes; a
sampled block pays O(log max_entries) Python steps. With a CPU budget (``cpu_share``: the
engine's), the shadow measures its own time every 50 ms of wall time and halves the rate until it
takes at most ``cpu_share`` of the lookups' time (or 1 % of the process's idle time, when more): a
mostly idle engine keeps every block, a busy one pays a bounded share of its lookup throughput
(docs/benchmarks.md). The rate never rises again (blocks left out have a missing past).

A changing replica set: the client marks a lookup ``moved`` when the chain's owner changed with
the replica set lately; blocks the shadow never saw in such a lookup were cached elsewhere, so
they stay out of the curve (miss reason ``moved``). Each entry keeps its chain's route key, so
``retain`` can forget the chains another replica owns now (the operator announces the set): they
would otherwise sit above this replica's own blocks and inflate every distance.

Miss reasons: the shadow remembers, for its sampled blocks, that the engine evicted them (to
make room, by a retune, or by a clear); a sampled block a lookup missed is classified by that
mark, or as never seen when the shadow never saw it, and counted at ``1 / R`` (an estimate with
the curve's precision).

Invariants: ``len(entries) <= max_entries``; every entry's hash is below the threshold; the
Fenwick tree holds exactly one mark per entry, at its last access time; the heap holds exactly
the entries' hashes; route keys are kept for entries only; histogram weights, ``_sampled`` and
``_expected`` share one unit (``_unit``: the weight of a reference recorded now).
"""

from __future__ import annotations

import heapq
import math
import sys
import time
from collections.abc import Callable, Sequence

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
DEFAULT_MAX_RATE = 1.0
"""Largest sampling rate: every block, until the entry cap or the CPU budget lowers it."""
ENTRY_BYTES = 400
"""Upper bound of the shadow's bytes per entry (dict slot + key + time, heap slot, two Fenwick
slots, histogram share); tests measure it with tracemalloc."""
MEMORY_SHARE = 0.01
"""The shadow may use at most this share of the pool's bytes."""
_MIN_ENTRIES = 64
_LINEAR = 64
_BINS_PER_OCTAVE = 8
"""Histogram bins: one per distance below ``_LINEAR`` (so small sizes are exact), then eight per
octave (9 % wide: a size's hit rate interpolates inside one)."""
DECAY_SAMPLES = float(1 << 17)
"""Halve every weight when the samples pass this: the curve follows a changing workload while
old references keep half their say per period."""
MIN_RATE = 2.0**-16
"""The CPU budget never lowers the rate below this."""
IDLE_SHARE = 0.01
"""The shadow may always take this share of the process's idle time (wall time it spent off the
CPU; the CPU budget's floor)."""
_BUDGET_WINDOW_S = 0.05

_NEVER_SEEN, _CAPACITY, _MOVED = "never_seen", "capacity", "moved"


def _tag(parent: int | None) -> int:
    """A parent's 8-bit tag (0 for a root): enough to see a block re-parented (255 to 1 odds
    of missing it), at no memory cost (stored in the time's low bits)."""
    return 0 if parent is None else parent % 255 + 1


def _bin_edges(b: int) -> tuple[float, float]:
    """The distances ``[lo, hi)`` histogram bin ``b`` holds."""
    if b < _LINEAR:
        return float(b), float(b + 1)
    k = b - _LINEAR
    return _LINEAR * 2 ** (k / _BINS_PER_OCTAVE), _LINEAR * 2 ** ((k + 1) / _BINS_PER_OCTAVE)


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
        n = self.size
        tree = [1 if 0 < i <= marks else 0 for i in range(n + 1)]
        for i in range(1, n + 1):
            j = i + (i & -i)
            if j <= n:
                tree[j] += tree[i]
        self.tree = tree


class ShadowCurve:
    """The sampled LRU shadow of one engine's block stream (see the module docstring). Not
    thread-safe: the engine calls it under its lock."""

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_rate: float = DEFAULT_MAX_RATE,
        *,
        cpu_share: float | None = None,
        decay_samples: float | None = DECAY_SAMPLES,
        route_depth: int = 2,
    ) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries: expected >= 0, got {max_entries}")
        if not 0 < max_rate <= 1:
            raise ValueError(f"max_rate: expected in (0, 1], got {max_rate}")
        if cpu_share is not None and not 0 < cpu_share < 1:
            raise ValueError(f"cpu_share: expected in (0, 1), got {cpu_share}")
        self.max_entries = max_entries
        self.route_depth = max(1, route_depth)
        self.cpu_share = cpu_share
        self.decay_samples = decay_samples
        # The CPU budget's window: the engine's lookup seconds and ours since the last check.
        self._host_s_at = 0.0
        self._busy_at = 0.0
        self._wall_at: float | None = None
        self._own_s = 0.0
        self._requested_total = 0.0  # blocks asked by every lookup (the engine's count)
        self._accounted = 0.0  # ... of which ``_expected`` and ``requested`` have their share
        self.threshold = min(_SPACE, int(max_rate * _SPACE)) if max_entries else 0
        self._last: dict[int, int] = {}  # sampled hash -> last access time << 8 | parent tag
        self._route: dict[int, int] = {}  # sampled hash -> its chain's route key (when known)
        self._heap: list[int] = []  # -hash of every entry (largest hash on top)
        self._marks: dict[int, str] = {}  # sampled hash -> why the engine evicted it
        self._time = 0
        self._fen = _Fenwick(max(16, 2 * max_entries))
        # Weights: a sampled reference recorded now weighs ``_unit``; a lower rate or a decay
        # raises the unit instead of rescaling every weight recorded before.
        self._unit = 1.0
        self._per_block = self.rate  # expected weight of one requested block: rate * unit
        self._decay_weight = math.inf if decay_samples is None else decay_samples  # * unit
        self._bins: list[float] = []  # weight by log2 bin of the scaled prefix-chain distance
        self._cold = 0.0  # never seen before (or after an unseen or re-parented block)
        self._sampled = 0.0  # recorded (bins + cold)
        self._expected = 0.0  # expected at the rates in force (SHARDS_adj)
        self.requested = 0.0  # blocks asked by lookups (decayed with the weights)
        self.miss_reasons: dict[str, float] = {}  # cumulative estimated missed blocks by reason

    @property
    def rate(self) -> float:
        return self.threshold / _SPACE

    @property
    def samples(self) -> float:
        """Sampled references behind the curve, at the current rate (its precision)."""
        return self._expected / self._unit

    @property
    def entries(self) -> int:
        return len(self._last)

    # -- the stream

    def lookup(
        self,
        hashes: Sequence[int],
        hit: int,
        *,
        requested_blocks: float | None = None,
        lookup_seconds: float | None = None,
        moved: bool = False,
    ) -> None:
        """A lookup of ``hashes`` (root first) that found its first ``hit`` blocks cached.
        ``moved``: the client says the chain's replica changed lately (the replica set did): its
        blocks this shadow never saw are not the workload's cold misses but the move's, so they
        are left out of the curve (counted as the miss reason ``moved``).

        The engine calls this only for lookups with a sampled hash (``min(hashes) < threshold``,
        its one check per lookup) and passes its totals instead: ``requested_blocks``, the blocks
        all its lookups asked for so far (this one included), and ``lookup_seconds``, their time
        (the CPU budget's reference). Without them, every lookup must come here (the replay
        tools)."""
        if requested_blocks is None:
            self._requested_total += len(hashes)
        else:
            self._requested_total = requested_blocks
        self._catch_up()
        if hashes and min(hashes) < self.threshold:
            if self.cpu_share is None or lookup_seconds is None:
                self._sampled_lookup(hashes, hit, moved)
            else:
                t0 = time.perf_counter()
                self._sampled_lookup(hashes, hit, moved)
                t1 = time.perf_counter()
                self._own_s += t1 - t0
                self._keep_budget(lookup_seconds, t1)

    def _catch_up(self) -> None:
        """Give the blocks asked since the last call their expected share at the current rate
        (the rate only changes inside calls, so they were all asked at it)."""
        delta = self._requested_total - self._accounted
        if delta:
            self._accounted = self._requested_total
            self._expected += delta * self._per_block
            self.requested += delta

    def stored(
        self, hashes: Sequence[int], parent: int | None = None, *, requested_blocks: float | None = None
    ) -> None:
        """A put stored or touched ``hashes`` (root first; the first one's parent is ``parent``).
        Only sampled blocks the shadow does not hold yet are added (as the most recent, root
        first): a put follows its lookup, which already touched the chain (a put without a
        lookup refreshes nothing already held). ``requested_blocks`` as for :meth:`lookup`."""
        if not hashes or min(hashes) >= self.threshold:
            return
        if requested_blocks is not None:
            self._requested_total = requested_blocks
        self._catch_up()  # adding entries may lower the rate
        t, last, marks = self.threshold, self._last, self._marks
        new: list[tuple[int, int]] = []
        prev = parent
        for h in hashes:
            if h < t:
                v = last.get(h)
                if v is None:
                    new.append((h, _tag(prev)))
                elif v & 0xFF != _tag(prev):
                    break  # known under another parent: the engine's put stops here
                else:
                    marks.pop(h, None)
            prev = h
        key = self._route_key(hashes) if parent is None else None  # a continuation's is unknown
        for h, tag in reversed(new):
            if h < self.threshold:  # a touch may have lowered it
                marks.pop(h, None)
                self._touch(h, tag, key)

    def imported(self, blocks: Sequence[tuple[int, int | None]]) -> None:
        """Blocks (hash, parent) restored or received from a peer, coldest first: the sampled
        ones the shadow does not hold become its most recent (a restart keeps its cache, so their
        next lookups are not predicted as never seen)."""
        for h, parent in blocks:
            if h < self.threshold and h not in self._last:
                self._touch(h, _tag(parent))

    def retain(self, owns: Callable[[int], bool]) -> int:
        """The replica set changed: forget the blocks of chains this replica no longer owns
        (``owns(route_key)`` False; blocks whose chain is unknown stay). Their entries would sit
        above this replica's own blocks and inflate every distance until they sank. Returns the
        entries dropped."""
        gone = [h for h, key in self._route.items() if not owns(key)]
        for h in gone:
            self._forget(h)
        if gone:
            self._heap = [-h for h in self._last]
            heapq.heapify(self._heap)
        return len(gone)

    def _forget(self, h: int) -> None:
        v = self._last.pop(h, None)
        if v is not None:
            self._fen.add(v >> 8, -1)
        self._marks.pop(h, None)
        self._route.pop(h, None)

    def evicted(self, h: int, reason: str = _CAPACITY) -> None:
        """The engine dropped ``h`` (``capacity``, ``retune`` or ``cleared``)."""
        if h < self.threshold and h in self._last:
            self._marks[h] = reason

    # -- predictions

    def hit_rate(self, capacity_blocks: float) -> float:
        """Predicted hit rate of an LRU cache of ``capacity_blocks`` blocks."""
        if self._expected <= 0 or capacity_blocks <= 0:
            return 0.0
        hits = self._adjustment() + self._weight_below(capacity_blocks)
        return min(1.0, max(0.0, hits / self._expected))

    def ceiling(self) -> float:
        """Predicted hit rate of an infinite cache."""
        if self._expected <= 0:
            return 0.0
        return min(1.0, max(0.0, (self._expected - self._cold) / self._expected))

    def curve(self, capacity_blocks: float, requested_blocks: float | None = None) -> HitRateCurve | None:
        """The wire form at ``CURVE_MULTIPLES x capacity_blocks`` (None without capacity);
        ``requested_blocks`` as for :meth:`lookup`."""
        if requested_blocks is not None:
            self._requested_total = requested_blocks
        self._catch_up()
        if capacity_blocks <= 0 or not self.max_entries:
            return None
        ceiling = self.ceiling()
        rates: list[float] = []
        for m in CURVE_MULTIPLES:  # monotone and under the ceiling despite the adjustment's clamp
            rates.append(min(ceiling, max(rates[-1] if rates else 0.0, self.hit_rate(m * capacity_blocks))))
        return HitRateCurve(float(capacity_blocks), tuple(rates), ceiling, self.samples, self.requested)

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
            self._per_block = 0.0
        if 2 * self.max_entries > self._fen.size:  # a larger pool: room for more entries (the
            # rate never rises again: blocks left out before have references the shadow missed)
            self._fen = _Fenwick(2 * self.max_entries)
            self._compact()

    # -- internals

    def _sampled_lookup(self, hashes: Sequence[int], hit: int, moved: bool = False) -> None:
        """Distances of the sampled blocks against the state before this request (the
        prefix-chain rule: the largest so far along the chain), then the touches, tail first, of
        the chain up to a block known under another parent (where the engine's put stops)."""
        t, rate, last, tree, marks = self.threshold, self.rate, self._last, self._fen.tree, self._marks
        bins, unit, log2 = self._bins, self._unit, math.log2
        live = len(last)
        run = 0.0
        chain: list[tuple[int, int]] = []
        stopped = False
        for i in [i for i, h in enumerate(hashes) if h < t]:
            h = hashes[i]
            v = last.get(h)
            tag = hashes[i - 1] % 255 + 1 if i else 0  # _tag, inlined (the hot loop)
            if v is not None and v & 0xFF != tag:
                stopped = True  # stored under another parent: the engine's index stops here
            if moved and (v is None or run == math.inf):
                run = math.inf  # unknown: the block was cached elsewhere before the move
                self._expected -= unit
                if i >= hit:
                    self._count_miss(_MOVED)
                if not stopped:
                    chain.append((h, tag))
                continue
            self._sampled += unit
            if v is None or stopped or run == math.inf:
                run = math.inf
                self._cold += unit
            else:
                j, newer = v >> 8, live  # newer = live - marks at times <= j (Fenwick prefix sum)
                while j > 0:
                    newer -= tree[j]
                    j &= j - 1
                run = max(run, newer / rate)
                b = int(run) if run < _LINEAR else _LINEAR + int(_BINS_PER_OCTAVE * log2(run / _LINEAR))
                if b >= len(bins):
                    bins.extend([0.0] * (b + 1 - len(bins)))
                bins[b] += unit
            if i >= hit:
                self._count_miss(_NEVER_SEEN if v is None else marks.get(h, _CAPACITY))
            if not stopped:
                chain.append((h, tag))
        key = self._route_key(hashes)
        for h, tag in reversed(chain):  # what the put after the lookup touches, tail first
            if h < self.threshold:  # a touch may have lowered it
                if marks:
                    marks.pop(h, None)
                self._touch(h, tag, key)
        if self._expected > self._decay_weight:
            self._reweigh(2.0)
            self.requested *= 0.5

    def _count_miss(self, reason: str) -> None:
        self.miss_reasons[reason] = self.miss_reasons.get(reason, 0.0) + 1 / self.rate

    def _keep_budget(self, lookup_seconds: float, now: float) -> None:
        """Every ``_BUDGET_WINDOW_S`` of wall time: the shadow's time over the window may be
        ``cpu_share`` of the lookups' time, or ``IDLE_SHARE`` of the time the process was idle
        (the window less the CPU time it used) when that is more: an engine that is mostly idle
        can afford a precise curve, a busy one pays a bounded share of its lookup throughput.
        Over it, the rate is halved as often as it takes."""
        busy_seconds = time.process_time()
        if self._wall_at is None:
            self._wall_at, self._host_s_at, self._busy_at = now, lookup_seconds, busy_seconds
            return
        wall = now - self._wall_at
        if wall < _BUDGET_WINDOW_S:
            return
        assert self.cpu_share is not None
        idle = max(0.0, wall - (busy_seconds - self._busy_at))
        allowed = max(self.cpu_share * (lookup_seconds - self._host_s_at), IDLE_SHARE * idle)
        if self._own_s > allowed:
            halvings = math.ceil(math.log2(self._own_s / allowed)) if allowed > 0 else 16
            self._lower_threshold(max(int(MIN_RATE * _SPACE), self.threshold >> min(halvings, 16)))
        self._own_s = 0.0
        self._wall_at, self._host_s_at, self._busy_at = now, lookup_seconds, busy_seconds

    def _lower_threshold(self, threshold: int) -> None:
        """Sample below ``threshold`` only: the entries at or above it leave."""
        heap = self._heap
        while heap and -heap[0] >= threshold:
            h = -heapq.heappop(heap)
            self._forget(h)
        old, self.threshold = self.threshold, threshold
        if threshold:
            self._reweigh(old / threshold)

    def _weight_below(self, capacity: float) -> float:
        """Recorded weight at distances below ``capacity`` (linear inside the straddling bin)."""
        total = 0.0
        for b, w in enumerate(self._bins):
            lo, hi = _bin_edges(b)
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
        return self._expected - self._sampled

    def _route_key(self, hashes: Sequence[int]) -> int:
        """The chain's placement key (contract.placement.route_key: its block at route_depth)."""
        return int(hashes[min(self.route_depth, len(hashes)) - 1])

    def _touch(self, h: int, tag: int, key: int | None = None) -> None:
        """``h`` becomes the most recent entry (added when new, with its chain's route ``key``;
        the largest entry leaves past ``max_entries``)."""
        last, fen = self._last, self._fen
        v = last.get(h)
        if v is None:
            heapq.heappush(self._heap, -h)
            if key is not None:
                self._route[h] = key
        if self._time >= fen.size:
            self._compact()
            v = last.get(h)
        tree, n = fen.tree, fen.size
        if v is not None:  # its old mark leaves (Fenwick add -1, inlined: the hot loop)
            j = v >> 8
            while j <= n:
                tree[j] -= 1
                j += j & -j
        self._time = j = self._time + 1
        last[h] = j << 8 | tag
        while j <= n:
            tree[j] += 1
            j += j & -j
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
        """Lower the threshold to the largest sampled hash (it leaves)."""
        self._lower_threshold(-self._heap[0])

    def _reweigh(self, factor: float) -> None:
        """New references weigh ``factor`` times more than before: the rate dropped by that
        factor, or (2) a decay halves the say of everything recorded so far."""
        self._unit *= factor
        if self._unit > 1e100:  # renormalise (rare): same ratios, smaller numbers
            k = 1 / self._unit
            self._bins = [w * k for w in self._bins]
            self._cold, self._sampled, self._expected, self._unit = (
                self._cold * k, self._sampled * k, self._expected * k, 1.0,
            )  # fmt: skip
        self._per_block = self.rate * self._unit
        self._decay_weight = math.inf if self.decay_samples is None else self.decay_samples * self._unit
