"""The controller tells the engines the replica set clients place chains over, once per change
(their curves forget the chains another replica owns): real engine servers on loopback."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import aiohttp

from kvcache_engine.core.curve import ShadowCurve
from kvcache_engine.engine import KVCacheEngine
from kvcache_engine.server import ServerSettings
from kvcache_operator import controller
from tests.service.conftest import TOKEN, LiveServer, make_config


async def test_placement_is_announced_once_per_change_of_the_ready_engines() -> None:
    servers = []
    for _ in range(2):
        engine = KVCacheEngine(make_config(max_tokens=64), load_on_start=False)
        engine._state.curve = ShadowCurve(10_000, 1.0, decay_samples=None)
        servers.append(LiveServer(engine, ServerSettings(host="127.0.0.1", port=0, token=TOKEN)))
    try:
        for srv in servers:
            for i in range(30):
                srv.engine.lookup_hashes([i, 1000 + i])  # thirty chains seen by both
        state = controller.CacheState()
        pods = [_pod(f"c-{i}", srv.port) for i, srv in enumerate(servers)]
        urls = sorted(srv.url for srv in servers)  # the operator announces them sorted
        async with aiohttp.ClientSession() as http:
            rt: Any = SimpleNamespace(http=http)
            log = logging.getLogger("test")
            await controller._announce_placement(rt, state, pods, token=TOKEN, logger=log)
            entries = [srv.engine._state.curve.entries for srv in servers]
            assert len(state.placed) == 2
            assert sum(entries) == 60 and min(entries) > 0  # each chain's 2 blocks stay on its owner only
            assert all(srv.server.placement == (tuple(urls), srv.url) for srv in servers)  # hand-off peers
            servers[0].engine.lookup_hashes([99, 1099])
            await controller._announce_placement(rt, state, pods, token=TOKEN, logger=log)
            assert servers[0].engine._state.curve.entries == entries[0] + 2  # same set: not sent again
            servers[1].server.placement = None  # as after a restart: the engine forgot
            pods[1]["status"]["containerStatuses"][0]["restartCount"] = 1
            await controller._announce_placement(rt, state, pods, token=TOKEN, logger=log)
            assert servers[1].server.placement == (tuple(urls), servers[1].url)  # told again
    finally:
        for srv in servers:
            srv.stop()


def _pod(name: str, port: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "spec": {"containers": [{"name": "engine", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {"name": "engine", "ready": True, "restartCount": 0, "state": {"running": {}}}
            ],
        },
    }
