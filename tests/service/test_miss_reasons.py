"""Miss reasons and the miss-ratio curve over the wire: what /metrics and /v1/stats carry (read
back through the contract's EngineStats), namespace mismatches seen by the engine, and client
failures reported by the real client on its next lookup."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import pytest

from kvcache_engine.client import KVCacheClient
from kvcache_engine.contract import (
    CURVE_MULTIPLES,
    MISS_REASONS,
    SyncAdminClient,
    rendezvous_owner,
    route_key,
)
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
    partial = bytearray()

    def reply(chunk: bytes) -> bytes | None:
        partial.extend(chunk)  # the client may send the head and the body in two segments
        head, _, body = bytes(partial).partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        if len(body) < length:
            return None
        partial.clear()
        bodies.append(json.loads(body))
        if hang.is_set():
            return None  # never answers: the client's deadline passes
        return http_reply(b'{"cached_blocks": 0, "cached_tokens": 0}')

    fake = FakeEngine(reply)
    cfg = make_config()
    client = KVCacheClient([fake.url], token=TOKEN, config=cfg, timeout_s=1.0, max_retries=0)
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


def test_placement_makes_the_curve_forget_chains_owned_elsewhere(live_server: Any) -> None:
    srv = live_server(make_config(max_tokens=64))
    srv.engine._state.curve = ShadowCurve(max_entries=10_000, max_rate=1.0, decay_samples=None, route_depth=2)
    me, other = "http://10.0.0.1:8080", "http://10.0.0.2:8080"
    chains = [[i, 1000 + i] for i in range(40)]  # forty chains keyed by their second block
    for hashes in chains:
        srv.engine.lookup_hashes(hashes)
    assert srv.engine._state.curve.entries == 80
    status, doc = http_json("POST", f"{srv.url}/admin/placement", {"endpoints": [me, other], "self": me})
    owned = [h for h in chains if rendezvous_owner(h[1], [me, other]) == me]
    assert status == 200 and doc["forgotten_entries"] == 2 * (40 - len(owned)) > 0
    assert srv.engine._state.curve.entries == 2 * len(owned)
    status, doc = http_json("POST", f"{srv.url}/admin/placement", {"endpoints": [other], "self": me})
    assert status == 400 and "self" in doc["error"]
    status, doc = http_json("POST", f"{srv.url}/admin/placement", {"endpoints": "x", "self": me})
    assert status == 400 and "endpoints" in doc["error"]


def test_a_lookup_marked_moved_is_left_out_of_the_curve(live_server: Any) -> None:
    srv = live_server(make_config(max_tokens=64))
    srv.engine._state.curve = exact_shadow()
    assert http_json("POST", f"{srv.url}/v1/lookup", {"hashes": [5, 6], "moved": True})[0] == 200
    reasons = srv.engine.get_stats()["miss_reasons"]
    assert reasons["moved"] == 2 and reasons["never_seen"] == 0
    status, doc = http_json("POST", f"{srv.url}/v1/lookup", {"hashes": [5, 6], "moved": "yes"})
    assert status == 400 and "moved" in doc["error"]


def test_the_client_says_moved_for_chains_whose_owner_changed_with_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bodies: list[dict[str, Any]] = []

    partial = bytearray()

    def reply(chunk: bytes) -> bytes | None:
        partial.extend(chunk)  # the client may send the head and the body in two segments
        head, _, body = bytes(partial).partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        if len(body) < length:
            return None
        partial.clear()
        bodies.append(json.loads(body))
        return http_reply(b'{"cached_blocks": 0, "cached_tokens": 0}')

    fake = FakeEngine(reply)
    port = int(fake.url.rsplit(":", 1)[1])
    answers = [["127.0.0.1"], ["127.0.0.1", "127.0.0.2"]]  # the headless Service gains a pod

    real = socket.getaddrinfo

    def getaddrinfo(host: str, p: Any, *args: Any, **kw: Any) -> list[Any]:
        if host != "svc.test":
            return real(host, p, *args, **kw)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, p)) for ip in answers[0]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    cfg = make_config()
    client = KVCacheClient(service=f"svc.test:{port}", token=TOKEN, config=cfg, dns_refresh_s=0.0)
    try:
        geometry = client._core._geometry
        assert geometry is not None
        owned: dict[bool, list[int]] = {True: [], False: []}
        for seed in range(40):
            tokens = make_tokens(8, seed=seed)
            key = route_key(client._core.hashes(geometry, tokens), geometry.route_depth)
            owner = rendezvous_owner(key, [f"http://127.0.0.1:{port}", f"http://127.0.0.2:{port}"])
            owned[owner.startswith("http://127.0.0.1")].append(seed)
        client.lookup(make_tokens(8, seed=owned[True][0]))
        assert "moved" not in bodies[-1]
        answers.pop(0)  # the new pod is ready: the next resolution sees two
        client.lookup(make_tokens(8, seed=owned[True][0]))  # still owned by the first pod
        assert "moved" not in bodies[-1]
        assert client._core.moved(
            route_key(client._core.hashes(geometry, make_tokens(8, seed=owned[False][0])), 2)
        )
    finally:
        client.close()
        fake.stop()
