"""The engine's endpoint paths and the one admin client (async, plus a thin sync form).

The server routes these paths; the operator, the backup CLI, the doctor and the drain call them
through ``AdminClient`` / ``SyncAdminClient``. Both send the bearer token, bound every call with
a timeout, and raise ``AdminError`` naming the request (method, URL, status and the engine's
message) on any failure; a response body is never trusted to be small or well-formed.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from kvcache_engine.contract.live import LiveConfig
from kvcache_engine.contract.metrics import EngineStats, parse_engine_stats

__all__ = ["MAX_JSON_BYTES", "AdminClient", "AdminError", "P", "SyncAdminClient", "decode_answer"]

MAX_JSON_BYTES = 16 * 2**20
"""Largest JSON answer a client reads (a hostile or broken endpoint cannot make it allocate more)."""


class P:
    """Endpoint paths."""

    HEALTHZ = "/healthz"
    READYZ = "/readyz"
    METRICS = "/metrics"
    STATS = "/v1/stats"
    CONFIG = "/v1/config"
    ANALYZE = "/v1/analyze"
    MEMORY = "/v1/memory"
    LOOKUP = "/v1/lookup"
    GET = "/v1/get"
    PUT = "/v1/put"
    ADMIN_CONFIG = "/admin/config"
    ADMIN_PERSIST = "/admin/persist"
    ADMIN_VALIDATE = "/admin/validate"
    ADMIN_COMPACT = "/admin/compact"
    ADMIN_CLEAR = "/admin/clear"
    ADMIN_SNAPSHOT = "/admin/snapshot"
    ADMIN_RESTORE = "/admin/restore"
    ADMIN_DRAIN = "/admin/drain"
    ADMIN_PLACEMENT = "/admin/placement"
    ADMIN_PROFILE = "/admin/profile"
    ADMIN_LOG_LEVEL = "/admin/log-level"
    ADMIN_TRACEMALLOC = "/admin/tracemalloc"


class AdminError(Exception):
    """An engine call failed: refused, timed out, or answered an error. ``status`` is the HTTP
    status when the engine answered (None when it did not)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _headers(token: str | None, content_type: str | None = None) -> dict[str, str]:
    out = {"Authorization": f"Bearer {token}"} if token else {}
    if content_type:
        out["Content-Type"] = content_type
    return out


def _base(url: str) -> str:
    """``http://host:port[/prefix]`` without a trailing slash (AdminError naming a bad URL)."""
    text = url.strip().rstrip("/")
    text = text if "//" in text else "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AdminError(f"engine URL {url!r}: expected http://host:port")
    return text


def decode_answer(where: str, status: int, raw: bytes) -> dict[str, Any]:
    """A JSON object from an answer; AdminError with the engine's own message on an error status."""
    try:
        payload = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError, RecursionError):
        payload = None
    if status >= 400:
        detail = payload.get("error") if isinstance(payload, dict) else None
        text = detail if isinstance(detail, str) else raw[:300].decode("utf-8", "replace")
        raise AdminError(f"{where}: HTTP {status}: {text}", status)
    if not isinstance(payload, dict):
        raise AdminError(f"{where}: expected a JSON object, got {raw[:100]!r}", status)
    return payload


def _config_of(payload: Mapping[str, Any]) -> dict[str, Any]:
    config = payload.get("config", payload)
    return dict(config) if isinstance(config, dict) else {}


class AdminClient:
    """Async client of one engine (aiohttp). ``session`` is shared and owned by the caller."""

    def __init__(self, session: Any, url: str, token: str | None, *, timeout_s: float = 10.0) -> None:
        self.session = session
        self.url = _base(url)
        self.token = token
        self.timeout_s = timeout_s

    async def _raw(self, method: str, path: str, body: Any, timeout_s: float | None) -> tuple[int, bytes]:
        import aiohttp

        where = f"{method} {self.url}{path}"
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self.session.request(
                method, self.url + path, json=body, headers=_headers(self.token), timeout=timeout
            ) as response:
                if response.content_length is not None and response.content_length > MAX_JSON_BYTES:
                    raise AdminError(
                        f"{where}: answer of {response.content_length} bytes refused", response.status
                    )
                raw = await response.content.read(MAX_JSON_BYTES + 1)
                if len(raw) > MAX_JSON_BYTES:
                    raise AdminError(
                        f"{where}: answer larger than {MAX_JSON_BYTES} bytes refused", response.status
                    )
                return response.status, raw
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdminError(f"{where}: {type(exc).__name__}: {exc}".rstrip(": ")) from exc

    async def call(
        self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """One JSON request; the answer's JSON object."""
        status, raw = await self._raw(method, path, body, timeout_s)
        return decode_answer(f"{method} {self.url}{path}", status, raw)

    async def stats(self, *, timeout_s: float | None = None) -> EngineStats:
        """``GET /metrics`` parsed into EngineStats."""
        where = f"GET {self.url}{P.METRICS}"
        status, raw = await self._raw("GET", P.METRICS, None, timeout_s)
        if status != 200:
            raise AdminError(f"{where}: HTTP {status}", status)
        try:
            return parse_engine_stats(raw.decode("utf-8"))
        except ValueError as exc:
            raise AdminError(f"{where}: not Prometheus text: {exc}", status) from exc

    async def config(self) -> dict[str, Any]:
        """The engine's running config (camelCase, every field)."""
        return _config_of(await self.call("GET", P.CONFIG))

    async def live(self) -> LiveConfig:
        """The live fields the engine runs."""
        running = await self.config()
        return LiveConfig.parse({k: v for k, v in running.items() if LiveConfig.is_live(k)}, "engine config")

    async def apply(self, changes: LiveConfig, *, timeout_s: float = 30.0) -> dict[str, Any]:
        """``POST /admin/config``: apply live fields without a restart; the new running config."""
        return _config_of(await self.call("POST", P.ADMIN_CONFIG, changes.to_wire(), timeout_s=timeout_s))

    async def placement(
        self, endpoints: list[str], this: str, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """``POST /admin/placement``: the replica set clients now place chains over (``this``: the
        engine's own URL among them); its curve forgets the chains it no longer owns."""
        body = {"endpoints": endpoints, "self": this}
        return await self.call("POST", P.ADMIN_PLACEMENT, body, timeout_s=timeout_s)

    async def drain(
        self, targets: list[str], *, only: list[str] | None = None, timeout_s: float = 120.0
    ) -> dict[str, Any]:
        """``POST /admin/drain``: push this engine's blocks to the replicas that own their chains
        among ``targets``; with ``only``, copy just the chains those targets own (a warm join)."""
        body: dict[str, Any] = {"targets": targets}
        if only is not None:
            body["only"] = only
        return await self.call("POST", P.ADMIN_DRAIN, body, timeout_s=timeout_s)

    async def persist(self, *, timeout_s: float = 300.0) -> dict[str, Any]:
        return await self.call("POST", P.ADMIN_PERSIST, timeout_s=timeout_s)

    async def stream(
        self, path: str, *, timeout_s: float = 600.0, chunk: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        """A GET whose body is a byte stream (``/admin/snapshot``)."""
        import aiohttp

        where = f"GET {self.url}{path}"
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session.get(
                self.url + path, headers=_headers(self.token), timeout=timeout
            ) as response:
                if response.status != 200:
                    decode_answer(where, response.status, await response.content.read(MAX_JSON_BYTES))
                async for piece in response.content.iter_chunked(chunk):
                    yield piece
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdminError(f"{where}: {type(exc).__name__}: {exc}".rstrip(": ")) from exc


class SyncAdminClient:
    """The thin sync form (http.client, no event loop): the backup CLI, the doctor, drains."""

    def __init__(self, url: str, token: str | None, *, timeout_s: float = 300.0) -> None:
        self.url = _base(url)
        self.token = token
        self.timeout_s = timeout_s
        parts = urlsplit(self.url)
        self._host, self._port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        self._https = parts.scheme == "https"
        self._prefix = parts.path

    def _connect(self, timeout_s: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout_s or self.timeout_s)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str | None = None,
        chunked: bool = False,
        timeout_s: float | None = None,
    ) -> tuple[int, bytes]:
        """One request; (status, body bytes, at most MAX_JSON_BYTES). AdminError when the engine
        cannot be reached or answers more than that."""
        where = f"{method} {self.url}{path}"
        conn = self._connect(timeout_s)
        try:
            conn.request(
                method,
                self._prefix + path,
                body=body,
                headers=_headers(self.token, content_type),
                encode_chunked=chunked,
            )
            resp = conn.getresponse()
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_JSON_BYTES:
                raise AdminError(f"{where}: answer of {length} bytes refused", resp.status)
            raw = resp.read(MAX_JSON_BYTES + 1)
            if len(raw) > MAX_JSON_BYTES:
                raise AdminError(f"{where}: answer larger than {MAX_JSON_BYTES} bytes refused", resp.status)
            return resp.status, raw
        except OSError as exc:
            raise AdminError(f"{where}: {exc}") from None
        finally:
            conn.close()

    def call_raw(
        self, method: str, path: str, body: Any, *, content_type: str, chunked: bool = False
    ) -> dict[str, Any]:
        """One request with a raw body (a KVS1 stream); the answer's JSON object."""
        status, raw = self.request(method, path, body, content_type=content_type, chunked=chunked)
        return decode_answer(f"{method} {self.url}{path}", status, raw)

    def call(
        self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """One JSON request; the answer's JSON object (AdminError with the engine's message)."""
        data = None if body is None else json.dumps(body).encode()
        ctype = "application/json" if data is not None else None
        status, raw = self.request(method, path, data, content_type=ctype, timeout_s=timeout_s)
        return decode_answer(f"{method} {self.url}{path}", status, raw)

    def stream(
        self,
        path: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        content_type: str | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """A request whose answer the caller reads incrementally (``/admin/snapshot``, a profile
        trace): yields the open response once (AdminError with the engine's message on an error
        status), closes the connection afterwards."""
        where = f"{method} {self.url}{path}"
        conn = self._connect(timeout_s)
        try:
            conn.request(method, self._prefix + path, body=body, headers=_headers(self.token, content_type))
            resp = conn.getresponse()
            if resp.status != 200:
                decode_answer(where, resp.status, resp.read(MAX_JSON_BYTES))
            yield resp
        except OSError as exc:
            raise AdminError(f"{where}: {exc}") from None
        finally:
            conn.close()

    def stats(self) -> EngineStats:
        status, raw = self.request("GET", P.METRICS)
        if status != 200:
            raise AdminError(f"GET {self.url}{P.METRICS}: HTTP {status}", status)
        return parse_engine_stats(raw.decode("utf-8", "replace"))

    def config(self) -> dict[str, Any]:
        return _config_of(self.call("GET", P.CONFIG))

    def apply(self, changes: LiveConfig) -> dict[str, Any]:
        return _config_of(self.call("POST", P.ADMIN_CONFIG, changes.to_wire()))

    def persist(self) -> dict[str, Any]:
        return self.call("POST", P.ADMIN_PERSIST)
