"""Sizing from the miss-ratio curve (policy.plan_capacity, decide_scale, int8 against replicas):
scripted curves, exact outcomes, and hypothesis over curve shapes."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_engine.contract import CURVE_MULTIPLES, HitRateCurve
from kvcache_operator.api import Autoscaling, Tuning
from kvcache_operator.policy import (
    MIN_CURVE_SAMPLES,
    PolicyInput,
    Sample,
    TunedConfig,
    decide,
    decide_scale,
    plan_capacity,
)

PER_REPLICA = 5000.0  # effective blocks per replica
INTERVAL = 10.0

Curve = Callable[[float], float]


def saturating(ceiling: float, scale: float) -> Curve:
    """A workload whose hit rate rises with capacity towards ``ceiling`` (half of it at ``scale``)."""
    return lambda x: ceiling * x / (x + scale)


def flat(_x: float) -> float:
    return 0.0  # no reuse: no size hits anything


def reported(f: Curve, capacity: float, samples: float = 10 * MIN_CURVE_SAMPLES) -> HitRateCurve:
    """What the engines would report for the workload ``f`` at ``capacity`` blocks."""
    rates = tuple(f(m * capacity) for m in CURVE_MULTIPLES)
    return HitRateCurve(capacity, rates, ceiling=max(f(1e12), rates[-1]), samples=samples, weight=1e6)


def sample(f: Curve, replicas: int, t: float = 0.0, samples: float = 10 * MIN_CURVE_SAMPLES) -> Sample:
    return Sample(
        time_s=t,
        memory_pressure=0.99,  # always full: the threshold rules would scale up
        hit_rate=f(replicas * PER_REPLICA),
        ready_replicas=replicas,
        curve=reported(f, replicas * PER_REPLICA, samples),
    )


def spec(**overrides: object) -> Autoscaling:
    fields: dict[str, object] = {
        "mode": "Auto",
        "min_replicas": 1,
        "max_replicas": 16,
        "target_hit_rate": 0.9,
        "min_gain_per_doubling": 0.01,
        "scale_up_stabilization_seconds": 20,
        "scale_down_stabilization_seconds": 40,
        "max_scale_up_step": 2,
        "max_scale_down_step": 1,
    }
    fields.update(overrides)
    return Autoscaling.model_validate(fields)


def run(a: Autoscaling, f: Curve, replicas: int, rounds: int = 200) -> tuple[int, list[tuple[int, int]]]:
    """The operator's loop on a stationary workload: a scrape, a decision, applied at once."""
    series: list[Sample] = []
    moves: list[tuple[int, int]] = []
    last: float | None = None
    for i in range(rounds):
        t = i * INTERVAL
        series.append(sample(f, replicas, t))
        d = decide_scale(a, series, current_replicas=replicas, now_s=t, last_change_s=last, rolling_out=False)
        if d is not None and d.applied and d.to_replicas is not None and d.to_replicas != replicas:
            moves.append((replicas, d.to_replicas))
            replicas, last = d.to_replicas, t
    return replicas, moves


# -- exact outcomes


def test_an_unreachable_target_sizes_to_the_knee_and_says_so() -> None:
    f = saturating(0.64, 1500)  # the knee (a doubling buys 0.01) is near 48k blocks
    plan = plan_capacity(spec(), sample(f, 1), 1)
    assert plan is not None and not plan.warming_up
    assert plan.reason.startswith("target 0.90 unreachable: predicted ceiling 0.64; sized to ")
    goal = plan.goal_capacity_blocks
    assert f(2 * goal) - f(goal) < 0.0105 < f(goal) - f(goal / 2)  # from the knee on, doubling buys < 0.01
    final, moves = run(spec(), f, 1)
    assert final == math.ceil(goal / PER_REPLICA)
    assert all(b > a for a, b in moves)  # it only grew, and then stayed
    # Once there, the plan says so: the next replica would buy too little.
    there = plan_capacity(spec(), sample(f, final), final)
    assert there is not None and there.replicas == final


def test_a_reachable_target_stops_at_the_smallest_size_that_reaches_it() -> None:
    f = saturating(0.64, 20_000)
    a = spec(target_hit_rate=0.25)
    # f(x) = 0.25 at x = 0.25 * 20000 / 0.39 = 12 821 blocks: three replicas
    final, moves = run(a, f, 1)
    assert final == 3 and moves == [(1, 3)]
    plan = plan_capacity(a, sample(f, 3), 3)
    assert plan is not None and plan.replicas == 3 and plan.recommended_capacity_blocks == 15_000
    assert plan.reason.startswith("target 0.25 predicted at 12.8k blocks")


def test_no_reuse_never_scales_out_whatever_the_pressure() -> None:
    final, moves = run(spec(), flat, 2)
    assert (final, moves) == (1, [(2, 1)])  # the idle replica goes; nothing is added
    d = decide_scale(
        spec(), [sample(flat, 1)], current_replicas=1, now_s=0.0, last_change_s=None, rolling_out=False
    )
    assert d is None


def test_a_replica_that_buys_too_little_is_not_added() -> None:
    f = saturating(0.3, 200)  # nearly flat past a thousand blocks: 1 -> 2 replicas buys 0.0056
    plan = plan_capacity(spec(target_hit_rate=0.299), sample(f, 1), 1)
    assert plan is not None and plan.replicas == 1
    assert "would buy" in plan.reason and "< minGainPerDoubling 0.01: not added" in plan.reason


def test_the_threshold_rules_decide_while_the_curve_warms_up_and_say_so() -> None:
    f = saturating(0.64, 20_000)
    cold = [sample(f, 2, t=i * INTERVAL, samples=10) for i in range(4)]
    d = decide_scale(spec(), cold, current_replicas=2, now_s=30.0, last_change_s=None, rolling_out=False)
    assert d is not None and d.to_replicas == 3  # ceil(2 x 0.99 / 0.8): the pressure rule
    assert (
        "memory pressure" in d.reason and "threshold rules: curve warming up (10 of 200 samples)" in d.reason
    )
    bare = [
        Sample(time_s=i * INTERVAL, memory_pressure=0.99, hit_rate=0.1, ready_replicas=2) for i in range(4)
    ]
    d = decide_scale(spec(), bare, current_replicas=2, now_s=30.0, last_change_s=None, rolling_out=False)
    assert d is not None and "the engines report no miss-ratio curve" in d.reason


def test_dry_run_recommends_without_applying() -> None:
    f = saturating(0.64, 20_000)
    series = [sample(f, 1, t=i * INTERVAL) for i in range(3)]
    d = decide_scale(
        spec(mode="DryRun"), series, current_replicas=1, now_s=20.0, last_change_s=None, rolling_out=False
    )
    assert d is not None and not d.applied and d.to_replicas == 3
    assert d.numbers["predictedCeiling"] == pytest.approx(0.64, abs=1e-3)


def tuning(**overrides: object) -> Tuning:
    fields: dict[str, object] = {"mode": "Auto", "interval_seconds": 30, "max_tokens_min": 16}
    fields.update(overrides)
    return Tuning.model_validate(fields)


def policy_input(f: Curve, replicas: int, live: TunedConfig, t: Tuning) -> PolicyInput:
    series = tuple(sample(f, replicas, t=i * INTERVAL) for i in range(5))
    return PolicyInput(
        autoscaling=spec(),
        tuning=t,
        samples=series,
        current_replicas=replicas,
        live=live,
        fp16_bytes_per_token=0.0,
        now_s=40.0,
    )


def test_int8_is_weighed_against_replicas_with_the_same_curve() -> None:
    f = saturating(0.64, 20_000)
    off = TunedConfig(max_tokens=80_000)
    got = decide(policy_input(f, 2, off, tuning()))
    assert got.tune is not None and got.tune.changes == {"use_compression": True, "compression_ratio": 0.5}
    assert "int8 takes the capacity 10k -> 19.4k blocks without new replicas" in got.tune.reason
    assert got.scale is None  # the replicas wait for the compressed capacity
    # Tuning off: the same curve buys replicas instead.
    got = decide(policy_input(f, 2, off, tuning(mode="Off")))
    assert got.tune is None and got.scale is not None and got.scale.to_replicas == 4
    # Compression already on and past the goal without it: switched off again (fidelity is free).
    on = TunedConfig(max_tokens=80_000, use_compression=True, compression_ratio=0.5)
    got = decide(policy_input(saturating(0.64, 500), 16, on, tuning()))
    assert got.tune is not None and got.tune.changes["use_compression"] is False


# -- invariants (hypothesis)

curves = st.builds(
    saturating,
    st.floats(0.05, 0.95),
    st.floats(100.0, 200_000.0),
)


@settings(max_examples=30, deadline=None)
@given(
    curves,
    st.integers(1, 16),
    st.integers(1, 6),
    st.integers(1, 16),
    st.floats(0.0, 1.0),
    st.floats(0.001, 0.05),
)
def test_capacity_stays_in_bounds_and_a_stationary_curve_never_flaps(
    f: Curve, start: int, low: int, high: int, target: float, gain: float
) -> None:
    lo, hi = min(low, high), max(low, high)
    a = spec(min_replicas=lo, max_replicas=hi, target_hit_rate=target, min_gain_per_doubling=gain)
    replicas = min(max(start, lo), hi)
    final, moves = run(a, f, replicas, rounds=120)
    assert lo <= final <= hi
    assert all(lo <= b <= hi for _, b in moves)
    # no flapping: the replica count moves one way only, then stays
    ups = [b > a_ for a_, b in moves]
    assert ups == sorted(ups, reverse=True) and (all(ups) or not any(ups))


@settings(max_examples=40, deadline=None)
@given(curves, st.integers(1, 8))
def test_a_rising_curve_grows_capacity_and_a_flat_one_never_does(f: Curve, start: int) -> None:
    a = spec(target_hit_rate=0.99, min_gain_per_doubling=0.01)
    plan = plan_capacity(a, sample(f, start), start)
    assert plan is not None
    gain = f(2 * start * PER_REPLICA) - f(start * PER_REPLICA)
    step = (f((start + 1) * PER_REPLICA) - f(start * PER_REPLICA)) / math.log2((start + 1) / start)
    if step >= 0.011 and gain >= 0.011:
        assert plan.replicas > start
    final, moves = run(a, flat, start, rounds=40)
    assert final <= start and all(b < a_ for a_, b in moves)
