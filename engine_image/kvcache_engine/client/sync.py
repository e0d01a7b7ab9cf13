"""``KVCacheClient``: the synchronous client over pooled keep-alive sockets, every syscall
bounded by the call's deadline (``socket.settimeout(remaining)``), gets received straight into
the result tensor's memory; puts are fire-and-forget through a bounded queue and one worker."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from kvcache_engine.client.buffers import byte_view
from kvcache_engine.client.codec import (
    CONFIG_REQ,
    MAX_HEAD_BYTES,
    RECV_CHUNK,
    Head,
    Req,
    check_answer_length,
    check_frame_header_length,
    error_message,
    json_body,
    parse_head,
    request_head,
    split_endpoint,
)
from kvcache_engine.client.connection import ClientGeometry
from kvcache_engine.client.core import Call, ClientBase, GetSink
from kvcache_engine.client.errors import (
    NO_ENDPOINT,
    CacheProtocolError,
    CacheServerError,
    CacheTimeoutError,
    CacheUnavailableError,
    KVCacheClientError,
    RetryableConnError,
    remaining,
    wire_exc,
)
from kvcache_engine.client.metrics import M_BYTES, M_PUT_DROPPED
from kvcache_engine.wire import PREFIX_BYTES, WireError, decode_frame_prefix

if TYPE_CHECKING:
    import torch

__all__ = ["KVCacheClient"]

T = TypeVar("T")


class SyncConn:
    """One keep-alive HTTP/1.1 connection; every syscall is bounded by the call's deadline."""

    def __init__(self, host: str, port: int, deadline: float) -> None:
        self.host = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=remaining(deadline))
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
            self.sock.settimeout(remaining(deadline))
            self.sock.sendall(part)

    def read_head(self, deadline: float) -> Head:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                raw = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return parse_head(raw)
            if len(self.buf) > MAX_HEAD_BYTES:
                raise CacheProtocolError("response head too large")
            self.sock.settimeout(remaining(deadline))
            chunk = self.sock.recv(65536)
            if not chunk:
                # Nothing received: a kept-alive socket the server closed meanwhile.
                if not self.buf:
                    raise RetryableConnError(f"connection to {self.host} closed before a response")
                raise CacheProtocolError("connection closed inside the response head")
            self.buf += chunk

    def read_into(self, view: memoryview, deadline: float) -> None:
        """Fill ``view`` exactly from buffered bytes, then straight from the socket."""
        pos = min(len(self.buf), len(view))
        if pos:
            view[:pos] = self.buf[:pos]
            del self.buf[:pos]
        while pos < len(view):
            self.sock.settimeout(remaining(deadline))
            got = self.sock.recv_into(view[pos : pos + RECV_CHUNK])
            if not got:
                raise CacheProtocolError("connection closed inside the response body")
            pos += got

    def read_exact(self, n: int, deadline: float) -> bytes:
        out = bytearray(n)
        self.read_into(memoryview(out), deadline)
        return bytes(out)

    def receive(self, sink: GetSink, head: Head, deadline: float) -> None:
        """Receive a get's frame: its header, then the payload straight into the sink's tensor."""
        hlen = check_frame_header_length(head, decode_frame_prefix(self.read_exact(PREFIX_BYTES, deadline)))
        kv = sink.tensor(head, hlen, self.read_exact(hlen, deadline))
        if kv.numel():
            self.read_into(byte_view(kv), deadline)
        sink.received(head, kv)


class KVCacheClient(ClientBase[SyncConn]):
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
        call = None
        try:
            call = self._core.lookup_call(self._geometry(time.monotonic() + self._core.timeout_s), tokens)
            if call is None:
                return 0
            blocks = self._call(call)
        except Exception as exc:  # never into inference (strict re-raises in fail())
            self._core.lookup_failed(call, exc, started)
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
        get_call = None
        try:
            call = get_call = self._core.get_call(
                self._geometry(time.monotonic() + self._core.timeout_s), tokens, out
            )
            if call is None:
                return None
            self._call(call)
        except Exception as exc:
            self._core.get_failed(exc, started, get_call)
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
        last: Exception = CacheUnavailableError(NO_ENDPOINT)
        for endpoint, attempt in self._core.attempts(None):
            try:
                with attempt:
                    raw = self._exchange(endpoint, CONFIG_REQ, deadline, None)
                    return self._core.set_geometry(json_body(raw))
            except Exception as exc:  # this replica's failure, recorded by its breaker
                last = exc
        raise last

    def _call(self, call: Call[T]) -> T:
        """Route to the chain's replica (first with a closed/probing breaker), exchange, and
        ``parse`` the body — a garbage answer is that endpoint's failure for its breaker."""
        deadline = time.monotonic() + call.budget
        for endpoint, attempt in self._core.attempts(call.root):
            with attempt:
                return call.parse(self._exchange(endpoint, call.req, deadline, call.sink))
        raise CacheUnavailableError(NO_ENDPOINT)

    def _exchange(self, endpoint: str, req: Req, deadline: float, sink: GetSink | None) -> bytes:
        """One request/response with retries on connection errors (backoff, within deadline)."""
        attempt = 0
        while True:
            try:
                return self._exchange_once(endpoint, req, deadline, sink)
            except RetryableConnError:
                if attempt >= self._core.max_retries:
                    raise
            except CacheUnavailableError:
                delay = self._core.retry_delay(attempt, deadline)
                if delay is None:
                    raise
                time.sleep(delay)
            attempt += 1

    def _exchange_once(self, endpoint: str, req: Req, deadline: float, sink: GetSink | None) -> bytes:
        conn = self._checkout(endpoint, deadline)
        length = req.nbytes()
        token = self._core.token()
        try:
            conn.send([request_head(req, conn.host, token, length), *req.parts], deadline)
            M_BYTES.labels("sent").inc(length)
            head = conn.read_head(deadline)
            if head.status != 200 or sink is None:
                n = check_answer_length(head)  # a lying Content-Length never allocates
                body = conn.read_exact(n, deadline) if n else b""
                if head.status != 200:
                    raise CacheServerError(head.status, error_message(body))
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
            err = wire_exc(exc)
            # A reset on a reused socket before any answer is the stale keep-alive case.
            if conn.reused and isinstance(err, CacheUnavailableError):
                raise RetryableConnError(str(err)) from None
            raise err from None
        if head.keep_alive:
            self._checkin(endpoint, conn)
        else:
            conn.close()
        return body

    def _checkout(self, endpoint: str, deadline: float) -> SyncConn:
        with self._pool_lock:
            conns = self._pool.get(endpoint)
            if conns:
                conn = conns.pop()
                conn.reused = True
                return conn
        host, port = split_endpoint(endpoint)
        return SyncConn(host, port, deadline)

    def _checkin(self, endpoint: str, conn: SyncConn) -> None:
        with self._pool_lock:
            conns = self._pool.setdefault(endpoint, [])
            if len(conns) < self._pool_size and not self._closed:
                conns.append(conn)
                return
        conn.close()
