"""The engine's miss-ratio curve (core/curve.py): exact small cases of the prefix-chain rule,
agreement with the exact replay, the sampler's invariants (hypothesis), its memory and CPU
bounds, miss reasons, and its place in the engine's stats."""

from __future__ import annotations

import random
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_engine.contract.curve import CURVE_MULTIPLES, MISS_REASONS
from kvcache_engine.core import curve as curve_mod
from kvcache_engine.core import retune as retune_mod
from kvcache_engine.core.curve import (
    ENTRY_BYTES,
    MEMORY_SHARE,
    ShadowCurve,
    curve_entries_for,
    mix_id,
)
from kvcache_engine.core.hashing import BlockHash
from kvcache_engine.engine import KVCacheEngine
from kvcache_engine.replay import replay
from tests.engine.helpers import make_kv


def exact(**kw: object) -> ShadowCurve:
    """A shadow that samples every block and never decays: distances are exact."""
    return ShadowCurve(max_entries=100_000, max_rate=1.0, decay_samples=None, **kw)  # type: ignore[arg-type]


def feed(shadow: ShadowCurve, requests: list[list[int]]) -> None:
    """What the replay does per request: lookup (hit count irrelevant to the curve), then put."""
    for r in requests:
        shadow.lookup(r, 0)
        shadow.stored(r)


def tree_requests(rng: random.Random, n: int, fanout: int = 3, depth: int = 6) -> list[list[int]]:
    """``n`` requests, each a root-to-node path of a random prefix tree (ids chained: an id
    names its whole prefix, as in a Mooncake trace)."""
    ids: dict[tuple[int, ...], int] = {}
    out = []
    for _ in range(n):
        path: tuple[int, ...] = ()
        chain = []
        for _ in range(rng.randint(1, depth)):
            path = (*path, rng.randrange(fanout))
            chain.append(ids.setdefault(path, len(ids)))
        out.append(chain)
    return out


# -- exact small cases of the prefix-chain rule


def test_repeated_chain_hits_at_its_stack_distances() -> None:
    s = exact()
    feed(s, [[1, 2, 3], [1, 2, 3]])
    # 6 blocks asked; the second request's blocks sit at distances 0, 1, 2 (root most recent).
    assert [s.hit_rate(c) for c in (1, 2, 3, 4)] == [1 / 6, 2 / 6, 3 / 6, 3 / 6]
    assert s.ceiling() == 3 / 6


def test_a_block_hits_only_if_every_block_before_it_hits() -> None:
    s = exact()
    feed(s, [[1, 2, 3]])  # recency: 1, 2, 3
    s.imported([(4, 3)])  # a block restored after its parent: the most recent of all
    feed(s, [[1, 2, 3, 4]])
    # Distances 1, 2, 3, 0: alone, 4 would hit in a 1-block cache; behind 3 it needs 4 blocks.
    assert [s.hit_rate(c) for c in (1, 2, 3, 4)] == [0.0, 1 / 7, 2 / 7, 4 / 7]


def test_an_unseen_block_ends_the_chain_at_every_size() -> None:
    s = exact()
    feed(s, [[1, 2, 3], [1, 9, 3]])  # 3 is known under parent 2, asked under 9
    # Second request: 1 hits (distance 0); 9 never seen; 3 under another parent stops too.
    assert s.hit_rate(10**6) == 1 / 6
    assert s.ceiling() == 1 / 6


def test_lookup_without_put_still_advances_the_chain() -> None:
    s = exact()
    for _ in range(3):
        s.lookup([1, 2], 0)  # the put that follows a lookup is implied: the chain is touched
    assert s.hit_rate(2) == pytest.approx(4 / 6)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 60))
def test_exact_shadow_equals_the_replay_for_small_caches(seed: int, n: int) -> None:
    requests = tree_requests(random.Random(seed), n)
    s = exact()
    feed(s, [[mix_id(i) for i in r] for r in requests])
    for capacity in range(1, 9):  # each distance below 8 has a bin of its own
        assert s.hit_rate(capacity) == pytest.approx(replay(requests, capacity).hit_rate, abs=1e-12)
    assert s.ceiling() == pytest.approx(replay(requests, 10**6).hit_rate, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32), st.sampled_from([12, 20, 33, 50]))
def test_exact_shadow_brackets_the_replay_within_one_bin(seed: int, capacity: int) -> None:
    requests = tree_requests(random.Random(seed), 200, fanout=4, depth=8)
    s = exact()
    feed(s, [[mix_id(i) for i in r] for r in requests])
    lo = replay(requests, int(capacity / 1.1)).hit_rate
    hi = replay(requests, int(capacity * 1.1) + 1).hit_rate
    assert lo - 1e-12 <= s.hit_rate(capacity) <= hi + 1e-12


# -- the sampler's invariants


def check_invariants(s: ShadowCurve) -> None:
    entries = s._last
    assert len(entries) <= s.max_entries
    assert all(h < s.threshold for h in entries)
    fen = s._fen
    assert fen.prefix(fen.size) == len(entries)  # one mark per entry ...
    for v in entries.values():  # ... at its time
        t = v >> 8
        assert fen.prefix(t) - fen.prefix(t - 1) == 1
    assert sorted(-x for x in s._heap) == sorted(entries)
    assert set(s._route) <= set(entries)
    c = s.curve(100.0)
    assert c is not None
    assert all(0.0 <= r <= c.ceiling <= 1.0 for r in c.hit_rates)
    assert list(c.hit_rates) == sorted(c.hit_rates)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**32),
    st.integers(1, 64),
    st.sampled_from([1.0, 0.5, 0.125]),
    st.lists(st.sampled_from(["lookup", "put", "evict", "import"]), min_size=1, max_size=300),
)
def test_sampler_invariants_under_any_stream(
    seed: int, max_entries: int, rate: float, ops: list[str]
) -> None:
    rng = random.Random(seed)
    s = ShadowCurve(max_entries=max_entries, max_rate=rate)
    thresholds = [s.threshold]
    for op in ops:
        chain = [mix_id(i) for i in tree_requests(rng, 1, fanout=5, depth=5)[0]]
        if op == "lookup":
            s.lookup(chain, rng.randint(0, len(chain)))
        elif op == "put":
            s.stored(chain)
        elif op == "evict":
            s.evicted(rng.choice(chain), rng.choice(["capacity", "retune", "cleared"]))
        else:
            s.imported([(h, None) for h in chain])
        thresholds.append(s.threshold)
    check_invariants(s)
    assert thresholds == sorted(thresholds, reverse=True)  # the rate never rises
    assert set(s.miss_reasons) <= {"never_seen", "capacity", "retune", "cleared"}


def test_fenwick_compaction_keeps_distances() -> None:
    s = ShadowCurve(max_entries=8, max_rate=1.0, decay_samples=None)  # times run out every 16 touches
    t = ShadowCurve(max_entries=10_000, max_rate=1.0, decay_samples=None)
    rng = random.Random(7)
    for _ in range(500):
        chain = [mix_id(rng.randrange(6))]  # six distinct blocks fit in eight entries: nothing leaves
        s.lookup(chain, 0)
        t.lookup(chain, 0)
    check_invariants(s)
    assert [s.hit_rate(c) for c in range(1, 8)] == [t.hit_rate(c) for c in range(1, 8)]


def test_a_full_shadow_lowers_its_rate_and_keeps_the_curve() -> None:
    requests = tree_requests(random.Random(3), 3000, fanout=6, depth=7)
    hashed = [[mix_id(i) for i in r] for r in requests]
    s = ShadowCurve(max_entries=400, max_rate=1.0, decay_samples=None)
    feed(s, hashed)
    assert s.entries <= 400 and s.rate < 0.5
    for capacity in (200, 800, 3200):
        assert s.hit_rate(capacity) == pytest.approx(replay(requests, capacity).hit_rate, abs=0.04)


def test_sampled_curve_tracks_the_replay() -> None:
    requests = tree_requests(random.Random(11), 30000, fanout=30, depth=5)  # ~32k distinct blocks
    hashed = [[mix_id(i) for i in r] for r in requests]
    s = ShadowCurve(max_entries=32768, max_rate=1 / 4, decay_samples=None)
    feed(s, hashed)
    assert s.rate == 1 / 4
    for capacity in (2000, 8000):  # SHARDS needs a few hundred sampled blocks below the size
        assert s.hit_rate(capacity) == pytest.approx(replay(requests, capacity).hit_rate, abs=0.015)


def test_decay_keeps_ratios_and_halves_the_weight() -> None:
    s = ShadowCurve(max_entries=1000, max_rate=1.0, decay_samples=50)
    feed(s, [[1, 2]] * 40)
    assert s.samples <= 50 * 1.01 + 2 and s.requested < 80
    assert s.hit_rate(2) == pytest.approx(1.0, abs=0.03)  # the one cold request has faded


# -- bounds: memory and CPU


def test_memory_stays_under_the_entry_budget() -> None:
    n = 4096
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        s = ShadowCurve(max_entries=n, max_rate=1.0)
        rng = random.Random(1)
        for _ in range(3 * n):
            chain = [rng.getrandbits(64) for _ in range(4)]
            s.lookup(chain, 0)
            s.evicted(chain[-1], "capacity")
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert s.entries == n
    assert used <= n * ENTRY_BYTES, used
    assert s.memory_bytes() >= used * 0.5  # the reported figure is of the right size


@pytest.mark.parametrize("pool_bytes", [10**6, 64 * 2**20, 10 * 2**30, 200 * 2**30])
def test_entry_budget_is_one_percent_of_the_pool_and_capped(pool_bytes: int) -> None:
    n = curve_entries_for(pool_bytes)
    assert n * ENTRY_BYTES <= MEMORY_SHARE * pool_bytes
    assert n <= curve_mod.DEFAULT_MAX_ENTRIES
    assert n == 0 or n >= 64


def test_cpu_budget_halves_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(curve_mod, "_BUDGET_WINDOW_S", 1e-4)
    s = ShadowCurve(max_entries=1000, max_rate=1.0, cpu_share=0.01)
    seconds = 0.0
    for i in range(200):
        seconds += 1e-6  # lookups "took" 1 us each: the shadow's own work is far above 1 %
        s.lookup([mix_id(i), mix_id(i + 1)], 0, requested_blocks=2 * (i + 1), lookup_seconds=seconds)
    assert s.rate < 1.0
    generous = ShadowCurve(max_entries=1000, max_rate=1.0, cpu_share=0.5)
    for i in range(200):
        generous.lookup([mix_id(i)], 0, requested_blocks=i + 1, lookup_seconds=float(i))  # 1 s each
    assert generous.rate == 1.0


def test_unsampled_lookups_are_accounted_from_the_engines_total() -> None:
    s = ShadowCurve(max_entries=1000, max_rate=0.5, decay_samples=None)
    hashes = [h for h in (mix_id(i) for i in range(100)) if h < s.threshold][:2]
    s.lookup(hashes, 0, requested_blocks=2)
    s.lookup(hashes, 0, requested_blocks=1002)  # 998 blocks of unsampled lookups in between
    assert s.requested == 1002
    assert s.samples == pytest.approx(1002 * 0.5)


# -- in the engine


def make_curved_engine(**overrides: object) -> KVCacheEngine:
    e = KVCacheEngine(
        device="cpu", num_layers=1, num_kv_heads=1, head_dim=8, block_tokens=4, max_tokens=32,
        enable_gc=False, **overrides,  # type: ignore[arg-type]
    )  # fmt: skip
    e._state.curve = exact()  # a toy pool gets no curve of its own (1 % of it is too little)
    return e


def chain(n: int, base: int) -> list[BlockHash]:
    return [BlockHash(mix_id(base + i)) for i in range(n)]


def put(e: KVCacheEngine, hashes: list[BlockHash]) -> None:
    e.put_blocks_raw(hashes, make_kv(4 * len(hashes), num_layers=1, num_kv_heads=1, head_dim=8))


def test_miss_reasons_in_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retune_mod, "curve_entries_for", lambda _pool_bytes: 100_000)  # keep it exact
    e = make_curved_engine()  # 8 blocks
    try:
        a = chain(2, 0)
        assert e.lookup_hashes(a) == 0
        put(e, a)
        for base in (100, 200, 300, 400):  # 8 more blocks push a out
            put(e, chain(2, base))
        assert e.lookup_hashes(a) == 0
        put(e, a)
        e.reconfigure(max_tokens=16)  # 4 blocks left: the retune drops the coldest
        b = chain(2, 300)
        assert e.lookup_hashes(b) == 0
        e.clear_cache()
        assert e.lookup_hashes(a) == 0
        reasons = e.get_stats()["miss_reasons"]
    finally:
        e.close()
    assert set(reasons) == set(MISS_REASONS)
    assert reasons["never_seen"] == 2
    assert reasons["capacity"] == 2
    assert reasons["retune"] == 2
    assert reasons["cleared"] == 2


def test_stats_report_the_curve_at_the_engines_capacity() -> None:
    e = make_curved_engine()
    try:
        a = chain(2, 0)
        for _ in range(3):
            e.lookup_hashes(a)
            put(e, a)
        stats = e.get_stats()
    finally:
        e.close()
    curve = stats["curve"]
    assert curve["capacity_blocks"] == 8.0
    assert len(curve["hit_rates"]) == len(CURVE_MULTIPLES)
    assert curve["hit_rates"][CURVE_MULTIPLES.index(0.25)] == pytest.approx(4 / 6)
    assert curve["ceiling"] == pytest.approx(4 / 6)
    assert curve["weight"] == 6
    assert stats["curve_entries"] == 2 and stats["curve_sampling_rate"] == 1.0


def test_engine_pools_get_a_curve_sized_by_their_bytes() -> None:
    e = KVCacheEngine(
        device="cpu", num_layers=4, num_kv_heads=4, head_dim=64, block_tokens=16, max_tokens=16 * 1024,
        enable_gc=False,
    )  # fmt: skip
    try:
        st_ = e._state
        assert st_.curve.max_entries == curve_entries_for(st_.pool_bytes()) > 0
        e.reconfigure(max_tokens=16 * 256)  # a quarter of the pool: a quarter of the entries
        assert st_.curve.max_entries == curve_entries_for(st_.pool_bytes())
        assert e.get_stats()["curve_memory_bytes"] <= MEMORY_SHARE * st_.pool_bytes()
    finally:
        e.close()


def test_a_restored_cache_is_not_predicted_cold() -> None:
    src = make_curved_engine()
    dst = make_curved_engine()
    try:
        a = chain(3, 0)
        put(src, a)
        dst.import_blocks(src.export_blocks())
        assert dst.lookup_hashes(a) == 3
        assert dst.get_stats()["miss_reasons"]["never_seen"] == 0
        assert dst._state.curve.ceiling() == 1.0
    finally:
        src.close()
        dst.close()


# -- a changing replica set


def test_moved_chains_stay_out_of_the_curve_and_count_as_moved() -> None:
    s = exact()
    s.lookup([1, 2, 3], 0, moved=True)  # cached elsewhere before: not a cold miss of the workload
    assert s.ceiling() == 0.0 and s.samples == 0
    assert s.miss_reasons == {"moved": 3.0}
    s.lookup([1, 2, 3], 0, moved=True)  # now seen here: measured as usual
    assert s.hit_rate(3) == 1.0 and s.samples == 3


def test_retain_forgets_the_chains_another_replica_owns() -> None:
    s = ShadowCurve(max_entries=1000, max_rate=1.0, decay_samples=None, route_depth=2)
    mine, theirs = [1, 2, 3], [1, 7, 8]  # keyed by their second block: 2 and 7
    feed(s, [mine, theirs])
    assert s.entries == 5
    assert s.retain(lambda key: key == 2) == 2  # 7 and 8 go; the shared root (keyed 2 first) stays
    check_invariants(s)
    kept = ShadowCurve(max_entries=1000, max_rate=1.0, decay_samples=None, route_depth=2)
    feed(kept, [mine, theirs, mine])  # the same, without the replica set changing
    feed(s, [mine])
    # 1, 2, 3 at distances 0, 1, 2 (nothing above them): all hit in 3 blocks, as do the two roots
    # before; with 7 and 8 still above 2 and 3, only the roots would.
    assert s.hit_rate(3) == pytest.approx(4 / 9) and kept.hit_rate(3) == pytest.approx(2 / 9)
