"""Pool memory: fragmentation of the slot range (and compaction), and pools that do not fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvcache_engine.contract import ConfigError
from kvcache_engine.core import tiers
from kvcache_engine.core.tiers import PoolAllocationError, available_bytes
from tests.engine.helpers import make_kv, make_tokens

LENGTHS = (2, 3, 1, 4, 2, 3)  # blocks per chain: 15 of 16 slots, in put order


def _churned(engine_factory: Any) -> tuple[Any, dict[int, tuple[list[int], torch.Tensor]]]:
    """16 slots; chains of varying length fill slots 0-14; the odd chains are looked up (most
    recent); gc at threshold 0.625 (10 blocks) then evicts the even chains' blocks (LRU) and leaves holes."""
    engine = engine_factory(max_tokens=64, cache_strategy="LRU")
    chains = {}
    for i, blocks in enumerate(LENGTHS):
        tokens = make_tokens(i, blocks)
        kv = make_kv(len(tokens), seed=i)
        engine.put(tokens, kv)
        chains[i] = (tokens, kv)
    assert engine.get_stats()["pool_fragmentation"] == 0.0  # filled in order: packed
    for i in range(1, len(LENGTHS), 2):
        engine.lookup(chains[i][0])
    engine.reconfigure(enable_gc=True, gc_threshold=0.625)
    engine.run_gc()
    return engine, chains


def test_churn_leaves_holes_and_compaction_packs_them_bit_exact(engine_factory: Any) -> None:
    engine, chains = _churned(engine_factory)
    stats = engine.get_stats()
    # Even chains (2 + 1 + 2 = 5 blocks) all evicted: 10 odd-chain blocks over slots 0-14.
    assert stats["used_blocks"] == 10 and stats["evictions"] == 5
    assert stats["pool_fragmentation"] == pytest.approx(1 - 10 / 15)
    result = engine.compact_cache()
    # Holes 0, 1, 5 below used=10 take the blocks of slots 12-14.
    assert result == {"moved_blocks": 3, "used_blocks": 10, "free_blocks": 6}
    assert engine.get_stats()["pool_fragmentation"] == 0.0
    report = engine.validate_cache_integrity()
    assert report["is_valid"], report["errors"]
    for i, (tokens, kv) in chains.items():
        cached = len(tokens) if i % 2 else 0
        assert engine.lookup(tokens) == cached
        assert torch.equal(engine.get(tokens), kv[:, :, :cached])
    # New blocks now take consecutive slots after the packed ones (background GC off: an eviction
    # racing this assert would punch a hole and make the test flaky).
    engine.reconfigure(enable_gc=False)
    engine.put(make_tokens(9, 3), make_kv(12, seed=9))
    assert engine.get_stats()["pool_fragmentation"] == 0.0


def test_fragmentation_is_zero_when_empty(engine_factory: Any) -> None:
    engine = engine_factory()
    assert engine.get_stats()["pool_fragmentation"] == 0.0
    engine.put(make_tokens(1, 2), make_kv(8))
    engine.clear_cache()
    assert engine.get_stats()["pool_fragmentation"] == 0.0


# ---------------------------------------------------------------- pools that do not fit


def test_a_pool_larger_than_the_host_is_refused_naming_max_tokens(engine_factory: Any) -> None:
    # 2**31 tokens of 128 B each: 256 GiB, more than this host can give.
    with pytest.raises(PoolAllocationError) as err:
        engine_factory(max_tokens=2**31)
    message = str(err.value)
    assert "max_tokens=2147483648 (536870912 blocks of 512 bytes, codec none)" in message
    assert f"asks {2**38} bytes (256.0 GiB) on cpu" in message
    assert "lower max_tokens" in message and "use_compression" in message and "cpu_tier_tokens" in message
    assert isinstance(err.value, ConfigError)  # the CLI prints it and exits 2, no traceback


def test_memory_pool_size_is_named_when_it_sizes_the_pool(
    engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiers, "available_bytes", lambda device: (4096, "available host memory"))
    with pytest.raises(
        PoolAllocationError, match=r"memory_pool_size=8192 \(16 blocks .* asks 8192 bytes .* 4096 bytes"
    ):
        engine_factory(memory_pool_size=8192)


def test_a_live_resize_that_does_not_fit_is_refused_and_keeps_the_cache(
    engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_factory()
    tokens, kv = make_tokens(1, 2), make_kv(8)
    engine.put(tokens, kv)
    monkeypatch.setattr(tiers, "available_bytes", lambda device: (1024, "available host memory"))
    with pytest.raises(PoolAllocationError, match=r"max_tokens=64 \(16 blocks"):
        engine.reconfigure(max_tokens=64)
    assert engine.config.max_tokens == 32 and engine.get_stats()["num_blocks"] == 8
    assert torch.equal(engine.get(tokens), kv)


def test_an_allocator_failure_gets_the_same_message(
    engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a fragmented GPU does: free memory suffices on paper, the allocator still refuses."""

    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 KiB")

    monkeypatch.setattr(tiers, "BlockPool", oom)
    with pytest.raises(PoolAllocationError, match=r"max_tokens=32 .*\(allocator: CUDA out of memory"):
        engine_factory()


def test_a_non_memory_error_while_allocating_keeps_its_traceback(
    engine_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(tiers, "BlockPool", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        engine_factory()


@pytest.mark.parametrize(
    ("limit", "usage", "expected"),
    [("1000000", "400000", (600000, "left under the container's memory limit")), ("max", "400000", None)],
)
def test_cpu_availability_is_capped_by_the_container_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str, usage: str, expected: Any
) -> None:
    (tmp_path / "max").write_text(limit + "\n")
    (tmp_path / "current").write_text(usage + "\n")
    monkeypatch.setattr(tiers, "_CGROUP_FILES", ((str(tmp_path / "max"), str(tmp_path / "current")),))
    got = available_bytes(torch.device("cpu"))
    if expected is None:
        assert got[1] == "available host memory" and got[0] > 0
    else:
        assert got == expected
