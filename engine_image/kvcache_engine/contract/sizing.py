"""The one sizing formula: blocks, tier blocks, pool bytes, pod memory, bytes per token.

The engine allocates with these functions and the operator sizes pods with them, so the memory a
pod requests is the memory its engine allocates. ``max_tokens`` is a budget in fp16-equivalent
bytes: with a codec, as many compressed blocks fit as the fp16 bytes allow.
"""

from __future__ import annotations

from typing import get_args

from kvcache_engine.contract.cache import SLOT_OVERHEAD_BYTES, Codec, ConfigError, KVCacheConfig

__all__ = [
    "STAGING_MB_DEFAULT",
    "achieved_compression_ratio",
    "bytes_per_token",
    "memory_request_bytes",
    "pool_blocks",
    "pool_bytes",
    "staging_bytes",
    "tier_blocks",
    "tier_bytes",
]

STAGING_MB_DEFAULT = 256
"""Default of ``kvcache-engine serve --staging-mb``: reusable host buffers for get responses."""


def bytes_per_token(config: KVCacheConfig) -> float:
    """Stored bytes per cached token with the configured codec."""
    return config.block_bytes_stored() / config.block_tokens


def achieved_compression_ratio(config: KVCacheConfig) -> float:
    """Stored bytes / fp16 bytes of one block with the configured codec and geometry (what a
    ``compression_ratio`` request turns into: int4 cannot go below its scales' share)."""
    return config.block_bytes_stored() / config.block_bytes_fp16()


def _budget_blocks(config: KVCacheConfig, tokens: int) -> int:
    return max(1, (tokens // config.block_tokens) * config.block_bytes_fp16() // config.block_bytes_stored())


def pool_blocks(config: KVCacheConfig) -> int:
    """Block slots of the primary pool: ``memory_pool_size`` bytes when set, else the
    ``max_tokens`` fp16 budget; at least one."""
    if config.memory_pool_size is not None:
        return max(1, config.memory_pool_size // config.block_bytes_stored())
    return _budget_blocks(config, config.max_tokens)


def pool_bytes(config: KVCacheConfig) -> int:
    """Bytes of the primary pool plus slot bookkeeping (index entry, checksums, eviction node)."""
    return pool_blocks(config) * (config.block_bytes_stored() + SLOT_OVERHEAD_BYTES)


def tier_blocks(config: KVCacheConfig) -> int:
    """Block slots of the pinned CPU tier behind a CUDA pool (``cpu_tier_tokens`` as its fp16
    budget, at least one slot); 0 without a tier."""
    if config.cpu_tier_tokens == 0:
        return 0
    return _budget_blocks(config, config.cpu_tier_tokens)


def tier_bytes(config: KVCacheConfig) -> int:
    """Host bytes of the CPU tier plus slot bookkeeping (0 without a tier)."""
    return tier_blocks(config) * (config.block_bytes_stored() + SLOT_OVERHEAD_BYTES)


def staging_bytes(staging_mb: int = STAGING_MB_DEFAULT) -> int:
    """Host bytes the server may hold in reusable get buffers (``serve --staging-mb``). They are
    CPU tensors whatever the pool's device, so the pod's memory request adds them to the pool."""
    if staging_mb < 0:
        raise ConfigError(f"staging_mb must be >= 0, got {staging_mb}")
    return staging_mb * 2**20


def _host_bytes(config: KVCacheConfig, *, pool_on_gpu: bool) -> int:
    return tier_bytes(config) if pool_on_gpu else pool_bytes(config)


def memory_request_bytes(
    config: KVCacheConfig,
    *,
    pool_on_gpu: bool,
    overhead_bytes: int,
    staging_mb: int = STAGING_MB_DEFAULT,
    max_tokens_ceiling: int | None = None,
) -> int:
    """Host memory an engine pod needs over its whole live range: the host-resident pool (or the
    CPU tier behind a GPU pool), the server's get buffers and ``overhead_bytes``.

    Live fields change without a restart, so the request must not depend on them: it is the
    largest host footprint over every codec (compression is live) at ``max_tokens_ceiling`` (the
    largest ``max_tokens`` the live path may set; default the config's own). Retuning inside
    that envelope never changes the pod."""
    ceiling = config.max_tokens if max_tokens_ceiling is None else max_tokens_ceiling
    host = 0
    for codec in get_args(Codec):
        variant = config.model_copy(
            update={"compression_codec": codec, "max_tokens": ceiling, "memory_pool_size": None}
        )
        host = max(host, _host_bytes(variant, pool_on_gpu=pool_on_gpu))
    return host + staging_bytes(staging_mb) + overhead_bytes
