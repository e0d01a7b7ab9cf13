"""``AsyncKVCacheClient``: the asyncio twin of :class:`~kvcache_engine.client.KVCacheClient`
(same parameters, same guarantees); each try bounded by ``asyncio.timeout``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
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
    RetryableConnError,
    remaining,
    wire_exc,
)
from kvcache_engine.client.metrics import M_BYTES, M_PUT_DROPPED
from kvcache_engine.wire import PREFIX_BYTES, WireError, decode_frame_prefix

if TYPE_CHECKING:
    import torch

__all__ = ["AsyncKVCacheClient"]

T = TypeVar("T")


class AsyncConn:
    def __init__(self, host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.host = host
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def read_head(self) -> Head:
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise RetryableConnError(f"connection to {self.host} closed before a response") from None
            raise CacheProtocolError("connection closed inside the response head") from None
        except asyncio.LimitOverrunError:
            raise CacheProtocolError("response head too large") from None
        return parse_head(raw[:-4])

    async def read_exact(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise CacheProtocolError("connection closed inside the response body") from None

    async def read_into(self, view: memoryview) -> None:
        pos = 0
        while pos < len(view):
            chunk = await self.reader.read(min(len(view) - pos, RECV_CHUNK))
            if not chunk:
                raise CacheProtocolError("connection closed inside the response body")
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)

    async def receive(self, sink: GetSink, head: Head) -> None:
        """Receive a get's frame: its header, then the payload straight into the sink's tensor."""
        hlen = check_frame_header_length(head, decode_frame_prefix(await self.read_exact(PREFIX_BYTES)))
        kv = sink.tensor(head, hlen, await self.read_exact(hlen))
        if kv.numel():
            await self.read_into(byte_view(kv))
        sink.received(head, kv)


class AsyncKVCacheClient(ClientBase[AsyncConn]):
    """asyncio twin of :class:`KVCacheClient` (same parameters, same guarantees); its methods
    are coroutines. Use it from one event loop; ``await client.aclose()`` when done."""

    def _init_io(self) -> None:
        self._queue: asyncio.Queue[tuple[Any, Any]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def lookup(self, tokens: Any) -> int:
        """Cached leading tokens; 0 on any failure (see :meth:`KVCacheClient.lookup`)."""
        started = time.perf_counter()
        call = None
        try:
            call = self._core.lookup_call(
                await self._geometry(time.monotonic() + self._core.timeout_s), tokens
            )
            if call is None:
                return 0
            blocks = await self._call(call)
        except Exception as exc:
            self._core.lookup_failed(call, exc, started)
            return 0
        return self._core.lookup_done(call, blocks, started)

    async def get(self, tokens: Any, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """KV of the cached prefix or None (see :meth:`KVCacheClient.get`, ``out`` included)."""
        started = time.perf_counter()
        get_call = None
        try:
            call = get_call = self._core.get_call(
                await self._geometry(time.monotonic() + self._core.timeout_s), tokens, out
            )
            if call is None:
                return None
            await self._call(call)
        except Exception as exc:
            self._core.get_failed(exc, started, get_call)
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
        last: Exception = CacheUnavailableError(NO_ENDPOINT)
        for endpoint, attempt in self._core.attempts(None):
            try:
                with attempt:
                    raw = await self._exchange(endpoint, CONFIG_REQ, deadline, None)
                    return self._core.set_geometry(json_body(raw))
            except Exception as exc:  # this replica's failure, recorded by its breaker
                last = exc
        raise last

    async def _call(self, call: Call[T]) -> T:
        """As :meth:`KVCacheClient._call`."""
        deadline = time.monotonic() + call.budget
        for endpoint, attempt in self._core.attempts(call.root):
            with attempt:
                return call.parse(await self._exchange(endpoint, call.req, deadline, call.sink))
        raise CacheUnavailableError(NO_ENDPOINT)

    async def _exchange(self, endpoint: str, req: Req, deadline: float, sink: GetSink | None) -> bytes:
        """As :meth:`KVCacheClient._exchange`, each try bounded by ``asyncio.timeout``."""
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(remaining(deadline)):
                    return await self._exchange_once(endpoint, req, sink)
            except TimeoutError:
                raise CacheTimeoutError("deadline exceeded") from None
            except RetryableConnError:
                if attempt >= self._core.max_retries:
                    raise
            except CacheUnavailableError:
                delay = self._core.retry_delay(attempt, deadline)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
            attempt += 1

    async def _exchange_once(self, endpoint: str, req: Req, sink: GetSink | None) -> bytes:
        conn = await self._checkout(endpoint)
        length = req.nbytes()
        ok = False
        try:
            conn.writer.write(request_head(req, conn.host, self._core.token(), length))
            for part in req.parts:
                conn.writer.write(part)
            await conn.writer.drain()
            M_BYTES.labels("sent").inc(length)
            head = await conn.read_head()
            if head.status != 200 or sink is None:
                n = check_answer_length(head)
                body = await conn.read_exact(n) if n else b""
                if head.status != 200:
                    ok = head.keep_alive
                    raise CacheServerError(head.status, error_message(body))
                M_BYTES.labels("received").inc(len(body))
            else:
                await conn.receive(sink, head)
                body = b""
            ok = head.keep_alive
        except (OSError, WireError) as exc:
            err = wire_exc(exc)
            if conn.reused and isinstance(err, CacheUnavailableError):
                raise RetryableConnError(str(err)) from None
            raise err from None
        finally:
            # Anything but a complete exchange leaves the socket in an unknown state.
            if ok and len(self._pool.setdefault(endpoint, [])) < self._pool_size:
                self._pool[endpoint].append(conn)
            else:
                conn.close()
        return body

    async def _checkout(self, endpoint: str) -> AsyncConn:
        conns = self._pool.get(endpoint)
        if conns:
            conn = conns.pop()
            conn.reused = True
            return conn
        host, port = split_endpoint(endpoint)
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD_BYTES)
        except OSError as exc:
            raise CacheUnavailableError(f"cannot connect to {host}:{port}: {exc}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return AsyncConn(f"{host}:{port}", reader, writer)
