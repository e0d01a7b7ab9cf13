"""Body I/O of the server: request bodies read into preallocated buffers (whole, as JSON, or
scattered straight into block slots as they arrive), KV frames sent straight from a tensor's
memory, and the warm staging buffers both directions reuse.

Invariants: a body is bounded by its limit (413) and by the body timeout (408); a body cut short
or longer than its Content-Length is refused (400) and nothing of it is used; a staging buffer
is held by one request at a time.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvcache_engine.client.buffers import byte_view, torch_dtype
from kvcache_engine.contract import DTYPE_BYTES, KVCacheConfig
from kvcache_engine.core.block_pool import ScatterSums
from kvcache_engine.server.http import REQUEST_ID, BadRequestError
from kvcache_engine.wire import FRAME_CONTENT_TYPE, decode_json_object, encode_frame_header

if TYPE_CHECKING:
    import torch

__all__ = [
    "BodyViews",
    "Staging",
    "read_exact",
    "receive_body",
    "receive_json",
    "send_direct",
    "send_tensor",
    "wire_pieces",
]

_WRITE_CHUNK = 256 * 1024
_DIRECT_SEND_BYTES = 1024 * 1024


# --- request bodies ------------------------------------------------------------------------------


async def receive_body(request: web.Request, limit: int, timeout_s: float) -> bytearray:
    """The whole body into one preallocated buffer; 413 over the limit, 408 when too slow."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BadRequestError(f"body of {declared} bytes exceeds the limit of {limit}", 413)
    buf = bytearray(declared) if declared is not None else bytearray()
    pos = 0
    async with asyncio.timeout(timeout_s):
        async for chunk in request.content.iter_any():
            end = pos + len(chunk)
            if end > limit or (declared is not None and end > declared):
                raise BadRequestError(f"body exceeds the limit of {limit} bytes", 413)
            if declared is None:
                buf += chunk
            else:
                buf[pos:end] = chunk
            pos = end
    if declared is not None and pos != declared:
        raise BadRequestError(f"body truncated: {pos} of {declared} bytes")
    return buf


async def receive_json(
    request: web.Request, timeout_s: float, max_bytes: int = 64 * 1024 * 1024, max_depth: int = 32
) -> dict[str, Any]:
    """A JSON object body of at most ``max_bytes`` nested at most ``max_depth`` deep (``{}`` when
    empty); 400 (413 over the size) naming ``body`` otherwise."""
    return decode_json_object(await receive_body(request, max_bytes, timeout_s) or b"{}", "body", max_depth)


def wire_pieces(shape: list[int], cfg: KVCacheConfig) -> tuple[int, int, int]:
    """(planes, plane bytes, piece bytes) of a put frame's ``[2, L, n, H, D]`` payload: 2L
    planes of n tokens, each plane one block_tokens piece per block, then a partial tail."""
    two, layers, n_tokens, heads, dim = shape
    token_bytes = heads * dim * DTYPE_BYTES[cfg.dtype]
    return two * layers, n_tokens * token_bytes, cfg.block_tokens * token_bytes


class BodyViews:
    """A request body's destination as a list of views, filled in order as the body arrives
    (a staged put: one staging buffer; a zero-copy put: see :meth:`for_blocks`)."""

    def __init__(self, views: list[memoryview], sums: ScatterSums | None = None) -> None:
        self.views = views
        self.sums = sums  # the C kernel's scatter (for_blocks): it fills the blocks itself
        self.total = sums.total if sums is not None else sum(v.nbytes for v in views)
        self.filled = 0
        self._i = self._off = 0  # the next byte goes to views[_i][_off]

    @classmethod
    def for_blocks(
        cls, targets: list[memoryview | None], planes: int, plane_bytes: int, piece: int
    ) -> BodyViews:
        """A put body of ``planes`` planes of ``plane_bytes`` (the ``[2, L, n, H, D]`` wire
        layout) into per-block slots: bytes ``[j * piece, (j + 1) * piece)`` of plane p are block
        j's bytes ``[p * piece, (p + 1) * piece)``. Blocks without a target (already cached) and
        a plane's partial last block are dropped. With the C kernel (and word-aligned pieces) the
        blocks' checksums are folded in as the bytes land (``sums.digests()``, in the order of
        the targets that are set)."""
        if ScatterSums.available() and piece % 4 == 0:
            return cls([], ScatterSums(targets, piece, plane_bytes, planes * plane_bytes))
        tail = plane_bytes - len(targets) * piece
        scratch = memoryview(bytearray(max(piece, tail)))
        views: list[memoryview] = []
        for p in range(planes):
            views += [t[p * piece : (p + 1) * piece] if t is not None else scratch[:piece] for t in targets]
            if tail:
                views.append(scratch[:tail])
        return cls(views)

    def feed(self, data: bytes | memoryview) -> None:
        """Copy ``data`` (the next bytes of the body) into place."""
        if self.filled + len(data) > self.total:
            raise BadRequestError("body longer than its Content-Length")
        if self.sums is not None:
            self.sums.feed(data if isinstance(data, bytes) else bytes(data))  # the kernel takes bytes
            self.filled = self.sums.filled
            return
        src = memoryview(data)
        pos = 0
        while pos < src.nbytes:
            view = self.views[self._i]
            step = min(src.nbytes - pos, view.nbytes - self._off)
            view[self._off : self._off + step] = src[pos : pos + step]
            pos += step
            self._off += step
            if self._off == view.nbytes:
                self._i, self._off = self._i + 1, 0
        self.filled += src.nbytes

    def checksums(self) -> list[str] | None:
        """The blocks' checksums when the C kernel folded them in (else the engine computes them)."""
        return self.sums.digests() if self.sums is not None else None

    async def read_from(self, reader: Any) -> None:
        """Fill every view from an aiohttp body stream, one received chunk at a time
        (``readany`` would first join the chunks buffered meanwhile: a copy of each)."""
        while self.filled < self.total:
            chunk, _ = await reader.readchunk()
            if not chunk:
                raise BadRequestError(f"body truncated: expected {self.total - self.filled} more bytes")
            self.feed(chunk)


async def read_exact(reader: Any, n: int) -> bytes:
    try:
        return bytes(await reader.readexactly(n))
    except asyncio.IncompleteReadError:
        raise BadRequestError(f"body truncated: expected {n} more bytes") from None


# --- responses ---------------------------------------------------------------------------------


async def send_tensor(request: web.Request, kv: torch.Tensor, dtype_name: str) -> web.StreamResponse:
    """Answer a get: the KV frame of ``kv`` (streamed; a large payload straight from the
    tensor's memory, see :func:`send_direct`)."""
    payload = byte_view(kv.contiguous()) if kv.numel() else memoryview(b"")
    head = encode_frame_header({"dtype": dtype_name, "shape": list(kv.shape), "nbytes": payload.nbytes})
    resp = web.StreamResponse(
        headers={"Content-Type": FRAME_CONTENT_TYPE, "X-Request-Id": request[REQUEST_ID]}
    )
    resp.content_length = len(head) + payload.nbytes
    await resp.prepare(request)
    try:
        await resp.write(head)  # the status line and headers leave with it
        if payload.nbytes < _DIRECT_SEND_BYTES or not await send_direct(request, payload):
            for start in range(0, payload.nbytes, _WRITE_CHUNK):
                await resp.write(payload[start : start + _WRITE_CHUNK])
        await resp.write_eof()
    except ConnectionError as exc:
        # The client went away mid-body: nothing to answer; aiohttp drops the connection.
        raise ConnectionResetError(str(exc)) from exc
    return resp


async def send_direct(request: web.Request, payload: memoryview) -> bool:
    """Send a large body straight from the tensor's memory with ``loop.sock_sendall`` on a dup of
    the connection's socket: no user-space copy (asyncio's transport copies whatever the socket
    does not take at once) and no per-chunk round trips through aiohttp's writer. Only on plain
    TCP with the transport's buffer already flushed (the headers must leave first); False when
    that does not hold, and the caller falls back to chunked writes."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if transport is None or sock is None or transport.get_extra_info("sslcontext") is not None:
        return False
    for _ in range(2000):  # the headers are a few hundred bytes: normally already gone
        if not transport.get_write_buffer_size():
            break
        await asyncio.sleep(0.0005)
    else:
        return False
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        await asyncio.get_running_loop().sock_sendall(dup, payload)
    finally:
        dup.close()
    # Tell aiohttp's writer the declared length went out, so the connection stays keep-alive.
    writer = request._payload_writer
    if writer.length is not None:
        writer.length = max(0, writer.length - payload.nbytes)
    return True


# --- staging buffers -----------------------------------------------------------------------------


class Staging:
    """Warm CPU buffers reused for get responses, at most ``max_bytes`` in total.

    A fresh 128 MiB tensor per get costs more in page faults than the copy itself; a reused one
    is already mapped. A buffer is held by one response at a time (take ... give); when the budget
    is spent, ``take`` answers None and the engine allocates as before."""

    def __init__(self, max_bytes: int, dtype_name: str) -> None:
        self.max_bytes = max_bytes
        self.dtype_name = dtype_name
        self._free: list[torch.Tensor] = []
        self._held = 0
        self._lock = threading.Lock()

    def take(self, numel: int) -> torch.Tensor | None:
        import torch

        dtype = torch_dtype(self.dtype_name)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= numel]
            if fits:
                # By index: list.remove compares tensors with ==, elementwise (raises on sizes).
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            size = numel * dtype.itemsize
            if numel == 0 or self._held + size > self.max_bytes:
                return None
            self._held += size
        return torch.empty(numel, dtype=dtype)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)
