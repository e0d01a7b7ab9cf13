"""kvcache-operator simulate: the operator's own observe/decide loop over the engines' own
bookkeeping, on a trace's clock. Small generated traces here; the packaged trace (the issue's
"must show" figures) in the slow tests."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvcache_engine.replay import load_timed_trace, replay
from kvcache_operator import api
from kvcache_operator.cli import main as cli_main
from kvcache_operator.simulate import simulate

BLOCK = {"numLayers": 32, "numKvHeads": 8, "headDim": 128, "blockTokens": 16}  # 2 MiB fp16 blocks


def manifest(blocks: int, **autoscaling: Any) -> dict[str, Any]:
    """A KVCache whose replicas hold ``blocks`` blocks each (a pool big enough to carry a curve)."""
    return {
        "apiVersion": "kvcache.dev/v1alpha1",
        "kind": "KVCache",
        "metadata": {"name": "sim", "namespace": "default"},
        "spec": {
            "replicas": 1,
            "cache": {**BLOCK, "maxTokens": blocks * 16, "device": "cpu"},
            "autoscaling": {"mode": "Auto", "minReplicas": 1, "maxReplicas": 8, **autoscaling},
            "metrics": {"scrapeInterval": "30s"},
        },
    }


def no_reuse(requests: int, blocks: int = 8, seconds: float = 1800.0) -> list[tuple[float, list[int]]]:
    return [(i * seconds / requests, list(range(i * blocks, (i + 1) * blocks))) for i in range(requests)]


def conversations(requests: int, seed: int = 0, seconds: float = 1800.0) -> list[tuple[float, list[int]]]:
    """Multi-turn conversations under a few system prompts: each turn extends a chain seen before."""
    rng = random.Random(seed)
    next_id = 10
    chats: list[list[int]] = []
    out = []
    for i in range(requests):
        if chats and rng.random() < 0.7:
            chat = rng.choice(chats[-300:])
            chat.extend(range(next_id, next_id + 2))
            next_id += 2
        else:
            chat = [rng.randrange(4), *range(next_id, next_id + 6)]  # system prompt, then the turn
            next_id += 6
            chats.append(chat)
        out.append((i * seconds / requests, list(chat)))
    return out


def test_no_reuse_never_scales_out_whatever_the_pressure() -> None:
    kvc = api.parse_kvcache(manifest(200, targetHitRate=0.9))
    result = simulate(kvc, no_reuse(2000))  # 16 000 blocks through a 200-block cache: always full
    assert result.final_replicas == 1
    assert not [d for d in result.decisions if d.kind == "Scale" and "-> 1" not in d.action]
    assert result.hit_rate == 0.0 and result.predicted_ceiling == 0.0
    assert max(p.capacity_blocks for p in result.points) == 200


def test_a_reusing_workload_grows_and_the_prediction_tracks_the_replay() -> None:
    trace = conversations(3000)
    kvc = api.parse_kvcache(manifest(250, targetHitRate=0.95))
    result = simulate(kvc, trace)
    assert result.final_replicas > 1
    assert next(d.action for d in result.decisions if d.kind == "Scale").startswith("replicas 1 -> ")
    assert result.predicted_hit_rate is not None
    measured = replay([ids for _, ids in trace], result.final_capacity_blocks).hit_rate
    assert result.predicted_hit_rate == pytest.approx(measured, abs=0.05)
    assert result.block_hours > 0 and result.requests == 3000


def test_dry_run_records_decisions_and_changes_nothing() -> None:
    trace = conversations(3000)
    kvc = api.parse_kvcache(manifest(250, targetHitRate=0.95, mode="DryRun"))
    result = simulate(kvc, trace)
    scales = [d for d in result.decisions if d.kind == "Scale"]
    assert scales and not any(d.applied for d in scales)
    assert result.final_replicas == 1 and {p.replicas for p in result.points} == {1}


def write_trace(path: Path, trace: list[tuple[float, list[int]]]) -> Path:
    lines = "".join(json.dumps({"timestamp": int(t * 1000), "hash_ids": ids}) + "\n" for t, ids in trace)
    path.write_bytes(gzip.compress(lines.encode()))
    return path


def test_the_command_prints_the_summary_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "t.jsonl.gz", conversations(600))
    assert list(load_timed_trace(trace))[1][0] == pytest.approx(3.0)
    spec = tmp_path / "kvcache.yaml"
    spec.write_text(yaml.safe_dump(manifest(250, targetHitRate=0.95)))
    png = tmp_path / "sim.png"
    assert cli_main(["simulate", "-f", str(spec), "--trace", str(trace), "--json", "--plot", str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in (
        "final_replicas", "final_capacity_blocks", "hit_rate", "hit_rate_last_quarter", "block_hours",
        "predicted_hit_rate", "predicted_ceiling", "decisions",
    ):  # fmt: skip
        assert key in doc, key
    assert all(set(d) >= {"t", "kind", "action", "reason"} for d in doc["decisions"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["simulate", "-f", str(spec), "--trace", str(tmp_path / "missing")]) == 1
    assert "simulate:" in capsys.readouterr().err


# -- the packaged conversation trace: the figures (5,000-block replicas, 1 to 16)

PACKAGED = Path(__file__).parents[2] / "engine_image/kvcache_engine/data/conversation_trace.jsonl.gz"


def packaged_manifest(target: float) -> api.KVCache:
    doc = manifest(5000, targetHitRate=target, maxReplicas=16)
    doc["spec"]["cache"] = {**BLOCK, "blockTokens": 512, "maxTokens": 5000 * 512, "device": "cpu"}
    return api.parse_kvcache(doc)


@pytest.mark.slow
def test_packaged_trace_unreachable_target_stops_near_the_knee() -> None:
    trace = list(load_timed_trace(PACKAGED))
    ids = [r for _, r in trace]
    result = simulate(packaged_manifest(0.9), trace)
    ceiling = replay(ids, 10**7).hit_rate
    smallest = next(c for c in range(5000, 200_001, 5000) if replay(ids, c).hit_rate >= ceiling - 0.01)
    assert smallest / 1.3 <= result.final_capacity_blocks <= smallest * 1.3
    assert result.predicted_hit_rate is not None
    assert abs(result.predicted_hit_rate - replay(ids, result.final_capacity_blocks).hit_rate) <= 0.02


@pytest.mark.slow
def test_packaged_trace_reachable_target_stops_at_the_smallest_size_reaching_it() -> None:
    trace = list(load_timed_trace(PACKAGED))
    ids = [r for _, r in trace]
    result = simulate(packaged_manifest(0.25), trace)
    smallest = next(c for c in range(1000, 60_001, 1000) if replay(ids, c).hit_rate >= 0.25)
    assert smallest / 1.3 <= result.final_capacity_blocks <= smallest * 1.3
