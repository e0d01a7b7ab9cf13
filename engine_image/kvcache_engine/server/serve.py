"""``kvcache-engine serve``: the process around the server: config, engine, listening socket,
signals (SIGTERM/SIGINT drain requests, then persist once), and the CLI handler."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from typing import Any

from aiohttp import web

from kvcache_engine.contract import ConfigError, load_config
from kvcache_engine.core.block_pool import ScatterSums
from kvcache_engine.server.app import EngineServer
from kvcache_engine.server.limits import GuardedSite, runner_kwargs
from kvcache_engine.server.settings import ServerSettings, settings_from_args

__all__ = ["cmd_serve", "serve"]

log = logging.getLogger("kvcache_engine.server")


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
    runner = web.AppRunner(
        server.app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=5.0,
        **runner_kwargs(server.settings),
    )
    await runner.setup()
    site = GuardedSite(runner, server.settings, server.headers_seen, backlog=1024)
    await site.start()
    port = site.port
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
    log.info("shutting down: handing chains to peers, draining requests, then persisting")
    try:
        await server.hand_off()  # still serving: clients keep hitting here until it is done
    except Exception:  # a failed hand-off must not skip the final persist
        log.exception("hand-off on shutdown failed; the chains stay on this replica's volume")
    await runner.cleanup()
    await server.shutdown()


def cmd_serve(args: Any) -> int:
    """Handler of ``kvcache-engine serve``."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return serve(args.config, settings)
