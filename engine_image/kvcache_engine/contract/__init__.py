"""The operator–engine contract (torch-free): the only engine package the operator imports.

* ``cache``     — ``KVCacheConfig``: the user-facing cache spec (the CRD's ``spec.cache``) and the
                  engine's runtime config; payload layouts per codec.
* ``live``      — ``LiveConfig``: the fields that change without a restart (diff/apply, camelCase on
                  the wire, snake_case in Python, converted there and only there).
* ``sizing``    — the one sizing formula: blocks, tier blocks, pool bytes, pod memory, bytes/token.
* ``metrics``   — metric names (``M``) and the typed ``EngineStats`` parsed from Prometheus text.
* ``admin``     — endpoint paths (``P``) and the one admin client (``AdminClient``, ``SyncAdminClient``).
* ``tokens``    — the one token resolver (``resolve_token``, ``TokenSource``).
* ``placement`` — route key and rendezvous order (which replica holds a chain), the shard map.
* ``curve``     — the hit-rate curve an engine predicts (``HitRateCurve``), its wire form, the
                  merge across replicas, and the miss reasons (``MISS_REASONS``).
"""

from kvcache_engine.contract.admin import MAX_JSON_BYTES, AdminClient, AdminError, P, SyncAdminClient
from kvcache_engine.contract.cache import (
    CODEC_BYTES_PER_FP16_BYTE,
    CODEC_GROUP_SIZE,
    DTYPE_BYTES,
    SLOT_ALIGN_BYTES,
    SLOT_OVERHEAD_BYTES,
    CacheStrategy,
    Codec,
    ConfigError,
    KVCacheConfig,
    PayloadField,
    PayloadLayout,
    format_validation_error,
    load_config,
    payload_layout,
)
from kvcache_engine.contract.curve import CURVE_MULTIPLES, MISS_REASONS, HitRateCurve, merge_curves
from kvcache_engine.contract.lifecycle import (
    HANDOFF_MIB_S,
    SHUTDOWN_HANDOFF_S,
    WARM_GATE,
    WARM_RATIO_KEY,
    handoff_timeout_s,
    persist_grace_seconds,
    warm_ratio_of,
)
from kvcache_engine.contract.live import LIVE_FIELDS, TUNED_FIELDS, LiveConfig
from kvcache_engine.contract.metrics import EngineStats, M, parse_engine_stats
from kvcache_engine.contract.placement import ShardMap, node_id, rendezvous_order, rendezvous_owner, route_key
from kvcache_engine.contract.sizing import (
    STAGING_MB_DEFAULT,
    achieved_compression_ratio,
    bytes_per_token,
    memory_request_bytes,
    pool_blocks,
    pool_bytes,
    staging_bytes,
    tier_blocks,
    tier_bytes,
)
from kvcache_engine.contract.tokens import TokenError, TokenSource, read_token_file, resolve_token, role_of

__all__ = [
    "CODEC_BYTES_PER_FP16_BYTE",
    "CODEC_GROUP_SIZE",
    "CURVE_MULTIPLES",
    "DTYPE_BYTES",
    "HANDOFF_MIB_S",
    "LIVE_FIELDS",
    "MAX_JSON_BYTES",
    "MISS_REASONS",
    "SHUTDOWN_HANDOFF_S",
    "SLOT_ALIGN_BYTES",
    "SLOT_OVERHEAD_BYTES",
    "STAGING_MB_DEFAULT",
    "TUNED_FIELDS",
    "WARM_GATE",
    "WARM_RATIO_KEY",
    "AdminClient",
    "AdminError",
    "CacheStrategy",
    "Codec",
    "ConfigError",
    "EngineStats",
    "HitRateCurve",
    "KVCacheConfig",
    "LiveConfig",
    "M",
    "P",
    "PayloadField",
    "PayloadLayout",
    "ShardMap",
    "SyncAdminClient",
    "TokenError",
    "TokenSource",
    "achieved_compression_ratio",
    "bytes_per_token",
    "format_validation_error",
    "handoff_timeout_s",
    "load_config",
    "memory_request_bytes",
    "merge_curves",
    "node_id",
    "parse_engine_stats",
    "payload_layout",
    "persist_grace_seconds",
    "pool_blocks",
    "pool_bytes",
    "read_token_file",
    "rendezvous_order",
    "rendezvous_owner",
    "resolve_token",
    "role_of",
    "route_key",
    "staging_bytes",
    "tier_blocks",
    "tier_bytes",
    "warm_ratio_of",
]
