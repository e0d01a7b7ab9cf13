"""Tiny worlds for the engine tests: small geometries, deterministic KV, scripted chains."""

from __future__ import annotations

from typing import Any

import torch

from kvcache_engine import KVCacheConfig
from kvcache_engine.engine import KVCacheEngine

GEOMETRY: dict[str, Any] = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_tokens": 4}


def make_config(**overrides: Any) -> KVCacheConfig:
    """A CPU config with a 4-token block and room for ``max_tokens // 4`` blocks (default 8)."""
    fields: dict[str, Any] = {**GEOMETRY, "device": "cpu", "max_tokens": 32, "enable_gc": False}
    fields.update(overrides)
    return KVCacheConfig(**fields)


def make_engine(**overrides: Any) -> KVCacheEngine:
    return KVCacheEngine(make_config(**overrides))


def make_tokens(chain: int, blocks: int, block_tokens: int = 4, extra: int = 0) -> list[int]:
    """Tokens of ``blocks`` full blocks (plus ``extra`` trailing tokens) unique to ``chain``."""
    return [chain * 100_000 + i for i in range(blocks * block_tokens + extra)]


def make_kv(
    num_tokens: int, seed: int = 0, dtype: torch.dtype = torch.float16, **geometry: int
) -> torch.Tensor:
    """Random normal KV ``[2, L, num_tokens, H, D]`` for the test geometry (or ``geometry``)."""
    g = {**GEOMETRY, **geometry}
    gen = torch.Generator().manual_seed(seed)
    shape = (2, g["num_layers"], num_tokens, g["num_kv_heads"], g["head_dim"])
    return torch.randn(shape, generator=gen).to(dtype)


def snapshot(engine: KVCacheEngine) -> tuple[list[int], dict[str, Any], list[str]]:
    """What a rejected call must leave untouched: cached hashes, counters, stored checksums."""
    stats = engine.get_stats()
    counters = {
        k: stats[k]
        for k in ("cache_hits", "cache_misses", "requests", "evictions", "bytes_in", "used_blocks")
    }
    checksums = [b.checksum for b in engine.export_blocks()]
    return list(engine.cached_hashes()), counters, checksums
