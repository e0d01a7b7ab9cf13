"""CacheAnalyzer on a real engine's access history: the curve's prediction is checked by
applying the recommended config change and replaying the same traffic."""

from __future__ import annotations

import torch

from kvcache_engine.analytics import CacheAnalyzer, PerformanceAnalyzer
from kvcache_engine.engine import KVCacheEngine

BT = 4


def make_engine(max_tokens: int) -> KVCacheEngine:
    return KVCacheEngine(
        max_tokens=max_tokens,
        block_tokens=BT,
        num_layers=1,
        num_kv_heads=1,
        head_dim=4,
        dtype="float16",
        device="cpu",
        cache_strategy="LRU",
        enable_gc=False,  # keep eviction inline so the pool holds exactly num_blocks
    )


def replay(engine: KVCacheEngine, prompts: int, blocks: int, rounds: int) -> float:
    """Round-robin over ``prompts`` distinct prompts: lookup, and put on a miss. Returns the
    engine's hit rate over this replay."""
    before = engine.get_stats()
    for _ in range(rounds):
        for p in range(prompts):
            tokens = [p * 1000 + t for t in range(blocks * BT)]
            if engine.lookup(tokens) < len(tokens):
                engine.put(tokens, torch.zeros(2, 1, len(tokens), 1, 4, dtype=torch.float16))
    after = engine.get_stats()
    return (after["hit_tokens"] - before["hit_tokens"]) / (
        after["requested_tokens"] - before["requested_tokens"]
    )


def test_recommended_capacity_achieves_the_estimated_hit_rate() -> None:
    engine = make_engine(max_tokens=64)  # 16 blocks for a 32-block cyclic working set
    assert engine.get_stats()["num_blocks"] == 16
    assert replay(engine, prompts=8, blocks=4, rounds=4) == 0.0  # LRU thrashes

    report = CacheAnalyzer(engine).analyze_access_patterns()
    [finding] = report.findings
    assert finding.area == "capacity"
    assert finding.evidence["estimated_hit_rate"] == 0.0
    assert finding.evidence["hit_rate_ceiling"] == 0.75
    assert finding.recommendation == {"max_tokens": 128}
    bottlenecks = {f.area: f for f in PerformanceAnalyzer(engine).identify_bottlenecks()}
    assert set(bottlenecks) == {"hit_rate", "memory"}  # thrashing: evicting at a full pool
    assert bottlenecks["hit_rate"].evidence["hit_rate"] == 0.0
    assert bottlenecks["memory"].evidence["memory_pressure"] == 1.0

    engine.reconfigure(**finding.recommendation)
    engine.clear_cache()
    assert (
        replay(engine, prompts=8, blocks=4, rounds=4) == finding.evidence["estimated_hit_rate_at_recommended"]
    )


def test_history_is_bounded() -> None:
    engine = make_engine(max_tokens=64)
    long_prompt = list(range(4 * 1000))
    for _ in range(1500):
        engine.lookup(long_prompt)
    history = engine.access_history()
    assert len(history) == 1024
    assert all(len(hashes) == 128 for hashes, _ in history)
