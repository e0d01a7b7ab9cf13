"""A restart gets its cache back before it is ready, and /readyz says how much: SIGTERM persists
within the grace period, the restarted engine loads before ready and reports warm_ratio (blocks
loaded / blocks its persisted cache named); a damaged segment shows as a ratio below 1."""

from __future__ import annotations

import json
from pathlib import Path

from kvcache_engine.client import KVCacheClient
from kvcache_engine.contract import KVCacheConfig, warm_ratio_of
from tests.service.conftest import GEOMETRY, TOKEN, http, make_kv, make_tokens


def _readyz(url: str) -> dict:
    status, body = http("GET", url + "/readyz", token=None)
    assert status == 200, body
    doc: dict = json.loads(body)
    return doc


def test_sigterm_persists_and_the_restart_is_warm_before_ready(engine_process) -> None:
    eng = engine_process("e0")
    cfg = KVCacheConfig(**{**GEOMETRY, "max_tokens": 4096})
    with KVCacheClient([eng.url], token=TOKEN, strict=True, timeout_s=5.0) as c:
        for s in range(8):
            c.put(make_tokens(16, seed=s), make_kv(cfg, 16, seed=s), wait=True)
    assert warm_ratio_of(_readyz(eng.url)) == 1.0  # nothing was persisted before: fully warm
    assert eng.terminate() == 0  # SIGTERM: drain, final persist, exit 0
    eng.start()  # start() returns once /readyz is 200: loaded before ready
    doc = _readyz(eng.url)
    assert warm_ratio_of(doc) == 1.0
    assert http("GET", eng.url + "/v1/stats")[0] == 200
    _, body = http("GET", eng.url + "/v1/stats")
    persistence = json.loads(body)["persistence"]
    assert persistence["blocks_expected"] == persistence["blocks_loaded"] == 32
    with KVCacheClient([eng.url], token=TOKEN, strict=True, timeout_s=5.0) as c:
        assert all(c.lookup(make_tokens(16, seed=s)) == 16 for s in range(8))


def test_a_damaged_segment_lowers_the_warm_ratio(engine_process) -> None:
    eng = engine_process("e1")
    cfg = KVCacheConfig(**{**GEOMETRY, "max_tokens": 4096})
    with KVCacheClient([eng.url], token=TOKEN, strict=True, timeout_s=5.0) as c:
        for s in range(8):
            c.put(make_tokens(16, seed=s), make_kv(cfg, 16, seed=s), wait=True)
    assert eng.terminate() == 0
    segments = sorted(Path(eng.workdir / "cache").glob("seg-*"))
    assert segments
    data = bytearray(segments[0].read_bytes())
    data[-1] ^= 0xFF
    segments[0].write_bytes(bytes(data))
    eng.start()
    ratio = warm_ratio_of(_readyz(eng.url))
    assert ratio is not None and 0.0 <= ratio < 1.0


def test_warm_ratio_of_reads_only_a_ready_answer() -> None:
    assert warm_ratio_of({"status": "loading"}) is None
    assert warm_ratio_of({"status": "ready"}) is None  # an older engine
    assert warm_ratio_of({"status": "ready", "warm_ratio": 0.5}) == 0.5
    assert warm_ratio_of({"status": "ready", "warm_ratio": True}) is None
    assert warm_ratio_of({"status": "ready", "warm_ratio": 3}) == 1.0
