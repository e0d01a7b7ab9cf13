"""App assembly: ``EngineServer`` builds the aiohttp application around one engine (routes,
auth and error middleware, probes, stats, the executors the engine calls run on) and owns its
lifecycle (load in the background, final persist on shutdown).

Guarantees of the middleware: every request gets a request id; a missing or unknown token gets
401 and a data token on ``/admin/*`` gets 403, both bare (``{"error": "unauthorized"}`` /
``"forbidden"``: nothing about which token was expected; probes stay open unless
``--auth-probes``, ``/metrics`` unless ``--auth-probes`` or ``--auth-metrics``); malformed input
gets a 4xx JSON error naming what was wrong, never a 500 and never a crash.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest

from kvcache_engine.contract.admin import AdminError, P, SyncAdminClient
from kvcache_engine.contract.lifecycle import WARM_RATIO_KEY
from kvcache_engine.contract.placement import node_id
from kvcache_engine.contract.tokens import ADMIN, DATA, TokenSource, role_of
from kvcache_engine.persistence import GeometryMismatchError, Persister, persister_for
from kvcache_engine.server.admin import AdminRoutes
from kvcache_engine.server.body import Staging, receive_body, receive_json
from kvcache_engine.server.data import DataRoutes
from kvcache_engine.server.http import REQUEST_ID, BadRequestError, describe, dumps, error_response
from kvcache_engine.server.metrics import EngineCollector
from kvcache_engine.server.settings import ServerSettings

if TYPE_CHECKING:
    from kvcache_engine.engine import KVCacheEngine

__all__ = ["OPEN_PATHS", "EngineServer"]

log = logging.getLogger("kvcache_engine.server")
T = TypeVar("T")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_PROBES = frozenset({"/healthz", "/readyz"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


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
        # (endpoints, this URL) from the operator's last /admin/placement: the peers a shutdown
        # hands this replica's chains to; ``handed_off``: a full drain already moved them all.
        self.placement: tuple[tuple[str, ...], str] | None = None
        self.handed_off = False
        self.executor = ThreadPoolExecutor(
            max_workers=max(2, engine.config.num_workers), thread_name_prefix="kvcache-io"
        )
        # Zero-copy puts commit on threads of their own: an admin call waiting in the engine for
        # in-flight reservations must never hold the threads those reservations commit on.
        self.commit_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvcache-commit")
        self._token = TokenSource(settings.token, settings.token_file)
        self._admin_token = TokenSource(settings.admin_token, settings.admin_token_file)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(self))
        self.http_requests = Counter(
            "kvcache_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.staging = Staging(settings.staging_bytes, engine.config.dtype)
        self.data = DataRoutes(self)
        self.admin = AdminRoutes(self)
        self.headers_seen: set[int] = set()  # handlers that completed headers (server.limits)
        self.app = self._build_app()

    # -- plumbing ---------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes, middlewares=[self._middleware])
        r = app.router
        r.add_get(P.HEALTHZ, self.healthz)
        r.add_get(P.READYZ, self.readyz)
        r.add_get(P.METRICS, self.metrics)
        r.add_get(P.STATS, self.stats)
        r.add_get(P.CONFIG, self.get_config)
        r.add_get(P.ANALYZE, self.analyze)
        r.add_post(P.LOOKUP, self.data.lookup)
        r.add_post(P.GET, self.data.get)
        r.add_post(P.PUT, self.data.put)
        r.add_post(P.ADMIN_CONFIG, self.admin.config)
        r.add_post(P.ADMIN_PERSIST, self.admin.persist)
        r.add_post(P.ADMIN_VALIDATE, self.admin.validate)
        r.add_post(P.ADMIN_COMPACT, self.admin.compact)
        r.add_post(P.ADMIN_CLEAR, self.admin.clear)
        r.add_get(P.ADMIN_SNAPSHOT, self.admin.snapshot)
        r.add_post(P.ADMIN_RESTORE, self.admin.restore)
        r.add_post(P.ADMIN_DRAIN, self.admin.drain)
        r.add_post(P.ADMIN_PLACEMENT, self.admin.placement)
        from kvcache_engine.debug import register_debug_routes  # profiler, log level, /v1/memory

        self.profiler = register_debug_routes(
            app, self.engine, request_id_key=REQUEST_ID, executor=self.executor
        )
        return app

    def token(self) -> str | None:
        """The expected data token; a token file is re-read (at most once a second) for rotation."""
        return self._token.get()

    def admin_token(self) -> str | None:
        """The expected admin token (the data token when no admin token is configured)."""
        admin = self._admin_token.get()
        return admin if admin is not None else self._token.get()

    def _needs(self, path: str) -> str | None:
        """The role a path needs (None: open)."""
        if self.settings.open_probes and (
            path in _PROBES or (path == P.METRICS and not self.settings.auth_metrics)
        ):
            return None
        return ADMIN if path == "/admin" or path.startswith("/admin/") else DATA

    def _refusal(self, request: web.Request) -> int | None:
        """401 (no or unknown token) or 403 (a data token on an admin path); None: allowed. The
        role is the stricter of the request's path and the route it matched (however spelt)."""
        need = self._needs(request.path)
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else None
        if canonical is not None and need != ADMIN and self._needs(canonical) == ADMIN:
            need = ADMIN
        tokens = {DATA: self.token(), ADMIN: self.admin_token()}
        if need is None or (tokens[DATA] is None and tokens[ADMIN] is None):
            return None
        role = role_of(request.headers.get("Authorization", ""), tokens)
        if role is None:
            return 401
        return 403 if need == ADMIN and role != ADMIN else None

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id", "")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex[:16]
        request[REQUEST_ID] = rid
        if self.settings.header_timeout_s > 0:
            self.headers_seen.add(id(request.protocol))
        route = (
            request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        )
        try:
            refused = self._refusal(request)
            if refused is not None:
                resp: web.StreamResponse = error_response(
                    refused, "unauthorized" if refused == 401 else "forbidden", rid
                )
            else:
                resp = await handler(request)
                if not resp.prepared:
                    resp.headers["X-Request-Id"] = rid
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            resp = error_response(exc.status, exc.reason, rid)
        except BadRequestError as exc:
            resp = error_response(exc.status, str(exc), rid)
        except (ValueError, KeyError, TypeError, IndexError, OverflowError) as exc:
            # Parsing and engine validation errors: the client sent something wrong.
            resp = error_response(400, describe(exc), rid)
        except TimeoutError:
            resp = error_response(408, "request body not received in time", rid)
        except ConnectionResetError:
            raise
        except Exception as exc:
            log.exception("request %s %s failed (request_id=%s)", request.method, request.path, rid)
            resp = error_response(500, f"internal error ({type(exc).__name__}); see the engine log", rid)
        self.http_requests.labels(route, str(resp.status)).inc()
        return resp

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the I/O executor (engine calls never run on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def read_body(self, request: web.Request, limit: int | None = None) -> bytearray:
        """The whole body (at most ``limit``, default max_body_bytes; see :func:`receive_body`)."""
        limit = self.settings.max_body_bytes if limit is None else limit
        return await receive_body(request, limit, self.settings.body_timeout_s)

    async def read_json(self, request: web.Request) -> dict[str, Any]:
        """The body as a JSON object (see :func:`receive_json`)."""
        s = self.settings
        return await receive_json(request, s.body_timeout_s, s.max_json_bytes, s.max_json_depth)

    # -- probes, stats ---------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.ready.is_set():
            warm = self.persister.warm_ratio()
            return web.json_response({"status": "ready", "load_error": self.load_error, WARM_RATIO_KEY: warm})
        return web.json_response({"status": "loading"}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        body = await self.run(generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def stats(self, request: web.Request) -> web.Response:
        st = await self.run(self.engine.get_stats)
        st = {**st, "persistence": self.persister.stats(), "ready": self.ready.is_set()}
        return web.json_response(st, dumps=dumps)

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self.engine.config.to_file_dict())

    async def analyze(self, request: web.Request) -> web.Response:
        """The analyzers' findings (kvcache_engine.analytics.analyze), for ``kvcache-engine doctor``."""
        from kvcache_engine.analytics import analyze

        return web.json_response(await self.run(analyze, self.engine), dumps=dumps)

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

    async def hand_off(self) -> dict[str, Any] | None:
        """On SIGTERM, while still serving: copy every chain to the peer that takes it while this
        replica is away (its next owner by rendezvous over the other replicas of the last
        placement), so a restart or an upgrade leaves no share of the chains cold; the replica's
        own volume still gets the final persist. Bounded by ``shutdown_handoff_s``; None when
        there is nothing to do (no placement, no peer, not loaded, or already drained)."""
        budget = self.settings.shutdown_handoff_s
        if self.placement is None or self.handed_off or not self.ready.is_set() or budget <= 0:
            return None
        endpoints, this = self.placement
        me = node_id(this)
        peers = [e for e in endpoints if node_id(e) != me]
        if not peers:
            return None
        started = time.monotonic()
        room = await self.run(self._free_slots, peers)
        drain = functools.partial(self.admin.drain_to, peers, None, deadline=started + budget, room=room)
        report = await self.run(drain)
        left = report["left_for_room"]
        log.info(
            "hand-off on shutdown to %d peer(s): %s of %s blocks in %.1f s%s%s",
            len(peers), report["handed_off_blocks"], report["held_blocks"], time.monotonic() - started,
            "" if report["complete"] else " (time budget spent: the rest is only on this volume)",
            f" ({left} left home: the peers had no free room for them)" if left else "",
        )  # fmt: skip
        return report

    def _free_slots(self, peers: list[str]) -> dict[str, int]:
        """Free block slots of each peer's primary tier (0 when it cannot say: nothing sent)."""
        room: dict[str, int] = {}
        for peer in peers:
            client = SyncAdminClient(f"http://{node_id(peer)}", self.admin_token(), timeout_s=2.0)
            try:
                stats = client.stats()
                room[peer] = max(0, int(stats.capacity_blocks - stats.used_blocks))
            except AdminError as exc:
                log.warning("hand-off: %s did not say its free room (%s); nothing sent to it", peer, exc)
                room[peer] = 0
        return room

    async def shutdown(self) -> None:
        """Stop periodic persists, persist once (the preStop contract), close the engine."""
        self.persister.stop()
        if self.ready.is_set():
            ok = await self.run(self.persister.persist)
            log.info("final persist on shutdown: %s", "ok" if ok else "FAILED")
        self.executor.shutdown(wait=True)
        self.commit_executor.shutdown(wait=True)
        self.engine.close()
