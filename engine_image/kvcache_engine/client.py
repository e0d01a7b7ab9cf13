"""``KVCacheClient`` (sync) and ``AsyncKVCacheClient``: the inference side of the engine service.

Promise to the caller: by default **no exception from the cache reaches the inference call**,
and every call returns within its deadline — ``lookup`` answers 0 and ``get`` answers ``None``
when an engine is down, slow, restarting or answering garbage; ``put`` is fire-and-forget
through a bounded queue that drops (and counts) instead of blocking. ``strict=True`` turns
failures into :class:`KVCacheClientError` subclasses for tools that want them.

Placement: a chain lives on one replica, chosen by rendezvous hashing on its block at depth
``route_depth`` (its last block when shorter; :func:`kvcache_engine.wire.route_key`, the same
function the server's drain uses), so prompts sharing a system prompt spread over the replicas
while the shared blocks are stored on each. When the owner's circuit breaker is open the next
replica in rendezvous order is used, so all calls for a chain agree on one fallback.

Transport: HTTP/1.1 keep-alive over pooled sockets, with a tiny purpose-built HTTP client so that
the deadline bounds every send and receive (``socket.settimeout(remaining)`` per syscall) and
large gets are received straight into the result tensor's memory (one copy off the wire).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar
from urllib.parse import urlsplit

from prometheus_client import Counter, Gauge, Histogram

from kvcache_engine.config import DTYPE_BYTES, KVCacheConfig
from kvcache_engine.core.hashing import chain_hashes
from kvcache_engine.wire import (
    FRAME_CONTENT_TYPE,
    PREFIX_BYTES,
    WireError,
    decode_frame_header,
    decode_frame_prefix,
    encode_frame_header,
    node_id,
    rendezvous_order,
    route_key,
)

if TYPE_CHECKING:
    import torch

__all__ = [
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

log = logging.getLogger("kvcache_engine.client")
T = TypeVar("T")
_ConnT = TypeVar("_ConnT")

DEFAULT_PORT = 8080
_MAX_HEAD_BYTES = 64 * 1024
_RECV_CHUNK = 4 * 1024 * 1024

# --- client metrics (module level: prometheus_client registries reject duplicate names) ------
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
M_REQUESTS = Counter("kvcache_client_requests", "Client calls by operation and outcome.", ["op", "outcome"])
M_HITS = Counter("kvcache_client_hits", "Lookups/gets that found at least one cached block.")
M_MISSES = Counter("kvcache_client_misses", "Lookups/gets that found nothing cached (errors included).")
M_HIT_TOKENS = Counter("kvcache_client_hit_tokens", "Cached tokens reported to callers.")
M_REQUESTED_TOKENS = Counter("kvcache_client_requested_tokens", "Full-block tokens asked for.")
M_ERRORS = Counter("kvcache_client_errors", "Failed calls by operation and kind.", ["op", "kind"])
M_TIMEOUTS = Counter("kvcache_client_timeouts", "Calls that ran out of their deadline.", ["op"])
M_BYTES = Counter("kvcache_client_bytes", "Body bytes over the wire.", ["direction"])
M_LATENCY = Histogram(
    "kvcache_client_latency_seconds", "Client call latency.", ["op"], buckets=_LATENCY_BUCKETS
)
M_PUT_DROPPED = Counter("kvcache_client_put_dropped", "Puts dropped because the put queue was full.")
M_BREAKER_OPEN = Gauge("kvcache_client_breaker_open", "1 while an endpoint's breaker is open.", ["endpoint"])


# --- errors ------------------------------------------------------------------------------------


class KVCacheClientError(Exception):
    """Base of the errors raised in strict mode."""

    kind = "error"


class CacheUnavailableError(KVCacheClientError):
    """No endpoint could be reached (connection refused/reset, breaker open, none configured)."""

    kind = "unavailable"


class CacheTimeoutError(KVCacheClientError):
    """The call's deadline passed."""

    kind = "timeout"


class CacheProtocolError(KVCacheClientError):
    """The server answered something that is not a valid response."""

    kind = "protocol"


class CacheServerError(KVCacheClientError):
    """The server answered with an error status."""

    kind = "server"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class _RetryableConnError(CacheUnavailableError):
    """A connection failed before any response byte arrived (safe to retry on a new socket)."""


# --- circuit breaker -----------------------------------------------------------------------------


class CircuitBreaker:
    """Per-endpoint breaker: closed → open after ``failure_threshold`` consecutive failures;
    open → half-open after ``reset_timeout_s`` (doubling per failed probe up to
    ``max_reset_timeout_s``); half-open lets exactly one probe through — its success closes the
    breaker, its failure re-opens it. Thread-safe; asyncio code uses it from one thread."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 3,
        reset_timeout_s: float = 1.0,
        max_reset_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.base_reset_s = reset_timeout_s
        self.max_reset_s = max_reset_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._reset_s = reset_timeout_s
        self._open_until = 0.0
        self._probe_since: float | None = None
        self.state = "closed"

    def allow(self) -> bool:
        """May a call go to this endpoint now? (In half-open, only the one probe may.)"""
        with self._lock:
            now = self._clock()
            if self.state == "closed":
                return True
            if self.state == "open" and now >= self._open_until:
                self.state = "half_open"
                self._probe_since = now
                return True
            # A probe that never reported (its caller vanished) must not wedge the breaker.
            if (
                self.state == "half_open"
                and self._probe_since is not None
                and now - self._probe_since > self._reset_s
            ):
                self._probe_since = now
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self.state = "closed"
            self._failures = 0
            self._reset_s = self.base_reset_s
            self._probe_since = None
        M_BREAKER_OPEN.labels(self.name).set(0)

    def record_failure(self) -> None:
        with self._lock:
            now = self._clock()
            if self.state == "half_open":
                self._reset_s = min(self._reset_s * 2, self.max_reset_s)
                self._open(now)
            else:
                self._failures += 1
                if self._failures >= self.failure_threshold:
                    self._open(now)

    def _open(self, now: float) -> None:
        self.state = "open"
        self._open_until = now + self._reset_s
        self._probe_since = None
        M_BREAKER_OPEN.labels(self.name).set(1)


# --- geometry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientGeometry:
    """What the client must know to hash chains and shape tensors (from config or /v1/config)."""

    namespace: str
    block_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    route_depth: int = 2

    @classmethod
    def from_config(cls, cfg: KVCacheConfig) -> ClientGeometry:
        return cls(
            cfg.namespace, cfg.block_tokens, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype,
            cfg.route_depth,
        )  # fmt: skip

    def block_bytes(self) -> int:
        return (
            2
            * self.num_layers
            * self.block_tokens
            * self.num_kv_heads
            * self.head_dim
            * DTYPE_BYTES[self.dtype]
        )


# --- the connection contract (the operator's ``<name>-connection`` ConfigMap) --------------------

SUPPORTED_CONNECTION_VERSIONS = frozenset({1})
_CONNECTION_REQUIRED = (
    "formatVersion", "headlessService", "port", "tokenSecretKey", "numLayers", "numKvHeads", "headDim",
    "blockTokens", "dtype", "cacheNamespace",
)  # fmt: skip
_CONNECTION_INTS = frozenset({"formatVersion", "port", "numLayers", "numKvHeads", "headDim", "blockTokens",
                              "routeDepth"})  # fmt: skip


def read_connection(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The connection contract from a mounted ConfigMap: a directory holding ``connection.json``
    or one file per key (kubelet's ``..data`` symlink layout is read through), or the JSON file.

    Raises ValueError naming the file and the missing keys, or an unsupported ``formatVersion``.
    """
    where = Path(path)
    if where.is_dir() and not (where / "connection.json").is_file():
        info = _read_key_files(where)
        source = f"{where}/*"
    else:
        file = where / "connection.json" if where.is_dir() else where
        source = str(file)
        try:
            info = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"connection: cannot read {file}: {exc}") from None
        if not isinstance(info, dict):
            raise ValueError(f"connection: {file} must hold a JSON object")
    version = info.get("formatVersion")
    if version not in SUPPORTED_CONNECTION_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_CONNECTION_VERSIONS))
        raise ValueError(
            f"connection: formatVersion {version!r} in {source} is not supported by this client "
            f"(supported: {supported}); upgrade kvcache-engine on the inference side"
        )
    missing = [k for k in _CONNECTION_REQUIRED if k not in info]
    if missing:
        raise ValueError(f"connection: {source} lacks the keys {missing}")
    return info


def _read_key_files(directory: Path) -> dict[str, Any]:
    """One key per file; kubelet's bookkeeping entries (``..data``, ``..2026_...``) start with '..'."""
    info: dict[str, Any] = {}
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("..") or not entry.is_file():
            continue
        text = entry.read_text(encoding="utf-8").strip()
        if entry.name in _CONNECTION_INTS:
            try:
                info[entry.name] = int(text)
            except ValueError:
                raise ValueError(f"connection: {entry}: expected an integer, got {text!r}") from None
        else:
            info[entry.name] = text
    if not info:
        raise ValueError(f"connection: {directory} holds neither connection.json nor any key file")
    return info


def connection_config(info: dict[str, Any]) -> KVCacheConfig:
    """The client-side config (geometry, block size, namespace, placement) of a connection."""
    fields: dict[str, Any] = {
        "num_layers": info["numLayers"],
        "num_kv_heads": info["numKvHeads"],
        "head_dim": info["headDim"],
        "block_tokens": info["blockTokens"],
        "dtype": info["dtype"],
        "namespace": info["cacheNamespace"],
    }
    if "routeDepth" in info:  # absent from contracts published before placement by depth
        fields["route_depth"] = info["routeDepth"]
    try:
        # Capacity is the engine's business; it only has to admit one block to validate.
        return KVCacheConfig(max_tokens=max(8192, int(info["blockTokens"])), **fields)
    except ValueError as exc:
        raise ValueError(f"connection: invalid geometry: {exc}") from None


def connection_token_file(
    path: str | os.PathLike[str], info: dict[str, Any], environ: dict[str, str] | None = None
) -> str | None:
    """Where the token Secret is mounted: ``$KVCACHE_TOKEN_FILE``, else ``<path>-token/<tokenSecretKey>``
    (the layout of ``crds/samples/inference-deployment.yaml``) when that file exists, else None."""
    env = os.environ if environ is None else environ
    if env.get("KVCACHE_TOKEN_FILE"):
        return env["KVCACHE_TOKEN_FILE"]
    base = Path(path)
    directory = base if base.is_dir() else base.parent
    candidate = directory.with_name(directory.name + "-token") / str(info["tokenSecretKey"])
    return str(candidate) if candidate.is_file() else None


def _connection_kwargs(path: str | os.PathLike[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments for a client built from a mounted connection; ``overrides`` win."""
    info = read_connection(path)
    kwargs: dict[str, Any] = {"config": connection_config(info)}
    if "endpoints" not in overrides:
        kwargs["service"] = f"{info['headlessService']}:{int(info['port'])}"
    if "token" not in overrides and "token_file" not in overrides:
        kwargs["token_file"] = connection_token_file(path, info)
        if kwargs["token_file"] is None:
            log.warning("kvcache client: no token file for %s (set KVCACHE_TOKEN_FILE)", path)
    kwargs.update(overrides)
    return kwargs


# --- HTTP plumbing shared by both clients ----------------------------------------------------


@dataclass
class _Head:
    status: int
    headers: dict[str, str]
    content_length: int
    keep_alive: bool


def _parse_head(raw: bytes) -> _Head:
    """Status line and headers of an HTTP/1.1 response (CacheProtocolError on garbage)."""
    try:
        text = raw.decode("latin-1")
        lines = text.split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        code = int(status)
    except ValueError as exc:
        raise CacheProtocolError(f"malformed response head: {exc}") from None
    if "chunked" in headers.get("transfer-encoding", "").lower() or "content-length" not in headers:
        raise CacheProtocolError("response without Content-Length (the engine always sends one)")
    try:
        length = int(headers["content-length"])
    except ValueError:
        raise CacheProtocolError(f"bad Content-Length {headers['content-length']!r}") from None
    if length < 0:
        raise CacheProtocolError(f"bad Content-Length {length}")
    keep = headers.get("connection", "").lower() != "close"
    return _Head(code, headers, length, keep)


@dataclass
class _Req:
    """One HTTP request: method, path, content type and body parts (sent without joining)."""

    method: str
    path: str
    ctype: str = ""
    parts: list[bytes | memoryview] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(memoryview(p).nbytes for p in self.parts)


def _request_head(req: _Req, host: str, token: str | None, length: int) -> bytes:
    lines = [
        f"{req.method} {req.path} HTTP/1.1",
        f"Host: {host}",
        f"Content-Length: {length}",
        "Connection: keep-alive",
    ]
    if length:
        lines.append(f"Content-Type: {req.ctype}")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return str(doc.get("error", doc)) if isinstance(doc, dict) else str(doc)
    except (ValueError, UnicodeDecodeError):
        return body[:200].decode("utf-8", "replace")


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise CacheProtocolError("response body is not JSON") from None
    if not isinstance(doc, dict):
        raise CacheProtocolError("response body is not a JSON object")
    return doc


def _int_field(doc: dict[str, Any], name: str, *, high: int) -> int:
    value = doc.get(name)
    if type(value) is not int or not 0 <= value <= high:
        raise CacheProtocolError(
            f"response field {name!r}: expected an integer in [0, {high}], got {value!r}"
        )
    return value


def _field_parser(name: str, high: int) -> Callable[[bytes], int]:
    """Parser of a JSON answer's integer field (run inside the breaker's scope: an endpoint that
    answers well-formed HTTP with a garbage body counts as failing)."""
    return lambda raw: _int_field(_json_body(raw), name, high=high)


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    text = endpoint if "//" in endpoint else "http://" + endpoint
    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"endpoint {endpoint!r}: expected http://host:port (plain HTTP)")
    return parts.hostname, parts.port or 80


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config dtype name (``float16``, ``bfloat16``, ``float32``)."""
    import torch

    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r}: supported: {', '.join(dtypes)}")
    return dtypes[name]


class _RecvPool:
    """Warm receive buffers for gets without ``out=``, at most ``max_bytes`` in total.

    A fresh 128 MiB result costs about as much in page faults as its transfer. Results are
    therefore tensors over pooled ``bytearray``s (``torch.frombuffer``), and a buffer is handed out
    again only when **no tensor the caller got from it is alive**: such a tensor, every view of
    it and every array sharing its memory hold a reference to the bytearray (the buffer export),
    so its reference count tells. Invariant: memory returned to a caller is never written again
    while the caller can still reach it. The price: up to ``max_bytes`` stay allocated after the
    caller dropped its results; ``max_bytes == 0`` turns pooling off (a fresh tensor per get)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"recv_pool_mb must be >= 0, got {max_bytes // (1024 * 1024)}")
        self.max_bytes = max_bytes
        self._bufs: list[bytearray] = []
        self._lock = threading.Lock()
        probe = [bytearray(1)]
        # References a free pooled buffer has when read as self._bufs[i] (the list's + the call's);
        # measured rather than assumed, since interpreters differ in temporary references.
        self._free_refs = sys.getrefcount(probe[0])

    def _is_free(self, i: int) -> bool:
        return sys.getrefcount(self._bufs[i]) == self._free_refs

    def tensor(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape``, over a warm pooled buffer when one is
        free (else a new pooled one within the budget, else a plain ``torch.empty``)."""
        import torch

        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if nbytes == 0 or nbytes > self.max_bytes:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            free = [i for i in range(len(self._bufs)) if self._is_free(i)]
            fits = [i for i in free if len(self._bufs[i]) >= nbytes]
            if fits:
                buf = self._bufs[min(fits, key=lambda i: len(self._bufs[i]))]
            else:
                held = sum(len(b) for b in self._bufs)
                # Make room by dropping free buffers too small for this size, smallest first.
                for i in sorted(free, key=lambda i: len(self._bufs[i])):
                    if held + nbytes <= self.max_bytes:
                        break
                    held -= len(self._bufs[i])
                    self._bufs[i] = bytearray()
                self._bufs = [b for b in self._bufs if len(b)]
                if held + nbytes > self.max_bytes:
                    return torch.empty(shape, dtype=dtype)
                buf = bytearray(nbytes)
                self._bufs.append(buf)
            return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)


def _reusable(out: torch.Tensor, dtype: torch.dtype, numel: int) -> bool:
    return out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous() and out.numel() >= numel


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (writable: gets receive into it)."""
    import torch

    return t.view(-1).view(torch.uint8).numpy().data


def _tokens_list(tokens: Any) -> list[int]:
    if hasattr(tokens, "tolist"):
        tokens = tokens.tolist()
    return [int(t) for t in tokens] if not isinstance(tokens, list) else tokens


# --- the core shared by both clients --------------------------------------------------------


def _hashes_body(hashes: list[int]) -> bytes:
    return json.dumps({"hashes": hashes}, separators=(",", ":")).encode()


_NO_ENDPOINT = "no endpoint available (none configured, or every breaker is open)"
_CONFIG_REQ = _Req("GET", "/v1/config")


@dataclass
class _Call(Generic[T]):
    """One cache call ready to send (sans I/O): the chain it is about, the request, the time
    budget, the parser of the answer's body (run inside the breaker's scope) and, for a get,
    the sink its frame is received into."""

    geometry: ClientGeometry
    hashes: list[int]
    req: _Req
    budget: float
    parse: Callable[[bytes], T]
    sink: _GetSink | None = None

    @property
    def root(self) -> int:
        """The chain's placement key (:func:`route_key`)."""
        return route_key(self.hashes, self.geometry.route_depth)


class _Attempt:
    """``with`` scope of one attempt at an endpoint: reports its outcome to the endpoint's breaker
    and lets any exception through. A 4xx answer is our fault (the endpoint is healthy); a 5xx or
    anything else raised (garbage, timeout, cancellation) is the endpoint's."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if exc is None or (isinstance(exc, CacheServerError) and exc.status < 500):
            self._breaker.record_success()
        else:
            self._breaker.record_failure()


class _GetSink:
    """The sans-I/O side of receiving a get's frame: validates its header and picks the tensor
    the payload lands in (a view of ``out``, or a pooled buffer); the connection reads the bytes."""

    def __init__(
        self, core: _ClientCore, geometry: ClientGeometry, asked_blocks: int, out: torch.Tensor | None
    ) -> None:
        self._core = core
        self._geometry = geometry
        self._asked_blocks = asked_blocks
        self._out = out
        self.result: torch.Tensor | None = None

    def tensor(self, head: _Head, header_len: int, raw_header: bytes) -> torch.Tensor:
        """The tensor to receive the payload into, from the frame header's ``header_len`` bytes."""
        header = decode_frame_header(raw_header)
        body_len = head.content_length - PREFIX_BYTES - header_len
        return self._core.get_tensor_for(self._geometry, header, self._asked_blocks, body_len, self._out)

    def received(self, head: _Head, kv: torch.Tensor) -> None:
        M_BYTES.labels("received").inc(head.content_length)
        self.result = kv


class _ClientCore:
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
        self.recv_pool = _RecvPool(recv_pool_mb * 1024 * 1024)
        self._token = token
        self._token_file = token_file
        self._token_read_at = -1e9
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
        if service is not None:
            self._resolve()

    # -- configuration ----------------------------------------------------------------

    @staticmethod
    def _normalise(endpoint: str) -> str:
        host, port = _split_endpoint(endpoint)
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
                self._endpoints = [
                    self._normalise(f"{ip}:{port}" if ":" not in ip else f"[{ip}]:{port}") for ip in ips
                ]
            self._resolved_at = time.monotonic()

    def endpoints(self) -> list[str]:
        """Current endpoints (re-resolving a service name every ``dns_refresh_s``)."""
        if self._service is not None and time.monotonic() - self._resolved_at > self._dns_refresh_s:
            self._resolve()
        return list(self._endpoints)

    def token(self) -> str | None:
        """The bearer token; a token file is re-read (at most once a second) so that rotated
        Secrets take effect without a restart."""
        if self._token_file is None:
            return self._token
        now = time.monotonic()
        if now - self._token_read_at < 1.0:
            return self._token
        try:
            with open(self._token_file, encoding="utf-8") as fh:
                self._token = fh.read().strip() or None
        except OSError as exc:
            self._warn("token", f"cannot read token file {self._token_file}: {exc.strerror}")
        self._token_read_at = now
        return self._token

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

    def attempts(self, root: int | None) -> Iterator[tuple[str, _Attempt]]:
        """The endpoints to try for chain ``root`` in rendezvous order (every endpoint for
        ``None``: the geometry, which any replica serves), each with the scope that reports the
        attempt to its breaker; those whose breaker refuses are skipped (asked lazily, just
        before each attempt)."""
        for endpoint in self.endpoints() if root is None else self.route(root):
            br = self.breaker(endpoint)
            if br.allow():
                yield endpoint, _Attempt(br)

    # -- requests ----------------------------------------------------------------

    def lookup_call(self, geometry: ClientGeometry, tokens: Any) -> _Call[int] | None:
        """The lookup of ``tokens`` (None when they hold no full block: nothing to ask)."""
        hashes = self.hashes(geometry, tokens)
        if not hashes:
            return None
        req = _Req("POST", "/v1/lookup", "application/json", [_hashes_body(hashes)])
        return _Call(geometry, hashes, req, self.timeout_s, _field_parser("cached_blocks", len(hashes)))

    def get_call(
        self, geometry: ClientGeometry, tokens: Any, out: torch.Tensor | None
    ) -> _Call[bytes] | None:
        """The get of ``tokens`` (None when they hold no full block); its frame is received
        into ``call.sink`` (into ``out`` when that is large enough)."""
        hashes = self.hashes(geometry, tokens)
        if not hashes:
            return None
        budget = self.deadline_for(len(hashes) * geometry.block_bytes())
        req = _Req("POST", "/v1/get", "application/json", [_hashes_body(hashes)])
        return _Call(geometry, hashes, req, budget, bytes, _GetSink(self, geometry, len(hashes), out))

    def put_call(self, geometry: ClientGeometry, tokens: Any, kv: torch.Tensor) -> _Call[int] | None:
        """The put of the full blocks of ``tokens`` with their KV (None when there is none)."""
        hashes = self.hashes(geometry, tokens)
        if not hashes:
            return None
        head, payload = self.put_frame(geometry, hashes, kv)
        budget = self.deadline_for(payload.nbytes)
        req = _Req("POST", "/v1/put", FRAME_CONTENT_TYPE, [head, payload])
        return _Call(geometry, hashes, req, budget, _field_parser("stored_blocks", len(hashes)))

    # -- encoding ----------------------------------------------------------------

    def hashes(self, geometry: ClientGeometry, tokens: Any) -> list[int]:
        return [int(h) for h in chain_hashes(geometry.namespace, _tokens_list(tokens), geometry.block_tokens)]

    def put_frame(
        self, geometry: ClientGeometry, hashes: list[int], kv: torch.Tensor
    ) -> tuple[bytes, memoryview]:
        """Frame header and payload view for a put of the full blocks of ``kv``."""
        import torch

        if not isinstance(kv, torch.Tensor) or kv.dim() != 5:
            raise ValueError("kv: expected a 5-D tensor [2, num_layers, n_tokens, num_kv_heads, head_dim]")
        n = len(hashes) * geometry.block_tokens
        want = (2, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
        got = (kv.shape[0], kv.shape[1], kv.shape[3], kv.shape[4])
        if got != want or kv.shape[2] < n:
            raise ValueError(
                f"kv: shape {tuple(kv.shape)} does not match the engine geometry "
                f"[2, {geometry.num_layers}, >={n}, {geometry.num_kv_heads}, {geometry.head_dim}]"
            )
        kv = kv.detach()[:, :, :n].to(device="cpu", dtype=torch_dtype(geometry.dtype)).contiguous()
        payload = byte_view(kv)
        header = {
            "hashes": hashes,
            "dtype": geometry.dtype,
            "shape": list(kv.shape),
            "nbytes": payload.nbytes,
        }
        return encode_frame_header(header), payload

    def get_tensor_for(
        self,
        geometry: ClientGeometry,
        header: dict[str, Any],
        asked_blocks: int,
        body_len: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Validate a get response header; the tensor its payload lands in (a view of the front
        of ``out`` when given and large enough, else a new one)."""

        shape = header.get("shape")
        n_max = asked_blocks * geometry.block_tokens
        if header.get("dtype") != geometry.dtype or not isinstance(shape, list) or len(shape) != 5:
            raise CacheProtocolError(f"get: unexpected tensor header {header!r}")
        if (
            any(type(x) is not int for x in shape)
            or shape[2] % geometry.block_tokens
            or not 0 <= shape[2] <= n_max
        ):
            raise CacheProtocolError(f"get: unexpected tensor shape {shape!r}")
        want = [2, geometry.num_layers, shape[2], geometry.num_kv_heads, geometry.head_dim]
        if shape != want:
            raise CacheProtocolError(f"get: tensor shape {shape} does not match the geometry {want}")
        nbytes = shape[2] * geometry.block_bytes() // geometry.block_tokens
        if header.get("nbytes") != nbytes or body_len != nbytes:
            raise CacheProtocolError(
                f"get: payload is {body_len} bytes, header says {header.get('nbytes')}, expected {nbytes}"
            )
        dtype = torch_dtype(geometry.dtype)
        if out is not None and _reusable(out, dtype, math.prod(want)):
            return out.view(-1)[: math.prod(want)].view(want)
        return self.recv_pool.tensor(want, dtype)

    # -- outcomes ----------------------------------------------------------------

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

    def lookup_done(self, call: _Call[int], blocks: int, started: float) -> int:
        """Count a successful lookup that found ``blocks`` blocks; the cached tokens."""
        hit = blocks * call.geometry.block_tokens
        self.count_lookup(len(call.hashes) * call.geometry.block_tokens, hit)
        self.ok("lookup", started)
        return hit

    def get_done(self, call: _Call[bytes], started: float) -> torch.Tensor | None:
        """Count a successful get; its result (None when nothing was cached)."""
        kv = call.sink.result if call.sink is not None else None
        n = 0 if kv is None else int(kv.shape[2])
        self.count_lookup(len(call.hashes) * call.geometry.block_tokens, n)
        self.ok("get", started)
        return kv if n else None

    def get_failed(self, exc: BaseException, started: float) -> None:
        """Count a failed get (a miss of nothing requested); re-raise in strict mode."""
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


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise CacheTimeoutError("deadline exceeded")
    return left


def _wire_exc(exc: BaseException) -> KVCacheClientError:
    if isinstance(exc, KVCacheClientError):
        return exc
    if isinstance(exc, TimeoutError | socket.timeout):
        return CacheTimeoutError("deadline exceeded")
    if isinstance(exc, WireError):
        return CacheProtocolError(str(exc))
    return CacheUnavailableError(f"{type(exc).__name__}: {exc}")


# --- what both clients share ----------------------------------------------------------------


class _ClientBase(Generic[_ConnT]):
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
        self._core = _ClientCore(
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
        return cls(**_connection_kwargs(path, overrides))

    @property
    def strict(self) -> bool:
        """Whether failures raise :class:`KVCacheClientError` instead of degrading to 0/None."""
        return self._core.strict

    def breaker(self, endpoint: str) -> CircuitBreaker:
        """The circuit breaker of one endpoint (``http://host:port``)."""
        return self._core.breaker(self._core._normalise(endpoint))


# --- the synchronous client -------------------------------------------------------------------


class _SyncConn:
    """One keep-alive HTTP/1.1 connection; every syscall is bounded by the call's deadline."""

    def __init__(self, host: str, port: int, deadline: float) -> None:
        self.host = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=_remaining(deadline))
        except OSError as exc:
            if isinstance(exc, TimeoutError | socket.timeout):
                raise CacheTimeoutError(f"connect to {self.host} timed out") from None
            raise CacheUnavailableError(f"cannot connect to {self.host}: {exc}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, parts: Iterable[bytes | memoryview], deadline: float) -> None:
        for part in parts:
            self.sock.settimeout(_remaining(deadline))
            self.sock.sendall(part)

    def read_head(self, deadline: float) -> _Head:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                raw = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return _parse_head(raw)
            if len(self.buf) > _MAX_HEAD_BYTES:
                raise CacheProtocolError("response head too large")
            self.sock.settimeout(_remaining(deadline))
            chunk = self.sock.recv(65536)
            if not chunk:
                # Nothing received: a kept-alive socket the server closed meanwhile.
                if not self.buf:
                    raise _RetryableConnError(f"connection to {self.host} closed before a response")
                raise CacheProtocolError("connection closed inside the response head")
            self.buf += chunk

    def read_into(self, view: memoryview, deadline: float) -> None:
        """Fill ``view`` exactly from buffered bytes, then straight from the socket."""
        pos = min(len(self.buf), len(view))
        if pos:
            view[:pos] = self.buf[:pos]
            del self.buf[:pos]
        while pos < len(view):
            self.sock.settimeout(_remaining(deadline))
            got = self.sock.recv_into(view[pos : pos + _RECV_CHUNK])
            if not got:
                raise CacheProtocolError("connection closed inside the response body")
            pos += got

    def read_exact(self, n: int, deadline: float) -> bytes:
        out = bytearray(n)
        self.read_into(memoryview(out), deadline)
        return bytes(out)

    def receive(self, sink: _GetSink, head: _Head, deadline: float) -> None:
        """Receive a get's frame: its header, then the payload straight into the sink's tensor."""
        hlen = decode_frame_prefix(self.read_exact(PREFIX_BYTES, deadline))
        kv = sink.tensor(head, hlen, self.read_exact(hlen, deadline))
        if kv.numel():
            self.read_into(byte_view(kv), deadline)
        sink.received(head, kv)


class KVCacheClient(_ClientBase[_SyncConn]):
    """Synchronous client. See the module docstring for the guarantees.

    Parameters: ``endpoints`` (``http://host:port`` list) or ``service`` (a headless Service DNS
    name, optionally ``:port``), ``token``/``token_file`` (bearer token), ``config`` (geometry;
    fetched from ``GET /v1/config`` when omitted), ``timeout_s`` (deadline for a lookup; a
    get/put adds the transfer time at ``min_bandwidth_mib_s``), ``max_retries`` and
    ``retry_backoff_s`` (connection errors only, within the deadline), ``failure_threshold``/
    ``reset_timeout_s`` (circuit breaker), ``put_queue_size`` (fire-and-forget queue),
    ``strict`` (raise instead of degrading), ``recv_pool_mb`` (warm receive buffers for gets
    without ``out=``; see :meth:`get`), ``pool_size`` (kept-alive connections per endpoint),
    ``port`` (when ``service`` names none) and ``dns_refresh_s`` (how often ``service`` is
    re-resolved).
    """

    def _init_io(self) -> None:
        self._pool_lock = threading.Lock()
        self._queue: Any = None
        self._worker: threading.Thread | None = None
        self._closed = False

    # -- public API ----------------------------------------------------------------

    def lookup(self, tokens: Any) -> int:
        """Cached leading tokens of ``tokens`` (a multiple of block_tokens); 0 on any failure."""
        started = time.perf_counter()
        try:
            call = self._core.lookup_call(self._geometry(time.monotonic() + self._core.timeout_s), tokens)
            if call is None:
                return 0
            blocks = self._call(call)
        except Exception as exc:  # never into inference (strict re-raises in fail())
            self._core.fail("lookup", exc, started)
            return 0
        return self._core.lookup_done(call, blocks, started)

    def get(self, tokens: Any, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """KV ``[2, L, n, H, D]`` of the cached prefix, or None when nothing is cached or on failure.

        ``out``: an optional preallocated contiguous CPU buffer of the config dtype (any shape);
        when it holds enough elements the result is received straight into its front and
        returned as a view of it (no allocation: the inference server's own staging memory).

        Without ``out`` the result is the caller's own tensor: it is never written again while
        the caller (or any view or array sharing its memory) holds it. Its memory comes from a
        pool of warm receive buffers (``recv_pool_mb``, default 256) and is reused for a later
        get only once every reference to it is gone, which spares the page faults of a fresh
        128 MiB allocation per call."""
        started = time.perf_counter()
        try:
            call = self._core.get_call(self._geometry(time.monotonic() + self._core.timeout_s), tokens, out)
            if call is None:
                return None
            self._call(call)
        except Exception as exc:
            self._core.get_failed(exc, started)
            return None
        return self._core.get_done(call, started)

    def put(self, tokens: Any, kv: torch.Tensor, *, wait: bool = False) -> int:
        """Store the full blocks of ``tokens`` with their KV ``[2, L, n, H, D]``.

        Default: enqueue and return at once (1 if queued, 0 if dropped because the queue is
        full); the caller must not modify ``kv`` in place afterwards. ``wait=True`` sends it now
        and returns the number of blocks the engine newly stored (0 on failure).
        """
        if wait:
            return self._put_now(tokens, kv)
        self._start_worker()
        try:
            self._queue.put_nowait((tokens, kv))
        except Exception:  # queue.Full
            M_PUT_DROPPED.inc()
            return 0
        return 1

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until queued puts are sent (True) or the timeout passes (False)."""
        if self._queue is None:
            return True
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    def stats(self) -> dict[str, Any]:
        """Per-endpoint breaker states and the put queue depth."""
        return {
            "endpoints": self._core.endpoints(),
            "breakers": {e: b.state for e, b in self._core._breakers.items()},
            "put_queue": 0 if self._queue is None else self._queue.qsize(),
        }

    def close(self) -> None:
        """Stop the put worker (after a short flush) and close pooled connections."""
        if self._closed:
            return
        self._closed = True
        if self._worker is not None:
            self.flush(1.0)
            with contextlib.suppress(Exception):
                self._queue.put_nowait(None)
            self._worker.join(timeout=2.0)
        with self._pool_lock:
            for conns in self._pool.values():
                for conn in conns:
                    conn.close()
            self._pool.clear()

    def __enter__(self) -> KVCacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------

    def _put_now(self, tokens: Any, kv: torch.Tensor) -> int:
        started = time.perf_counter()
        try:
            call = self._core.put_call(self._geometry(time.monotonic() + self._core.timeout_s), tokens, kv)
            if call is None:
                return 0
            stored = self._call(call)
        except Exception as exc:
            self._core.fail("put", exc, started)
            return 0
        self._core.ok("put", started)
        return stored

    def _start_worker(self) -> None:
        if self._worker is not None:
            return
        import queue

        with self._pool_lock:
            if self._worker is None:
                self._queue = queue.Queue(maxsize=self._core.put_queue_size)
                self._worker = threading.Thread(
                    target=self._drain_puts, name="kvcache-client-put", daemon=True
                )
                self._worker.start()

    def _drain_puts(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                with contextlib.suppress(Exception):  # strict mode: background errors are only counted
                    self._put_now(*item)
            finally:
                self._queue.task_done()

    def _geometry(self, deadline: float) -> ClientGeometry:
        """The engine geometry: given, or fetched once from the first replica that serves a
        valid ``GET /v1/config`` (a failing one counts against its breaker; the next is asked)."""
        geo = self._core._geometry
        if geo is not None:
            return geo
        last: Exception = CacheUnavailableError(_NO_ENDPOINT)
        for endpoint, attempt in self._core.attempts(None):
            try:
                with attempt:
                    raw = self._exchange(endpoint, _CONFIG_REQ, deadline, None)
                    return self._core.set_geometry(_json_body(raw))
            except Exception as exc:  # this replica's failure, recorded by its breaker
                last = exc
        raise last

    def _call(self, call: _Call[T]) -> T:
        """Route to the chain's replica (first with a closed/probing breaker), exchange, and
        ``parse`` the body — a garbage answer is that endpoint's failure for its breaker."""
        deadline = time.monotonic() + call.budget
        for endpoint, attempt in self._core.attempts(call.root):
            with attempt:
                return call.parse(self._exchange(endpoint, call.req, deadline, call.sink))
        raise CacheUnavailableError(_NO_ENDPOINT)

    def _exchange(self, endpoint: str, req: _Req, deadline: float, sink: _GetSink | None) -> bytes:
        """One request/response with retries on connection errors (backoff, within deadline)."""
        attempt = 0
        while True:
            try:
                return self._exchange_once(endpoint, req, deadline, sink)
            except _RetryableConnError:
                if attempt >= self._core.max_retries:
                    raise
            except CacheUnavailableError:
                delay = self._core.retry_delay(attempt, deadline)
                if delay is None:
                    raise
                time.sleep(delay)
            attempt += 1

    def _exchange_once(self, endpoint: str, req: _Req, deadline: float, sink: _GetSink | None) -> bytes:
        conn = self._checkout(endpoint, deadline)
        length = req.nbytes()
        token = self._core.token()
        try:
            conn.send([_request_head(req, conn.host, token, length), *req.parts], deadline)
            M_BYTES.labels("sent").inc(length)
            head = conn.read_head(deadline)
            if head.status != 200 or sink is None:
                body = conn.read_exact(head.content_length, deadline) if head.content_length else b""
                if head.status != 200:
                    raise CacheServerError(head.status, _error_message(body))
                M_BYTES.labels("received").inc(len(body))
            else:
                conn.receive(sink, head, deadline)
                body = b""
        except CacheServerError:
            # A complete error answer (status, length, body read): the socket is in a known state.
            self._checkin(endpoint, conn) if head.keep_alive else conn.close()
            raise
        except KVCacheClientError:
            conn.close()  # garbage: do not reuse a socket in doubt
            raise
        except (OSError, WireError) as exc:
            conn.close()
            err = _wire_exc(exc)
            # A reset on a reused socket before any answer is the stale keep-alive case.
            if conn.reused and isinstance(err, CacheUnavailableError):
                raise _RetryableConnError(str(err)) from None
            raise err from None
        if head.keep_alive:
            self._checkin(endpoint, conn)
        else:
            conn.close()
        return body

    def _checkout(self, endpoint: str, deadline: float) -> _SyncConn:
        with self._pool_lock:
            conns = self._pool.get(endpoint)
            if conns:
                conn = conns.pop()
                conn.reused = True
                return conn
        host, port = _split_endpoint(endpoint)
        return _SyncConn(host, port, deadline)

    def _checkin(self, endpoint: str, conn: _SyncConn) -> None:
        with self._pool_lock:
            conns = self._pool.setdefault(endpoint, [])
            if len(conns) < self._pool_size and not self._closed:
                conns.append(conn)
                return
        conn.close()


# --- the asyncio client ------------------------------------------------------------------------


class _AsyncConn:
    def __init__(self, host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.host = host
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def read_head(self) -> _Head:
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _RetryableConnError(f"connection to {self.host} closed before a response") from None
            raise CacheProtocolError("connection closed inside the response head") from None
        except asyncio.LimitOverrunError:
            raise CacheProtocolError("response head too large") from None
        return _parse_head(raw[:-4])

    async def read_exact(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise CacheProtocolError("connection closed inside the response body") from None

    async def read_into(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            chunk = await self.reader.read(min(len(view) - pos, _RECV_CHUNK))
            if not chunk:
                raise CacheProtocolError("connection closed inside the response body")
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)

    async def receive(self, sink: _GetSink, head: _Head) -> None:
        """Receive a get's frame: its header, then the payload straight into the sink's tensor."""
        hlen = decode_frame_prefix(await self.read_exact(PREFIX_BYTES))
        kv = sink.tensor(head, hlen, await self.read_exact(hlen))
        if kv.numel():
            await self.read_into(byte_view(kv))
        sink.received(head, kv)


class AsyncKVCacheClient(_ClientBase[_AsyncConn]):
    """asyncio twin of :class:`KVCacheClient` (same parameters, same guarantees); its methods
    are coroutines. Use it from one event loop; ``await client.aclose()`` when done."""

    def _init_io(self) -> None:
        self._queue: asyncio.Queue[tuple[Any, Any]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def lookup(self, tokens: Any) -> int:
        """Cached leading tokens; 0 on any failure (see :meth:`KVCacheClient.lookup`)."""
        started = time.perf_counter()
        try:
            call = self._core.lookup_call(
                await self._geometry(time.monotonic() + self._core.timeout_s), tokens
            )
            if call is None:
                return 0
            blocks = await self._call(call)
        except Exception as exc:
            self._core.fail("lookup", exc, started)
            return 0
        return self._core.lookup_done(call, blocks, started)

    async def get(self, tokens: Any, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """KV of the cached prefix or None (see :meth:`KVCacheClient.get`, ``out`` included)."""
        started = time.perf_counter()
        try:
            call = self._core.get_call(
                await self._geometry(time.monotonic() + self._core.timeout_s), tokens, out
            )
            if call is None:
                return None
            await self._call(call)
        except Exception as exc:
            self._core.get_failed(exc, started)
            return None
        return self._core.get_done(call, started)

    async def put(self, tokens: Any, kv: torch.Tensor, *, wait: bool = False) -> int:
        """Fire-and-forget (1 queued / 0 dropped) or, with ``wait=True``, blocks newly stored."""
        if wait:
            return await self._put_now(tokens, kv)
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=self._core.put_queue_size)
            self._worker = asyncio.get_running_loop().create_task(self._drain_puts())
        try:
            self._queue.put_nowait((tokens, kv))
        except asyncio.QueueFull:
            M_PUT_DROPPED.inc()
            return 0
        return 1

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until queued puts are sent (True) or the timeout passes (False)."""
        if self._queue is None:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Flush briefly, stop the put worker, close pooled connections."""
        if self._worker is not None:
            await self.flush(1.0)
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for conns in self._pool.values():
            for conn in conns:
                conn.close()
                with contextlib.suppress(Exception):
                    await conn.writer.wait_closed()
        self._pool.clear()

    async def __aenter__(self) -> AsyncKVCacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _drain_puts(self) -> None:
        assert self._queue is not None
        while True:
            tokens, kv = await self._queue.get()
            try:
                with contextlib.suppress(Exception):
                    await self._put_now(tokens, kv)
            finally:
                self._queue.task_done()

    async def _put_now(self, tokens: Any, kv: torch.Tensor) -> int:
        started = time.perf_counter()
        try:
            call = self._core.put_call(
                await self._geometry(time.monotonic() + self._core.timeout_s), tokens, kv
            )
            if call is None:
                return 0
            stored = await self._call(call)
        except Exception as exc:
            self._core.fail("put", exc, started)
            return 0
        self._core.ok("put", started)
        return stored

    async def _geometry(self, deadline: float) -> ClientGeometry:
        """As :meth:`KVCacheClient._geometry`."""
        geo = self._core._geometry
        if geo is not None:
            return geo
        last: Exception = CacheUnavailableError(_NO_ENDPOINT)
        for endpoint, attempt in self._core.attempts(None):
            try:
                with attempt:
                    raw = await self._exchange(endpoint, _CONFIG_REQ, deadline, None)
                    return self._core.set_geometry(_json_body(raw))
            except Exception as exc:  # this replica's failure, recorded by its breaker
                last = exc
        raise last

    async def _call(self, call: _Call[T]) -> T:
        """As :meth:`KVCacheClient._call`."""
        deadline = time.monotonic() + call.budget
        for endpoint, attempt in self._core.attempts(call.root):
            with attempt:
                return call.parse(await self._exchange(endpoint, call.req, deadline, call.sink))
        raise CacheUnavailableError(_NO_ENDPOINT)

    async def _exchange(self, endpoint: str, req: _Req, deadline: float, sink: _GetSink | None) -> bytes:
        """As :meth:`KVCacheClient._exchange`, each try bounded by ``asyncio.timeout``."""
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(_remaining(deadline)):
                    return await self._exchange_once(endpoint, req, sink)
            except TimeoutError:
                raise CacheTimeoutError("deadline exceeded") from None
            except _RetryableConnError:
                if attempt >= self._core.max_retries:
                    raise
            except CacheUnavailableError:
                delay = self._core.retry_delay(attempt, deadline)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
            attempt += 1

    async def _exchange_once(self, endpoint: str, req: _Req, sink: _GetSink | None) -> bytes:
        conn = await self._checkout(endpoint)
        length = req.nbytes()
        ok = False
        try:
            conn.writer.write(_request_head(req, conn.host, self._core.token(), length))
            for part in req.parts:
                conn.writer.write(part)
            await conn.writer.drain()
            M_BYTES.labels("sent").inc(length)
            head = await conn.read_head()
            if head.status != 200 or sink is None:
                body = await conn.read_exact(head.content_length) if head.content_length else b""
                if head.status != 200:
                    ok = head.keep_alive
                    raise CacheServerError(head.status, _error_message(body))
                M_BYTES.labels("received").inc(len(body))
            else:
                await conn.receive(sink, head)
                body = b""
            ok = head.keep_alive
        except (OSError, WireError) as exc:
            err = _wire_exc(exc)
            if conn.reused and isinstance(err, CacheUnavailableError):
                raise _RetryableConnError(str(err)) from None
            raise err from None
        finally:
            # Anything but a complete exchange leaves the socket in an unknown state.
            if ok and len(self._pool.setdefault(endpoint, [])) < self._pool_size:
                self._pool[endpoint].append(conn)
            else:
                conn.close()
        return body

    async def _checkout(self, endpoint: str) -> _AsyncConn:
        conns = self._pool.get(endpoint)
        if conns:
            conn = conns.pop()
            conn.reused = True
            return conn
        host, port = _split_endpoint(endpoint)
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=_MAX_HEAD_BYTES)
        except OSError as exc:
            raise CacheUnavailableError(f"cannot connect to {host}:{port}: {exc}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _AsyncConn(f"{host}:{port}", reader, writer)
