"""kvcache_engine.debug against a real ``kvcache-engine serve``: profiler, log level, memory."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvcache_engine.debug import DebugError, JsonFormatter, RequestIdFilter, current_request_id, set_log_level
from tests.docs.harness import BIN
from tests.docs.scenarios import TOKEN, EngineProcess, prompts, put_and_lookup, request


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    proc = EngineProcess(tmp_path_factory.mktemp("debug"), {}).start()
    put_and_lookup(proc.url, prompts(4, 4, 4))
    yield proc
    proc.close()


def _wait_recording(url: str) -> None:
    deadline = time.monotonic() + 30
    while request("GET", url + "/admin/profile")[1]["session"] is None or (
        request("GET", url + "/admin/profile")[1]["session"]["state"] != "recording"
    ):
        assert time.monotonic() < deadline, "the profile never started recording"
        time.sleep(0.05)


def test_profile_of_20_requests_is_a_chrome_trace_naming_engine_functions(
    engine: EngineProcess, tmp_path: Path
) -> None:
    out = tmp_path / "trace.json"
    cli = subprocess.Popen(
        [str(BIN / "kvcache-engine"), "profile", "--url", engine.url, "--requests", "20", "--out", str(out)],
        env={"KVCACHE_TOKEN": TOKEN, "PATH": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _wait_recording(engine.url)
    tokens = prompts(4, 4, 4)[0]
    for _ in range(25):  # 5 more than recorded: the session must stop at 20
        assert request("POST", engine.url + "/v1/get", {"tokens": tokens})[0] == 200
    output, _ = cli.communicate(timeout=120)
    assert cli.returncode == 0, output
    assert re.search(rb"over 20 requests", output), output
    trace = json.loads(out.read_text())
    events = trace["traceEvents"]
    assert isinstance(events, list) and events
    complete = [e for e in events if e.get("ph") == "X"]
    assert complete and all(
        isinstance(e["ts"], int | float) and isinstance(e["dur"], int | float) for e in complete
    )
    names = [str(e.get("name", "")) for e in events]
    assert sum(n == "kvcache.http POST /v1/get" for n in names) == 20
    for function in ("get_hashes", "block_hashes"):
        assert any(re.search(rf"kvcache_engine/engine\.py\(\d+\): {function}$", n) for n in names), function
    assert any(e.get("cat") == "cpu_op" and str(e.get("name")).startswith("aten::") for e in events)
    session = request("GET", engine.url + "/admin/profile")[1]["session"]
    assert session["state"] == "done" and session["recorded_requests"] == 20
    assert Path(session["path"]).read_bytes() == out.read_bytes()


def test_profile_is_gated_validated_and_exclusive(engine: EngineProcess) -> None:
    url = engine.url
    assert request("POST", url + "/admin/config", {"enableProfiling": False})[0] == 200
    status, body = request("POST", url + "/admin/profile", {"requests": 1})
    assert status == 403 and "enable_profiling" in body["error"] and body["request_id"]
    assert request("POST", url + "/admin/config", {"enableProfiling": True})[0] == 200
    bad_bodies = (
        ({"requests": 0}, "requests"),
        ({"seconds": -1}, "seconds"),
        ({}, "exactly one"),
        ({"requests": 1, "seconds": 1}, "exactly one"),
        ({"requests": 1, "x": 1}, "unknown"),
    )
    for bad, field in bad_bodies:
        status, body = request("POST", url + "/admin/profile", bad)
        assert status == 400 and field in body["error"], (bad, body)
    assert request("POST", url + "/admin/profile", {"requests": 1}, token=None)[0] == 401
    results: list[tuple[int, object]] = []
    timed = threading.Thread(
        target=lambda: results.append(request("POST", url + "/admin/profile", {"seconds": 1}))
    )
    timed.start()
    _wait_recording(url)
    status, body = request("POST", url + "/admin/profile", {"requests": 1})
    assert status == 409 and "already recording" in body["error"]
    timed.join(timeout=60)
    assert results and results[0][0] == 200 and "traceEvents" in results[0][1]  # type: ignore[operator]


def test_log_level_switches_at_runtime_with_json_lines_carrying_request_ids(engine: EngineProcess) -> None:
    url = engine.url
    req = f"{url}/admin/log-level"
    status, body = request("POST", req, {"level": "DEBUG", "format": "json"}, token=TOKEN)
    assert status == 200 and body["levels"]["kvcache_engine"] == "DEBUG" and body["format"] == "json"
    import urllib.request

    marked = urllib.request.Request(req, data=b'{"level": "INFO"}', method="POST")
    marked.add_header("Authorization", f"Bearer {TOKEN}")
    marked.add_header("X-Request-Id", "doc-test-rid-7")
    with urllib.request.urlopen(marked, timeout=30) as resp:
        assert json.loads(resp.read())["levels"]["kvcache_engine"] == "INFO"
    deadline = time.monotonic() + 10
    while '"request_id": "doc-test-rid-7"' not in engine.log():
        assert time.monotonic() < deadline, engine.log()[-2000:]
        time.sleep(0.05)
    line = next(ln for ln in engine.log().splitlines() if "doc-test-rid-7" in ln)
    record = json.loads(line)
    assert record["logger"] == "kvcache_engine.debug" and record["level"] == "WARNING"
    for bad in ({"level": "LOUD"}, {"level": "DEBUG", "logger": "aiohttp"}, {"format": "xml"}, {}):
        assert request("POST", req, bad)[0] == 400, bad
    assert request("POST", req, {"format": "text"})[0] == 200


def test_memory_report_bounds_and_tracemalloc(engine: EngineProcess) -> None:
    url = engine.url
    status, mem = request("GET", url + "/v1/memory")
    assert status == 200
    assert mem["pool"]["pool_bytes"] == mem["pool"]["primary_pool_bytes_by_formula"] > 0
    assert mem["cuda"] is None and mem["process"]["rss_bytes"] > mem["pool"]["pool_bytes"]
    assert mem["tracemalloc"] == {"enabled": False, "top": []}
    assert request("POST", url + "/admin/tracemalloc", {"enabled": True})[1] == {"enabled": True}
    put_and_lookup(url, prompts(2, 4, 4, seed=3))
    status, mem = request("GET", url + "/v1/memory?top=3")
    assert mem["tracemalloc"]["enabled"] and 1 <= len(mem["tracemalloc"]["top"]) <= 3
    assert all(re.match(r".+:\d+$", site["site"]) for site in mem["tracemalloc"]["top"])
    assert request("POST", url + "/admin/tracemalloc", {"enabled": False})[1] == {"enabled": False}
    assert request("GET", url + "/v1/memory?top=0")[0] == 400
    assert request("POST", url + "/admin/tracemalloc", {"enabled": "yes"})[0] == 400
    assert request("GET", url + "/v1/memory", token=None)[0] == 401


def test_json_formatter_keeps_traceback_and_request_id() -> None:
    record = logging.LogRecord("kvcache_engine.server", logging.ERROR, __file__, 1, "failed %s", ("x",), None)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    token = current_request_id.set("rid-1")
    try:
        RequestIdFilter().filter(record)
    finally:
        current_request_id.reset(token)
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "failed x" and doc["request_id"] == "rid-1" and doc["level"] == "ERROR"
    assert "RuntimeError: boom" in doc["exc"] and "Traceback" in doc["exc"]


def test_set_log_level_names_the_bad_argument() -> None:
    with pytest.raises(DebugError, match="level: expected one of"):
        set_log_level("verbose")
    with pytest.raises(DebugError, match="logger: expected 'kvcache_engine'"):
        set_log_level("DEBUG", "root")


async def test_a_failed_request_logs_its_traceback_with_the_id_its_response_carries(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from kvcache_engine.contract import KVCacheConfig
    from kvcache_engine.engine import KVCacheEngine
    from kvcache_engine.server import EngineServer, ServerSettings

    engine = KVCacheEngine(
        KVCacheConfig(max_tokens=64, block_tokens=4, num_layers=1, num_kv_heads=1, head_dim=8, device="cpu"),
        load_on_start=False,
    )
    server = EngineServer(engine, ServerSettings(host="127.0.0.1", port=0, token=None))

    def broken() -> dict[str, object]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine, "get_stats", broken)
    caplog.handler.addFilter(RequestIdFilter())  # as configure_log_format does: ids stamped at emission
    try:
        async with TestClient(TestServer(server.app)) as client:
            resp = await client.get("/v1/stats", headers={"X-Request-Id": "rid-500"})
            body = await resp.json()
    finally:
        server.executor.shutdown(wait=True)
        engine.close()
    assert resp.status == 500 and body["request_id"] == "rid-500" == resp.headers["X-Request-Id"]
    failed = next(r for r in caplog.records if r.exc_info and r.name.startswith("kvcache_engine"))
    line = json.loads(JsonFormatter().format(failed))
    assert line["request_id"] == "rid-500" and "RuntimeError: disk on fire" in line["exc"]
