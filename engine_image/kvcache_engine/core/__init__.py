"""The engine's storage core: block pool and checksums, prefix index, eviction strategies,
compression codecs, tiers, chained block hashes, and the parts of ``KVCacheEngine`` (store,
reservations, GC, transfer, retune, stats).

Rules: the core imports no transport (no aiohttp, no HTTP client, nothing of
``kvcache_engine.server``, ``kvcache_engine.client`` or ``kvcache_engine.wire``); this
``__init__`` imports nothing, so ``kvcache_engine.core.hashing`` stays torch-free.
"""
