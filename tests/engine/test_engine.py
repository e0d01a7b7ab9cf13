from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_engine import CacheStrategy, KVCacheEngine
from kvcache_engine.contract import ConfigError
from kvcache_engine.core.compression import relative_error
from kvcache_engine.core.stats import LATENCY_BUCKETS_MS
from tests.engine.helpers import make_config, make_engine, make_kv, make_tokens, snapshot

STATS_KEYS = {
    "avg_latency", "p50_latency", "p95_latency", "p99_latency", "hit_rate", "cache_hits", "cache_misses",
    "hit_tokens", "requested_tokens", "requests", "evictions", "num_blocks", "used_blocks", "memory_pressure",
    "compression_ratio", "codec", "cache_strategy", "max_tokens", "block_tokens", "bytes_in", "bytes_out",
    "pool_bytes", "device", "device_memory_allocated", "device_memory_reserved", "device_memory_total",
    "cpu_tier_blocks", "cpu_tier_used_blocks", "demotions", "promotions", "prefetches", "latency_histograms",
}  # fmt: skip


def put_chain(engine: KVCacheEngine, chain: int, blocks: int, seed: int = 0) -> list[int]:
    tokens = make_tokens(chain, blocks)
    engine.put(tokens, make_kv(len(tokens), seed=seed))
    return tokens


# ---------------------------------------------------------------- data plane


def test_put_lookup_get_round_trip_is_bit_exact(engine_factory: Any) -> None:
    engine = engine_factory()
    tokens = make_tokens(1, 3, extra=2)  # 3 full blocks + 2 tokens that are never stored
    kv = make_kv(len(tokens))
    assert engine.put(tokens, kv) == 3
    assert engine.lookup(tokens) == 12
    assert torch.equal(engine.get(tokens), kv[:, :, :12])
    assert engine.lookup(tokens[:9]) == 8  # a prefix of the prompt hits its full blocks
    assert engine.put(tokens, kv) == 0  # already cached: touched, not stored again


def test_tensor_tokens_are_accepted(engine_factory: Any) -> None:
    engine = engine_factory()
    tokens = make_tokens(1, 2)
    engine.put(torch.tensor(tokens), make_kv(8))
    assert engine.lookup(torch.tensor(tokens, dtype=torch.int32)) == 8


def test_get_of_uncached_prompt_is_empty_with_the_layout(engine_factory: Any) -> None:
    engine = engine_factory()
    out = engine.get(make_tokens(5, 2))
    assert out.shape == (2, 2, 0, 2, 8) and out.dtype == torch.float16


def test_counters_follow_the_contract(engine_factory: Any) -> None:
    engine = engine_factory()
    tokens = put_chain(engine, 1, 2)
    engine.lookup(tokens + make_tokens(9, 1))  # 2 of 3 blocks hit
    engine.lookup(make_tokens(7, 2))  # 0 of 2
    engine.get(tokens)  # get does not count hits
    s = engine.get_stats()
    assert set(s) >= STATS_KEYS
    assert (s["requests"], s["cache_hits"], s["cache_misses"]) == (2, 2, 3)
    assert (s["hit_tokens"], s["requested_tokens"]) == (8, 20)
    assert s["hit_rate"] == pytest.approx(8 / 20)
    assert s["bytes_in"] == 2 * 2 * 2 * 4 * 2 * 8 * 2 and s["bytes_out"] == s["bytes_in"]
    assert (s["num_blocks"], s["used_blocks"], s["memory_pressure"]) == (8, 2, 0.25)
    hist = s["latency_histograms"]["lookup"]
    assert (
        hist["count"] == 2 and hist["counts"][-1] == 2 and len(hist["buckets"]) == len(LATENCY_BUCKETS_MS) + 1
    )


def test_put_blocks_raw_and_hash_api(engine_factory: Any) -> None:
    source, target = engine_factory(), engine_factory()
    tokens = put_chain(source, 1, 3)
    hashes = source.block_hashes(tokens)
    kv = source.get_hashes(hashes)
    assert target.put_blocks_raw(hashes[1:], kv[:, :, 4:], parent=hashes[0]) == 0  # parent absent
    assert target.put_blocks_raw(hashes[:1], kv[:, :, :4]) == 1
    assert target.put_blocks_raw(hashes[1:], kv[:, :, 4:], parent=hashes[0]) == 2
    assert target.lookup(tokens) == 12 and target.lookup_hashes(hashes) == 3
    assert torch.equal(target.get(tokens), kv)
    assert target.cached_hashes() == hashes


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda e, t: e.put(t, make_kv(8)[:, :1]), "kv"),  # wrong layer count
        (lambda e, t: e.put(t, make_kv(8).float()), "kv"),  # wrong dtype
        (lambda e, t: e.put(t, make_kv(7)), "kv"),  # token count mismatch
        (lambda e, t: e.put(t, make_kv(8).tolist()), "kv"),  # not a tensor
        (lambda e, t: e.put(t[:3], make_kv(3)), "tokens"),  # fewer tokens than a block
        (lambda e, t: e.put([1.5] * 8, make_kv(8)), "tokens"),
        (lambda e, t: e.put(torch.ones(2, 4, dtype=torch.long), make_kv(8)), "tokens"),
        (lambda e, t: e.lookup("abcd"), "tokens"),
        (lambda e, t: e.lookup_hashes([-1]), "hashes"),
        (lambda e, t: e.put_blocks_raw([], make_kv(0)), "hashes"),
        (lambda e, t: e.resize(-1), "max_tokens"),
        (lambda e, t: e.reconfigure(cache_strategy="fifo"), "cache_strategy"),
        (lambda e, t: e.reconfigure(compression_codec="zstd"), "compression_codec"),
        (lambda e, t: e.reconfigure(max_tokens=-16), "max_tokens"),
        (lambda e, t: e.reconfigure(num_layers=4), "num_layers"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(
    engine_factory: Any, call: Any, argument: str
) -> None:
    engine = engine_factory()
    tokens = put_chain(engine, 1, 2)
    before = snapshot(engine)
    with pytest.raises(ValueError, match=argument):
        call(engine, make_tokens(2, 2))
    assert snapshot(engine) == before
    assert torch.equal(engine.get(tokens), make_kv(8))


def test_constructor_rejects_unknown_strategy_and_fields() -> None:
    with pytest.raises(ValueError, match="cache_strategy"):
        KVCacheEngine(make_config(), cache_strategy="mru")
    with pytest.raises(ConfigError, match="bogus"):
        KVCacheEngine(make_config(), bogus=1)


# ---------------------------------------------------------------- eviction through the engine


def test_lru_evicts_least_recent_chain_tail_first(engine_factory: Any) -> None:
    engine = engine_factory(cache_strategy="LRU", max_tokens=16)  # 4 slots
    a = put_chain(engine, 1, 2)
    b = put_chain(engine, 2, 2)
    engine.lookup(a)  # a is now the most recent
    put_chain(engine, 3, 1)  # evicts b's tail only
    assert engine.lookup(b) == 4 and engine.lookup(a) == 8
    assert engine.get_stats()["evictions"] == 1
    put_chain(engine, 4, 2)  # LRU now: b's root (looked up before a), then c
    assert engine.lookup(b) == 0 and engine.lookup(a) == 8


def test_lfu_keeps_the_frequent_chain(engine_factory: Any) -> None:
    engine = engine_factory(cache_strategy="LFU", max_tokens=16)
    a = put_chain(engine, 1, 2)
    for _ in range(3):
        engine.lookup(a)
    b = put_chain(engine, 2, 2)
    engine.lookup(b)  # b is more recent than a but less frequent
    put_chain(engine, 3, 2)
    assert engine.lookup(a) == 8 and engine.lookup(b) == 0


def test_a_block_whose_parent_is_gone_is_never_served(engine_factory: Any) -> None:
    engine = engine_factory(cache_strategy="LFU", max_tokens=16)
    tokens = put_chain(engine, 1, 3)
    hashes = engine.block_hashes(tokens)
    for _ in range(5):
        engine.lookup_hashes(hashes[1:])  # not a chain from the root: counts nothing, touches nothing
    assert engine.lookup_hashes(hashes[1:]) == 0
    # Force the root out: the chain's descendants go with it.
    engine._slots.drop(hashes[0], engine._state.tiers[0])
    assert engine.cached_hashes() == [] and engine.lookup(tokens) == 0
    assert engine.validate_cache_integrity()["is_valid"]


def test_chain_longer_than_the_pool_stores_its_head(engine_factory: Any) -> None:
    engine = engine_factory(max_tokens=16)  # 4 slots
    tokens = put_chain(engine, 1, 6)
    assert engine.lookup(tokens) == 16
    assert torch.equal(engine.get(tokens), make_kv(24)[:, :, :16])


def test_background_gc_evicts_down_to_the_threshold(engine_factory: Any) -> None:
    engine = engine_factory(enable_gc=True, gc_threshold=0.5, max_tokens=32)
    for chain in range(8):
        put_chain(engine, chain, 1)
    done = threading.Event()

    def used() -> int:
        return int(engine.get_stats()["used_blocks"])

    for _ in range(500):
        if used() <= 4:
            done.set()
            break
        threading.Event().wait(0.01)
    assert done.is_set() and used() == 4
    assert engine.get_stats()["evictions"] >= 4
    engine.close()
    assert engine._gc.thread is not None and not engine._gc.thread.is_alive()


# ---------------------------------------------------------------- compression through the engine


@pytest.mark.parametrize(("codec", "bound"), [("fp8", 0.05), ("int8", 0.01), ("int4", 0.10)])
def test_compressed_round_trip_within_bounds(engine_factory: Any, codec: str, bound: float) -> None:
    engine = engine_factory(compression_codec=codec, head_dim=32, block_tokens=16, max_tokens=256)
    tokens = list(range(64))
    kv = make_kv(64, head_dim=32)
    engine.put(tokens, kv)
    out = engine.get(tokens)
    assert out.shape == kv.shape and relative_error(kv, out) <= bound
    assert engine.get_stats()["compression_ratio"] < 0.7


def test_use_compression_picks_the_codec_from_the_ratio(engine_factory: Any) -> None:
    assert engine_factory(use_compression=True, compression_ratio=0.5).codec == "int8"
    assert engine_factory(use_compression=True, compression_ratio=0.25).codec == "int4"
    assert engine_factory().codec == "none"


# ---------------------------------------------------------------- integrity


def test_flipped_byte_is_caught(engine_factory: Any) -> None:
    engine = engine_factory()
    tokens = put_chain(engine, 1, 3)
    assert engine.validate_cache_integrity() == {
        "is_valid": True, "errors": [], "checked_blocks": 3,
        "corrupt_blocks": 0, "dangling_blocks": 0, "repaired_blocks": 0,
    }  # fmt: skip
    victim = engine._state.index.get(engine.block_hashes(tokens)[1])
    engine._state.tiers[victim.tier].pool.storage[victim.slot, 17] ^= 0x40
    report = engine.validate_cache_integrity()
    assert not report["is_valid"] and report["corrupt_blocks"] == 1
    assert any(f"{victim.hash:016x}" in e and "checksum" in e for e in report["errors"])
    repaired = engine.validate_cache_integrity(repair=True)
    assert repaired["repaired_blocks"] == 2  # the corrupt block and its child
    assert engine.validate_cache_integrity()["is_valid"] and engine.lookup(tokens) == 4


def test_dangling_chain_is_caught(engine_factory: Any) -> None:
    engine = engine_factory()
    tokens = put_chain(engine, 1, 3)
    root = engine.block_hashes(tokens)[0]
    entry = engine._state.index._entries.pop(root)  # planted: the parent vanishes from the index alone
    engine._state.tiers[0].pool.free(entry.slot)
    engine._state.tiers[0].strategy.remove(root)
    report = engine.validate_cache_integrity()
    assert not report["is_valid"] and report["dangling_blocks"] == 1
    assert any("dangling" in e for e in report["errors"])
    assert engine.lookup(tokens) == 0


# ---------------------------------------------------------------- export / import


def test_export_import_round_trip_and_transcode(engine_factory: Any) -> None:
    source = engine_factory()
    a = put_chain(source, 1, 3)
    b = put_chain(source, 2, 1)
    blocks = list(source.export_blocks())
    order = [blk.hash for blk in blocks]
    assert all(blk.parent is None or order.index(blk.parent) < order.index(blk.hash) for blk in blocks)
    plain, packed = engine_factory(), engine_factory(compression_codec="int8", head_dim=8)
    assert plain.import_blocks(blocks) == 4 and plain.import_blocks(blocks) == 0
    assert torch.equal(plain.get(a), source.get(a)) and torch.equal(plain.get(b), source.get(b))
    assert packed.import_blocks(iter(blocks)) == 4
    assert relative_error(source.get(a), packed.get(a)) <= 0.01
    assert packed.validate_cache_integrity()["is_valid"]
    # And back: int8 blocks exported and transcoded into an fp16 engine.
    again = engine_factory()
    assert again.import_blocks(packed.export_blocks()) == 4
    assert relative_error(source.get(a), again.get(a)) <= 0.01


def test_import_rejects_bad_checksum_geometry_and_orphans(engine_factory: Any) -> None:
    source = engine_factory()
    put_chain(source, 1, 2)
    root, child = list(source.export_blocks())
    tampered = dataclasses.replace(root, payload={"kv": root.payload["kv"] + 1})
    other = engine_factory(head_dim=16)
    target = engine_factory()
    assert target.import_blocks([tampered, child]) == 0  # bad checksum, then an orphan
    assert other.import_blocks([root]) == 0  # geometry mismatch
    assert target.get_stats()["import_rejected"] == 1 and other.get_stats()["import_rejected"] == 1
    assert target.cached_hashes() == []


# ---------------------------------------------------------------- admin


def test_reconfigure_live_fields_and_refuse_the_others(engine_factory: Any) -> None:
    engine = engine_factory(cache_strategy="LRU")
    cfg = engine.reconfigure(cache_strategy="lfu", gc_threshold=0.8)
    assert cfg.cache_strategy is CacheStrategy.LFU and engine.get_stats()["cache_strategy"] == "LFU"
    with pytest.raises(ConfigError, match=r"head_dim.*restart"):
        engine.reconfigure(head_dim=16)
    engine.config.max_tokens = 1024  # a copy: the engine is not affected
    assert engine.get_stats()["max_tokens"] == 32


def test_resize_keeps_the_hottest_blocks_that_fit(engine_factory: Any) -> None:
    engine = engine_factory(cache_strategy="LRU", max_tokens=32)
    cold = put_chain(engine, 1, 2)
    hot = put_chain(engine, 2, 2)
    warm = put_chain(engine, 3, 2)
    engine.lookup(warm)
    engine.lookup(hot)
    engine.resize(16)  # 4 slots
    assert engine.get_stats()["num_blocks"] == 4
    assert engine.lookup(hot) == 8 and engine.lookup(warm) == 8 and engine.lookup(cold) == 0
    assert torch.equal(engine.get(hot), make_kv(8))
    engine.resize(64)
    assert engine.get_stats()["num_blocks"] == 16 and engine.lookup(hot) == 8
    assert engine.validate_cache_integrity()["is_valid"]


def test_codec_change_rebuilds_online(engine_factory: Any) -> None:
    engine = engine_factory(head_dim=32, block_tokens=16, max_tokens=128)
    tokens = list(range(64))
    kv = make_kv(64, head_dim=32)
    engine.put(tokens, kv)
    engine.reconfigure(compression_codec="int8")
    assert engine.codec == "int8" and engine.get_stats()["num_blocks"] > 8
    assert engine.lookup(tokens) == 64 and relative_error(kv, engine.get(tokens)) <= 0.01
    assert engine.validate_cache_integrity()["is_valid"]


def test_compact_moves_live_blocks_to_the_front(engine_factory: Any) -> None:
    engine = engine_factory(cache_strategy="LRU")
    chains = [put_chain(engine, c, 1, seed=c) for c in range(8)]
    for c in (0, 2, 3, 5):
        engine._slots.drop(engine.block_hashes(chains[c])[0], engine._state.tiers[0])
    result = engine.compact_cache()
    assert result == {"moved_blocks": 3, "used_blocks": 4, "free_blocks": 4}  # slots 4, 6, 7 -> 0, 2, 3
    assert sorted(e.slot for e in engine._state.index) == [0, 1, 2, 3]
    for c in (1, 4, 6, 7):
        assert torch.equal(engine.get(chains[c]), make_kv(4, seed=c))
    assert engine.validate_cache_integrity()["is_valid"]


def test_clear_keeps_counters(engine_factory: Any) -> None:
    engine = engine_factory()
    tokens = put_chain(engine, 1, 2)
    engine.lookup(tokens)
    engine.clear_cache()
    s = engine.get_stats()
    assert s["used_blocks"] == 0 and s["cache_hits"] == 2 and engine.lookup(tokens) == 0


def test_concurrent_callers(engine_factory: Any) -> None:
    engine = engine_factory(max_tokens=64, enable_gc=True, gc_threshold=0.75)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(30):
                tokens = put_chain(engine, seed * 1000 + i % 7, 2, seed=i % 7)
                got = engine.get(tokens)
                assert got.shape[2] in (0, 4, 8)
                assert torch.equal(got, make_kv(8, seed=i % 7)[:, :, : got.shape[2]])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine.close()
    assert engine.validate_cache_integrity()["is_valid"]


def test_delegations_import_their_modules_lazily(engine_factory: Any) -> None:
    engine = engine_factory()
    assert engine._persister is None and engine._runner is None


# ---------------------------------------------------------------- invariants


ops = st.lists(
    st.tuples(st.sampled_from(["put", "lookup", "get"]), st.integers(0, 5), st.integers(1, 4)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops, st.sampled_from(["LRU", "LFU", "ADAPTIVE"]), st.sampled_from(["none", "int8"]), st.integers(4, 10)
)
def test_engine_invariants(script: list[tuple[str, int, int]], strategy: str, codec: str, slots: int) -> None:
    with make_engine(
        cache_strategy=strategy, compression_codec=codec, max_tokens=slots * 4, head_dim=8
    ) as engine:
        capacity = engine.get_stats()["num_blocks"]
        lookups = asked = 0
        for op, chain, blocks in script:
            tokens = make_tokens(chain, blocks)
            kv = make_kv(16, seed=chain)[:, :, : len(tokens)]  # a chain's KV does not depend on its length
            if op == "put":
                engine.put(tokens, kv)
            elif op == "lookup":
                engine.lookup(tokens)
                lookups += 1
                asked += blocks
            else:
                got = engine.get(tokens)
                if codec == "none":
                    assert torch.equal(got, kv[:, :, : got.shape[2]])
                else:
                    assert got.shape[2] == 0 or relative_error(kv[:, :, : got.shape[2]], got) <= 0.01
            s = engine.get_stats()
            assert s["used_blocks"] <= capacity
            assert s["cache_hits"] + s["cache_misses"] == asked and s["requests"] == lookups
        report = engine.validate_cache_integrity()
        assert report["is_valid"], report["errors"]
        kept = engine.cached_hashes()
        engine.resize(16)  # 4 slots (x2 with int8): keeps every block that fits
        new_slots = engine.get_stats()["num_blocks"]
        assert engine.validate_cache_integrity()["is_valid"]
        survivors = engine.cached_hashes()
        assert set(survivors) <= set(kept)
        assert len(survivors) == min(len(kept), new_slots) or len(survivors) < new_slots
        engine.compact_cache()
        assert sorted(e.slot for e in engine._state.index) == list(range(len(engine.cached_hashes())))


def test_gc_thread_ends_when_an_unclosed_engine_is_dropped() -> None:
    import gc

    engine = make_engine(enable_gc=True, gc_threshold=0.5)
    for chain in range(8):
        put_chain(engine, chain, 1)
    thread = engine._gc.thread
    assert thread is not None
    del engine
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_put_blocks_raw_keeps_the_parents_whole_chain(engine_factory: Any) -> None:
    engine = engine_factory(cache_strategy="LRU", max_tokens=16)  # 4 slots
    a = make_tokens(1, 3)
    kv = make_kv(12)
    engine.put(a[:8], kv[:, :, :8])
    b = put_chain(engine, 2, 2)
    engine.lookup(b)  # LRU order now: a's tail, a's root, b's tail, b's root
    hashes = engine.block_hashes(a)
    assert engine.put_blocks_raw(hashes[2:], kv[:, :, 8:], parent=hashes[1]) == 1
    assert engine.lookup(a) == 12 and engine.lookup(b) == 4
    assert torch.equal(engine.get(a), kv)
    assert engine.validate_cache_integrity()["is_valid"]
