"""``kvcache-engine serve``: the engine's HTTP API (aiohttp). Transport only: every decision
lives in the engine or the persister; this module parses, limits, authenticates and streams.

Data plane (bearer token): ``POST /v1/lookup``, ``POST /v1/get`` (answers a binary frame,
streamed), ``POST /v1/put`` (a binary frame). Probes (open by default): ``/healthz``,
``/readyz`` (503 until the persisted cache is loaded), ``/metrics``. Stats/config:
``GET /v1/stats``, ``GET /v1/config``. Admin (token): config hot reload, persist, validate,
compact, clear, snapshot (stream), restore (stream), drain. See docs/engine-api.md.

Guarantees: malformed input gets a 4xx JSON ``{"error", "request_id"}`` naming what was wrong,
never a 500 and never a crash; bodies, blocks per request and body read time are bounded; a
missing or wrong token gets 401 with no detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hmac
import http.client
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from kvcache_engine.client.buffers import byte_view, torch_dtype
from kvcache_engine.config import DTYPE_BYTES, LIVE_FIELDS, ConfigError, KVCacheConfig, load_config
from kvcache_engine.core.block_pool import ScatterSums
from kvcache_engine.persistence import (
    SEGMENT_BYTES,
    GeometryMismatchError,
    Persister,
    check_geometry,
    decode_segment,
    geometry_of,
    iter_segments,
    persister_for,
)
from kvcache_engine.wire import (
    FRAME_CONTENT_TYPE,
    PREFIX_BYTES,
    SEGMENT_LEN,
    STREAM_CONTENT_TYPE,
    STREAM_MAGIC,
    TRAILER_LEN,
    WIRE_FORMAT_VERSION,
    decode_frame_header,
    decode_frame_prefix,
    decode_json_object,
    encode_frame_header,
    encode_stream_header,
    encode_stream_segment,
    encode_stream_trailer,
    node_id,
    parse_hashes,
    parse_tokens,
    rendezvous_owner,
    route_key,
    split_frame,
)

if TYPE_CHECKING:
    import torch

    from kvcache_engine.core.block_pool import StoredBlock
    from kvcache_engine.core.reservations import PutReservation
    from kvcache_engine.engine import KVCacheEngine

__all__ = ["EngineServer", "ServerSettings", "resolve_token", "serve"]

log = logging.getLogger("kvcache_engine.server")
T = TypeVar("T")

REQUEST_ID = web.RequestKey("request_id", str)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_WRITE_CHUNK = 256 * 1024
_DIRECT_SEND_BYTES = 1024 * 1024
SNAPSHOT_SEGMENT_BYTES = 64 * 1024 * 1024
"""Segment size inside snapshot/drain streams (bounds the server's memory per stream)."""


@dataclass
class ServerSettings:
    """Transport limits and auth. ``token`` None disables auth (a warning is logged)."""

    host: str = "0.0.0.0"
    port: int = 8080
    token: str | None = None
    token_file: str | None = None
    open_probes: bool = True
    max_body_bytes: int = 1024 * 1024 * 1024
    max_blocks_per_request: int = 4096
    body_timeout_s: float = 60.0
    drain_timeout_s: float = 60.0
    staging_bytes: int = 256 * 1024 * 1024


def resolve_token(
    token_file: str | None, environ: dict[str, str] | None = None
) -> tuple[str | None, str | None]:
    """(token, token_file) from ``--token-file``, ``KVCACHE_TOKEN_FILE`` or ``KVCACHE_TOKEN``."""
    env = dict(os.environ) if environ is None else environ
    path = token_file or env.get("KVCACHE_TOKEN_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise ValueError(f"--token-file {path}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"--token-file {path}: the file is empty")
        return token, path
    return env.get("KVCACHE_TOKEN") or None, None


class BadRequestError(ValueError):
    """A 4xx answer with a message; ``status`` defaults to 400."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, request_id: str) -> web.Response:
    return web.json_response(
        {"error": message, "request_id": request_id}, status=status, headers={"X-Request-Id": request_id}
    )


# --- metrics -------------------------------------------------------------------------------------


class _EngineCollector:
    """Prometheus view of ``engine.get_stats()`` and the persister, computed per scrape."""

    def __init__(self, server: EngineServer) -> None:
        self.server = server

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families come from live stats

    def collect(self) -> Iterator[Metric]:
        st = self.server.engine.get_stats()
        ps = self.server.persister.stats()
        counters = {
            "kvcache_hits": ("Blocks found by lookups.", st["cache_hits"]),
            "kvcache_misses": ("Blocks asked by lookups and not found.", st["cache_misses"]),
            "kvcache_hit_tokens": ("Cached leading tokens found by lookups.", st["hit_tokens"]),
            "kvcache_requested_tokens": ("Full-block tokens asked by lookups.", st["requested_tokens"]),
            "kvcache_requests": ("Lookups served.", st["requests"]),
            "kvcache_evictions": ("Blocks evicted.", st["evictions"]),
            "kvcache_bytes_in": ("KV bytes received by puts.", st["bytes_in"]),
            "kvcache_bytes_out": ("KV bytes sent by gets.", st["bytes_out"]),
            "kvcache_persist_failures": ("Persists that failed (any reason).", ps["persist_failures"]),
            "kvcache_persists": ("Persists that completed.", ps["persists"]),
            "kvcache_quarantined_segments": (
                "Persisted segments moved to quarantine.",
                ps["quarantined_segments"],
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=float(value))
        by_reason = CounterMetricFamily(
            "kvcache_persist_failures_by_reason", "Failed persists by reason.", labels=["reason"]
        )
        for reason, count in sorted(ps["persist_failures_by_reason"].items()):
            by_reason.add_metric([reason], float(count))
        yield by_reason
        gauges = {
            "kvcache_capacity_blocks": ("Block slots of the primary tier.", st["num_blocks"]),
            "kvcache_used_blocks": ("Occupied block slots of the primary tier.", st["used_blocks"]),
            "kvcache_memory_pressure": ("used_blocks / capacity_blocks (0..1).", st["memory_pressure"]),
            "kvcache_compression_ratio": ("Stored bytes / fp16 bytes achieved.", st["compression_ratio"]),
            "kvcache_max_tokens": ("Configured capacity in tokens.", st["max_tokens"]),
            "kvcache_block_tokens": ("Tokens per block.", st["block_tokens"]),
            "kvcache_hit_rate": ("hit_tokens / requested_tokens since start.", st["hit_rate"]),
            "kvcache_ready": (
                "1 once the persisted cache is loaded.",
                1.0 if self.server.ready.is_set() else 0.0,
            ),
            "kvcache_persisted_blocks": ("Blocks named by the manifest on disk.", ps["persisted_blocks"]),
            "kvcache_last_persist_timestamp_seconds": (
                "Unix time of the last good persist.",
                ps["last_persist_unix"],
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        mem = GaugeMetricFamily("kvcache_device_memory_bytes", "Device memory (0 on CPU).", labels=["kind"])
        for kind in ("allocated", "reserved", "total"):
            mem.add_metric([kind], float(st[f"device_memory_{kind}"]))
        yield mem
        info = GaugeMetricFamily(
            "kvcache_info", "Engine identity.", labels=["codec", "strategy", "device", "namespace"]
        )
        info.add_metric(
            [
                str(st["codec"]),
                str(st["cache_strategy"]),
                str(st["device"]),
                self.server.engine.config.namespace,
            ],
            1.0,
        )
        yield info
        yield self._latency(st.get("latency_histograms", {}))

    @staticmethod
    def _latency(hists: dict[str, Any]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily("kvcache_op_latency_ms", "Engine operation latency (ms).", labels=["op"])
        for op, h in sorted(hists.items()):
            buckets: list[tuple[str, float]] = []
            for bound, count in zip(h["buckets"], h["counts"], strict=True):
                label = "+Inf" if math.isinf(float(bound)) else repr(float(bound))
                buckets.append((label, float(count)))
            if not buckets or buckets[-1][0] != "+Inf":
                buckets.append(("+Inf", float(h["count"])))
            fam.add_metric([op], buckets, float(h["sum"]))
        return fam


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


# --- the server ---------------------------------------------------------------------------------


class EngineServer:
    """The aiohttp application around one engine. ``ready`` is set once ``load()`` finished."""

    def __init__(
        self, engine: KVCacheEngine, settings: ServerSettings, persister: Persister | None = None
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.persister = persister or persister_for(engine)
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.executor = ThreadPoolExecutor(
            max_workers=max(2, engine.config.num_workers), thread_name_prefix="kvcache-io"
        )
        # Zero-copy puts commit on threads of their own: an admin call waiting in the engine for
        # in-flight reservations must never hold the threads those reservations commit on.
        self.commit_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvcache-commit")
        self._token_cache: tuple[float, str | None] = (0.0, settings.token)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(self))
        self.http_requests = Counter(
            "kvcache_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.staging = Staging(settings.staging_bytes, engine.config.dtype)
        self.app = self._build_app()

    # -- plumbing ---------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes, middlewares=[self._middleware])
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/v1/stats", self.stats)
        r.add_get("/v1/config", self.get_config)
        r.add_get("/v1/analyze", self.analyze)
        r.add_post("/v1/lookup", self.lookup)
        r.add_post("/v1/get", self.get)
        r.add_post("/v1/put", self.put)
        r.add_post("/admin/config", self.admin_config)
        r.add_post("/admin/persist", self.admin_persist)
        r.add_post("/admin/validate", self.admin_validate)
        r.add_post("/admin/compact", self.admin_compact)
        r.add_post("/admin/clear", self.admin_clear)
        r.add_get("/admin/snapshot", self.admin_snapshot)
        r.add_post("/admin/restore", self.admin_restore)
        r.add_post("/admin/drain", self.admin_drain)
        from kvcache_engine.debug import register_debug_routes  # profiler, log level, /v1/memory

        self.profiler = register_debug_routes(
            app, self.engine, request_id_key=REQUEST_ID, executor=self.executor
        )
        return app

    def _token(self) -> str | None:
        """The expected token; a token file is re-read (at most once a second) for rotation."""
        if self.settings.token_file is None:
            return self.settings.token
        checked, token = self._token_cache
        now = time.monotonic()
        if now - checked >= 1.0:
            with contextlib.suppress(OSError), open(self.settings.token_file, encoding="utf-8") as fh:
                token = fh.read().strip() or token
            self._token_cache = (now, token)
        return token

    def _authorised(self, request: web.Request) -> bool:
        expected = self._token()
        if expected is None:
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {expected}".encode())

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id", "")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex[:16]
        request[REQUEST_ID] = rid
        route = (
            request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        )
        try:
            if not (request.path in OPEN_PATHS and self.settings.open_probes) and not self._authorised(
                request
            ):
                resp: web.StreamResponse = _error(401, "unauthorized", rid)
            else:
                resp = await handler(request)
                if not resp.prepared:
                    resp.headers["X-Request-Id"] = rid
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = _error(exc.status, exc.reason, rid)
        except BadRequestError as exc:
            resp = _error(exc.status, str(exc), rid)
        except (ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
            # Parsing and engine validation errors: the client sent something wrong.
            resp = _error(400, _describe(exc), rid)
        except TimeoutError:
            resp = _error(408, "request body not received in time", rid)
        except ConnectionResetError:
            raise
        except Exception as exc:
            log.exception("request %s %s failed (request_id=%s)", request.method, request.path, rid)
            resp = _error(500, f"internal error ({type(exc).__name__}); see the engine log", rid)
        self.http_requests.labels(route, str(resp.status)).inc()
        return resp

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _body(self, request: web.Request, limit: int | None = None) -> bytearray:
        """The whole body into one preallocated buffer; 413 over the limit, 408 when too slow."""
        limit = self.settings.max_body_bytes if limit is None else limit
        declared = request.content_length
        if declared is not None and declared > limit:
            raise BadRequestError(f"body of {declared} bytes exceeds the limit of {limit}", 413)
        buf = bytearray(declared) if declared is not None else bytearray()
        pos = 0
        async with asyncio.timeout(self.settings.body_timeout_s):
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

    async def _json(self, request: web.Request) -> dict[str, Any]:
        return decode_json_object(await self._body(request, limit=64 * 1024 * 1024) or b"{}", "body")

    def _chain(self, doc: dict[str, Any]) -> tuple[str, list[int]]:
        """("hashes"|"tokens", values) from a request, bounded by max_blocks_per_request."""
        cfg = self.engine.config
        max_blocks = self.settings.max_blocks_per_request
        if ("hashes" in doc) == ("tokens" in doc):
            raise BadRequestError("give exactly one of 'hashes' (block hashes) or 'tokens' (token ids)")
        if "hashes" in doc:
            return "hashes", parse_hashes(doc["hashes"], max_len=max_blocks)
        return "tokens", parse_tokens(
            doc["tokens"], max_len=max_blocks * cfg.block_tokens + cfg.block_tokens - 1
        )

    # -- probes, stats ---------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready.is_set():
            return web.json_response({"status": "ready", "load_error": self.load_error})
        return web.json_response({"status": "loading"}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self._run(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def stats(self, request: web.Request) -> web.Response:
        st = await self._run(self.engine.get_stats)
        st = {**st, "persistence": self.persister.stats(), "ready": self.ready.is_set()}
        return web.json_response(st, dumps=_dumps)

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.config.to_file_dict())

    async def analyze(self, request: web.Request) -> web.Response:
        """The analyzers' findings (kvcache_engine.analytics.analyze), for ``kvcache-engine doctor``."""
        from kvcache_engine.analytics import analyze

        return web.json_response(await self._run(analyze, self.engine), dumps=_dumps)

    # -- data plane ----------------------------------------------------------------------------

    async def lookup(self, request: web.Request) -> web.Response:
        kind, values = self._chain(await self._json(request))
        bt = self.engine.config.block_tokens
        if kind == "hashes":
            blocks = await self._run(self.engine.lookup_hashes, values)
        else:
            blocks = await self._run(self.engine.lookup, values) // bt
        return web.json_response({"cached_blocks": blocks, "cached_tokens": blocks * bt})

    async def get(self, request: web.Request) -> web.StreamResponse:
        kind, values = self._chain(await self._json(request))
        if kind == "tokens":
            values = [int(h) for h in self.engine.block_hashes(values)]
        buf = self.staging.take(len(values) * self._token_elems())
        try:
            kv = await self._run(self.engine.get_hashes, values, buf)
            return await self._send_tensor(request, kv)
        finally:
            if buf is not None:
                self.staging.give(buf)

    def _token_elems(self) -> int:
        cfg = self.engine.config
        return cfg.block_tokens * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim

    async def _send_tensor(self, request: web.Request, kv: torch.Tensor) -> web.StreamResponse:
        payload = byte_view(kv.contiguous()) if kv.numel() else memoryview(b"")
        cfg = self.engine.config
        head = encode_frame_header({"dtype": cfg.dtype, "shape": list(kv.shape), "nbytes": payload.nbytes})
        resp = web.StreamResponse(
            headers={"Content-Type": FRAME_CONTENT_TYPE, "X-Request-Id": request[REQUEST_ID]}
        )
        resp.content_length = len(head) + payload.nbytes
        await resp.prepare(request)
        try:
            await resp.write(head)  # the status line and headers leave with it
            if payload.nbytes < _DIRECT_SEND_BYTES or not await _send_direct(request, payload):
                for start in range(0, payload.nbytes, _WRITE_CHUNK):
                    await resp.write(payload[start : start + _WRITE_CHUNK])
            await resp.write_eof()
        except ConnectionError as exc:
            # The client went away mid-body: nothing to answer; aiohttp drops the connection.
            raise ConnectionResetError(str(exc)) from exc
        return resp

    async def put(self, request: web.Request) -> web.Response:
        """Store a put frame. The header is read and checked first; the payload then lands
        straight in slots the engine reserved (:meth:`_put_in_place`, raw CPU pools with free
        slots), else in a warm staging buffer (no fresh pages to fault in per put) that the
        engine encodes into its slots and that goes back to the staging pool afterwards."""
        cfg = self.engine.config
        declared = request.content_length
        if declared is None:  # chunked upload: buffer it whole
            body = await self._body(request)
            header, payload = split_frame(body)
            kind, values = self._chain(header)
            want = self._frame_shape(header, kind, values, payload.nbytes)
            kv = self._as_kv(want, memoryview(body)[len(body) - payload.nbytes :])
            return await self._store(kind, values, kv)
        limit = self.settings.max_body_bytes
        if declared > limit:
            raise BadRequestError(f"body of {declared} bytes exceeds the limit of {limit}", 413)
        reader = request.content
        async with asyncio.timeout(self.settings.body_timeout_s):
            hlen = decode_frame_prefix(await _read_exact(reader, PREFIX_BYTES))
            if PREFIX_BYTES + hlen > declared:
                raise BadRequestError(f"frame: truncated header ({declared - PREFIX_BYTES} of {hlen} bytes)")
            header = decode_frame_header(await _read_exact(reader, hlen))
        kind, values = self._chain(header)
        want = self._frame_shape(header, kind, values, declared - PREFIX_BYTES - hlen)
        raw = self.engine.stores_raw_rows
        hashes = self._hashes(kind, values) if raw else []
        res = await self._run(self.engine.reserve_put, hashes) if hashes else None
        if res is not None:
            return await self._put_in_place(request, res, want, cfg)
        numel = math.prod(want)
        buf = self.staging.take(numel)
        try:
            view = byte_view(buf)[: numel * DTYPE_BYTES[cfg.dtype]] if buf is not None else None
            if view is None:
                view = memoryview(bytearray(numel * DTYPE_BYTES[cfg.dtype]))
            if hashes:  # staged as slot rows, checksummed on the way: put_rows copies them as is
                return await self._put_rows_staged(request, hashes, want, view, cfg)
            async with asyncio.timeout(self.settings.body_timeout_s):
                await _BodyViews([view]).read_from(reader)
            return await self._store(kind, values, self._as_kv(want, view))
        finally:
            if buf is not None:
                self.staging.give(buf)

    def _hashes(self, kind: str, values: list[int]) -> list[int]:
        """The block hashes of a put's chain (its full blocks when given as tokens)."""
        return values if kind == "hashes" else [int(h) for h in self.engine.block_hashes(values)]

    async def _put_in_place(
        self, request: web.Request, res: PutReservation, shape: list[int], cfg: KVCacheConfig
    ) -> web.Response:
        """The zero-copy put: the body's bytes go from aiohttp's chunks straight into the slots
        the engine reserved (no staging buffer, no second copy), then the engine indexes them
        (checksummed on the way, or at commit without the C kernel). A body cut short releases
        the slots and indexes nothing."""
        body = _BodyViews.for_blocks(res.targets, *_wire_pieces(shape, cfg))
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                await body.read_from(request.content)
        except BaseException:
            self.engine.release_put(res)
            raise
        commit = functools.partial(self.engine.commit_put, res, body.checksums())
        stored = await asyncio.get_running_loop().run_in_executor(self.commit_executor, commit)
        return web.json_response({"stored_blocks": stored, "block_tokens": cfg.block_tokens})

    async def _put_rows_staged(
        self, request: web.Request, hashes: list[int], shape: list[int], view: memoryview, cfg: KVCacheConfig
    ) -> web.Response:
        """The staged put of a raw-rows engine (no free slots to reserve): the body lands in the
        staging buffer already laid out as the blocks' slot rows, checksummed on the way with the
        C kernel; engine.put_rows then evicts, copies the new rows into their slots as they are
        and indexes them. A body cut short changes nothing."""
        import torch

        planes, plane_bytes, piece = _wire_pieces(shape, cfg)
        width = planes * piece
        targets: list[memoryview | None] = [view[j * width : (j + 1) * width] for j in range(len(hashes))]
        body = _BodyViews.for_blocks(targets, planes, plane_bytes, piece)
        async with asyncio.timeout(self.settings.body_timeout_s):
            await body.read_from(request.content)
        rows = torch.frombuffer(view, dtype=torch.uint8, count=len(hashes) * width).view(len(hashes), width)
        stored = await self._run(self.engine.put_rows, hashes, rows, body.checksums())
        return web.json_response({"stored_blocks": stored, "block_tokens": cfg.block_tokens})

    async def _store(self, kind: str, values: list[int], kv: torch.Tensor) -> web.Response:
        if kind == "hashes":
            stored = await self._run(self.engine.put_blocks_raw, values, kv)
        else:
            stored = await self._run(self.engine.put, values, kv)
        return web.json_response({"stored_blocks": stored, "block_tokens": self.engine.config.block_tokens})

    def _frame_shape(
        self, header: dict[str, Any], kind: str, values: list[int], payload_nbytes: int
    ) -> list[int]:
        """The KV shape a put frame must carry, after checking its header and payload length."""
        cfg = self.engine.config
        if header.get("dtype") != cfg.dtype:
            raise BadRequestError(f"dtype: got {header.get('dtype')!r}, this engine stores {cfg.dtype!r}")
        shape = header.get("shape")
        n = len(values) * cfg.block_tokens if kind == "hashes" else len(values)
        want = [2, cfg.num_layers, n, cfg.num_kv_heads, cfg.head_dim]
        if shape != want:
            raise BadRequestError(
                f"shape: got {shape!r}, expected {want} ([2, num_layers, n_tokens, num_kv_heads, head_dim])"
            )
        nbytes = math.prod(want) * DTYPE_BYTES[cfg.dtype]
        if header.get("nbytes") != nbytes or payload_nbytes != nbytes:
            raise BadRequestError(
                f"payload: {payload_nbytes} bytes (header nbytes={header.get('nbytes')!r}), expected {nbytes}"
            )
        return want

    def _as_kv(self, want: list[int], payload: memoryview) -> torch.Tensor:
        """A zero-copy tensor view of a put payload (already length-checked)."""
        import torch

        dtype = torch_dtype(self.engine.config.dtype)
        if not payload.nbytes:
            return torch.empty(want, dtype=dtype)
        return torch.frombuffer(payload, dtype=dtype, count=math.prod(want)).view(want)

    # -- admin ---------------------------------------------------------------------------------

    async def admin_config(self, request: web.Request) -> web.Response:
        doc = await self._json(request)
        changes = live_changes(doc)
        await self._run(lambda: self.engine.reconfigure(**changes))
        if "log_level" in changes:
            logging.getLogger("kvcache_engine").setLevel(str(self.engine.config.log_level))
        log.info("config reloaded: %s", sorted(changes))
        return web.json_response({"config": self.engine.config.to_file_dict(), "applied": sorted(changes)})

    async def admin_persist(self, request: web.Request) -> web.Response:
        ok = await self._run(self.persister.persist)
        st = self.persister.stats()
        return web.json_response({"ok": ok, "error": st["last_persist_error"], "stats": st})

    async def admin_validate(self, request: web.Request) -> web.Response:
        report = dict(await self._run(self.engine.validate_cache_integrity))
        extra = [e for e in self.persister.integrity_errors() if e not in report.get("errors", [])]
        if extra:
            report["persistence_errors"] = extra
        return web.json_response(report, dumps=_dumps)

    async def admin_compact(self, request: web.Request) -> web.Response:
        return web.json_response({"compacted": await self._run(self.engine.compact_cache)}, dumps=_dumps)

    async def admin_clear(self, request: web.Request) -> web.Response:
        await self._run(self.engine.clear_cache)
        return web.json_response({"ok": True})

    async def admin_snapshot(self, request: web.Request) -> web.StreamResponse:
        """Stream every block as a KVS1 stream (segments of copies taken under the engine lock);
        a block evicted meanwhile is left out, and the trailer carries the counts."""
        hashes = await self._run(self.engine.cached_hashes)
        segments = iter_segments(self.engine.export_blocks(hashes), SNAPSHOT_SEGMENT_BYTES)
        resp = web.StreamResponse(
            headers={"Content-Type": STREAM_CONTENT_TYPE, "X-Request-Id": request[REQUEST_ID]}
        )
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(encode_stream_header(self._stream_header()))
        blocks = count = 0
        while True:
            item = await self._run(next, segments, None)
            if item is None:
                break
            data, metas = item
            await resp.write(encode_stream_segment(data))
            await resp.write(data)
            blocks += len(metas)
            count += 1
        await resp.write(encode_stream_trailer({"blocks": blocks, "segments": count}))
        await resp.write_eof()
        return resp

    def _stream_header(self) -> dict[str, Any]:
        cfg = self.engine.config
        return {
            "format_version": WIRE_FORMAT_VERSION,
            "geometry": geometry_of(cfg),
            "codec": cfg.codec,
            "created_unix": time.time(),
        }

    async def admin_restore(self, request: web.Request) -> web.Response:
        """Import a KVS1 stream (a snapshot, a backup being restored, or a drain push)."""
        reader = request.content
        async with asyncio.timeout(self.settings.body_timeout_s):
            hlen = decode_frame_prefix(await _read_exact(reader, PREFIX_BYTES), STREAM_MAGIC)
            header = decode_frame_header(await _read_exact(reader, hlen))
        try:
            check_geometry(header.get("geometry") or {}, self.engine.config, "restore stream")
        except GeometryMismatchError as exc:
            raise BadRequestError(str(exc), 409) from None
        imported = segments = offered = 0
        while True:
            async with asyncio.timeout(self.settings.body_timeout_s):
                (length,) = SEGMENT_LEN.unpack(await _read_exact(reader, SEGMENT_LEN.size))
                if length == 0:
                    (tlen,) = TRAILER_LEN.unpack(await _read_exact(reader, TRAILER_LEN.size))
                    trailer = decode_frame_header(await _read_exact(reader, min(tlen, 1 << 20)))
                    break
                if length > 2 * SEGMENT_BYTES:
                    raise BadRequestError(
                        f"segment of {length} bytes exceeds the limit of {2 * SEGMENT_BYTES}", 413
                    )
                data = await _read_exact(reader, length)
            blocks = await self._run(decode_segment, data, None, f"segment {segments}")
            offered += len(blocks)
            imported += await self._run(self.engine.import_blocks, blocks)
            segments += 1
        if trailer.get("blocks") not in (None, offered):
            raise BadRequestError(
                f"stream trailer says {trailer.get('blocks')} blocks, {offered} received (truncated?)"
            )
        return web.json_response(
            {"imported_blocks": imported, "offered_blocks": offered, "segments": segments}
        )

    async def admin_drain(self, request: web.Request) -> web.Response:
        doc = await self._json(request)
        targets = doc.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise BadRequestError("targets: expected a non-empty list of 'http://host:port' strings")
        for t in targets:
            node_id(t)  # ValueError (400) naming a malformed target
        report = await self._run(self._drain, targets)
        return web.json_response(report)

    def _drain(self, targets: list[str]) -> dict[str, Any]:
        """Push every block to the replica owning its chain (:func:`route_key` at the engine's
        ``route_depth``, the client's function). A block at depth d >= route_depth goes to the
        owner of its ancestor at depth route_depth, preceded by the shallow ancestors (depth <
        route_depth) that target has not been sent yet, so every push keeps the parent rule: a
        shared system-prompt block goes to each target owning a chain through it, and nowhere
        else. A shallow block without children ended a short chain and goes to its own key's
        owner (after its ancestors). Export order is parents first, so one pass plus the
        short-chain tail suffices; only the shallow blocks are held in memory."""
        depth = self.engine.config.route_depth
        shallow: dict[int, tuple[int, ...]] = {}  # block -> its chain's first min(d, depth) hashes
        shallow_blocks: dict[int, StoredBlock] = {}  # blocks at depth < route_depth (ancestors to carry)
        has_child: set[int] = set()
        sent: dict[str, set[int]] = {t: set() for t in targets}
        pending: dict[str, list[StoredBlock]] = {t: [] for t in targets}
        sizes = dict.fromkeys(targets, 0)
        result: dict[str, dict[str, Any]] = {t: {"blocks": 0, "ok": True, "error": None} for t in targets}

        def add(owner: str, block: StoredBlock) -> None:
            sent[owner].add(int(block.hash))
            pending[owner].append(block)
            sizes[owner] += sum(t.numel() * t.element_size() for t in block.payload.values())
            if sizes[owner] >= SNAPSHOT_SEGMENT_BYTES:
                self._push(owner, pending[owner], result[owner])
                pending[owner], sizes[owner] = [], 0

        for block in self.engine.export_blocks(None):
            h = int(block.hash)
            above = shallow.get(int(block.parent), ()) if block.parent is not None else ()
            path = (*above, h) if len(above) < depth else above
            shallow[h] = path
            if block.parent is not None:
                has_child.add(int(block.parent))
            if len(path) < depth:
                shallow_blocks[h] = block
                continue
            self._drain_with_ancestors(
                block, path, shallow_blocks=shallow_blocks, sent=sent, targets=targets, add=add
            )
        for h, block in shallow_blocks.items():
            if h not in has_child:
                self._drain_with_ancestors(
                    block, shallow[h], shallow_blocks=shallow_blocks, sent=sent, targets=targets, add=add
                )
        for owner, blocks in pending.items():
            if blocks:
                self._push(owner, blocks, result[owner])
        ok = all(r["ok"] for r in result.values())
        drained = sum(int(r["blocks"]) for r in result.values())
        return {"ok": ok, "targets": result, "drained_blocks": drained}

    @staticmethod
    def _drain_with_ancestors(
        block: StoredBlock,
        path: tuple[int, ...],
        *,
        shallow_blocks: dict[int, StoredBlock],
        sent: dict[str, set[int]],
        targets: list[str],
        add: Callable[[str, StoredBlock], None],
    ) -> None:
        """Queue ``block`` for the owner of its chain's key, after the shallow ancestors it lacks."""
        owner = rendezvous_owner(route_key(path, len(path)), targets)
        for ancestor in path:
            if ancestor in shallow_blocks and ancestor != int(block.hash) and ancestor not in sent[owner]:
                add(owner, shallow_blocks[ancestor])
        add(owner, block)

    def _push(self, target: str, blocks: list[StoredBlock], result: dict[str, Any]) -> None:
        if not result["ok"]:
            return  # the target failed earlier; do not hammer it
        data, metas = next(iter_segments(blocks, max_bytes=1 << 62))
        body = b"".join(
            [encode_stream_header(self._stream_header()), encode_stream_segment(data), data,
             encode_stream_trailer({"blocks": len(metas), "segments": 1})]
        )  # fmt: skip
        host, _, port = node_id(target).rpartition(":")
        headers = {"Content-Type": STREAM_CONTENT_TYPE}
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self.settings.drain_timeout_s)
        try:
            conn.request("POST", "/admin/restore", body=body, headers=headers)
            resp = conn.getresponse()
            answer = resp.read()
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status}: {answer[:200].decode('utf-8', 'replace')}")
            result["blocks"] += len(metas)
        except (OSError, http.client.HTTPException) as exc:
            result["ok"] = False
            result["error"] = f"{type(exc).__name__}: {exc}"
            log.error("drain to %s failed: %s", target, exc)
        finally:
            conn.close()

    # -- lifecycle -----------------------------------------------------------------------------

    def load_in_background(self, then: Callable[[], None] | None = None) -> threading.Thread:
        """Load the persisted cache, then call ``then``, mark ready and start periodic persists."""

        def run() -> None:
            try:
                self.persister.load()
            except GeometryMismatchError as exc:
                self.load_error = str(exc)
                log.error("%s", exc)
                self.persister.set_aside(str(exc))
            except Exception as exc:  # never leave the pod unready forever on a bad disk
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.exception("loading the persisted cache failed")
            if then is not None:
                then()
            self.ready.set()
            self.persister.start_periodic()

        thread = threading.Thread(target=run, name="kvcache-load", daemon=True)
        thread.start()
        return thread

    async def shutdown(self) -> None:
        """Stop periodic persists, persist once (the preStop contract), close the engine."""
        self.persister.stop()
        if self.ready.is_set():
            ok = await self._run(self.persister.persist)
            log.info("final persist on shutdown: %s", "ok" if ok else "FAILED")
        self.executor.shutdown(wait=True)
        self.commit_executor.shutdown(wait=True)
        self.engine.close()


async def _send_direct(request: web.Request, payload: memoryview) -> bool:
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


def _wire_pieces(shape: list[int], cfg: KVCacheConfig) -> tuple[int, int, int]:
    """(planes, plane bytes, piece bytes) of a put frame's ``[2, L, n, H, D]`` payload: 2L
    planes of n tokens, each plane one block_tokens piece per block, then a partial tail."""
    two, layers, n_tokens, heads, dim = shape
    token_bytes = heads * dim * DTYPE_BYTES[cfg.dtype]
    return two * layers, n_tokens * token_bytes, cfg.block_tokens * token_bytes


class _BodyViews:
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
    ) -> _BodyViews:
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


async def _read_exact(reader: Any, n: int) -> bytes:
    try:
        return bytes(await reader.readexactly(n))
    except asyncio.IncompleteReadError:
        raise BadRequestError(f"body truncated: expected {n} more bytes") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}"
    return str(exc) or type(exc).__name__


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)


def live_changes(doc: dict[str, Any]) -> dict[str, Any]:
    """snake_case live-field changes from a camelCase/snake_case body; 400 naming a bad field."""
    aliases = {f.alias or n: n for n, f in KVCacheConfig.model_fields.items()}
    changes: dict[str, Any] = {}
    for key, value in doc.items():
        name = key if key in KVCacheConfig.model_fields else aliases.get(key)
        if name is None:
            raise BadRequestError(f"unknown config field {key!r}")
        if name not in LIVE_FIELDS:
            live = ", ".join(sorted(LIVE_FIELDS))
            raise BadRequestError(f"field {key!r} cannot change live (needs a restart); live fields: {live}")
        changes[name] = value
    if not changes:
        raise BadRequestError("no config fields given")
    return changes


# --- serve --------------------------------------------------------------------------------------


def serve(config_path: str | None, settings: ServerSettings, environ: dict[str, str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; then persist and exit 0."""
    config = load_config(config_path, environ)
    logging.basicConfig(
        level=config.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from kvcache_engine.engine import KVCacheEngine

    engine = KVCacheEngine(config, load_on_start=False)
    if ScatterSums.available():
        log.info("checksums: C kernel (_wordsums)")
    else:
        log.warning(
            "checksums: the C kernel (_wordsums.c) was not built; torch computes the same digests "
            "~3x slower (puts, loads, validation): install with a C compiler present"
        )
    server = EngineServer(engine, settings)
    if settings.token is None:
        log.warning(
            "no API token configured (--token-file / KVCACHE_TOKEN_FILE / KVCACHE_TOKEN): auth is OFF"
        )
    asyncio.run(_serve_forever(server))
    return 0


async def _serve_forever(server: EngineServer) -> None:
    runner = web.AppRunner(server.app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, server.settings.host, server.settings.port, backlog=1024)
    await site.start()
    server_sockets = getattr(site._server, "sockets", None) or []
    sockets = [s.getsockname() for s in server_sockets]
    port = sockets[0][1] if sockets else server.settings.port
    print(f"kvcache-engine: listening on http://{server.settings.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Once loaded, what startup made (modules: torch, aiohttp; the loaded index) moves to the
    # collector's permanent generation, so its full passes walk only what came later: a full
    # pass over all of it took 65-86 ms (docs/benchmarks.md, "Put pass 2").
    server.load_in_background(then=gc.freeze)
    await stop.wait()
    log.info("shutting down: draining requests, then persisting")
    await runner.cleanup()
    await server.shutdown()


def settings_from_args(args: Any, environ: dict[str, str] | None = None) -> ServerSettings:
    token, token_file = resolve_token(args.token_file, environ)
    return ServerSettings(
        host=args.host,
        port=args.port,
        token=token,
        token_file=token_file,
        open_probes=not args.auth_probes,
        max_body_bytes=args.max_body_mb * 1024 * 1024,
        max_blocks_per_request=args.max_blocks,
        body_timeout_s=args.body_timeout_s,
        staging_bytes=args.staging_mb * 1024 * 1024,
    )


def cmd_serve(args: Any) -> int:
    """Handler of ``kvcache-engine serve``."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return serve(args.config, settings)
