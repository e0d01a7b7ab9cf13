"""contract.sizing: the one formula, and the live envelope the pod's memory covers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvcache_engine.contract import (
    KVCacheConfig,
    LiveConfig,
    achieved_compression_ratio,
    memory_request_bytes,
    pool_blocks,
    pool_bytes,
    tier_blocks,
)

GEOMETRY = {"num_layers": 4, "num_kv_heads": 2, "head_dim": 64, "block_tokens": 16}


def test_max_tokens_is_an_fp16_budget_and_codecs_fit_more_blocks() -> None:
    fp16 = KVCacheConfig(max_tokens=16 * 100, **GEOMETRY)
    int8 = KVCacheConfig(max_tokens=16 * 100, use_compression=True, **GEOMETRY)
    assert pool_blocks(fp16) == 100
    assert pool_blocks(int8) == 100 * fp16.block_bytes_fp16() // int8.block_bytes_stored() > 100
    assert tier_blocks(fp16) == 0
    assert tier_blocks(fp16.model_copy(update={"cpu_tier_tokens": 160})) == 10


def test_memory_pool_size_sizes_the_pool_and_max_tokens_reports_it() -> None:
    config = KVCacheConfig(**GEOMETRY)
    config.memory_pool_size = 50 * config.block_bytes_fp16()
    assert pool_blocks(config) == 50
    assert config.max_tokens == 50 * 16  # the config says what the pool holds, not a stale budget


def test_achieved_ratio_of_int4_is_above_an_aggressive_request() -> None:
    config = KVCacheConfig(use_compression=True, compression_ratio=0.2, **GEOMETRY)
    assert config.codec == "int4"
    assert achieved_compression_ratio(config) > 0.3


@given(
    max_tokens=st.integers(16, 1 << 16),
    use_compression=st.booleans(),
    ratio=st.floats(0.1, 1.0),
    on_gpu=st.booleans(),
)
def test_the_request_covers_every_live_value_inside_the_ceiling(
    max_tokens: int, use_compression: bool, ratio: float, on_gpu: bool
) -> None:
    """Invariant: for any live change within the ceiling, the engine's host bytes fit the request
    computed before the change, and the request itself does not move."""
    base = KVCacheConfig(max_tokens=1 << 16, cpu_tier_tokens=1 << 10, **GEOMETRY)
    before = memory_request_bytes(base, pool_on_gpu=on_gpu, overhead_bytes=0, max_tokens_ceiling=1 << 16)
    changed = LiveConfig(max_tokens=max_tokens, use_compression=use_compression, compression_ratio=ratio)
    after_config = changed.apply(base)
    host = pool_bytes(after_config) if not on_gpu else 0
    assert host <= before
    after = memory_request_bytes(
        after_config, pool_on_gpu=on_gpu, overhead_bytes=0, max_tokens_ceiling=1 << 16
    )
    assert after == before
