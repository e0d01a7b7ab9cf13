"""Miss reasons and the miss-ratio curve over the wire: what /metrics and /v1/stats carry (read
back through the contract's EngineStats), namespace mismatches seen by the engine, and client
failures reported by the real client on its next lookup."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from kvcache_engine.client import KVCacheClient
from kvcache_engine.contract import CURVE_MULTIPLES, MISS_REASONS, SyncAdminClient
from kvcache_engine.core.curve import ShadowCurve
from kvcache_engine.core.hashing import chain_hashes
from tests.service.conftest import TOKEN, http_json, make_config, make_kv, make_tokens
from tests.service.test_client_faults import FakeEngine, http_reply


def exact_shadow() -> ShadowCurve:
    return ShadowCurve(max_entries=10_000, max_rate=1.0, decay_samples=None)


def test_curve_and_miss_reasons_reach_engine_stats(live_server: Any) -> None:
    srv = live_server(make_config(max_tokens=64))  # 16 blocks
    srv.engine._state.curve = exact_shadow()  # a toy pool has no curve of its own
    cfg = srv.engine.config
    tokens = make_tokens(32)  # 8 blocks
    for _ in range(3):
        srv.engine.lookup(tokens)
        srv.engine.put(tokens, make_kv(cfg, 32))
    stats = SyncAdminClient(srv.url, TOKEN).stats()
    engine = srv.engine.get_stats()
    assert stats.curve is not None
    assert stats.curve.capacity_blocks == engine["curve"]["capacity_blocks"] == 16
    assert list(stats.curve.hit_rates) == pytest.approx(engine["curve"]["hit_rates"])
    assert stats.curve.at(16) == pytest.approx(16 / 24)  # two of three lookups hit all 8 blocks
    assert stats.curve.ceiling == pytest.approx(16 / 24)
    assert stats.curve.weight == 24 and stats.curve.samples == 24
    assert len(stats.curve.hit_rates) == len(CURVE_MULTIPLES)
    assert set(stats.misses_by_reason) == set(MISS_REASONS)
    assert stats.misses_by_reason["never_seen"] == 8 == engine["miss_reasons"]["never_seen"]
    assert stats.curve_sampling_rate == 1.0 and stats.curve_memory_bytes > 0
    status, doc = http_json("GET", f"{srv.url}/v1/stats")
    assert status == 200 and doc["curve"]["hit_rates"] == engine["curve"]["hit_rates"]


def test_an_engine_without_a_curve_reports_none(live_server: Any) -> None:
    srv = live_server(make_config(max_tokens=64))  # 1 % of a toy pool is under 64 entries
    stats = SyncAdminClient(srv.url, TOKEN).stats()
    assert stats.curve is None and srv.engine.get_stats()["curve"] is None
    assert stats.misses_by_reason == dict.fromkeys(MISS_REASONS, 0.0)


def test_lookups_under_another_namespace_count_as_a_mismatch(live_server: Any) -> None:
    srv = live_server(make_config(max_tokens=64))
    cfg = srv.engine.config
    tokens = make_tokens(16)
    srv.engine.put(tokens, make_kv(cfg, 16))
    ours = [int(h) for h in chain_hashes(cfg.namespace, tokens, cfg.block_tokens)]
    theirs = [int(h) for h in chain_hashes("old-model", tokens, cfg.block_tokens)]
    assert http_json("POST", f"{srv.url}/v1/lookup", {"hashes": ours, "namespace": cfg.namespace}) == (
        200,
        {"cached_blocks": 4, "cached_tokens": 16},
    )
    status, doc = http_json("POST", f"{srv.url}/v1/lookup", {"hashes": theirs, "namespace": "old-model"})
    assert (status, doc["cached_blocks"]) == (200, 0)
    reasons = srv.engine.get_stats()["miss_reasons"]
    assert reasons["namespace_mismatch"] == 4
    status, doc = http_json("POST", f"{srv.url}/v1/lookup", {"hashes": ours, "namespace": 7})
    assert status == 400 and "namespace" in doc["error"]


def test_reported_client_misses_are_counted_and_checked(live_server: Any) -> None:
    srv = live_server(make_config(max_tokens=64))
    hashes = [1, 2]
    doc = {"hashes": hashes, "client_misses": {"client_timeout": 5, "client_error": 3}}
    assert http_json("POST", f"{srv.url}/v1/lookup", doc)[0] == 200
    reasons = srv.engine.get_stats()["miss_reasons"]
    assert (reasons["client_timeout"], reasons["client_error"]) == (5, 3)
    for bad, word in (
        ({"capacity": 1}, "unknown reason"),
        ({"client_error": -1}, "client_error"),
        ([], "object"),
    ):
        status, answer = http_json("POST", f"{srv.url}/v1/lookup", {"hashes": hashes, "client_misses": bad})
        assert status == 400 and word in answer["error"], bad
    assert srv.engine.get_stats()["miss_reasons"]["client_error"] == 3  # refused bodies count nothing


def test_the_client_reports_its_failed_calls_on_its_next_lookup() -> None:
    bodies: list[dict[str, Any]] = []
    hang = threading.Event()
    hang.set()

    def reply(request: bytes) -> bytes | None:
        bodies.append(json.loads(request.split(b"\r\n\r\n", 1)[1]))
        if hang.is_set():
            return None  # never answers: the client's deadline passes
        return http_reply(b'{"cached_blocks": 0, "cached_tokens": 0}')

    fake = FakeEngine(reply)
    cfg = make_config()
    client = KVCacheClient([fake.url], token=TOKEN, config=cfg, timeout_s=0.2, max_retries=0)
    try:
        tokens = make_tokens(12)  # 3 blocks
        assert client.lookup(tokens) == 0  # times out
        hang.clear()
        assert client.lookup(tokens) == 0
        assert client.lookup(tokens) == 0
    finally:
        client.close()
        fake.stop()
    assert bodies[0]["namespace"] == cfg.namespace and "client_misses" not in bodies[0]
    assert bodies[1]["client_misses"] == {"client_timeout": 3}
    assert "client_misses" not in bodies[2]  # reported once
