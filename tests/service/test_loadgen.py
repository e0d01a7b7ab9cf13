"""``kvcache-engine bench`` (kvcache_engine.loadgen) against a real ``kvcache-engine serve``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvcache_engine.cli import main
from kvcache_engine.loadgen import load_trace, percentile, request_tokens
from tests.service.conftest import http_json

BLOCK_BYTES = 2 * 2 * 4 * 2 * 8 * 2  # K and V x layers x block_tokens x heads x head_dim x fp16


def _stats(url: str) -> dict[str, Any]:
    status, doc = http_json("GET", url + "/v1/stats")
    assert status == 200
    return dict(doc)


def _bench(capsys: pytest.CaptureFixture[str], url: str, token_file: Path, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["bench", "--url", url, "--token-file", str(token_file), *args])
    return code, capsys.readouterr().out


def test_bench_on_a_small_trace_counts_exactly(
    engine_process: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Three requests: the second shares two leading blocks with the first, the third one.
    trace = tmp_path / "trace.jsonl"
    rows = [[0, 1, 2], [0, 1, 3], [0, 4]]
    trace.write_text("".join(json.dumps({"timestamp": 0, "hash_ids": r}) + "\n" for r in rows))
    eng = engine_process(max_tokens=65536)
    code, out = _bench(
        capsys,
        eng.url,
        eng.token_file,
        "--trace",
        str(trace),
        "--requests",
        "3",
        "--concurrency",
        "1",
        "--json",
    )
    report = json.loads(out)
    assert code == 0, report
    assert (report["requests"], report["requested_blocks"], report["hit_blocks"]) == (3, 8, 3)
    assert report["stored_blocks"] == 5
    assert report["bytes_out"] == 3 * BLOCK_BYTES  # gets of 2 then 1 cached blocks
    assert report["bytes_in"] == 8 * BLOCK_BYTES  # every request had a missing block: three puts
    assert [report["latency_ms"][op]["count"] for op in ("lookup", "get", "put")] == [3, 2, 3]
    assert report["hit_rate"] == round(3 / 8, 4)


def test_bench_hits_equal_the_engine_stats_delta(
    engine_process: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    eng = engine_process(max_tokens=65536)
    before = _stats(eng.url)
    code, out = _bench(capsys, eng.url, eng.token_file, "--requests", "120", "--concurrency", "3", "--json")
    report = json.loads(out)
    after = _stats(eng.url)
    assert set(report) == {
        "url", "concurrency", "seconds", "requests", "requests_per_s", "requested_blocks", "hit_blocks",
        "hit_rate", "stored_blocks", "bytes_in", "bytes_out", "bytes_per_s", "errors", "timeouts",
        "errors_by_op", "latency_ms",
    }  # fmt: skip
    assert set(report["latency_ms"]["get"]) == {"count", "p50", "p95", "p99"}
    assert report["errors_by_op"] == {"lookup": 0, "get": 0, "put": 0}, report
    assert code == 0
    assert report["requests"] == 120 == after["requests"] - before["requests"]
    assert report["hit_blocks"] == after["cache_hits"] - before["cache_hits"]
    assert report["hit_blocks"] > 0  # every request of the packaged trace starts with block 0
    requested = (after["cache_hits"] + after["cache_misses"]) - (
        before["cache_hits"] + before["cache_misses"]
    )
    assert report["requested_blocks"] == requested
    assert after["evictions"] == 0 and report["stored_blocks"] == after["used_blocks"]


def test_bench_table_for_a_duration(engine_process: Any, capsys: pytest.CaptureFixture[str]) -> None:
    eng = engine_process(max_tokens=65536)
    code, out = _bench(capsys, eng.url, eng.token_file, "--seconds", "0.5", "--concurrency", "1")
    assert code == 0, out
    for label in (
        "requests/s",
        "hit rate (client)",
        "lookup ms p50/p95/p99",
        "put ms p50/p95/p99",
        "timeouts",
    ):
        assert label in out


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--concurrency", "0"], "--concurrency"),
        (["--requests", "-1"], "--requests"),
        (["--seconds", "0"], "--seconds"),
    ],
)
def test_bench_rejects_bad_numbers(args: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--url", "http://127.0.0.1:9", *args])
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_bench_rejects_an_unknown_trace_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.jsonl"
    assert main(["bench", "--url", "http://127.0.0.1:9", "--trace", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--trace {missing}: no such file" in err


def test_trace_mapping_shares_prefixes_exactly_as_the_trace() -> None:
    trace = load_trace(limit=50)
    a, b = trace[0], trace[1]
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    ta, tb = request_tokens(a, 4), request_tokens(b, 4)
    assert (
        ta[: shared * 4] == tb[: shared * 4]
        and ta[shared * 4 : shared * 4 + 4] != tb[shared * 4 : shared * 4 + 4]
    )


def test_percentile_is_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert [percentile(samples, q) for q in (50, 95, 99)] == [50.0, 95.0, 99.0]
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0
