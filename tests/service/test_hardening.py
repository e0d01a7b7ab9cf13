"""Issue 16, the engine side: token roles, hostile JSON, atomic puts, drain peers, connection
limits and the log of malformed HTTP, each over a real server on loopback."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from typing import Any

import pytest
import torch

from kvcache_engine.wire import STREAM_MAGIC, encode_frame_header, encode_stream_header
from tests.service.conftest import TOKEN, http, make_config, make_kv

ADMIN = "admin-token"


def _frame(hashes: list[int], n_blocks: int | None = None, seed: int = 0) -> bytes:
    cfg = make_config()
    kv = make_kv(cfg, (len(hashes) if n_blocks is None else n_blocks) * cfg.block_tokens, seed=seed)
    payload = kv.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    header = {"hashes": hashes, "dtype": "float16", "shape": list(kv.shape), "nbytes": len(payload)}
    return encode_frame_header(header) + payload


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else -1


# --- roles -------------------------------------------------------------------------------------


@pytest.fixture
def roles_server(live_server: Any) -> Any:
    return live_server(admin_token=ADMIN)


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/admin/clear"), ("POST", "/admin/persist"), ("GET", "/admin/snapshot"),
     ("POST", "/admin/config"), ("POST", "/admin/restore"), ("POST", "/admin/drain"),
     ("GET", "/admin/log-level"), ("POST", "/admin/profile")],
)  # fmt: skip
def test_data_token_gets_a_bare_403_on_admin_paths(roles_server: Any, method: str, path: str) -> None:
    status, body = http(method, roles_server.url + path, b"{}" if method == "POST" else None, token=TOKEN)
    assert status == 403
    assert json.loads(body)["error"] == "forbidden"
    assert set(json.loads(body)) == {"error", "request_id"}


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ADMIN[:-1]])
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/lookup"), ("POST", "/admin/clear")])
def test_no_or_unknown_token_gets_a_bare_401(
    roles_server: Any, token: str | None, method: str, path: str
) -> None:
    status, body = http(method, roles_server.url + path, b'{"hashes": [1]}', token=token)
    assert status == 401
    assert json.loads(body)["error"] == "unauthorized"


def test_admin_token_does_everything_the_data_token_does(roles_server: Any) -> None:
    url = roles_server.url
    assert http("POST", url + "/v1/put", _frame([11, 12]), token=TOKEN)[0] == 200
    assert http("POST", url + "/v1/lookup", b'{"hashes": [11, 12]}', token=ADMIN)[0] == 200
    assert http("GET", url + "/v1/config", token=TOKEN)[0] == 200
    assert http("POST", url + "/admin/clear", b"", token=ADMIN)[0] == 200
    assert roles_server.engine.get_stats()["cached_blocks"] == 0


def test_the_data_token_changes_no_state_under_admin(roles_server: Any) -> None:
    url = roles_server.url
    assert http("POST", url + "/v1/put", _frame([21, 22]), token=TOKEN)[0] == 200
    for path, body in [
        ("/admin/clear", b""),
        ("/admin/config", b'{"maxTokens": 16}'),
        ("/admin/compact", b""),
    ]:
        assert http("POST", url + path, body, token=TOKEN)[0] == 403
    assert roles_server.engine.get_stats()["cached_blocks"] == 2
    assert roles_server.engine.config.max_tokens == 1024


def test_one_token_without_an_admin_token_keeps_every_right(live_server: Any) -> None:
    srv = live_server()  # older deployments: one token
    assert http("POST", srv.url + "/admin/clear", b"", token=TOKEN)[0] == 200


def test_non_utf8_authorization_is_401(roles_server: Any) -> None:
    raw = _raw(
        roles_server.port,
        b"POST /v1/lookup HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    assert _status(raw) == 401, raw[:200]
    assert b"codec" not in raw


def test_metrics_auth_is_optional(live_server: Any) -> None:
    open_srv = live_server(admin_token=ADMIN)
    assert http("GET", open_srv.url + "/metrics", token=None)[0] == 200
    closed = live_server(admin_token=ADMIN, auth_metrics=True)
    assert http("GET", closed.url + "/metrics", token=None)[0] == 401
    assert http("GET", closed.url + "/metrics", token=TOKEN)[0] == 200
    assert http("GET", closed.url + "/metrics", token=ADMIN)[0] == 200
    assert http("GET", closed.url + "/healthz", token=None)[0] == 200


# --- hostile JSON ------------------------------------------------------------------------------


def _deep(depth: int) -> bytes:
    return b'{"hashes": ' + b"[" * depth + b"]" * depth + b"}"


JSON_ENDPOINTS = ["/v1/lookup", "/v1/get", "/admin/config", "/admin/drain", "/admin/log-level"]


@pytest.mark.parametrize("depth", [33, 1_000, 100_000])
@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_deep_json_is_a_400_naming_the_depth(
    roles_server: Any, path: str, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    status, body = http("POST", roles_server.url + path, _deep(depth), token=ADMIN)
    assert status == 400, body[:200]
    assert "deeper than 32" in json.loads(body)["error"] or "not valid JSON" in json.loads(body)["error"]
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_frame_and_restore_headers_are_400(roles_server: Any, depth: int) -> None:
    header = b'{"hashes": ' + b"[" * depth + b"]" * depth + b"}"
    frame = b"KVC1" + struct.pack("<I", len(header)) + header
    assert http("POST", roles_server.url + "/v1/put", frame, token=TOKEN)[0] == 400
    stream = STREAM_MAGIC + struct.pack("<I", len(header)) + header
    status, body = http("POST", roles_server.url + "/admin/restore", stream, token=ADMIN)
    assert status == 400, body[:200]
    good = encode_stream_header({"format_version": 1, "geometry": {}})
    trailer = b"[" * depth + b"]" * depth
    bad_trailer = good + struct.pack("<Q", 0) + struct.pack("<I", len(trailer)) + trailer
    assert http("POST", roles_server.url + "/admin/restore", bad_trailer, token=ADMIN)[0] in (400, 409)


# --- atomic puts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("hashes", [[5, 5], [5, 6, 5], [7, 8, 9, 7]])
def test_a_put_repeating_a_hash_is_refused_without_a_trace(live_server: Any, hashes: list[int]) -> None:
    srv = live_server(config=make_config(max_tokens=256))  # 64 slots
    for _ in range(50):
        status, body = http("POST", srv.url + "/v1/put", _frame(hashes))
        assert status == 400
        assert "repeats" in json.loads(body)["error"]
    st = srv.engine.get_stats()
    assert st["used_blocks"] == st["cached_blocks"] == 0
    assert http("POST", srv.url + "/v1/put", _frame(list(range(100, 164))))[0] == 200
    assert srv.engine.get_stats()["cached_blocks"] == 64
    assert srv.engine.validate_cache_integrity()["is_valid"]


# --- drain peers ---------------------------------------------------------------------------------


class _Listener:
    """A TCP listener that records whether anyone connected (a would-be exfiltration target)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connected = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connected = True
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.mark.parametrize(
    "target",
    [
        "http://metadata.google.internal:80",
        "http://169.254.169.254:80",
        "http://8.8.8.8:80",
        "http://example.com:1",
    ],
)
def test_drain_refuses_targets_that_are_not_peers(roles_server: Any, target: str) -> None:
    assert http("POST", roles_server.url + "/v1/put", _frame([31, 32]))[0] == 200
    status, body = http(
        "POST", roles_server.url + "/admin/drain", json.dumps({"targets": [target]}).encode(), ADMIN
    )
    assert status == 403, body
    assert "not" in json.loads(body)["error"]


def test_drain_peers_narrow_the_allowed_networks(live_server: Any) -> None:
    srv = live_server(admin_token=ADMIN, drain_peers=("10.0.0.0/8",))
    listener = _Listener()
    try:
        assert http("POST", srv.url + "/v1/put", _frame([41, 42]))[0] == 200
        doc = {"targets": [f"http://127.0.0.1:{listener.port}"]}
        assert http("POST", srv.url + "/admin/drain", json.dumps(doc).encode(), ADMIN)[0] == 403
        time.sleep(0.3)
        assert not listener.connected
    finally:
        listener.close()


# --- connection limits and the log ------------------------------------------------------------


def test_headers_not_finished_in_time_close_the_connection(live_server: Any) -> None:
    srv = live_server(header_timeout_s=0.3)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        assert s.recv(100) == b""  # closed by the server
    assert time.monotonic() - t0 < 3


def test_a_connection_that_finished_its_headers_is_not_cut(live_server: Any) -> None:
    srv = live_server(header_timeout_s=0.3)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b"}"):
            first += s.recv(1000)
        assert first.startswith(b"HTTP/1.1 200")
        time.sleep(0.6)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")


def test_connections_over_the_cap_get_503(live_server: Any) -> None:
    srv = live_server(max_connections=3, header_timeout_s=0)
    held = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(3)]
    try:
        time.sleep(0.1)
        assert _status(_raw(srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")) == 503
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert http("GET", srv.url + "/healthz", token=None)[0] == 200


@pytest.mark.parametrize(
    "garbage",
    [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03SECRET-BYTES\r\n\r\n",
     b"GET / HTTP/1.1\r\nHo\x00st: SECRET-BYTES\r\n\r\n",
     b"POST /v1/put HTTP/1.1\r\nContent-Length: -5\r\nX: SECRET-BYTES\r\n\r\n"],
)  # fmt: skip
def test_malformed_http_is_one_warning_without_the_bytes(
    live_server: Any, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    srv = live_server()
    with caplog.at_level(logging.DEBUG):
        raw = _raw(srv.port, garbage)
        time.sleep(0.1)
    assert _status(raw) in (400, -1)
    assert "SECRET" not in caplog.text
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) <= 1


@pytest.mark.parametrize(
    "path",
    ["/admin/clear", "//admin/clear", "/admin/clear/", "/admin%2Fclear", "/./admin/clear",
     "/v1/../admin/clear", "/v1/%2E%2E/admin/clear", "/%61dmin/clear", "/admin/clear?x=1"],
)  # fmt: skip
def test_no_spelling_of_an_admin_path_lets_the_data_token_in(roles_server: Any, path: str) -> None:
    from http.client import HTTPConnection

    assert http("POST", roles_server.url + "/v1/put", _frame([51, 52]))[0] == 200
    conn = HTTPConnection("127.0.0.1", roles_server.port, timeout=10)
    try:
        conn.request("POST", path, body=b"{}", headers={"Authorization": f"Bearer {TOKEN}"})
        status = conn.getresponse().status
    finally:
        conn.close()
    assert status in (403, 404), (path, status)
    assert roles_server.engine.get_stats()["cached_blocks"] == 2
