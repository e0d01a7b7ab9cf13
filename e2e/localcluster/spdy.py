"""The server side of SPDY/3.1, as much of it as ``kubectl port-forward`` uses.

kubectl (1.31+) tunnels port forwarding through a WebSocket whose subprotocol is
``SPDY/3.1+portforward.k8s.io``: the binary messages carry a SPDY/3.1 byte stream (frame
boundaries need not match message boundaries). Per forwarded connection the client opens two
streams (SYN_STREAM with headers ``streamtype: error|data``, ``port``, ``requestid``), waits for
each one's SYN_REPLY, then sends DATA frames; FIN half-closes a stream, RST_STREAM drops it, PING
must be echoed. Header blocks are zlib streams (one per direction, for the whole connection)
primed with the SPDY/3 dictionary. Flow control (WINDOW_UPDATE) is not used by the Go client
(moby/spdystream) and is ignored here.

:class:`Session` parses what :meth:`Session.feed` receives and writes frames through the ``send``
callback; :class:`Stream` is one stream with an asyncio queue of received data (``None`` = FIN).
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
RST_CANCEL = 5
MAX_DATA = 32 * 1024  # bytes per DATA frame we send

# The SPDY/3 header dictionary (draft-mbelshe-httpbis-spdy-00, section 2.6.10.1): these words,
# each prefixed with its length as a 32-bit big-endian integer, then the bytes of _TAIL.
_WORDS = (
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200\x00OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
)
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 "
    "Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service "
    "UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, "
    "Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,"
    "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch"
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = (
    b"".join(struct.pack(">I", len(w)) + w.replace("\x00", " ").encode() for w in _WORDS) + _TAIL.encode()
)


class ProtocolError(Exception):
    """The peer sent something that is not SPDY/3.1."""


def control_frame(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, flags: int = 0) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


def encode_headers(headers: dict[str, str]) -> bytes:
    """A header block, uncompressed: count, then (name, value) pairs, 32-bit lengths."""
    out = [struct.pack(">I", len(headers))]
    for name, value in headers.items():
        n, v = name.lower().encode(), value.encode()
        out += [struct.pack(">I", len(n)), n, struct.pack(">I", len(v)), v]
    return b"".join(out)


def decode_headers(block: bytes) -> dict[str, str]:
    (count,) = struct.unpack_from(">I", block, 0)
    offset, out = 4, {}
    for _ in range(count):
        (n,) = struct.unpack_from(">I", block, offset)
        name = block[offset + 4 : offset + 4 + n].decode()
        offset += 4 + n
        (v,) = struct.unpack_from(">I", block, offset)
        out[name] = block[offset + 4 : offset + 4 + v].decode().replace("\x00", ",")
        offset += 4 + v
    return out


@dataclass
class Stream:
    """One SPDY stream opened by the client."""

    id: int
    headers: dict[str, str]
    session: Session
    received: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    remote_closed: bool = False
    local_closed: bool = False
    reset: bool = False

    async def write(self, data: bytes) -> None:
        for start in range(0, len(data), MAX_DATA):
            if self.reset or self.local_closed:
                return
            await self.session.send(data_frame(self.id, data[start : start + MAX_DATA]))

    async def close(self) -> None:
        """Half-close our side (an empty DATA frame with FIN)."""
        if not (self.local_closed or self.reset):
            self.local_closed = True
            await self.session.send(data_frame(self.id, b"", FLAG_FIN))


class Session:
    """Server half of one SPDY/3.1 connection."""

    def __init__(
        self, send: Callable[[bytes], Awaitable[None]], on_stream: Callable[[Stream], Awaitable[None]]
    ) -> None:
        self._send = send
        self._lock = asyncio.Lock()
        self.on_stream = on_stream
        self.streams: dict[int, Stream] = {}
        self._buffer = b""
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._deflate = zlib.compressobj(zdict=DICTIONARY)
        self.closed = False

    async def send(self, frame: bytes) -> None:
        async with self._lock:
            if not self.closed:
                await self._send(frame)

    async def reply(self, stream: Stream) -> None:
        block = self._deflate.compress(encode_headers({})) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        await self.send(control_frame(SYN_REPLY, 0, struct.pack(">I", stream.id) + block))

    async def feed(self, data: bytes) -> None:
        """Consume received bytes: every complete frame is handled, the rest kept for later."""
        self._buffer += data
        while len(self._buffer) >= 8:
            (length,) = struct.unpack_from(">I", self._buffer, 4)
            length &= 0xFFFFFF
            if len(self._buffer) < 8 + length:
                return
            frame, self._buffer = self._buffer[: 8 + length], self._buffer[8 + length :]
            await self._handle(frame)

    async def _handle(self, frame: bytes) -> None:
        first, second = struct.unpack_from(">II", frame, 0)
        flags, payload = second >> 24, frame[8:]
        if not first & 0x80000000:
            await self._data(first & 0x7FFFFFFF, flags, payload)
            return
        version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
        if version != VERSION:
            raise ProtocolError(f"SPDY version {version}, expected {VERSION}")
        if kind == SYN_STREAM:
            (stream_id,) = struct.unpack_from(">I", payload, 0)
            headers = decode_headers(self._inflate.decompress(payload[10:]))
            stream = Stream(stream_id & 0x7FFFFFFF, headers, self)
            self.streams[stream.id] = stream
            await self.reply(stream)
            if flags & FLAG_FIN:
                stream.remote_closed = True
                stream.received.put_nowait(None)
            await self.on_stream(stream)
        elif kind == RST_STREAM:
            (stream_id,) = struct.unpack_from(">I", payload, 0)
            gone = self.streams.pop(stream_id & 0x7FFFFFFF, None)
            if gone is not None:
                gone.reset = True
                gone.received.put_nowait(None)
        elif kind == PING:
            await self.send(frame)  # a client-initiated ping (odd id) is echoed unchanged
        elif kind == GOAWAY:
            self.close()
        elif kind == HEADERS:
            self._inflate.decompress(payload[4:])  # keep the shared zlib stream in step

    async def _data(self, stream_id: int, flags: int, payload: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return
        if payload:
            stream.received.put_nowait(payload)
        if flags & FLAG_FIN:
            stream.remote_closed = True
            stream.received.put_nowait(None)

    def close(self) -> None:
        self.closed = True
        for stream in self.streams.values():
            stream.reset = True
            stream.received.put_nowait(None)
        self.streams.clear()
