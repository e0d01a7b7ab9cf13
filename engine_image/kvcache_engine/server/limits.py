"""Connection limits of the server, like Redis' ``timeout`` and ``maxclients``: a cap on open
connections, a deadline for a new connection's first request line and headers, an idle
keep-alive timeout (aiohttp's own, set by :func:`runner_kwargs`), and a quiet log for malformed
HTTP (one WARNING line naming the peer and the error's kind, never the bytes it sent).

Invariants: a connection over the cap gets ``503`` and is closed before any byte of it is
parsed; a connection that has not completed a request's headers ``header_timeout_s`` after it
opened is closed; nothing a client sent is written to the log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from kvcache_engine.server.settings import ServerSettings

__all__ = ["GuardedSite", "QuietHTTPLog", "runner_kwargs"]

log = logging.getLogger("kvcache_engine.server")

_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class QuietHTTPLog:
    """The ``logger`` aiohttp's protocol writes its errors to: a malformed request is one WARNING
    line (peer and error class), not a traceback echoing what the peer sent."""

    def __init__(self, target: logging.Logger = log) -> None:
        self._log = target

    def exception(self, msg: str, *args: Any, exc_info: Any = None, **_: Any) -> None:
        kind = type(exc_info).__name__ if isinstance(exc_info, BaseException) else "error"
        status = getattr(exc_info, "code", None) or getattr(exc_info, "status", None) or 400
        peer = args[0] if args else "?"
        self._log.warning("malformed HTTP from %s: %s (answered %s, connection closed)", peer, kind, status)

    def debug(self, *args: Any, **kw: Any) -> None:  # aiohttp logs protocol noise at debug
        pass

    def warning(self, msg: str, *args: Any, **_: Any) -> None:
        self._log.warning(msg, *args)

    def error(self, msg: str, *args: Any, **_: Any) -> None:
        self._log.error(msg, *args)


def runner_kwargs(settings: ServerSettings) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner`` that carry the limits aiohttp enforces itself."""
    return {"keepalive_timeout": settings.idle_timeout_s, "logger": QuietHTTPLog()}


class _Busy(asyncio.Protocol):
    """A connection over the cap: 503, closed, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


class _GuardedFactory:
    """aiohttp's protocol factory behind the connection cap and the header deadline."""

    def __init__(self, server: web.Server, settings: ServerSettings, started: set[int]) -> None:
        self._server = server
        self._settings = settings
        self._started = started  # ids of handlers that completed a request's headers
        self.refused = 0

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._server.connections) >= self._settings.max_connections:
            self.refused += 1
            log.warning("connection refused: %d open (max_connections)", self._settings.max_connections)
            return _Busy()
        handler = self._server()
        if self._settings.header_timeout_s > 0:
            loop = asyncio.get_running_loop()
            loop.call_later(self._settings.header_timeout_s, self._deadline, handler)
        return handler

    def _deadline(self, handler: Any) -> None:
        if id(handler) in self._started:
            self._started.discard(id(handler))
            return
        transport = handler.transport
        if transport is not None and not transport.is_closing():
            log.warning(
                "connection closed: no complete request headers in %.3gs", self._settings.header_timeout_s
            )
            transport.close()


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through the cap and the header deadline. The
    server's middleware calls :meth:`headers_done` for every request it sees."""

    def __init__(
        self, runner: web.AppRunner, settings: ServerSettings, started: set[int], **kwargs: Any
    ) -> None:
        super().__init__(runner, settings.host, settings.port, **kwargs)
        self._settings = settings
        self._started = started
        self.factory: _GuardedFactory | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.factory = _GuardedFactory(server, self._settings, self._started)
        self._server = await asyncio.get_running_loop().create_server(
            self.factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )

    @property
    def port(self) -> int:
        sockets = getattr(self._server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else self._settings.port
