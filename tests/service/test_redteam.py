"""Red team (issue 16): hypothesis over the wire format and the admin API against one real server
on loopback. Whatever arrives: no 5xx, no slot leaked (used == indexed: nothing is in flight
between requests), and no state change without the right token. A few thousand cases here; the
``slow`` variants run ten times as many (make e2e)."""

from __future__ import annotations

import http.client
import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_engine.engine import KVCacheEngine
from kvcache_engine.server import ServerSettings
from kvcache_engine.wire import encode_frame_header, encode_stream_header
from tests.service.conftest import TOKEN, LiveServer, make_config, make_kv

ADMIN = "red-team-admin"
FAST = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck))

JSON_PATHS = ["/v1/lookup", "/v1/get", "/admin/config", "/admin/drain", "/admin/log-level", "/v1/put"]
ADMIN_PATHS = ["/admin/clear", "/admin/config", "/admin/compact", "/admin/persist", "/admin/restore",
               "/admin/drain", "/admin/log-level", "/admin/validate"]  # fmt: skip

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)
fields = st.sampled_from(["hashes", "tokens", "maxTokens", "targets", "level", "namespace", "client_misses",
                          "dtype", "shape", "nbytes", "cacheStrategy", "gcThreshold"])  # fmt: skip
documents = st.dictionaries(fields, json_values | st.lists(st.integers(0, 2**64 + 5), max_size=8), max_size=4)


class Conn:
    """One keep-alive HTTP connection to the server (reopened when it closes)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body: bytes, token: str | None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                return resp.status, raw
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def red() -> Iterator[tuple[LiveServer, Conn]]:
    engine = KVCacheEngine(make_config(max_tokens=256), load_on_start=False)
    srv = LiveServer(engine, ServerSettings(host="127.0.0.1", port=0, token=TOKEN, admin_token=ADMIN))
    conn = Conn(srv.port)
    try:
        yield srv, conn
    finally:
        conn.conn.close()
        srv.stop()


def _state(srv: LiveServer) -> tuple[Any, ...]:
    st_ = srv.engine.get_stats()
    return st_["cached_blocks"], st_["used_blocks"], srv.engine.config.to_file_dict()


def _no_leak(srv: LiveServer) -> None:
    st_ = srv.engine.get_stats()
    assert st_["used_blocks"] == st_["cached_blocks"], st_


def _frame(header: dict[str, Any], payload: bytes) -> bytes:
    return encode_frame_header(header) + payload


def _valid_put(hashes: list[int]) -> bytes:
    cfg = make_config()
    kv = make_kv(cfg, len(hashes) * cfg.block_tokens)
    payload = kv.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return _frame(
        {"hashes": hashes, "dtype": "float16", "shape": list(kv.shape), "nbytes": len(payload)}, payload
    )


# --- JSON over every endpoint -------------------------------------------------------------------


def _json_case(red: tuple[LiveServer, Conn], path: str, doc: Any, depth: int) -> None:
    srv, conn = red
    body = json.dumps(doc).encode()
    if depth:
        body = b"[" * depth + body + b"]" * depth
    if path == "/v1/put":
        body = struct.pack("<4sI", b"KVC1", len(body)) + body
    status, raw = conn.request("POST", path, body, ADMIN)
    assert status < 500, (path, body[:200], status, raw[:300])
    _no_leak(srv)


@FAST
@given(
    path=st.sampled_from(JSON_PATHS), doc=documents | json_values, depth=st.sampled_from([0, 0, 0, 40, 3000])
)
def test_any_json_on_any_endpoint_is_never_a_5xx(
    red: tuple[LiveServer, Conn], path: str, doc: Any, depth: int
) -> None:
    _json_case(red, path, doc, depth)


@pytest.mark.slow
@SLOW
@given(path=st.sampled_from(JSON_PATHS), doc=documents | json_values, depth=st.integers(0, 50_000))
def test_any_json_on_any_endpoint_is_never_a_5xx_many(
    red: tuple[LiveServer, Conn], path: str, doc: Any, depth: int
) -> None:
    _json_case(red, path, doc, depth)


# --- put frames -------------------------------------------------------------------------------------


def _put_case(red: tuple[LiveServer, Conn], hashes: list[int], cut: int, lie: int, dtype: str) -> None:
    srv, conn = red
    body = _valid_put(hashes)
    if dtype != "float16":
        body = body.replace(b'"float16"', json.dumps(dtype).encode(), 1)
    if lie:  # the header's nbytes lies
        body = body.replace(b'"nbytes":', f'"nbytes":{lie},"x":'.encode(), 1)
    if cut:
        body = body[: max(0, len(body) - cut)]
    status, raw = conn.request("POST", "/v1/put", body, TOKEN)
    assert status < 500, (hashes, cut, lie, dtype, status, raw[:300])
    if len(set(hashes)) != len(hashes):
        assert status == 400
    _no_leak(srv)


@FAST
@given(
    hashes=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    cut=st.sampled_from([0, 0, 1, 7, 100]),
    lie=st.sampled_from([0, 0, 1, 2**40]),
    dtype=st.sampled_from(["float16", "float16", "int8", "bfloat16"]),
)
def test_any_put_frame_leaves_no_trace_unless_stored(
    red: tuple[LiveServer, Conn], hashes: list[int], cut: int, lie: int, dtype: str
) -> None:
    _put_case(red, hashes, cut, lie, dtype)


@pytest.mark.slow
@SLOW
@given(
    hashes=st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 40), min_size=1, max_size=64),
    cut=st.integers(0, 5000),
    lie=st.integers(0, 2**63),
    dtype=st.text(max_size=10),
)
def test_any_put_frame_leaves_no_trace_unless_stored_many(
    red: tuple[LiveServer, Conn], hashes: list[int], cut: int, lie: int, dtype: str
) -> None:
    _put_case(red, hashes, cut, lie, dtype)


# --- no state change without the right token ---------------------------------------------------------


@FAST
@given(
    path=st.sampled_from(ADMIN_PATHS),
    token=st.sampled_from([None, "", TOKEN, ADMIN + "x", "x" + TOKEN, TOKEN.upper()]),
    doc=documents,
)
def test_no_admin_state_change_without_the_admin_token(
    red: tuple[LiveServer, Conn], path: str, token: str | None, doc: dict[str, Any]
) -> None:
    srv, conn = red
    conn.request("POST", "/v1/put", _valid_put([1001, 1002]), TOKEN)
    before = _state(srv)
    status, raw = conn.request("POST", path, json.dumps(doc).encode(), token)
    assert status == (403 if token == TOKEN else 401), (path, token, status)
    assert set(json.loads(raw)) == {"error", "request_id"}
    assert _state(srv) == before


@FAST
@given(auth=st.binary(min_size=0, max_size=40))
def test_any_authorization_bytes_are_401_never_400_or_5xx(red: tuple[LiveServer, Conn], auth: bytes) -> None:
    srv, _ = red
    auth = auth.replace(b"\r", b"").replace(b"\n", b"")
    request = (
        b"POST /v1/lookup HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + auth
        + b"\r\nContent-Length: 15\r\nConnection: close\r\n\r\n" + b'{"hashes": [1]}'
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(request)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else -1
    assert status in (401, 400), raw[:200]  # 400 only for bytes HTTP itself forbids in a header
    if status == 400:
        assert any(b < 0x20 and b != 0x09 for b in auth) or b"\x7f" in auth, (auth, raw[:200])


# --- restore streams ---------------------------------------------------------------------------------


@FAST
@given(header=documents, tail=st.binary(max_size=64), length=st.integers(0, 2**64 - 1))
def test_any_restore_stream_is_never_a_5xx(
    red: tuple[LiveServer, Conn], header: dict[str, Any], tail: bytes, length: int
) -> None:
    srv, conn = red
    body = encode_stream_header(header) + struct.pack("<Q", length) + tail
    before = srv.engine.get_stats()["cached_blocks"]
    status, raw = conn.request("POST", "/admin/restore", body, ADMIN)
    assert 400 <= status < 500, (header, status, raw[:300])
    assert srv.engine.get_stats()["cached_blocks"] == before
    _no_leak(srv)
