"""Analyzers on scripted stats and access patterns: exact findings, evidence and recommendations."""

from __future__ import annotations

from typing import Any

import pytest

from kvcache_engine.analytics import (
    AccessRecord,
    CacheAnalyzer,
    MultiGPULoadBalancer,
    PerformanceAnalyzer,
    RemoteEngineView,
    analyze,
    hit_rate_curve,
    reuse_distances,
)
from kvcache_engine.contract import KVCacheConfig


def make_stats(**values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "requests": 100,
        "p50_latency": 1.0,
        "p95_latency": 2.0,
        "hit_rate": 0.8,
        "evictions": 0,
        "memory_pressure": 0.5,
        "num_blocks": 16,
        "device": "cpu",
        "device_memory_total": 0,
        "device_memory_reserved": 0,
    }
    return {**base, **values}


def make_view(
    history: list[AccessRecord] | None = None, *, stats: dict[str, Any] | None = None, **cfg: Any
) -> Any:
    config = KVCacheConfig(**{"max_tokens": 256, "block_tokens": 16, "num_layers": 2, **cfg})
    return RemoteEngineView(stats or make_stats(num_blocks=config.num_blocks()), config, history)


def cyclic(prompts: int, blocks: int, rounds: int) -> list[AccessRecord]:
    """``prompts`` distinct chains of ``blocks`` blocks, looked up round-robin ``rounds`` times;
    a lookup hits when its chain was looked up before."""
    chains = [tuple(1000 * p + b for b in range(blocks)) for p in range(prompts)]
    return [AccessRecord(chains[p], blocks if r else 0) for r in range(rounds) for p in range(prompts)]


def areas(findings: list[Any]) -> list[tuple[str, str]]:
    return [(f.area, f.severity) for f in findings]


# --- reuse distances and the curve ------------------------------------------------------------------


def test_reuse_distance_is_the_lru_stack_distance() -> None:
    assert reuse_distances([1, 2, 3, 1, 2, 2, 4, 1]) == [None, None, None, 2, 2, 0, None, 2]


def test_curve_applies_the_prefix_rule() -> None:
    # A0 B1 | C2 | C3 | B4 | A5 B6: B6 alone has distance 1, but it follows A5 (distance 2) in
    # its lookup, so with 2 blocks it misses: a chain lookup stops at the first miss.
    records = [AccessRecord((1, 2), 0), AccessRecord((3,), 0), AccessRecord((3,), 1), AccessRecord((2,), 1)]
    records.append(AccessRecord((1, 2), 2))
    assert hit_rate_curve(records, [1, 2, 3]) == [(1, 1 / 7), (2, 2 / 7), (3, 4 / 7)]


def test_cyclic_working_set_larger_than_capacity_is_capacity_bound() -> None:
    view = make_view(cyclic(prompts=8, blocks=4, rounds=4))  # 32 blocks in a cycle, 16 fit
    report = CacheAnalyzer(view).analyze_access_patterns()

    assert (report.lookups, report.block_accesses, report.unique_blocks) == (32, 128, 32)
    assert report.observed_hit_rate == 0.75
    assert report.reuse_distance == {
        "first_access_fraction": 0.25,
        "p50": 31,
        "p90": 31,
        "p99": 31,
        "max": 31,
    }
    curve = {p["capacity_blocks"]: p["hit_rate"] for p in report.hit_rate_curve}
    assert curve[16] == 0.0 and curve[32] == 0.75 and curve[64] == 0.75
    [finding] = report.findings
    assert (finding.area, finding.severity) == ("capacity", "warning")
    assert finding.evidence["estimated_hit_rate"] == 0.0
    assert finding.evidence["hit_rate_ceiling"] == 0.75
    assert finding.evidence["recommended_capacity_blocks"] == 32
    assert finding.recommendation == {"max_tokens": 512}


def test_working_set_far_below_capacity_is_oversized() -> None:
    view = make_view(cyclic(prompts=8, blocks=4, rounds=4), max_tokens=4096)  # 256 blocks
    [finding] = CacheAnalyzer(view).analyze_access_patterns().findings
    assert (finding.area, finding.severity) == ("capacity", "info")
    assert finding.evidence["estimated_hit_rate"] == 0.75
    assert finding.recommendation == {"max_tokens": 512}


def test_no_reuse_is_workload_bound_and_recommends_no_capacity() -> None:
    history = [AccessRecord((10 * i, 10 * i + 1), 0) for i in range(50)]
    report = CacheAnalyzer(make_view(history)).analyze_access_patterns()
    [finding] = report.findings
    assert (finding.area, finding.severity) == ("workload", "warning")
    assert finding.evidence["first_access_fraction"] == 1.0
    assert finding.recommendation == {}
    assert report.prefix_sharing == {
        "degree": 1.0,
        "distinct_roots": 50,
        "shared_root_fraction": 0.0,
        "mean_reusable_blocks": 0.0,
    }


def test_hot_chain_with_scans_under_lru_recommends_adaptive() -> None:
    hot = (1, 2, 3, 4)
    history = []
    for i in range(20):
        history.append(AccessRecord(hot, 4 if i else 0))
        history.append(AccessRecord((100 + 2 * i, 101 + 2 * i), 0))
    report = CacheAnalyzer(make_view(history, max_tokens=128, cache_strategy="LRU")).analyze_access_patterns()

    assert report.hot_chains[0]["root"] == f"{1:016x}"
    assert report.hot_chains[0]["lookups"] == 20
    assert report.hot_chains[0]["max_depth_blocks"] == 4
    [finding] = report.findings
    assert (finding.area, finding.severity) == ("strategy", "warning")
    assert finding.evidence["top3_chain_lookup_share"] == 0.55
    assert finding.recommendation == {"cache_strategy": "ADAPTIVE"}
    # the same pattern under ADAPTIVE: nothing to change
    adaptive = CacheAnalyzer(make_view(history, max_tokens=128)).analyze_access_patterns()
    assert areas(adaptive.findings) == [("access_patterns", "ok")]


def test_prefix_sharing_degree_counts_branches_per_root() -> None:
    # one system prompt block (7) followed by four different user turns, each seen once
    history = [AccessRecord((7, 70 + i), 1 if i else 0) for i in range(4)]
    sharing = CacheAnalyzer(make_view(history)).analyze_access_patterns().prefix_sharing
    assert sharing == {
        "degree": 4.0,
        "distinct_roots": 1,
        "shared_root_fraction": 0.75,
        "mean_reusable_blocks": 0.75,
    }


def test_engine_without_history_says_so() -> None:
    class NoHistory:
        config = KVCacheConfig(max_tokens=256, block_tokens=16, num_layers=2)

        def get_stats(self) -> dict[str, Any]:
            return make_stats()

    report = CacheAnalyzer(NoHistory()).analyze_access_patterns()
    assert areas(report.findings) == [("history", "info")]


# --- performance ---------------------------------------------------------------------------------------


def test_no_traffic_is_reported_as_such() -> None:
    findings = PerformanceAnalyzer(make_view(stats=make_stats(requests=0))).identify_bottlenecks()
    assert areas(findings) == [("traffic", "info")]


def test_healthy_engine_has_one_ok_finding_with_evidence() -> None:
    [finding] = PerformanceAnalyzer(make_view(stats=make_stats())).identify_bottlenecks()
    assert (finding.area, finding.severity, finding.recommendation) == ("overall", "ok", {})
    assert finding.evidence["hit_rate"] == 0.8


@pytest.mark.parametrize(
    ("stats", "cfg", "expected", "recommendation"),
    [
        (
            {"p50_latency": 250.0, "p95_latency": 400.0},
            {},
            ("latency", "warning"),
            {"enable_prefetch": True, "prefetch_size": 32},
        ),
        (
            {"p50_latency": 250.0, "p95_latency": 1500.0},
            {"use_compression": True},
            ("latency", "critical"),
            {"use_compression": False, "compression_codec": "none"},
        ),
        ({"hit_rate": 0.3, "evictions": 50}, {}, ("hit_rate", "warning"), {"max_tokens": 512}),
        ({"hit_rate": 0.3}, {}, ("hit_rate", "info"), {}),
        (
            {"memory_pressure": 0.97, "evictions": 5},
            {},
            ("memory", "warning"),
            {"use_compression": True, "compression_codec": "int8"},
        ),
        (
            {"device": "cuda:0", "device_memory_total": 100, "device_memory_reserved": 95},
            {},
            ("device_memory", "critical"),
            {"max_tokens": 128, "cpu_tier_tokens": 256},
        ),
    ],
)
def test_each_bottleneck_names_its_evidence_and_change(
    stats: dict[str, Any], cfg: dict[str, Any], expected: tuple[str, str], recommendation: dict[str, Any]
) -> None:
    view = make_view(stats=make_stats(**stats), **cfg)
    [finding] = PerformanceAnalyzer(view).identify_bottlenecks()
    assert areas([finding]) == [expected]
    assert finding.recommendation == recommendation
    for key, value in stats.items():
        if key in finding.evidence:
            assert finding.evidence[key] == value
    assert finding.evidence  # every finding carries numbers


def test_recommendations_are_valid_live_config_changes() -> None:
    view = make_view(stats=make_stats(hit_rate=0.2, evictions=9, memory_pressure=0.95))
    for finding in PerformanceAnalyzer(view).identify_bottlenecks():
        KVCacheConfig(**{**view.config.model_dump(), **finding.recommendation})


# --- devices -------------------------------------------------------------------------------------------


def test_balancer_is_honest_without_gpus() -> None:
    import torch

    balancer = MultiGPULoadBalancer(make_view())
    stats = balancer.get_gpu_stats()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert stats["device_count"] == count == len(stats["devices"])
    plan = balancer.balance_load()
    if count <= 1:
        assert plan["balanced"] is True and plan["moves"] == []
        assert plan["findings"][0]["evidence"]["device_count"] == count


def test_analyze_bundles_every_analyzer_as_json() -> None:
    import json

    doc = analyze(make_view(cyclic(prompts=2, blocks=2, rounds=2)))
    assert set(doc) == {"bottlenecks", "access_patterns", "balance"}
    json.dumps(doc)
