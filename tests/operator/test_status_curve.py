"""status.py with the engines' miss-ratio curve: predicted hit rate and ceiling, the capacity the
autoscaler sizes for, and the miss reasons summed over the engines."""

from __future__ import annotations

from kvcache_engine.contract import CURVE_MULTIPLES, EngineStats, HitRateCurve, merge_curves
from kvcache_operator import status as st
from kvcache_operator.scrape import Observation, PodScrape, Scrape, observe
from tests.operator.test_status import build, make_kvc, make_pod


def engine(capacity: float, samples: float, misses: dict[str, float]) -> EngineStats:
    rates = tuple(min(0.36, 0.1 * m) for m in CURVE_MULTIPLES)  # 0.1 at 1x, the ceiling from 3.6x
    curve = HitRateCurve(capacity, rates, ceiling=0.36, samples=samples, weight=1000.0)
    return EngineStats(capacity_blocks=capacity, memory_pressure=0.9, misses_by_reason=misses, curve=curve)


def scrape_of(*stats: EngineStats, time_s: float = 100.0) -> Scrape:
    pods = {f"c-{i}": PodScrape(f"c-{i}", f"http://c-{i}", s) for i, s in enumerate(stats)}
    return Scrape(time_s=time_s, pods=pods)


def test_status_reports_what_the_curve_predicts_and_recommends() -> None:
    a = engine(5000, 400, {"never_seen": 900.0, "capacity": 100.0})
    b = engine(5000, 400, {"never_seen": 100.0, "client_timeout": 30.0})
    now = scrape_of(a, b)
    observation: Observation = observe(None, now)
    assert observation.sample.curve == merge_curves([a.curve, b.curve])  # type: ignore[list-item]
    pods = [make_pod("c-0", ready=True), make_pod("c-1", ready=True)]
    kvc = make_kvc(autoscaling={"targetHitRate": 0.9, "maxReplicas": 8})
    status = build(pods, kvc=kvc, observation=observation, scraped=st.scraped(now, now))
    assert status["predictedHitRate"] == 0.1 and status["predictedCeiling"] == 0.36
    # 0.9 is out of reach: sized to the knee, where the curve flattens (3.6x of 10k blocks)
    assert status["recommendedCapacity"] == 40_000
    assert status["missesByReason"] == {"capacity": 100, "client_timeout": 30, "never_seen": 1000}


def test_a_warming_curve_predicts_but_recommends_nothing_and_a_missing_one_nothing_at_all() -> None:
    pods = [make_pod("c-0", ready=True)]
    warm = observe(None, scrape_of(engine(5000, 10, {})))
    status = build(pods, observation=warm, desired=1)
    assert status["predictedHitRate"] == 0.1 and "recommendedCapacity" not in status
    bare = observe(None, scrape_of(EngineStats(capacity_blocks=5000)))
    status = build(pods, observation=bare, desired=1)
    assert "predictedHitRate" not in status and "recommendedCapacity" not in status
