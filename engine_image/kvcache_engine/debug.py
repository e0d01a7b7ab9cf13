"""Debugging features of the engine service: profiler, runtime log level, memory report.

``register_debug_routes(app, engine)`` adds, to the server's aiohttp application (before it
starts, so behind the server's auth and request-id middleware):

* ``POST /admin/profile`` ``{"requests": N}`` or ``{"seconds": S}``: records the next N
  data-plane requests (POSTs under ``/v1/``) or the next S seconds with ``torch.profiler``
  (CPU, plus CUDA where present; shapes and Python stacks; every thread of the process) and
  answers the Chrome trace (``chrome://tracing`` / Perfetto JSON), also stored under the
  profile directory (header ``X-Profile-Path``). ``GET /admin/profile``: the current or last
  session. Gated by the live config field ``enable_profiling`` (403 naming it when off); one
  session at a time (409 otherwise).
* ``POST /admin/log-level`` ``{"level": "DEBUG", "logger": "kvcache_engine", "format": "json"}``
  and ``GET /admin/log-level``: the level of a ``kvcache_engine*`` logger, now, for this
  process; ``format`` switches every root handler between text and JSON lines. The override
  holds until the next config change, which applies ``log_level`` from the config (the
  operator's ``spec.cache.logLevel``).
* ``GET /v1/memory``: pool bytes (bounded by construction: they equal the sizing formula),
  the CUDA allocator's allocated/reserved/free bytes, the process RSS, gc counts and, when
  tracing is on, the top tracemalloc sites. ``POST /admin/tracemalloc`` ``{"enabled": true}``
  turns tracing on or off (``PYTHONTRACEMALLOC=N`` at start does too).

Every request's id (the server's ``X-Request-Id``) is put in a context variable that
``RequestIdFilter`` copies onto log records, so JSON logs of a failing request (traceback
included) carry the id its error response carries.

Nothing here imports torch at module level: the JSON log formatter is usable without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import json
import logging
import os
import tempfile
import threading
import time
import traceback
import tracemalloc
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvcache_engine.contract import P, pool_blocks
from kvcache_engine.wire import WireError, decode_json_object

if TYPE_CHECKING:
    from kvcache_engine.engine import KVCacheEngine

__all__ = [
    "LOG_FORMATS",
    "JsonFormatter",
    "ProfileSession",
    "Profiler",
    "RequestIdFilter",
    "cmd_profile",
    "configure_log_format",
    "memory_report",
    "register_debug_routes",
    "set_log_level",
]

log = logging.getLogger("kvcache_engine.debug")

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ENGINE_LOGGER = "kvcache_engine"
MAX_PROFILE_SECONDS = 600.0
MAX_PROFILE_REQUESTS = 100_000
TOP_SITES = 10

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kvcache_request_id", default=None
)
"""The id of the HTTP request being handled on this task (None outside requests)."""


class DebugError(ValueError):
    """A 4xx answer from a debug route; ``status`` defaults to 400."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# --- logging -------------------------------------------------------------------------------------


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the current request's id, or None) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, and the traceback
    (``exc``) when the record carries one. Extra fields given with ``extra=`` are kept."""

    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            doc["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and not key.startswith("_"):
                doc[key] = value
        return json.dumps(doc, default=str)


def configure_log_format(fmt: str) -> None:
    """Switch every root handler to ``text`` or ``json`` lines (adding the request-id filter)."""
    if fmt not in LOG_FORMATS:
        raise DebugError(f"format: expected one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in root.handlers:
        handler.setFormatter(formatter)
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


def current_log_format() -> str:
    root = logging.getLogger()
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers) else "text"


def set_log_level(level: str, logger_name: str = ENGINE_LOGGER) -> dict[str, str]:
    """Set the level of ``kvcache_engine`` or one of its children; returns the levels now."""
    name = str(level).upper()
    if name not in LOG_LEVELS:
        raise DebugError(f"level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    if logger_name != ENGINE_LOGGER and not logger_name.startswith(ENGINE_LOGGER + "."):
        raise DebugError(
            f"logger: expected {ENGINE_LOGGER!r} or a child ('{ENGINE_LOGGER}.x'), got {logger_name!r}"
        )
    logging.getLogger(logger_name).setLevel(name)
    log.warning("log level of %s set to %s", logger_name, name)
    return log_levels()


def log_levels() -> dict[str, str]:
    """Effective level of ``kvcache_engine`` and of each child logger that sets its own."""
    out = {ENGINE_LOGGER: logging.getLevelName(logging.getLogger(ENGINE_LOGGER).getEffectiveLevel())}
    for name, obj in sorted(logging.root.manager.loggerDict.items()):
        if name.startswith(ENGINE_LOGGER + ".") and isinstance(obj, logging.Logger) and obj.level:
            out[name] = logging.getLevelName(obj.level)
    return out


# --- profiler ------------------------------------------------------------------------------------


@dataclass
class ProfileSession:
    """One profiling run: stops after ``requests`` data-plane requests or ``seconds``,
    whichever is given, or at ``deadline_s`` at the latest."""

    requests: int | None
    seconds: float | None
    deadline_s: float
    started_unix: float = field(default_factory=time.time)
    recorded: int = 0
    state: str = "starting"  # starting -> recording -> done | failed
    path: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "requests": self.requests,
            "seconds": self.seconds,
            "recorded_requests": self.recorded,
            "started_unix": self.started_unix,
            "path": self.path,
            "error": self.error,
        }


def _profile_request(doc: Mapping[str, Any]) -> tuple[int | None, float | None, float]:
    """(requests, seconds, deadline_s) from a POST /admin/profile body, validated."""
    unknown = sorted(set(doc) - {"requests", "seconds", "timeout_s"})
    if unknown:
        raise DebugError(
            f"unknown field(s) {', '.join(unknown)}; expected 'requests' or 'seconds' (and 'timeout_s')"
        )
    if ("requests" in doc) == ("seconds" in doc):
        raise DebugError("give exactly one of 'requests' (count) or 'seconds' (duration)")
    timeout = doc.get("timeout_s", MAX_PROFILE_SECONDS)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_PROFILE_SECONDS
    ):
        raise DebugError(f"timeout_s: expected a number in (0, {MAX_PROFILE_SECONDS:g}], got {timeout!r}")
    if "requests" in doc:
        n = doc["requests"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PROFILE_REQUESTS:
            raise DebugError(f"requests: expected an integer in [1, {MAX_PROFILE_REQUESTS}], got {n!r}")
        return n, None, float(timeout)
    s = doc["seconds"]
    if isinstance(s, bool) or not isinstance(s, int | float) or not 0 < s <= MAX_PROFILE_SECONDS:
        raise DebugError(f"seconds: expected a number in (0, {MAX_PROFILE_SECONDS:g}], got {s!r}")
    return None, float(s), float(s)


class Profiler:
    """Runs at most one ``torch.profiler`` session at a time for the server.

    Every method runs on the event loop's thread (no locking needed); the trace is exported in a
    worker thread. Invariant: ``_prof`` is not None exactly while a session is recording.
    """

    def __init__(self, out_dir: Path, executor: ThreadPoolExecutor | None = None) -> None:
        self.out_dir = out_dir
        self.executor = executor
        self.session: ProfileSession | None = None
        self._prof: Any = None
        self._done: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._finishing: asyncio.Future[None] | None = None

    @property
    def recording(self) -> bool:
        return self._prof is not None

    async def start(self, requests: int | None, seconds: float | None, deadline_s: float) -> ProfileSession:
        if self.recording or (self.session is not None and self.session.state == "starting"):
            raise DebugError("a profile is already recording; wait for it (GET /admin/profile)", 409)
        session = self.session = ProfileSession(requests, seconds, deadline_s, state="starting")
        try:
            await _start_all_workers(self.executor)
            prof = _make_profiler()
            prof.start()
        except Exception as exc:  # e.g. another profiler active in the process: report, do not stick
            session.state, session.error = "failed", f"{type(exc).__name__}: {exc}"
            raise DebugError(f"cannot start the profiler: {session.error}", 503) from exc
        self._prof, session.state = prof, "recording"
        self._done = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(deadline_s, self._finish_soon)
        log.warning("profiling started: %s", session.to_dict())
        return session

    def request_done(self) -> None:
        """Count one finished data-plane request; finish the session at the requested count."""
        s = self.session
        if not self.recording or s is None:
            return
        s.recorded += 1
        if s.requests is not None and s.recorded >= s.requests:
            self._finish_soon()

    def _finish_soon(self) -> None:
        self._finishing = asyncio.ensure_future(self.finish())  # kept so the task is not collected

    async def finish(self) -> None:
        """Stop recording and export the trace (idempotent)."""
        prof, self._prof = self._prof, None
        if prof is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        session = self.session
        assert session is not None and self._done is not None
        try:
            prof.stop()
            session.path = await asyncio.to_thread(self._export, prof)
            session.state = "done"
            log.warning("profile of %d requests written to %s", session.recorded, session.path)
        except Exception as exc:  # a failed export must not leave the server stuck "recording"
            session.state, session.error = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("profile export failed")
        self._done.set()

    async def wait(self) -> ProfileSession:
        assert self._done is not None and self.session is not None
        await self._done.wait()
        return self.session

    def _export(self, prof: Any) -> str:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            directory = self.out_dir
        except OSError:
            directory = Path(tempfile.gettempdir())
        path = directory / f"trace-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.json"
        prof.export_chrome_trace(str(path))
        return str(path)


async def _start_all_workers(executor: ThreadPoolExecutor | None) -> None:
    """Make the server's thread pool start every worker thread now: torch's Python tracer only
    follows threads that exist when it starts, and the engine's calls run on these threads."""
    workers = int(getattr(executor, "_max_workers", 0))
    if executor is None or workers < 1:
        return
    barrier = threading.Barrier(workers)

    def meet() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=2.0)  # a pool busy with long calls just means fewer new threads

    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(executor, meet) for _ in range(workers)))


def _make_profiler() -> Any:
    """A torch.profiler over CPU (and CUDA when present) with shapes and Python stacks, recording
    every thread (the server runs engine calls on a thread pool) where torch supports it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    kwargs: dict[str, Any] = {"activities": activities, "record_shapes": True, "with_stack": True}
    with contextlib.suppress(AttributeError, TypeError):
        kwargs["experimental_config"] = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    return profile(**kwargs)


def _is_data_plane(request: web.Request) -> bool:
    """Data-plane requests are the POSTs under /v1/ (lookup, get, put ...); GETs there are stats."""
    return request.method == "POST" and request.path.startswith("/v1/")


# --- memory ---------------------------------------------------------------------------------------


def memory_report(engine: KVCacheEngine, top: int = TOP_SITES) -> dict[str, Any]:
    """Where the engine's memory is: pool, CUDA allocator, process, gc, tracemalloc sites."""
    import psutil
    import torch

    stats = engine.get_stats()
    cfg = engine.config
    pool = {
        "pool_bytes": int(stats["pool_bytes"]),
        # The primary pool is one allocation of exactly pool_blocks(config) slots: it cannot grow.
        "primary_pool_bytes_by_formula": pool_blocks(cfg) * cfg.block_bytes_stored(),
        "num_blocks": int(stats["num_blocks"]),
        "used_blocks": int(stats["used_blocks"]),
        "memory_pressure": float(stats["memory_pressure"]),
        # Holes in the slot range the blocks span (1 - used / span); POST /admin/compact -> 0.
        "fragmentation": float(stats["pool_fragmentation"]),
        "cpu_tier_blocks": int(stats["cpu_tier_blocks"]),
        "device": str(stats["device"]),
    }
    info = psutil.Process().memory_info()
    report: dict[str, Any] = {
        "pool": pool,
        "process": {
            "rss_bytes": int(info.rss),
            "vms_bytes": int(info.vms),
            "threads": len(psutil.Process().threads()),
        },
        "cuda": _cuda_memory(torch, engine.device) if engine.device.type == "cuda" else None,
        "gc": {"counts": list(gc.get_count()), "uncollectable": len(gc.garbage)},
        "tracemalloc": _tracemalloc_report(top),
    }
    return report


def _cuda_memory(torch: Any, device: Any) -> dict[str, Any]:
    free, total = torch.cuda.mem_get_info(device)
    ms = torch.cuda.memory_stats(device)
    allocated, reserved = int(torch.cuda.memory_allocated(device)), int(torch.cuda.memory_reserved(device))
    return {
        "allocated_bytes": allocated,
        "reserved_bytes": reserved,
        "max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "reserved_unallocated_bytes": reserved - allocated,
        "free_bytes": int(free),
        "total_bytes": int(total),
        "alloc_retries": int(ms.get("num_alloc_retries", 0)),
        "ooms": int(ms.get("num_ooms", 0)),
    }


def _tracemalloc_report(top: int) -> dict[str, Any]:
    if not tracemalloc.is_tracing():
        return {"enabled": False, "top": []}
    current, peak = tracemalloc.get_traced_memory()
    stats = tracemalloc.take_snapshot().statistics("lineno")[:top]
    return {
        "enabled": True,
        "traced_bytes": current,
        "peak_bytes": peak,
        "top": [
            {
                "site": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
                "size_bytes": s.size,
                "count": s.count,
            }
            for s in stats
        ],
    }


# --- routes ---------------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _DebugRoutes:
    """The route handlers (one instance per app)."""

    def __init__(self, engine: KVCacheEngine, profiler: Profiler, request_id_key: Any) -> None:
        self.engine = engine
        self.profiler = profiler
        self.request_id_key = request_id_key

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.request_id_key is not None:
            current_request_id.set(request.get(self.request_id_key))
        if not (self.profiler.recording and _is_data_plane(request)):
            return await handler(request)
        from torch.profiler import record_function

        try:
            with record_function(f"kvcache.http {request.method} {request.path}"):
                return await handler(request)
        finally:
            self.profiler.request_done()

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            return decode_json_object(await request.read() or b"{}", "body")
        except WireError as exc:
            raise DebugError(str(exc)) from None

    async def post_profile(self, request: web.Request) -> web.StreamResponse:
        if not self.engine.config.enable_profiling:
            raise DebugError(
                "profiling is disabled: set enable_profiling (KVCache spec.cache.enableProfiling: true, "
                'or POST /admin/config {"enableProfiling": true})',
                403,
            )
        requests, seconds, deadline = _profile_request(await self._json(request))
        await self.profiler.start(requests, seconds, deadline)
        session = await self.profiler.wait()
        if session.state != "done" or session.path is None:
            raise DebugError(f"profile failed: {session.error}", 503)
        headers = {
            "X-Profile-Path": session.path,
            "X-Profile-Requests": str(session.recorded),
            "Content-Type": "application/json",
        }
        return web.FileResponse(session.path, headers=headers)

    async def get_profile(self, request: web.Request) -> web.Response:
        s = self.profiler.session
        return web.json_response(
            {"enabled": self.engine.config.enable_profiling, "session": s.to_dict() if s else None}
        )

    async def post_log_level(self, request: web.Request) -> web.Response:
        doc = await self._json(request)
        unknown = sorted(set(doc) - {"level", "logger", "format"})
        if unknown:
            raise DebugError(f"unknown field(s) {', '.join(unknown)}; expected 'level', 'logger', 'format'")
        if "level" not in doc and "format" not in doc:
            raise DebugError(
                "give 'level' (DEBUG, INFO, WARNING, ERROR, CRITICAL) and/or 'format' (text, json)"
            )
        if "format" in doc:
            configure_log_format(str(doc["format"]))
        if "level" in doc:
            set_log_level(str(doc["level"]), str(doc.get("logger", ENGINE_LOGGER)))
        return await self.get_log_level(request)

    async def get_log_level(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "levels": log_levels(),
                "format": current_log_format(),
                "config_log_level": self.engine.config.log_level,
            }
        )

    async def get_memory(self, request: web.Request) -> web.Response:
        top = request.query.get("top", str(TOP_SITES))
        if not top.isdigit() or not 1 <= int(top) <= 1000:
            raise DebugError(f"top: expected an integer in [1, 1000], got {top!r}")
        report = await asyncio.to_thread(memory_report, self.engine, int(top))
        return web.json_response(report)

    async def post_tracemalloc(self, request: web.Request) -> web.Response:
        doc = await self._json(request)
        enabled = doc.get("enabled")
        frames = doc.get("frames", 1)
        if not isinstance(enabled, bool):
            raise DebugError(f"enabled: expected true or false, got {enabled!r}")
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= 64:
            raise DebugError(f"frames: expected an integer in [1, 64], got {frames!r}")
        if enabled and not tracemalloc.is_tracing():
            tracemalloc.start(frames)
        elif not enabled and tracemalloc.is_tracing():
            tracemalloc.stop()
        return web.json_response({"enabled": tracemalloc.is_tracing()})


def _error_middleware() -> Any:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except DebugError as exc:
            rid = current_request_id.get() or ""
            return web.json_response(
                {"error": str(exc), "request_id": rid}, status=exc.status, headers={"X-Request-Id": rid}
            )

    return errors


def register_debug_routes(
    app: web.Application,
    engine: KVCacheEngine,
    *,
    profile_dir: str | os.PathLike[str] | None = None,
    request_id_key: Any = None,
    executor: ThreadPoolExecutor | None = None,
    environ: Mapping[str, str] | None = None,
) -> Profiler:
    """Add the debug routes and middleware to ``app`` (before it starts).

    ``request_id_key``: the key under which the server's middleware stores the request id;
    ``executor``: the thread pool the server runs engine calls on (profiled threads).
    ``profile_dir`` (default ``$KVCACHE_PROFILE_DIR``, else ``<tmp>/kvcache-profiles``) keeps
    the traces. ``$KVCACHE_LOG_FORMAT=json`` switches the logs to JSON lines now."""
    env = os.environ if environ is None else environ
    out = Path(
        profile_dir or env.get("KVCACHE_PROFILE_DIR") or Path(tempfile.gettempdir()) / "kvcache-profiles"
    )
    profiler = Profiler(out, executor)
    routes = _DebugRoutes(engine, profiler, request_id_key)
    app.middlewares.append(routes.middleware)
    app.middlewares.append(_error_middleware())
    r = app.router
    r.add_post("/admin/profile", routes.post_profile)
    r.add_get("/admin/profile", routes.get_profile)
    r.add_post("/admin/log-level", routes.post_log_level)
    r.add_get("/admin/log-level", routes.get_log_level)
    r.add_post("/admin/tracemalloc", routes.post_tracemalloc)
    r.add_get("/v1/memory", routes.get_memory)
    fmt = env.get("KVCACHE_LOG_FORMAT")
    if fmt:
        configure_log_format(fmt.lower())
    return profiler


# --- CLI: kvcache-engine profile -------------------------------------------------------------------


def cmd_profile(args: Any) -> int:
    """``kvcache-engine profile --url URL --out trace.json [--requests N | --seconds S]``."""
    from kvcache_engine.backup import admin

    body: dict[str, Any] = (
        {"seconds": args.seconds} if args.seconds is not None else {"requests": args.requests}
    )
    body["timeout_s"] = args.timeout
    client = admin(args.url, args.token_file, timeout=args.timeout + 60)
    for resp in client.stream(
        P.ADMIN_PROFILE, method="POST", body=json.dumps(body).encode(), content_type="application/json"
    ):
        data = resp.read()
    Path(args.out).write_bytes(data)
    events = len(json.loads(data).get("traceEvents", []))
    print(
        f"wrote {args.out}: {events} trace events over {resp.getheader('X-Profile-Requests')} requests "
        f"(engine copy: {resp.getheader('X-Profile-Path')}); open it in https://ui.perfetto.dev or chrome://tracing"
    )
    return 0
