"""Fuzzing the API with malformed requests: only 4xx answers, the server stays up, RSS bounded."""

from __future__ import annotations

import http.client
import json
import random
import struct
from collections.abc import Callable

import psutil
import pytest

from kvcache_engine.client import KVCacheClient
from kvcache_engine.wire import FRAME_MAGIC, STREAM_MAGIC, encode_frame_header, encode_stream_header
from tests.service.conftest import GEOMETRY, TOKEN, make_config, make_kv, make_tokens

Request = tuple[str, str, bytes, dict[str, str]]


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _bad_value(rng: random.Random) -> object:
    return rng.choice(
        [None, "x", 1.5, -1, 2**64, True, {}, [[1]], ["1"], [1.0], [-3], [2**70], "\u2603" * 5, [None]]
    )


def _valid_put(rng: random.Random) -> bytes:
    cfg = make_config()
    n = rng.randint(1, 6) * cfg.block_tokens
    kv = make_kv(cfg, n, seed=rng.randint(0, 99))
    payload = kv.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()
    header = {"tokens": make_tokens(n, seed=rng.randint(0, 99)), "dtype": "float16", "shape": list(kv.shape),
              "nbytes": len(payload)}  # fmt: skip
    return encode_frame_header(header) + payload


def _generators() -> list[Callable[[random.Random], Request]]:
    def truncated_put(rng: random.Random) -> Request:
        body = _valid_put(rng)
        return "POST", "/v1/put", body[: rng.randint(0, len(body) - 1)], _auth()

    def bad_put_header(rng: random.Random) -> Request:
        body = _valid_put(rng)
        hlen = struct.unpack("<I", body[4:8])[0]
        header = json.loads(body[8 : 8 + hlen])
        field = rng.choice(["dtype", "shape", "nbytes", "tokens", "hashes"])
        header[field] = _bad_value(rng) if field != "dtype" else rng.choice(["int8", "float32", 3, None])
        if field == "hashes":
            header["hashes"] = [1]  # both hashes and tokens: always invalid
        return "POST", "/v1/put", encode_frame_header(header) + body[8 + hlen :], _auth()

    def random_bytes(rng: random.Random) -> Request:
        body = bytes([rng.choice(b"xyz{[\x00\xff")]) + rng.randbytes(rng.randint(0, 300))
        return "POST", rng.choice(["/v1/put", "/v1/lookup", "/v1/get", "/admin/config", "/admin/restore",
                                   "/admin/drain"]), body, _auth()  # fmt: skip

    def bad_json_fields(rng: random.Random) -> Request:
        key = rng.choice(["hashes", "tokens"])
        doc = {key: _bad_value(rng)} if rng.random() < 0.8 else {"hashes": [1], "tokens": [1]}
        return "POST", rng.choice(["/v1/lookup", "/v1/get"]), json.dumps(doc).encode(), _auth()

    def huge_count(rng: random.Random) -> Request:
        doc = {"hashes": list(range(rng.randint(4097, 20000)))}
        return "POST", rng.choice(["/v1/lookup", "/v1/get"]), json.dumps(doc).encode(), _auth()

    def huge_header_length(rng: random.Random) -> Request:
        return "POST", "/v1/put", FRAME_MAGIC + struct.pack("<I", rng.randint(2**26 + 1, 2**32 - 1)), _auth()

    def wrong_token(rng: random.Random) -> Request:
        headers = rng.choice(
            [{}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}, {"Authorization": ""}]
        )
        return "POST", rng.choice(["/v1/lookup", "/admin/clear", "/admin/config"]), b"{}", headers

    def bad_config(rng: random.Random) -> Request:
        doc = rng.choice([{"numLayers": 3}, {"maxTokens": "big"}, {"maxTokens": -1},
                          {"cacheStrategy": "FIFO"},
                          {}, {"nope": 1}, {"gcThreshold": 7}])  # fmt: skip
        return "POST", "/admin/config", json.dumps(doc).encode(), _auth()

    def bad_stream(rng: random.Random) -> Request:
        geometry = {
            k: GEOMETRY[k] for k in ("block_tokens", "num_layers", "num_kv_heads", "head_dim", "dtype")
        }
        head = encode_stream_header({"format_version": 1, "geometry": {**geometry, "namespace": "default"}})
        tail = rng.choice(
            [b"", b"\x05\x00", struct.pack("<Q", 50) + rng.randbytes(50), struct.pack("<Q", 2**40)]
        )
        return (
            "POST",
            "/admin/restore",
            rng.choice([head[:5], head + tail, STREAM_MAGIC + b"\xff" * 4]),
            _auth(),
        )

    def bad_drain(rng: random.Random) -> Request:
        doc = rng.choice([{"targets": "x"}, {"targets": []}, {"targets": [1]}, {}, {"targets": ["http://"]}])
        return "POST", "/admin/drain", json.dumps(doc).encode(), _auth()

    def wrong_route(rng: random.Random) -> Request:
        route = rng.choice(
            [
                ("GET", "/v1/put"),
                ("PUT", "/v1/lookup"),
                ("GET", "/x" * rng.randint(1, 50)),
                ("DELETE", "/admin/clear"),
            ]
        )
        return (*route, b"", _auth())  # fmt: skip

    return [truncated_put, bad_put_header, random_bytes, bad_json_fields, huge_count, huge_header_length,
            wrong_token, bad_config, bad_stream, bad_drain, wrong_route]  # fmt: skip


def fuzz(url: str, n: int, seed: int) -> dict[int, int]:
    rng = random.Random(seed)
    gens = _generators()
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    statuses: dict[int, int] = {}
    try:
        for i in range(n):
            method, path, body, headers = gens[i % len(gens)](rng)
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            assert 400 <= resp.status < 500, (method, path, body[:80], resp.status, raw[:200])
            doc = json.loads(raw)
            assert doc["error"] and doc["request_id"]
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
    finally:
        conn.close()
    return statuses


def _still_serves(url: str) -> None:
    cfg = make_config()
    with KVCacheClient([url], token=TOKEN, strict=True, timeout_s=5.0) as c:
        tokens = make_tokens(16, seed=1234)
        c.put(tokens, make_kv(cfg, 16), wait=True)
        assert c.lookup(tokens) == 16


def test_fuzz_a_few_hundred_malformed_requests(live_server) -> None:
    srv = live_server()
    statuses = fuzz(srv.url, 330, seed=5)
    assert set(statuses) <= {400, 401, 404, 405, 409, 413}
    assert statuses[400] > 150 and statuses[401] >= 30
    _still_serves(srv.url)


@pytest.mark.slow
def test_fuzz_thousands_of_requests_rss_bounded(engine_process) -> None:
    proc = engine_process("fuzz")
    fuzz(proc.url, 500, seed=1)  # warm up allocator pools before the baseline
    rss0 = psutil.Process(proc.pid).memory_info().rss
    fuzz(proc.url, 5000, seed=2)
    rss1 = psutil.Process(proc.pid).memory_info().rss
    assert rss1 - rss0 < 64 * 1024 * 1024, f"RSS grew {(rss1 - rss0) / 2**20:.1f} MiB"
    _still_serves(proc.url)
