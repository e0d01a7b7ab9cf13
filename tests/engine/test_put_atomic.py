"""Puts are atomic (issue 16): whatever mix of puts, zero-copy reservations, repeated hashes,
missing parents, commits and releases, every slot in use is indexed or reserved, and a refused
put leaves no trace: ``used == indexed + reserved`` after every step, and the cache validates."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_engine.core.hashing import BlockHash
from kvcache_engine.engine import KVCacheEngine
from tests.engine.helpers import make_engine, make_kv

BT = 4
HASHES = st.integers(1, 24)  # a small space: repeats and shared prefixes are frequent


def _h(*values: int) -> list[BlockHash]:
    return [BlockHash(v) for v in values]


def _used(engine: KVCacheEngine) -> int:
    return int(engine.get_stats()["used_blocks"])


def _check(engine: KVCacheEngine, in_flight: list[Any]) -> None:
    st_ = engine.get_stats()
    reserved = sum(len(r.slots) for r in in_flight)
    assert st_["used_blocks"] == st_["cached_blocks"] + reserved, (
        st_["used_blocks"],
        st_["cached_blocks"],
        reserved,
    )


def _step(engine: KVCacheEngine, op: tuple[Any, ...], in_flight: list[Any]) -> None:
    kind, hashes, parent = op
    kv = make_kv(len(hashes) * BT, seed=len(hashes))
    try:
        if kind == "put":
            engine.put_blocks_raw(hashes, kv, parent)
        elif kind == "rows":
            rows = kv.reshape(2, kv.shape[1], len(hashes), -1).permute(2, 0, 1, 3).contiguous()
            engine.put_rows(hashes, rows.view(len(hashes), -1).view(torch.uint8), None, parent)
        elif kind == "reserve":
            res = engine.reserve_put(hashes, parent)
            if res is not None:
                in_flight.append(res)
        elif kind == "commit" and in_flight:
            engine.commit_put(in_flight.pop(0))
        elif kind == "release" and in_flight:
            engine.release_put(in_flight.pop())
    except ValueError as exc:
        assert "repeats" in str(exc) or "expected" in str(exc)


OPS = st.tuples(
    st.sampled_from(["put", "rows", "reserve", "commit", "release"]),
    st.lists(HASHES, min_size=1, max_size=6),
    st.one_of(st.none(), HASHES),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(OPS, min_size=1, max_size=25))
def test_used_is_indexed_plus_reserved_after_any_mix(ops: list[tuple[Any, ...]]) -> None:
    engine = make_engine(max_tokens=16 * BT, enable_gc=False)
    in_flight: list[Any] = []
    try:
        for op in ops:
            _step(engine, op, in_flight)
            _check(engine, in_flight)
        for res in in_flight:
            engine.release_put(res)
        in_flight.clear()
        _check(engine, in_flight)
        assert engine.validate_cache_integrity()["is_valid"]
    finally:
        engine.close()


@pytest.mark.parametrize("hashes", [[3, 3], [3, 4, 3], [9, 8, 7, 9]])
@pytest.mark.parametrize("kind", ["put", "rows", "reserve"])
def test_a_repeated_hash_is_refused_before_anything_is_taken(kind: str, hashes: list[int]) -> None:
    engine = make_engine(max_tokens=16 * BT, enable_gc=False)
    try:
        for _ in range(40):  # more than the pool holds: a leak would fill it
            with pytest.raises(ValueError, match="repeats"):
                _step_raising(engine, kind, hashes)
        assert _used(engine) == 0
        engine.put_blocks_raw(_h(*range(100, 116)), make_kv(16 * BT))
        assert engine.get_stats()["cached_blocks"] == 16
    finally:
        engine.close()


def test_a_chain_holding_its_parent_is_refused() -> None:
    engine = make_engine(max_tokens=16 * BT, enable_gc=False)
    try:
        engine.put_blocks_raw(_h(1), make_kv(BT))
        with pytest.raises(ValueError, match="repeats the parent"):
            engine.put_blocks_raw(_h(2, 1), make_kv(2 * BT), parent=BlockHash(1))
        assert _used(engine) == engine.get_stats()["cached_blocks"] == 1
    finally:
        engine.close()


def _step_raising(engine: KVCacheEngine, kind: str, hashes: Any) -> None:
    kv = make_kv(len(hashes) * BT)
    if kind == "put":
        engine.put_blocks_raw(hashes, kv)
    elif kind == "rows":
        rows = torch.zeros(len(hashes), kv.numel() * 2 // len(hashes), dtype=torch.uint8)
        engine.put_rows(hashes, rows)
    else:
        engine.reserve_put(hashes)
