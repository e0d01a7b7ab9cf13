"""``kvcache-engine serve``: the engine's HTTP API (aiohttp). Transport only: every decision
lives in the engine or the persister; this module parses, limits, authenticates and streams.

Data plane (bearer token): ``POST /v1/lookup``, ``POST /v1/get`` (answers a binary frame,
streamed), ``POST /v1/put`` (a binary frame). Probes (open by default): ``/healthz``,
``/readyz`` (503 until the persisted cache is loaded), ``/metrics``. Stats/config:
``GET /v1/stats``, ``GET /v1/config``. Admin (token): config hot reload, persist, validate,
compact, clear, snapshot (stream), restore (stream), drain. See docs/engine-api.md.

Modules: ``app`` (EngineServer: routes, middleware, probes, lifecycle), ``data`` (lookup, get,
put), ``admin`` (config, persist, validate, compact, clear, snapshot, restore, drain),
``metrics`` (``/metrics``), ``body`` (body I/O: bodies in, KV frames out, staging buffers),
``http`` (request ids, 4xx errors), ``settings`` and ``serve`` (the process).

Guarantees: malformed input gets a 4xx JSON ``{"error", "request_id"}`` naming what was wrong,
never a 500 and never a crash; bodies, blocks per request and body read time are bounded; a
missing or wrong token gets 401 with no detail.
"""

from kvcache_engine.server.admin import live_changes
from kvcache_engine.server.app import EngineServer
from kvcache_engine.server.body import Staging
from kvcache_engine.server.http import BadRequestError
from kvcache_engine.server.serve import cmd_serve, serve
from kvcache_engine.server.settings import ServerSettings, settings_from_args

__all__ = [
    "BadRequestError",
    "EngineServer",
    "ServerSettings",
    "Staging",
    "cmd_serve",
    "live_changes",
    "serve",
    "settings_from_args",
]
