"""kvcache_engine: a KV cache engine for LLM inference (block pool, prefix index, eviction,
compression, tiers, persistence, HTTP service).

``KVCacheConfig`` and ``CacheStrategy`` import without torch (the operator uses them);
``KVCacheEngine`` and the analytics load torch on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvcache_engine.contract.cache import CacheStrategy, KVCacheConfig

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kvcache_engine.engine import KVCacheEngine

__all__ = ["CacheStrategy", "KVCacheConfig", "KVCacheEngine", "UltraAdaptiveKVCacheEngine", "__version__"]

_LAZY = {
    "KVCacheEngine": ("kvcache_engine.engine", "KVCacheEngine"),
    # The seed's name for the engine.
    "UltraAdaptiveKVCacheEngine": ("kvcache_engine.engine", "KVCacheEngine"),
    "KVCacheClient": ("kvcache_engine.client", "KVCacheClient"),
    "AsyncKVCacheClient": ("kvcache_engine.client", "AsyncKVCacheClient"),
    "PerformanceAnalyzer": ("kvcache_engine.analytics", "PerformanceAnalyzer"),
    "CacheAnalyzer": ("kvcache_engine.analytics", "CacheAnalyzer"),
    "MultiGPULoadBalancer": ("kvcache_engine.analytics", "MultiGPULoadBalancer"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kvcache_engine' has no attribute {name!r}")
