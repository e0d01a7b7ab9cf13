"""``KVCacheClient`` (sync) and ``AsyncKVCacheClient``: the inference side of the engine service.

Promise to the caller: by default **no exception from the cache reaches the inference call**,
and every call returns within its deadline — ``lookup`` answers 0 and ``get`` answers ``None``
when an engine is down, slow, restarting or answering garbage; ``put`` is fire-and-forget
through a bounded queue that drops (and counts) instead of blocking. ``strict=True`` turns
failures into :class:`KVCacheClientError` subclasses for tools that want them.

Placement: a chain lives on one replica, chosen by rendezvous hashing on its block at depth
``route_depth`` (its last block when shorter;
:func:`kvcache_engine.contract.placement.route_key`, the same function the server's drain
uses), so prompts sharing a system prompt spread over the replicas while the shared blocks are
stored on each. When the owner's circuit breaker is open the next replica in rendezvous order
is used, so all calls for a chain agree on one fallback.

Modules: ``errors`` (errors, circuit breaker), ``connection`` (the connection contract,
geometry), ``codec`` (HTTP/1.1 and KV frame encoding, sans I/O), ``buffers`` (byte views,
warm receive buffers), ``core`` (routing, deadlines, calls, accounting, the shared
constructor), ``sync`` (``KVCacheClient``), ``aio`` (``AsyncKVCacheClient``), ``metrics``.

Transport: HTTP/1.1 keep-alive over pooled sockets, with a tiny purpose-built HTTP client so that
the deadline bounds every send and receive (``socket.settimeout(remaining)`` per syscall) and
large gets are received straight into the result tensor's memory (one copy off the wire).
"""

from kvcache_engine.client.aio import AsyncKVCacheClient
from kvcache_engine.client.connection import (
    DEFAULT_PORT,
    SUPPORTED_CONNECTION_VERSIONS,
    ClientGeometry,
    connection_config,
    connection_token_file,
    read_connection,
)
from kvcache_engine.client.errors import (
    CacheProtocolError,
    CacheServerError,
    CacheTimeoutError,
    CacheUnavailableError,
    CircuitBreaker,
    KVCacheClientError,
)
from kvcache_engine.client.metrics import (
    M_BREAKER_OPEN,
    M_BYTES,
    M_ERRORS,
    M_HIT_TOKENS,
    M_HITS,
    M_LATENCY,
    M_MISSES,
    M_PUT_DROPPED,
    M_REQUESTED_TOKENS,
    M_REQUESTS,
    M_TIMEOUTS,
)
from kvcache_engine.client.sync import KVCacheClient

__all__ = [
    "DEFAULT_PORT",
    "M_BREAKER_OPEN",
    "M_BYTES",
    "M_ERRORS",
    "M_HITS",
    "M_HIT_TOKENS",
    "M_LATENCY",
    "M_MISSES",
    "M_PUT_DROPPED",
    "M_REQUESTED_TOKENS",
    "M_REQUESTS",
    "M_TIMEOUTS",
    "SUPPORTED_CONNECTION_VERSIONS",
    "AsyncKVCacheClient",
    "CacheProtocolError",
    "CacheServerError",
    "CacheTimeoutError",
    "CacheUnavailableError",
    "CircuitBreaker",
    "ClientGeometry",
    "KVCacheClient",
    "KVCacheClientError",
    "connection_config",
    "connection_token_file",
    "read_connection",
]
