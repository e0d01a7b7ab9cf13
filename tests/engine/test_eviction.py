from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcache_engine.contract import CacheStrategy
from kvcache_engine.core.eviction import AdaptiveStrategy, LFUStrategy, LRUStrategy, make_strategy
from kvcache_engine.core.hashing import BlockHash


def H(*xs: int) -> list[BlockHash]:
    return [BlockHash(x) for x in xs]


def drain(strategy: LRUStrategy | LFUStrategy | AdaptiveStrategy) -> list[int]:
    """Evict everything, returning the eviction order."""
    out = []
    while (v := strategy.victim()) is not None:
        strategy.evicted(v)
        out.append(int(v))
    return out


def test_lru_exact_order() -> None:
    s = LRUStrategy(10)
    for h in H(1, 2, 3, 4):
        s.insert(h)
    s.touch(BlockHash(2))
    s.touch(BlockHash(1))
    s.remove(BlockHash(3))
    assert drain(s) == [4, 2, 1]


def test_lfu_exact_order_ties_broken_by_recency() -> None:
    s = LFUStrategy(10)
    for h in H(1, 2, 3, 4):
        s.insert(h)
    for h in H(3, 3, 1, 2, 2):
        s.touch(h)
    # freqs: 1->2, 2->3, 3->3, 4->1; 3 reached 3 before 2 did.
    assert [s.frequency(h) for h in H(1, 2, 3, 4)] == [2, 3, 3, 1]
    assert drain(s) == [4, 1, 3, 2]


def test_lfu_victim_skips_protected() -> None:
    s = LFUStrategy(10)
    for h in H(1, 2, 3):
        s.insert(h)
    s.touch(BlockHash(3))
    assert s.victim(protected={BlockHash(1), BlockHash(2)}) == 3
    assert s.victim(protected=set(H(1, 2, 3))) is None


def test_adaptive_replace_follows_p_and_ghost_hits_move_it() -> None:
    s = AdaptiveStrategy(4)
    assert s.p == 2.0  # neutral start
    for h in H(1, 2, 3):
        s.insert(h)
    s.touch(BlockHash(1))  # T1 = [2, 3], T2 = [1]
    assert s.victim() == 1  # |T1| = 2 is not above p = 2: take T2's LRU
    s.p = 1.0
    assert s.victim() == 2  # |T1| > p: take T1's LRU
    s.evicted(BlockHash(2))
    assert s.ghosts() == (1, 0)
    s.insert(BlockHash(2))  # B1 ghost hit: recency was undervalued, p grows; 2 goes to T2
    assert s.p == 2.0 and s.ghosts() == (0, 0)
    assert list(s.order()) == [1, 2, 3]  # |T1| = 1 <= p: T2 first (1 then 2), then T1
    s.evicted(BlockHash(1))  # from T2 -> B2
    assert s.ghosts() == (0, 1)
    s.insert(BlockHash(1))  # B2 ghost hit: frequency was undervalued, p shrinks
    assert s.p == 1.0


def test_adaptive_ghosts_are_bounded() -> None:
    s = AdaptiveStrategy(3)
    for i in range(100):
        s.insert(BlockHash(i))
        while len(s) > 3:
            v = s.victim()
            assert v is not None
            s.evicted(v)
    b1, b2 = s.ghosts()
    assert len(s) + b1 + b2 <= 6


def test_make_strategy_accepts_config_spellings_and_rejects_unknown() -> None:
    assert isinstance(make_strategy("lru", 1), LRUStrategy)
    assert isinstance(make_strategy(CacheStrategy.LFU, 1), LFUStrategy)
    assert isinstance(make_strategy("CacheStrategy.ADAPTIVE", 1), AdaptiveStrategy)
    with pytest.raises(ValueError, match=r"cache_strategy.*LRU, LFU, ADAPTIVE"):
        make_strategy("fifo", 1)
    with pytest.raises(ValueError, match="capacity"):
        LRUStrategy(-1)


ops = st.lists(
    st.tuples(st.sampled_from(["insert", "touch", "remove", "evict"]), st.integers(0, 12)), max_size=80
)


@given(st.sampled_from(["LRU", "LFU", "ADAPTIVE"]), ops)
def test_strategy_tracks_exactly_the_live_set(name: str, script: list[tuple[str, int]]) -> None:
    s = make_strategy(name, 5)
    live: set[int] = set()
    for op, x in script:
        h = BlockHash(x)
        if op == "insert":
            s.insert(h)
            live.add(x)
        elif op == "touch":
            s.touch(h)
        elif op == "remove":
            s.remove(h)
            live.discard(x)
        else:
            v = s.victim()
            if v is not None:
                s.evicted(v)
                live.discard(int(v))
        assert len(s) == len(live)
        assert sorted(int(h) for h in s.order()) == sorted(live)
        assert all(BlockHash(x) in s for x in live)
