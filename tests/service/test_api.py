"""The HTTP API against an in-process server: round trips, auth, limits, reload, metrics."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from kvcache_engine.client import AsyncKVCacheClient, KVCacheClient
from kvcache_engine.wire import FRAME_MAGIC, encode_frame_header
from tests.service.conftest import TOKEN, http, http_json, make_config, make_kv, make_tokens


def _client(url: str, **kw: object) -> KVCacheClient:
    return KVCacheClient([url], token=TOKEN, strict=True, timeout_s=2.0, **kw)  # type: ignore[arg-type]


def test_round_trip_put_lookup_get(live_server) -> None:
    srv = live_server()
    cfg = srv.engine.config
    tokens = make_tokens(42)
    kv = make_kv(cfg, 42)
    with _client(srv.url) as c:
        assert c.lookup(tokens) == 0
        assert c.get(tokens) is None
        assert c.put(tokens, kv, wait=True) == 10  # 42 tokens -> 10 full blocks of 4
        assert c.put(tokens, kv, wait=True) == 0  # already there
        assert c.lookup(tokens) == 40
        assert c.lookup([*tokens[:20], 1, 2, 3, 4]) == 20  # shared prefix only
        got = c.get(tokens)
        assert got is not None and torch.equal(got, kv[:, :, :40])
        assert c.lookup(tokens[:3]) == 0  # shorter than a block
        buf = torch.empty(3, 10_000, dtype=torch.float16)  # the caller's staging memory
        got = c.get(tokens, out=buf)
        assert got is not None and got.data_ptr() == buf.data_ptr() and torch.equal(got, kv[:, :, :40])
        small = torch.empty(8, dtype=torch.float16)  # too small: a new tensor instead
        got = c.get(tokens, out=small)
        assert got is not None and got.data_ptr() != small.data_ptr() and torch.equal(got, kv[:, :, :40])


def test_fire_and_forget_put_then_flush(live_server) -> None:
    srv = live_server()
    tokens = make_tokens(16, seed=3)
    with _client(srv.url) as c:
        assert c.put(tokens, make_kv(srv.engine.config, 16, seed=3)) == 1
        assert c.flush(5.0)
        assert c.lookup(tokens) == 16


async def test_async_client_round_trip(live_server) -> None:
    srv = live_server()
    cfg = srv.engine.config
    tokens = make_tokens(33, seed=1)
    kv = make_kv(cfg, 33, seed=1)
    async with AsyncKVCacheClient([srv.url], token=TOKEN, strict=True, timeout_s=2.0) as c:
        assert await c.lookup(tokens) == 0
        assert await c.put(tokens, kv, wait=True) == 8
        assert await c.lookup(tokens) == 32
        got = await c.get(tokens)
        assert got is not None and torch.equal(got, kv[:, :, :32])
        assert await c.put(make_tokens(8, seed=2), make_kv(cfg, 8)) == 1
        assert await c.flush(5.0)
        assert await c.lookup(make_tokens(8, seed=2)) == 8


def test_tokens_endpoints_for_curl_users(live_server) -> None:
    srv = live_server()
    cfg = srv.engine.config
    tokens = list(range(8))
    kv = make_kv(cfg, 8)
    payload = kv.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    head = encode_frame_header(
        {"tokens": tokens, "dtype": "float16", "shape": list(kv.shape), "nbytes": len(payload)}
    )
    status, body = http("POST", srv.url + "/v1/put", head + payload)
    assert status == 200 and json.loads(body)["stored_blocks"] == 2
    assert http_json("POST", srv.url + "/v1/lookup", {"tokens": tokens}) == (
        200,
        {"cached_blocks": 2, "cached_tokens": 8},
    )


@pytest.mark.parametrize("path,method", [("/v1/lookup", "POST"), ("/v1/get", "POST"), ("/v1/put", "POST"),
                                         ("/v1/stats", "GET"), ("/admin/persist", "POST"),
                                         ("/admin/snapshot", "GET"),
                                         ("/admin/config", "POST"), ("/admin/drain", "POST")])  # fmt: skip
def test_auth_required_401_without_detail(live_server, path: str, method: str) -> None:
    srv = live_server()
    for token in (None, "wrong"):
        status, body = http(method, srv.url + path, b"{}", token=token)
        doc = json.loads(body)
        assert status == 401
        assert doc["error"] == "unauthorized" and set(doc) == {"error", "request_id"}


def test_probes_open_by_default_and_protected_on_request(live_server) -> None:
    open_srv = live_server()
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http("GET", open_srv.url + path, token=None)[0] == 200
    closed = live_server(open_probes=False)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http("GET", closed.url + path, token=None)[0] == 401
        assert http("GET", closed.url + path)[0] == 200


PUT = {"hashes": [1], "dtype": "float16", "shape": [2, 2, 4, 2, 8], "nbytes": 512}


def _frame(header: dict, payload: bytes) -> bytes:
    return encode_frame_header(header) + payload


@pytest.mark.parametrize(
    "path,body,expect_status,expect_words",
    [
        ("/v1/lookup", b"{not json", 400, "JSON"),
        ("/v1/lookup", b"[1, 2]", 400, "object"),
        ("/v1/lookup", b'{"hashes": [1], "tokens": [1]}', 400, "exactly one"),
        ("/v1/lookup", b'{"hashes": "abc"}', 400, "hashes"),
        ("/v1/lookup", b'{"hashes": [-1]}', 400, "hashes[0]"),
        ("/v1/lookup", b'{"hashes": [18446744073709551616]}', 400, "hashes[0]"),
        ("/v1/lookup", b'{"tokens": [1.5]}', 400, "tokens[0]"),
        ("/v1/lookup", b'{"tokens": [true]}', 400, "tokens[0]"),
        ("/v1/get", json.dumps({"hashes": list(range(5000))}).encode(), 400, "limit"),
        ("/v1/put", b"KVC", 400, "truncated"),
        ("/v1/put", b"XXXX\x00\x00\x00\x00", 400, "magic"),
        ("/v1/put", FRAME_MAGIC + struct.pack("<I", 1 << 30), 400, "header length"),
        ("/v1/put", FRAME_MAGIC + struct.pack("<I", 100) + b"{}", 400, "truncated"),
        ("/v1/put", _frame({**PUT, "dtype": "float32"}, b""), 400, "dtype"),
        ("/v1/put", _frame({**PUT, "shape": [2, 2, 5, 2, 8], "nbytes": 640}, b""), 400, "shape"),
        ("/v1/put", _frame(PUT, b"x" * 10), 400,
         "payload"),
        ("/v1/put", _frame({k: v for k, v in PUT.items() if k != "hashes"}, b"x" * 512), 400, "exactly one"),
        ("/nope", b"", 404, "Not Found"),
    ],
)  # fmt: skip
def test_malformed_input_is_4xx_naming_the_problem(
    live_server, path, body, expect_status, expect_words
) -> None:
    srv = live_server()
    status, raw = http("POST", srv.url + path, body, X_Request_Id="req-123")
    doc = json.loads(raw)
    assert status == expect_status, doc
    assert expect_words in doc["error"]
    assert doc["request_id"] == "req-123"


def test_body_limit_413_and_wrong_method_405(live_server) -> None:
    srv = live_server(max_body_bytes=1000)
    status, raw = http("POST", srv.url + "/v1/put", b"x" * 2000)
    assert status == 413 and "limit" in json.loads(raw)["error"]
    assert http("DELETE", srv.url + "/v1/lookup")[0] == 405


def test_stats_config_and_metric_names(live_server) -> None:
    srv = live_server()
    with _client(srv.url) as c:
        c.put(make_tokens(8), make_kv(srv.engine.config, 8), wait=True)
        c.lookup(make_tokens(8))
    status, stats = http_json("GET", srv.url + "/v1/stats")
    assert (
        status == 200 and stats["num_blocks"] == 256 and stats["used_blocks"] == 2 and stats["ready"] is True
    )
    status, cfg = http_json("GET", srv.url + "/v1/config")
    assert cfg["blockTokens"] == 4 and cfg["numLayers"] == 2
    text = http("GET", srv.url + "/metrics", token=None)[1].decode()
    for name in ("kvcache_hits_total 2.0", "kvcache_misses_total 0.0", "kvcache_hit_tokens_total 8.0",
                 "kvcache_requested_tokens_total 8.0", "kvcache_requests_total", "kvcache_evictions_total",
                 "kvcache_bytes_in_total", "kvcache_bytes_out_total", "kvcache_persist_failures_total",
                 "kvcache_capacity_blocks 256.0", "kvcache_used_blocks 2.0", "kvcache_memory_pressure",
                 "kvcache_compression_ratio", "kvcache_max_tokens 1024.0",
                 'kvcache_device_memory_bytes{kind="total"}', "kvcache_http_requests_total",
                 'kvcache_op_latency_ms_bucket{le="+Inf",op="lookup"} 1.0'):  # fmt: skip
        assert name in text, name


def test_hot_reload_shrink_keeps_hottest_and_rejects_non_live(live_server) -> None:
    srv = live_server(make_config(max_tokens=256))  # 64 blocks
    cfg = srv.engine.config
    chains = [make_tokens(16, seed=s) for s in range(12)]  # 12 chains x 4 blocks = 48 blocks
    with _client(srv.url) as c:
        for s, tokens in enumerate(chains):
            assert c.put(tokens, make_kv(cfg, 16, seed=s), wait=True) == 4
        hot = chains[:3]
        for _ in range(5):
            for tokens in hot:
                assert c.lookup(tokens) == 16
        status, doc = http_json("POST", srv.url + "/admin/config", {"maxTokens": 64, "cacheStrategy": "LFU"})
        assert status == 200, doc
        assert doc["config"]["maxTokens"] == 64 and doc["config"]["cacheStrategy"] == "LFU"
        assert srv.engine.config.max_tokens == 64
        for tokens in hot:  # 16 blocks of capacity: the 12 hot blocks stay
            assert c.lookup(tokens) == 16
        assert srv.engine.get_stats()["used_blocks"] <= 16
    status, doc = http_json("POST", srv.url + "/admin/config", {"numLayers": 4})
    assert status == 400 and "numLayers" in doc["error"] and "restart" in doc["error"]
    status, doc = http_json("POST", srv.url + "/admin/config", {"maxTokens": -5})
    assert status == 400 and "max_tokens" in doc["error"]
    status, doc = http_json("POST", srv.url + "/admin/config", {"bogus": 1})
    assert status == 400 and "bogus" in doc["error"]


def test_admin_validate_compact_clear(live_server) -> None:
    srv = live_server()
    with _client(srv.url) as c:
        c.put(make_tokens(8), make_kv(srv.engine.config, 8), wait=True)
    status, report = http_json("POST", srv.url + "/admin/validate")
    assert status == 200 and report["is_valid"] is True
    assert http_json("POST", srv.url + "/admin/compact")[0] == 200
    assert http_json("POST", srv.url + "/admin/clear") == (200, {"ok": True})
    assert srv.engine.get_stats()["used_blocks"] == 0


def test_client_from_service_name_and_token_file(live_server, tmp_path) -> None:
    srv = live_server()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    tokens = make_tokens(8, seed=9)
    with KVCacheClient(
        service=f"127.0.0.1:{srv.port}", token_file=str(token_file), strict=True, timeout_s=2.0
    ) as c:
        assert c.stats()["endpoints"] == [srv.url]
        assert c.put(tokens, make_kv(srv.engine.config, 8), wait=True) == 2  # geometry from /v1/config
        assert c.lookup(tokens) == 8


def test_serve_sets_aside_a_cache_of_another_geometry(live_server, tmp_path) -> None:
    from kvcache_engine.engine import KVCacheEngine

    old = KVCacheEngine(make_config(persistence_path=str(tmp_path), head_dim=16), load_on_start=False)
    old.put(make_tokens(8), torch.zeros(2, 2, 8, 2, 16, dtype=torch.float16))
    assert old.persist()
    old.close()
    srv = live_server(make_config(persistence_path=str(tmp_path)))
    status, ready = http_json("GET", srv.url + "/readyz", token=None)
    assert status == 200 and "head_dim is 16" in ready["load_error"]
    assert not (tmp_path / "manifest.json").exists()
    (aside,) = (tmp_path / "quarantine").glob("set-aside-*")
    assert (aside / "manifest.json").exists() and "head_dim" in (aside / "REASON").read_text()
    status, report = http_json("POST", srv.url + "/admin/validate")
    assert not report["is_valid"] and any("set aside" in e for e in report["errors"])


@pytest.mark.parametrize("staging_bytes", [0, 8 * 1024, 1 << 20])
def test_concurrent_gets_with_and_without_staging_buffers(live_server, staging_bytes: int) -> None:
    import threading

    srv = live_server(staging_bytes=staging_bytes)
    cfg = srv.engine.config
    chains = {s: make_tokens(64, seed=s) for s in range(6)}
    errors: list[str] = []
    with _client(srv.url) as c:
        for s, tokens in chains.items():
            assert c.put(tokens, make_kv(cfg, 64, seed=s), wait=True) == 16

        def worker(s: int) -> None:
            with _client(srv.url) as own:
                for _ in range(10):
                    got = own.get(chains[s])
                    if got is None or not torch.equal(got, make_kv(cfg, 64, seed=s)):
                        errors.append(f"chain {s}")

        threads = [threading.Thread(target=worker, args=(s,)) for s in chains]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_large_get_is_sent_directly_and_keeps_the_connection(live_server, monkeypatch) -> None:
    import kvcache_engine.server.body as body_module

    direct: list[bool] = []
    original = body_module.send_direct

    async def counting(request, payload):  # type: ignore[no-untyped-def]
        direct.append(await original(request, payload))
        return direct[-1]

    monkeypatch.setattr(body_module, "send_direct", counting)
    # 256 KiB blocks: an 8-block get is 2 MiB, above the direct-send threshold.
    cfg = make_config(num_layers=8, num_kv_heads=8, head_dim=64, block_tokens=16, max_tokens=512)
    srv = live_server(cfg)
    tokens = make_tokens(128, seed=4)
    kv = make_kv(cfg, 128, seed=4)
    with _client(srv.url, pool_size=1) as c:
        assert c.put(tokens, kv, wait=True) == 8
        for _ in range(3):
            got = c.get(tokens)
            assert got is not None and torch.equal(got, kv)
        (conn,) = c._pool[srv.url]  # one pooled socket served every call: keep-alive held
        assert conn.reused
        assert c.lookup(tokens) == 128
    assert direct == [True, True, True]


def test_client_vanishing_mid_body_leaves_the_server_healthy(live_server) -> None:
    import socket

    cfg = make_config(num_layers=8, num_kv_heads=8, head_dim=64, block_tokens=16, max_tokens=512)
    srv = live_server(cfg)
    tokens = make_tokens(128, seed=5)
    with _client(srv.url) as c:
        assert c.put(tokens, make_kv(cfg, 128, seed=5), wait=True) == 8
    body = json.dumps({"tokens": tokens}).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(
                f"POST /v1/get HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    with _client(srv.url) as c:
        got = c.get(tokens)
        assert got is not None and torch.equal(got, make_kv(cfg, 128, seed=5))
    assert http("GET", srv.url + "/healthz", token=None)[0] == 200


def _put_frame(tokens: list[int], kv: torch.Tensor) -> bytes:
    payload = kv.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    head = encode_frame_header(
        {"tokens": tokens, "dtype": "float16", "shape": list(kv.shape), "nbytes": len(payload)}
    )
    return head + payload


def test_puts_land_in_place_and_a_cut_body_releases_its_slots(live_server) -> None:
    """codec none on the CPU: a put's body goes straight into reserved pool slots (no staging
    buffer); cached prefixes and a partial last block are skipped; a body cut short frees the
    slots and leaves every stored block as it was; with compression puts go through staging."""
    import socket
    import time

    srv = live_server()
    cfg = srv.engine.config
    kv = make_kv(cfg, 30, seed=7)
    tokens = make_tokens(30, seed=7)
    status, body = http("POST", srv.url + "/v1/put", _put_frame(tokens[:10], kv[:, :, :10]))
    assert status == 200 and json.loads(body)["stored_blocks"] == 2  # 10 tokens: 2 blocks + 2 dropped
    status, body = http("POST", srv.url + "/v1/put", _put_frame(tokens, kv))
    assert status == 200 and json.loads(body)["stored_blocks"] == 5  # 2 cached, 5 new, 2 tail tokens
    assert srv.server.staging._held == 0  # no staging buffer was ever taken for those puts
    # With the C kernel the checksums were folded in while the bytes landed: they must equal
    # a recomputation from the slots.
    assert srv.engine.validate_cache_integrity()["is_valid"]
    with _client(srv.url) as c:
        got = c.get(tokens)
        assert got is not None and torch.equal(got, kv[:, :, :28])
    used = srv.engine.get_stats()["used_blocks"]

    other = make_tokens(40, seed=8)
    frame = _put_frame(other, make_kv(cfg, 40, seed=8))
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(
            f"POST /v1/put HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(frame)}\r\n\r\n".encode()
            + frame[: len(frame) // 2]
        )
        deadline = time.monotonic() + 5
        while srv.engine.get_stats()["used_blocks"] == used and time.monotonic() < deadline:
            time.sleep(0.01)  # the slots are reserved once the header is in
        assert srv.engine.get_stats()["used_blocks"] == used + 10
    deadline = time.monotonic() + 5
    while srv.engine.get_stats()["used_blocks"] != used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.engine.get_stats()["used_blocks"] == used
    assert srv.engine.validate_cache_integrity()["is_valid"]
    with _client(srv.url) as c:
        assert c.lookup(other) == 0
        got = c.get(tokens)
        assert got is not None and torch.equal(got, kv[:, :, :28])

    srv.engine.reconfigure(use_compression=True, compression_ratio=0.5)  # int8: via staging
    assert not srv.engine.stores_raw_rows
    status, body = http("POST", srv.url + "/v1/put", _put_frame(other, make_kv(cfg, 40, seed=8)))
    assert status == 200 and json.loads(body)["stored_blocks"] == 10
    assert srv.server.staging._held > 0


def test_a_cut_put_into_a_full_pool_evicts_nothing(live_server) -> None:
    """A full pool has no free slots to receive into: the put is staged, and a body that never
    completes leaves every cached block in place (eviction waits for the whole body)."""
    import socket
    import time

    srv = live_server(make_config(max_tokens=40))  # 10 blocks of 4 tokens
    cfg = srv.engine.config
    tokens = make_tokens(40, seed=1)
    status, _ = http("POST", srv.url + "/v1/put", _put_frame(tokens, make_kv(cfg, 40, seed=1)))
    assert status == 200 and srv.engine.get_stats()["used_blocks"] == 10
    before = srv.engine.cached_hashes()
    frame = _put_frame(make_tokens(16, seed=2), make_kv(cfg, 16, seed=2))
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(
            f"POST /v1/put HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(frame)}\r\n\r\n".encode()
            + frame[:-7]
        )
        time.sleep(0.2)
    time.sleep(0.2)
    assert srv.engine.cached_hashes() == before
    status, body = http("POST", srv.url + "/v1/put", frame)  # complete: now it evicts
    assert status == 200 and json.loads(body)["stored_blocks"] == 4
    # Staged as slot rows (checksummed on the way with the C kernel), then copied as they are:
    # the same bytes back, and stored checksums that a recomputation agrees with.
    with _client(srv.url) as c:
        got = c.get(make_tokens(16, seed=2))
        assert got is not None and torch.equal(got, make_kv(cfg, 16, seed=2))
    assert srv.engine.validate_cache_integrity()["is_valid"]
    assert srv.server.staging._held > 0  # this put did take a staging buffer
