from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch

from kvcache_engine.cli import main as cli_main
from kvcache_engine.replay import effective_capacity, load_trace, replay
from tests.engine.helpers import make_engine

# The reference LRU curve of the issue (budget in fp16 blocks -> hit rate), +-0.01.
REFERENCE_LRU = {1_000: 0.044, 10_000: 0.211, 30_000: 0.326, 50_000: 0.355, 100_000: 0.364}


@pytest.fixture(scope="module")
def trace() -> list[list[int]]:
    return list(load_trace())


def make_trace_file(tmp_path: Path, requests: list[list[int]], gz: bool) -> Path:
    path = tmp_path / ("t.jsonl.gz" if gz else "t.jsonl")
    text = "".join(
        json.dumps({"timestamp": i, "input_length": 512 * len(r), "hash_ids": r}) + "\n"
        for i, r in enumerate(requests)
    )
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_packaged_trace_loads(trace: list[list[int]]) -> None:
    assert len(trace) == 12031 and sum(map(len, trace)) == 288_500
    assert trace[0][:3] == [0, 1, 2]


def test_lru_and_adaptive_at_10k(trace: list[list[int]]) -> None:
    lru = replay(trace, 10_000, "lru")
    adaptive = replay(trace, 10_000, "adaptive")
    assert lru.hit_rate == pytest.approx(REFERENCE_LRU[10_000], abs=0.01)
    assert adaptive.hit_rate >= lru.hit_rate - 0.01
    assert lru.requests == 12031 and lru.requested_blocks == 288_500
    assert lru.hit_blocks / lru.requested_blocks == lru.hit_rate


@pytest.mark.slow
def test_reference_curve_adaptive_and_codecs(trace: list[list[int]]) -> None:
    lru = {n: replay(trace, n, "lru").hit_rate for n in REFERENCE_LRU}
    for n, expected in REFERENCE_LRU.items():
        assert lru[n] == pytest.approx(expected, abs=0.01), n
    assert replay(trace, 10**7, "lru").hit_rate == pytest.approx(0.366, abs=0.001)  # the infinite cache
    for n in (1_000, 10_000, 30_000):
        assert replay(trace, n, "adaptive").hit_rate >= lru[n] - 0.01, n
    none_20k = replay(trace, 20_000, "lru").hit_rate
    none_35k = replay(trace, 35_000, "lru").hit_rate
    assert replay(trace, 10_000, "lru", "int8").hit_rate >= none_20k - 0.01
    assert replay(trace, 10_000, "lru", "int4").hit_rate >= none_35k - 0.01


def test_effective_capacity_uses_the_codec_bytes() -> None:
    assert effective_capacity(10_000, "none") == 10_000
    assert effective_capacity(10_000, "int8") == 10_000 * 256 // 132
    assert effective_capacity(10_000, "int4") == 32_000
    with pytest.raises(ValueError, match="capacity_blocks"):
        effective_capacity(-1)
    with pytest.raises(ValueError, match="codec"):
        effective_capacity(10, "zstd")


def test_replay_semantics_on_a_scripted_trace() -> None:
    # A block hits only if every block before it hit; capacity 3 with LRU, tails evicted first.
    requests = [[1, 2, 3], [1, 2, 4], [1, 5], [1, 2, 3]]
    result = replay(requests, 3, "lru")
    # r2: 1,2 hit; stores 4 (evicts 3, the tail). r3: 1 hits; stores 5 (evicts 4). r4: 1,2 hit, 3 missing.
    assert (result.hit_blocks, result.requested_blocks) == (0 + 2 + 1 + 2, 11)
    assert result.evictions == 3
    with pytest.raises(ValueError, match="strategy"):
        replay(requests, 3, "fifo")


@pytest.mark.parametrize("strategy", ["LRU", "LFU", "ADAPTIVE"])
def test_replay_matches_the_engine(strategy: str) -> None:
    # The replay's bookkeeping equals the real engine's: same trace, one token per block.
    rng = random.Random(7)
    roots = [[rng.randrange(10**6) for _ in range(rng.randint(1, 6))] for _ in range(12)]
    requests = []
    for _ in range(120):
        base = rng.choice(roots)
        requests.append(
            base[: rng.randint(1, len(base))] + [rng.randrange(10**6) for _ in range(rng.randint(0, 3))]
        )
    capacity = 16
    expected = replay(requests, capacity, strategy)
    with make_engine(
        cache_strategy=strategy, block_tokens=1, max_tokens=capacity, num_layers=1, num_kv_heads=1, head_dim=8
    ) as engine:
        hits = 0
        for ids in requests:
            hits += engine.lookup(ids)
            engine.put(ids, torch.zeros(2, 1, len(ids), 1, 8, dtype=torch.float16))
        assert engine.get_stats()["num_blocks"] == capacity
    assert hits == expected.hit_blocks


@pytest.mark.parametrize("gz", [True, False])
def test_cli_json_reads_plain_and_gzipped_traces(
    tmp_path: Path, gz: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    path = make_trace_file(tmp_path, [[1, 2, 3], [1, 2, 4], [1, 5], [1, 2, 3]], gz)
    code = cli_main(["replay", "--trace", str(path), "--capacity-blocks", "3", "--strategy", "LRU", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hit_blocks"] == 5 and out["requested_blocks"] == 11 and out["requests"] == 4
    assert out["capacity_blocks_effective"] == 3 and out["hit_rate"] == pytest.approx(5 / 11)


def test_cli_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["replay", "--capacity-blocks", "-5"])
    assert exc.value.code == 2 and "capacity-blocks" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hash_ids": [1]}\n{"nope": 1}\n')
    assert cli_main(["replay", "--trace", str(bad), "--capacity-blocks", "4"]) == 2
    assert "trace line 2" in capsys.readouterr().err
    assert cli_main(["replay", "--trace", str(tmp_path / "missing"), "--capacity-blocks", "4"]) == 2
