"""What both clients share, sans I/O: routing (rendezvous over the endpoints, breakers),
deadlines, the calls (lookup, get, put) ready to send, and their accounting; and the common
constructor. The sync and async clients only move bytes.

Invariants: a chain's calls go to its owner by :func:`route_key` and, when the owner's breaker
is open, to the next replica in rendezvous order, so all calls for a chain agree on one
fallback; every call is bounded by one deadline across its retries and replicas.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

from kvcache_engine.client.buffers import RecvPool
from kvcache_engine.client.codec import (
    Head,
    Req,
    field_parser,
    get_tensor_for,
    hashes_body,
    put_frame,
    split_endpoint,
    tokens_list,
)
from kvcache_engine.client.connection import DEFAULT_PORT, ClientGeometry, connection_kwargs, read_connection
from kvcache_engine.client.errors import (
    Attempt,
    CacheProtocolError,
    CacheTimeoutError,
    CircuitBreaker,
    KVCacheClientError,
)
from kvcache_engine.client.metrics import (
    M_BYTES,
    M_ERRORS,
    M_HIT_TOKENS,
    M_HITS,
    M_LATENCY,
    M_MISSES,
    M_REQUESTED_TOKENS,
    M_REQUESTS,
    M_TIMEOUTS,
)
from kvcache_engine.contract import (
    KVCacheConfig,
    ShardMap,
    TokenSource,
    node_id,
    rendezvous_order,
    rendezvous_owner,
    route_key,
)
from kvcache_engine.contract.curve import MOVED_WINDOW_S
from kvcache_engine.core.hashing import chain_hashes
from kvcache_engine.wire import (
    FRAME_CONTENT_TYPE,
    PREFIX_BYTES,
    decode_frame_header,
)

if TYPE_CHECKING:
    import torch

__all__ = ["Call", "ClientBase", "ClientCore", "GetSink"]

log = logging.getLogger("kvcache_engine.client")
T = TypeVar("T")
_ConnT = TypeVar("_ConnT")


@dataclass
class Call(Generic[T]):
    """One cache call ready to send (sans I/O): the chain it is about, the request, the time
    budget, the parser of the answer's body (run inside the breaker's scope) and, for a get,
    the sink its frame is received into."""

    geometry: ClientGeometry
    hashes: list[int]
    req: Req
    budget: float
    parse: Callable[[bytes], T]
    sink: GetSink | None = None
    carried: dict[str, int] | None = None  # client misses this lookup reports (given back if it fails)

    @property
    def root(self) -> int:
        """The chain's placement key (:func:`route_key`)."""
        return route_key(self.hashes, self.geometry.route_depth)


class GetSink:
    """The sans-I/O side of receiving a get's frame: validates its header and picks the tensor
    the payload lands in (a view of ``out``, or a pooled buffer); the connection reads the bytes."""

    def __init__(
        self, core: ClientCore, geometry: ClientGeometry, asked_blocks: int, out: torch.Tensor | None
    ) -> None:
        self._core = core
        self._geometry = geometry
        self._asked_blocks = asked_blocks
        self._out = out
        self.result: torch.Tensor | None = None

    def tensor(self, head: Head, header_len: int, raw_header: bytes) -> torch.Tensor:
        """The tensor to receive the payload into, from the frame header's ``header_len`` bytes."""
        header = decode_frame_header(raw_header)
        body_len = head.content_length - PREFIX_BYTES - header_len
        return get_tensor_for(
            self._geometry, header, self._asked_blocks, body_len, self._out, recv_pool=self._core.recv_pool
        )

    def received(self, head: Head, kv: torch.Tensor) -> None:
        M_BYTES.labels("received").inc(head.content_length)
        self.result = kv


class ClientCore:
    """Routing, breakers, deadlines, encoding and metrics; the subclasses only move bytes."""

    def __init__(
        self,
        endpoints: Sequence[str] | None,
        service: str | None,
        *,
        token: str | None,
        token_file: str | None,
        config: KVCacheConfig | None,
        timeout_s: float,
        min_bandwidth_mib_s: float,
        max_retries: int,
        retry_backoff_s: float,
        failure_threshold: int,
        reset_timeout_s: float,
        put_queue_size: int,
        strict: bool,
        port: int,
        dns_refresh_s: float,
        recv_pool_mb: int = 256,
    ) -> None:
        if (endpoints is None) == (service is None):
            raise ValueError("KVCacheClient: pass exactly one of endpoints=[...] or service='name.ns.svc'")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.min_bandwidth = min_bandwidth_mib_s * 1024 * 1024
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.strict = strict
        self.put_queue_size = put_queue_size
        self.recv_pool = RecvPool(recv_pool_mb * 1024 * 1024)
        self._token = TokenSource(token, token_file, on_error=lambda message: self._warn("token", message))
        self._breaker_args = (failure_threshold, reset_timeout_s)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()
        self._geometry = ClientGeometry.from_config(config) if config is not None else None
        self._service = service
        self._port = port
        self._dns_refresh_s = dns_refresh_s
        self._resolved_at = 0.0
        self._endpoints: list[str] = [self._normalise(e) for e in endpoints] if endpoints is not None else []
        self._last_warning: dict[str, float] = {}  # before _resolve(), which may warn
        self._missed: dict[str, int] = {}  # blocks failed lookups/gets missed, not yet reported
        self._before: list[str] = []  # the endpoints before the last change of the set ...
        self._changed_at = -1e18  # ... and when it changed (monotonic)
        self._epoch = -1  # the shard map in use (-1: none; endpoints from the list or DNS)
        self._connection: str | None = None  # a mounted contract re-read for newer shard maps
        self._connection_read_at = 0.0
        if service is not None:
            self._resolve()

    # -- configuration ----------------------------------------------------------------

    @staticmethod
    def _normalise(endpoint: str) -> str:
        host, port = split_endpoint(endpoint)
        return f"http://{node_id(f'{host}:{port}')}"

    def _resolve(self) -> None:
        """Endpoints of a headless Service: one per A record (pod IP), re-resolved periodically."""
        assert self._service is not None
        host, _, port_text = self._service.partition(":")
        port = int(port_text) if port_text else self._port
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self._warn("dns", f"cannot resolve service {host!r}: {exc}")
            infos = []
        ips = sorted({str(info[4][0]) for info in infos})
        with self._lock:
            if ips or not self._endpoints:
                fresh = [self._normalise(f"{ip}:{port}" if ":" not in ip else f"[{ip}]:{port}") for ip in ips]
                if self._endpoints and fresh != self._endpoints:
                    self._before, self._changed_at = self._endpoints, time.monotonic()
                self._endpoints = fresh
            self._resolved_at = time.monotonic()

    def endpoints(self) -> list[str]:
        """Current endpoints: the shard map's members once one is in use (a followed connection
        contract is re-read every ``dns_refresh_s``), else the service's addresses (re-resolved
        every ``dns_refresh_s``) or the given list."""
        now = time.monotonic()
        if self._connection is not None and now - self._connection_read_at > self._dns_refresh_s:
            self._read_shard_map()
        if self._epoch < 0 and self._service is not None and now - self._resolved_at > self._dns_refresh_s:
            self._resolve()
        return list(self._endpoints)

    def use_shard_map(self, epoch: int, members: Sequence[str]) -> bool:
        """Place chains over ``members`` from now on, if ``epoch`` is newer than the map in use
        (an older or equal epoch is ignored: maps may arrive out of order). Returns whether the
        client switched. Members must be non-empty (ValueError otherwise)."""
        shard_map = ShardMap.of(epoch, members)
        if not shard_map.members:
            raise ValueError("use_shard_map: members must not be empty")
        fresh = [self._normalise(m) for m in shard_map.members]
        with self._lock:
            if shard_map.epoch <= self._epoch:
                return False
            if self._endpoints and fresh != self._endpoints:
                self._before, self._changed_at = self._endpoints, time.monotonic()
            self._endpoints, self._epoch = fresh, shard_map.epoch
        log.info("kvcache client: shard map epoch %d: %s", shard_map.epoch, ", ".join(shard_map.members))
        return True

    @property
    def shard_map_epoch(self) -> int | None:
        """The epoch of the shard map in use (None: none yet)."""
        return None if self._epoch < 0 else self._epoch

    def follow_connection(self, path: str | os.PathLike[str]) -> None:
        """Re-read the mounted connection contract at ``path`` (kubelet updates it in place) and
        switch to each newer shard map it publishes."""
        self._connection = os.fspath(path)
        self._read_shard_map()

    def _read_shard_map(self) -> None:
        assert self._connection is not None
        self._connection_read_at = time.monotonic()
        try:
            shard_map = ShardMap.from_connection(read_connection(self._connection), self._connection)
        except ValueError as exc:  # a half-written update: keep the map in use, say so (rate-limited)
            self._warn("shard-map", str(exc))
            return
        if shard_map is not None and shard_map.members:
            self.use_shard_map(shard_map.epoch, shard_map.members)

    def token(self) -> str | None:
        """The bearer token; a token file is re-read (at most once a second) so that rotated
        Secrets take effect without a restart."""
        return self._token.get()

    def breaker(self, endpoint: str) -> CircuitBreaker:
        with self._lock:
            br = self._breakers.get(endpoint)
            if br is None:
                threshold, reset = self._breaker_args
                br = self._breakers[endpoint] = CircuitBreaker(endpoint, threshold, reset)
            return br

    def _warn(self, key: str, message: str) -> None:
        # Rate-limited: a dead engine must not flood the inference server's log.
        now = time.monotonic()
        if now - self._last_warning.get(key, -1e9) >= 10.0:
            self._last_warning[key] = now
            log.warning("kvcache client: %s", message)
        else:
            log.debug("kvcache client: %s", message)

    def set_geometry(self, doc: dict[str, Any]) -> ClientGeometry:
        cfg = KVCacheConfig.model_validate(doc)
        self._geometry = ClientGeometry.from_config(cfg)
        return self._geometry

    # -- routing ----------------------------------------------------------------

    def route(self, root: int) -> list[str]:
        """Endpoints to try for a chain whose :func:`route_key` is ``root``, in rendezvous order
        (callers skip those whose breaker is open)."""
        return rendezvous_order(root, self.endpoints())

    def deadline_for(self, nbytes: int) -> float:
        """Seconds allowed for a call moving ``nbytes``: the base timeout plus transfer time at
        the configured minimum bandwidth."""
        return self.timeout_s + nbytes / self.min_bandwidth

    def retry_delay(self, attempt: int, deadline: float) -> float | None:
        """Backoff before retrying a connection error after ``attempt`` retries (exponential from
        ``retry_backoff_s``), or None when no retry is left or the wait would pass ``deadline``."""
        if attempt >= self.max_retries:
            return None
        delay = self.retry_backoff_s * (2**attempt)
        return None if time.monotonic() + delay >= deadline else delay

    def attempts(self, root: int | None) -> Iterator[tuple[str, Attempt]]:
        """The endpoints to try for chain ``root`` in rendezvous order (every endpoint for
        ``None``: the geometry, which any replica serves), each with the scope that reports the
        attempt to its breaker; those whose breaker refuses are skipped (asked lazily, just
        before each attempt)."""
        for endpoint in self.endpoints() if root is None else self.route(root):
            br = self.breaker(endpoint)
            if br.allow():
                yield endpoint, Attempt(br)

    # -- requests ----------------------------------------------------------------

    def lookup_call(self, geometry: ClientGeometry, tokens: Any) -> Call[int] | None:
        """The lookup of ``tokens`` (None when they hold no full block: nothing to ask)."""
        hashes = self.hashes(geometry, tokens)
        if not hashes:
            return None
        carried = self._take_missed()
        moved = self.moved(route_key(hashes, geometry.route_depth)) or None
        body = hashes_body(hashes, namespace=geometry.namespace, moved=moved, client_misses=carried or None)
        req = Req("POST", "/v1/lookup", "application/json", [body])
        parse = field_parser("cached_blocks", len(hashes))
        return Call(geometry, hashes, req, self.timeout_s, parse, carried=carried or None)

    def get_call(self, geometry: ClientGeometry, tokens: Any, out: torch.Tensor | None) -> Call[bytes] | None:
        """The get of ``tokens`` (None when they hold no full block); its frame is received
        into ``call.sink`` (into ``out`` when that is large enough)."""
        hashes = self.hashes(geometry, tokens)
        if not hashes:
            return None
        budget = self.deadline_for(len(hashes) * geometry.block_bytes())
        req = Req("POST", "/v1/get", "application/json", [hashes_body(hashes)])
        return Call(geometry, hashes, req, budget, bytes, GetSink(self, geometry, len(hashes), out))

    def put_call(self, geometry: ClientGeometry, tokens: Any, kv: torch.Tensor) -> Call[int] | None:
        """The put of the full blocks of ``tokens`` with their KV (None when there is none)."""
        hashes = self.hashes(geometry, tokens)
        if not hashes:
            return None
        head, payload = put_frame(geometry, hashes, kv)
        budget = self.deadline_for(payload.nbytes)
        req = Req("POST", "/v1/put", FRAME_CONTENT_TYPE, [head, payload])
        return Call(geometry, hashes, req, budget, field_parser("stored_blocks", len(hashes)))

    # -- encoding ----------------------------------------------------------------

    def hashes(self, geometry: ClientGeometry, tokens: Any) -> list[int]:
        return [int(h) for h in chain_hashes(geometry.namespace, tokens_list(tokens), geometry.block_tokens)]

    # -- outcomes ----------------------------------------------------------------

    def moved(self, root: int) -> bool:
        """Whether the chain keyed ``root`` changed owner with the replica set lately (within
        MOVED_WINDOW_S): its owner then never saw it, and says so to its curve."""
        with self._lock:
            before, since = self._before, time.monotonic() - self._changed_at
        if not before or since >= MOVED_WINDOW_S:
            return False
        now = self.endpoints()
        return bool(now) and node_id(rendezvous_owner(root, before)) != node_id(rendezvous_owner(root, now))

    def _take_missed(self) -> dict[str, int]:
        """The client misses not reported yet (the next lookup carries them to its engine)."""
        with self._lock:
            missed, self._missed = self._missed, {}
        return missed

    def note_missed(self, call: Call[Any] | None, exc: BaseException) -> None:
        """A lookup or get failed: its blocks are misses the engines never saw (reported with the
        next lookup as ``client_timeout`` or ``client_error``), and so are those it carried."""
        if call is None:
            return
        reason = "client_timeout" if isinstance(exc, CacheTimeoutError) else "client_error"
        with self._lock:
            self._missed[reason] = self._missed.get(reason, 0) + len(call.hashes)
            for r, blocks in (call.carried or {}).items():
                self._missed[r] = self._missed.get(r, 0) + blocks

    def lookup_failed(self, call: Call[int] | None, exc: BaseException, started: float) -> None:
        """Count a failed lookup (``call`` None when it failed before it was built); re-raise in
        strict mode."""
        self.note_missed(call, exc)
        self.fail("lookup", exc, started)

    def fail(self, op: str, exc: BaseException, started: float) -> None:
        """Count a failed call; re-raise in strict mode."""
        err = (
            exc if isinstance(exc, KVCacheClientError) else CacheProtocolError(f"{type(exc).__name__}: {exc}")
        )
        kind = err.kind
        M_REQUESTS.labels(op, kind).inc()
        M_ERRORS.labels(op, kind).inc()
        if isinstance(err, CacheTimeoutError):
            M_TIMEOUTS.labels(op).inc()
        M_LATENCY.labels(op).observe(time.perf_counter() - started)
        self._warn(f"{op}:{kind}", f"{op} failed ({kind}): {err}")
        if self.strict:
            raise err from (exc if err is not exc else None)

    def ok(self, op: str, started: float) -> None:
        M_REQUESTS.labels(op, "ok").inc()
        M_LATENCY.labels(op).observe(time.perf_counter() - started)

    def lookup_done(self, call: Call[int], blocks: int, started: float) -> int:
        """Count a successful lookup that found ``blocks`` blocks; the cached tokens."""
        hit = blocks * call.geometry.block_tokens
        self.count_lookup(len(call.hashes) * call.geometry.block_tokens, hit)
        self.ok("lookup", started)
        return hit

    def get_done(self, call: Call[bytes], started: float) -> torch.Tensor | None:
        """Count a successful get; its result (None when nothing was cached)."""
        kv = call.sink.result if call.sink is not None else None
        n = 0 if kv is None else int(kv.shape[2])
        self.count_lookup(len(call.hashes) * call.geometry.block_tokens, n)
        self.ok("get", started)
        return kv if n else None

    def get_failed(self, exc: BaseException, started: float, call: Call[bytes] | None = None) -> None:
        """Count a failed get (a miss of nothing requested); re-raise in strict mode."""
        self.note_missed(call, exc)
        self.fail("get", exc, started)
        self.count_lookup(0, 0)

    @staticmethod
    def count_lookup(requested_tokens: int, hit_tokens: int) -> None:
        M_REQUESTED_TOKENS.inc(requested_tokens)
        if hit_tokens:
            M_HITS.inc()
            M_HIT_TOKENS.inc(hit_tokens)
        else:
            M_MISSES.inc()


# --- what both clients share ----------------------------------------------------------------


class ClientBase(Generic[_ConnT]):
    """The constructor (parameters: see :class:`KVCacheClient`), the connection contract and
    the breakers of both clients. A subclass sets up its own put queue and worker in
    :meth:`_init_io` and only moves bytes: routing, encoding and accounting are ``_core``'s."""

    def __init__(
        self,
        endpoints: Sequence[str] | None = None,
        *,
        service: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
        config: KVCacheConfig | None = None,
        timeout_s: float = 0.05,
        min_bandwidth_mib_s: float = 200.0,
        max_retries: int = 2,
        retry_backoff_s: float = 0.005,
        failure_threshold: int = 3,
        reset_timeout_s: float = 1.0,
        put_queue_size: int = 64,
        pool_size: int = 8,
        strict: bool = False,
        port: int = DEFAULT_PORT,
        dns_refresh_s: float = 30.0,
        recv_pool_mb: int = 256,
    ) -> None:
        self._core = ClientCore(
            endpoints, service, token=token, token_file=token_file, config=config, timeout_s=timeout_s,
            min_bandwidth_mib_s=min_bandwidth_mib_s, max_retries=max_retries, retry_backoff_s=retry_backoff_s,
            failure_threshold=failure_threshold, reset_timeout_s=reset_timeout_s,
            put_queue_size=put_queue_size, strict=strict, port=port, dns_refresh_s=dns_refresh_s,
            recv_pool_mb=recv_pool_mb,
        )  # fmt: skip
        self._pool: dict[str, list[_ConnT]] = {}
        self._pool_size = pool_size
        self._init_io()

    def _init_io(self) -> None:
        """Set up the subclass's own I/O state (called last in ``__init__``)."""
        raise NotImplementedError

    @classmethod
    def from_connection(cls, path: str | os.PathLike[str], **overrides: Any) -> Self:
        """A client for the KVCache whose ``<name>-connection`` ConfigMap is mounted at ``path``
        (see :func:`read_connection`): the headless Service and port, the geometry (no
        ``/v1/config`` round trip), and the token file (:func:`connection_token_file`).
        ``overrides`` are constructor arguments (``timeout_s=...``, ``endpoints=[...]``, ...).
        ValueError when the contract is unreadable or of an unknown ``formatVersion``."""
        client = cls(**connection_kwargs(path, overrides))
        if "endpoints" not in overrides:
            client._core.follow_connection(path)
        return client

    def use_shard_map(self, epoch: int, members: Sequence[str]) -> bool:
        """Place chains over ``members`` (``host:port`` or URLs) once ``epoch`` is newer than the
        shard map in use; returns whether the client switched. A client made by
        :meth:`from_connection` does this itself from the mounted contract's ``shardMapEpoch``
        and ``members``; a client that learns maps another way (a watch, a sidecar) calls it."""
        return self._core.use_shard_map(epoch, members)

    @property
    def strict(self) -> bool:
        """Whether failures raise :class:`KVCacheClientError` instead of degrading to 0/None."""
        return self._core.strict

    def breaker(self, endpoint: str) -> CircuitBreaker:
        """The circuit breaker of one endpoint (``http://host:port``)."""
        return self._core.breaker(self._core._normalise(endpoint))
