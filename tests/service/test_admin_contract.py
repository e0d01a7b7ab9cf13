"""The contract's admin client and EngineStats against the real engine server on loopback: what the
operator reads is what the engine reports, with the same names on both sides."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvcache_engine.contract import (
    AdminClient,
    AdminError,
    LiveConfig,
    P,
    SyncAdminClient,
    TokenError,
    TokenSource,
    resolve_token,
)
from tests.service.conftest import TOKEN, make_config, make_kv, make_tokens


def test_engine_stats_are_what_the_engine_reports(live_server: Any) -> None:
    srv = live_server(make_config(max_tokens=256))
    cfg = srv.engine.config
    tokens = make_tokens(32)
    srv.engine.put(tokens, make_kv(cfg, 32))
    srv.engine.lookup(tokens)
    srv.engine.lookup(make_tokens(16, seed=9))
    stats = SyncAdminClient(srv.url, TOKEN).stats()
    engine = srv.engine.get_stats()
    assert (stats.hits, stats.misses) == (engine["cache_hits"], engine["cache_misses"]) != (0, 0)
    assert (stats.hit_tokens, stats.requested_tokens) == (engine["hit_tokens"], engine["requested_tokens"])
    assert stats.capacity_blocks == engine["num_blocks"] and stats.used_blocks == engine["used_blocks"] > 0
    assert stats.memory_pressure == pytest.approx(engine["memory_pressure"])
    assert stats.max_tokens == cfg.max_tokens and stats.codec == engine["codec"]
    assert stats.lookup_latency_buckets and stats.lookup_latency_buckets[-1][1] == 2


def test_live_config_round_trip_and_errors_name_the_request(live_server: Any) -> None:
    srv = live_server(make_config(max_tokens=256))

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            client = AdminClient(session, srv.url, TOKEN)
            running = await client.live()
            assert running.max_tokens == 256
            await client.apply(LiveConfig(max_tokens=512, prefetch_size=8))
            assert (await client.live()).given()["max_tokens"] == 512
            with pytest.raises(AdminError, match=r"POST .*/admin/config: HTTP 400: .*numLayers") as bad:
                await client.call("POST", P.ADMIN_CONFIG, {"numLayers": 3})
            assert bad.value.status == 400
            with pytest.raises(AdminError, match=r"HTTP 401") as denied:
                await AdminClient(session, srv.url, "wrong").config()
            assert denied.value.status == 401

    asyncio.run(scenario())
    assert srv.engine.config.max_tokens == 512 and srv.engine.config.prefetch_size == 8


@pytest.fixture
def liar() -> Iterator[str]:
    """A server that declares a 1 GiB JSON answer and sends a few bytes, then hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n"
                    b"Content-Type: application/json\r\n\r\n{"
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    sock.close()
    thread.join(timeout=5)


def test_a_huge_declared_answer_is_refused_without_allocating(liar: str) -> None:
    with pytest.raises(AdminError, match="answer of 1073741824 bytes refused"):
        SyncAdminClient(liar, None, timeout_s=5).config()

    async def via_async() -> None:
        async with aiohttp.ClientSession() as session:
            await AdminClient(session, liar, None, timeout_s=5).config()

    with pytest.raises(AdminError, match="answer of 1073741824 bytes refused"):
        asyncio.run(via_async())


def test_unreachable_engine_is_an_admin_error_naming_the_url() -> None:
    with pytest.raises(AdminError, match=r"GET http://127\.0\.0\.1:9/v1/config"):
        SyncAdminClient("http://127.0.0.1:9", None, timeout_s=2).config()
    with pytest.raises(AdminError, match="expected http://host:port"):
        SyncAdminClient("ftp://x", None)


def test_token_resolution_order_and_rotation(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first\n")
    assert resolve_token(str(path), {}) == ("first", str(path))
    assert resolve_token(None, {"KVCACHE_TOKEN_FILE": str(path), "KVCACHE_TOKEN": "env"}) == (
        "first",
        str(path),
    )
    assert resolve_token(None, {"KVCACHE_TOKEN": "env"}) == ("env", None)
    assert resolve_token(None, {}, token="given") == ("given", None)
    source = TokenSource("first", str(path), recheck_s=0.0)
    path.write_text("second\n")
    assert source.get() == "second"
    path.write_text("")  # a Secret update in progress: keep the last good token
    assert source.get() == "second"
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(TokenError, match=r"token file .*empty: the file is empty"):
        resolve_token(str(tmp_path / "empty"), {})
