"""``kvcache-engine doctor`` against a real engine server on localhost."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kvcache_engine.cli import main
from kvcache_engine.engine import KVCacheEngine
from kvcache_engine.server import EngineServer, ServerSettings
from tests.analytics.test_engine_history import make_engine, replay

TOKEN = "doctor-token"


class ServedApp:
    """An aiohttp app on 127.0.0.1:<free port>, its loop in a background thread."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        self._call(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self._call(site.start())
        assert site._server is not None
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[[web.Application], ServedApp]]:
    made: list[ServedApp] = []

    def factory(app: web.Application) -> ServedApp:
        made.append(ServedApp(app))
        return made[-1]

    yield factory
    for served in made:
        served.stop()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def thrashing_engine_server(serve: Callable[[web.Application], ServedApp]) -> tuple[KVCacheEngine, ServedApp]:
    engine = make_engine(max_tokens=64)
    replay(engine, prompts=8, blocks=4, rounds=4)
    server = EngineServer(engine, ServerSettings(host="127.0.0.1", port=0, token=TOKEN))
    server.load_in_background().join(timeout=30)
    return engine, serve(server.app)


def test_doctor_json_reports_the_analyzers_findings(
    serve: Any, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, served = thrashing_engine_server(serve)

    code = main(["doctor", "--url", served.url, "--token-file", str(token_file), "--json"])

    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert doc["source"] == "/v1/analyze"
    [capacity] = doc["access_patterns"]["findings"]
    assert capacity["area"] == "capacity"
    assert capacity["recommendation"] == {"max_tokens": 128}
    assert capacity["evidence"]["hit_rate_ceiling"] == 0.75
    assert {f["area"] for f in doc["bottlenecks"]} == {"hit_rate", "memory"}
    assert doc["balance"]["balanced"] is True


def test_doctor_table_shows_findings_and_the_curve(
    serve: Any, token_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, served = thrashing_engine_server(serve)

    assert main(["doctor", "--url", served.url, "--token-file", str(token_file)]) == 0

    out = capsys.readouterr().out
    for text in ("kvcache doctor", "capacity-bound", "max_tokens=128", "hit rate vs capacity", "← current"):
        assert text in out


def test_doctor_wrong_token_is_a_one_line_error(
    serve: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, served = thrashing_engine_server(serve)
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")

    assert main(["doctor", "--url", served.url, "--token-file", str(wrong)]) == 2
    assert "HTTP 401 (check --token-file)" in capsys.readouterr().err


def test_doctor_falls_back_to_stats_when_the_server_has_no_analyze(
    serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = make_engine(max_tokens=64)
    replay(engine, prompts=8, blocks=4, rounds=2)

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(engine.get_stats())

    async def config(_: web.Request) -> web.Response:
        return web.json_response(engine.config.to_file_dict())

    app = web.Application()
    app.router.add_get("/v1/stats", stats)
    app.router.add_get("/v1/config", config)
    served = serve(app)

    assert main(["doctor", "--url", served.url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == "/v1/stats"
    assert {f["area"] for f in doc["bottlenecks"]} == {"hit_rate", "memory"}
    assert doc["access_patterns"]["findings"][0]["evidence"] == {"status": 404}
