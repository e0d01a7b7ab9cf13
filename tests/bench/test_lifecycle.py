"""bench/lifecycle.py's arithmetic and output shape (the 12-minute run itself is not a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench import lifecycle as lc

REPO = Path(__file__).resolve().parents[2]


def make_samples(rates: Sequence[float | None], *, start: float = 100.0, per_s: int = 4) -> lc.Samples:
    """``per_s`` requests of 100 tokens in each second from ``start``; second k hits ``rates[k]``
    (None: no request that second)."""
    samples = lc.Samples()
    for k, rate in enumerate(rates):
        if rate is None:
            continue
        for i in range(per_s):
            samples.add(lc.Sample(start + k + i / per_s, 100, round(100 * rate)))
    return samples


def test_hit_rate_is_token_weighted() -> None:
    samples = [lc.Sample(0.0, 300, 300), lc.Sample(0.1, 100, 0)]
    assert lc.hit_rate(samples) == 0.75  # the mean of per-request rates would be 0.5
    assert lc.hit_rate([]) is None
    assert lc.hit_rate([lc.Sample(0.0, 0, 0)]) is None


def test_between_is_half_open_and_ordered() -> None:
    samples = make_samples([1.0, 0.5, 0.0], per_s=1)
    assert [s.hit for s in samples.between(101.0, 103.0)] == [50, 0]
    assert [s.hit for s in samples.between(100.0, 101.0)] == [100]
    assert samples.between(103.0, 110.0) == []


def test_dip_points() -> None:
    assert lc.dip_points(0.95, 0.80) == 15.0
    assert lc.dip_points(0.80, 0.95) == -15.0  # better after: a negative dip
    assert lc.dip_points(None, 0.5) is None
    assert lc.dip_points(0.5, None) is None


def test_recovery_is_the_end_of_the_last_low_bucket() -> None:
    # before: 10 s at 0.96; event at t0 = 110: 0.96, 0.5, 0.95 (within 2 points), 0.93 (out), 0.96...
    before = [0.96] * 10
    after = [0.96, 0.5, 0.95, 0.93, 0.96, 0.96, 0.96, 0.96, 0.96, 0.96]
    samples = make_samples(before + after)
    assert lc.recovery_s(samples, 110.0, 10.0, 0.96) == 4.0  # bucket [113, 114) was the last low one


def test_recovery_zero_when_nothing_dips_and_none_when_still_low() -> None:
    flat = make_samples([0.9] * 20)
    assert lc.recovery_s(flat, 110.0, 10.0, 0.9) == 0.0
    still_low = make_samples([0.9] * 10 + [0.9] * 9 + [0.5])
    assert lc.recovery_s(still_low, 110.0, 10.0, 0.9) is None
    assert lc.recovery_s(flat, 110.0, 10.0, None) is None


def test_a_second_without_requests_counts_as_not_recovered() -> None:
    rates: list[float | None] = [0.9] * 10
    samples = make_samples([*rates, 0.9, 0.9, None, 0.9, 0.9])
    assert lc.recovery_s(samples, 110.0, 5.0, 0.9) == 3.0


def test_a_delayed_dip_counts_from_the_event() -> None:
    # the event (a pod starting) shows 3 s later and lasts 2 s: recovered 5 s after the event
    samples = make_samples([1.0] * 10 + [1.0, 1.0, 1.0, 0.4, 0.6, 1.0, 1.0, 1.0])
    assert lc.recovery_s(samples, 110.0, 8.0, 1.0) == 5.0


def test_event_record_from_samples() -> None:
    samples = make_samples([1.0] * 10 + [0.0, 0.0] + [1.0] * 8)
    record = lc.event_record(
        samples, 110.0, 10.0, client_errors=0, client_failed_calls=3, blocks_lost=7, held_before=100
    )
    assert record["dip_points"] == 20.0  # 2 of 10 seconds missed everything
    assert record["recovery_s"] == 2.0
    assert record["hit_rate_before"] == 1.0 and record["hit_rate_after"] == 0.8
    assert record["requests_after"] == 40
    assert record["hit_rate_1s_after"] == [0.0, 0.0] + [1.0] * 8
    assert (record["client_errors"], record["client_failed_calls"], record["blocks_lost"]) == (0, 3, 7)
    assert record["held_before"] == 100


def test_report_is_keyed_by_every_event() -> None:
    one = {"dip_points": 1.0, "recovery_s": 0.0, "client_errors": 0, "blocks_lost": 0}
    out = lc.report({"kill": one, "not-an-event": one}, {"window_s": 60})
    assert list(out) == ["scale_out", "scale_in", "rolling_restart", "kill", "restore", "meta"]
    assert out["kill"] == one and out["scale_out"] is None and out["meta"] == {"window_s": 60}
    json.dumps(out)  # serialisable as is


def test_handed_off_reads_the_operators_proof() -> None:
    reasons = [
        "replicas 3 -> 2: spec.replicas; lc-2: handed off 980/1000 blocks (98%), 1010 verified by 2 replicas",
        "replicas 3 -> 2; lc-12: handed off 5/5 blocks (100%)",
    ]
    assert lc.handed_off(reasons, "lc-2") == 980
    assert lc.handed_off(reasons, "lc-12") == 5
    assert lc.handed_off(reasons, "lc-1") is None
    assert lc.handed_off([], "lc-2") is None


def test_shutdown_handoff_reads_the_engines_last_line() -> None:
    log = (
        "INFO hand-off on shutdown to 2 peer(s): 10 of 12 blocks in 0.4 s (time budget spent: ...)\n"
        "INFO final persist on shutdown: ok\n"
        "INFO hand-off on shutdown to 1 peer(s): 1656 of 1656 blocks in 1.2 s\n"
    )
    assert lc.shutdown_handoff(log) == (1656, 1656)
    assert lc.shutdown_handoff("INFO final persist on shutdown: ok\n") is None


def test_shard_map_from_the_connection_configmap() -> None:
    info = {"name": "lc", "shardMapEpoch": 7, "members": ["127.0.0.5:8080", "127.0.0.6:8080"]}
    cm = {"data": {"connection.json": json.dumps(info), "shardMapEpoch": "7"}}
    assert lc.shard_map(cm) == (7, ["127.0.0.5:8080", "127.0.0.6:8080"])
    per_key = {"data": {"shardMapEpoch": "3", "members": "127.0.0.5:8080, 127.0.0.6:8080"}}
    assert lc.shard_map(per_key) == (3, ["127.0.0.5:8080", "127.0.0.6:8080"])
    assert lc.shard_map({"data": {"connection.json": json.dumps({"name": "lc"})}}) is None
    assert lc.shard_map(None) is None
    half_written = {"data": {"connection.json": json.dumps({"shardMapEpoch": "x", "members": []})}}
    assert lc.shard_map(half_written) is None  # the map in use stays


def test_table_renders_every_outcome() -> None:
    from rich.console import Console

    ok = {"dip_points": 0.5, "recovery_s": 3.0, "client_errors": 0, "client_failed_calls": 2,
          "blocks_lost": 0, "hit_rate_before": 0.99, "hit_rate_after": 0.985}  # fmt: skip
    result = lc.report({"kill": ok, "restore": {"error": "backup Job lc-backup-1 failed"}}, {"window_s": 20})
    console = Console(width=200, record=True)
    console.print(lc.table(result))
    text = console.export_text()
    assert "kill" in text and "0.985" in text
    assert "failed: backup Job lc-backup-1 failed" in text and "not run" in text


def test_cli_refuses_a_bad_window_and_an_unknown_event() -> None:
    for args, says in (
        (["--window", "1"], "--window must be >= 2"),
        (["--events", "kill,upgrade"], "upgrade"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.lifecycle", *args],
            check=False,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def test_events_run_in_the_bench_order() -> None:
    assert list(lc.events_arg("restore, kill,scale_out")) == ["scale_out", "kill", "restore"]


@pytest.mark.slow
def test_smoke_on_the_local_cluster() -> None:
    """The whole bench with 3 s windows: every event measured, no client error (about 3 minutes)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.lifecycle", "--json", "--window", "3"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for name in lc.EVENTS:
        record = result[name]
        assert record is not None and "error" not in record, (name, record)
        assert record["client_errors"] == 0, (name, record)
        assert isinstance(record["blocks_lost"], int), (name, record)
