"""policy.py driven by scripted metric series: no cluster, no clock, exact outcomes."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_operator.api import Autoscaling, Mode, Tuning
from kvcache_operator.policy import (
    Decision,
    PolicyInput,
    Proposals,
    Sample,
    TunedConfig,
    decide,
    decide_scale,
    decide_tuning,
)

INTERVAL = 10.0  # seconds between scrapes in the scripted series


def make_autoscaling(**overrides: object) -> Autoscaling:
    fields: dict[str, object] = {
        "mode": "Auto",
        "min_replicas": 1,
        "max_replicas": 6,
        "target_memory_pressure": 0.8,
        "target_hit_rate": 0.5,
        "scale_up_stabilization_seconds": 60,
        "scale_down_stabilization_seconds": 120,
        "max_scale_up_step": 2,
        "max_scale_down_step": 1,
    }
    fields.update(overrides)
    return Autoscaling.model_validate(fields)


def make_series(
    pressures: Sequence[float], hit_rates: Sequence[float | None] | float | None = 0.2, start: float = 0.0
) -> list[Sample]:
    if not isinstance(hit_rates, Sequence):
        hit_rates = [hit_rates] * len(pressures)
    return [
        Sample(time_s=start + i * INTERVAL, memory_pressure=p, hit_rate=h)
        for i, (p, h) in enumerate(zip(pressures, hit_rates, strict=True))
    ]


def run_loop(spec: Autoscaling, series: Sequence[Sample], replicas: int) -> tuple[int, list[Decision]]:
    """Replay the series like the operator's scrape loop: decide after each scrape, apply Auto ones."""
    decisions: list[Decision] = []
    last_change: float | None = None
    for i, sample in enumerate(series):
        decision = decide_scale(
            spec,
            series[: i + 1],
            current_replicas=replicas,
            now_s=sample.time_s,
            last_change_s=last_change,
            rolling_out=False,
        )
        if decision is None:
            continue
        decisions.append(decision)
        if decision.applied:
            assert decision.to_replicas is not None
            replicas, last_change = decision.to_replicas, sample.time_s
    return replicas, decisions


def test_sustained_pressure_with_low_hit_rate_scales_out_once_the_window_holds() -> None:
    spec = make_autoscaling()
    series = make_series([0.95] * 7)  # 0s .. 60s: the 60 s window is covered at the 7th scrape
    replicas, decisions = run_loop(spec, series, replicas=2)
    assert [(d.from_replicas, d.to_replicas) for d in decisions] == [(2, 3)]
    assert replicas == 3
    assert decisions[0].numbers["memoryPressureMin"] == 0.95
    assert decisions[0].numbers["samples"] == 7


def test_not_yet_after_a_shorter_spell() -> None:
    replicas, decisions = run_loop(make_autoscaling(), make_series([0.95] * 6), replicas=2)
    assert (replicas, decisions) == (2, [])


def test_high_pressure_with_good_hit_rate_does_not_buy_replicas() -> None:
    replicas, decisions = run_loop(make_autoscaling(), make_series([0.95] * 20, hit_rates=0.9), replicas=2)
    assert (replicas, decisions) == (2, [])


def test_scale_up_step_and_max_bound() -> None:
    spec = make_autoscaling(max_replicas=4, max_scale_up_step=5)
    decision = decide_scale(
        spec, make_series([1.0] * 7), current_replicas=2, now_s=60.0, last_change_s=None, rolling_out=False
    )
    assert decision is not None and decision.to_replicas == 3  # ceil(2 * 1.0 / 0.8) = 3


def test_oscillating_metrics_do_not_flap() -> None:
    spec = make_autoscaling()
    pressures = [0.95 if i % 2 else 0.2 for i in range(60)]
    replicas, decisions = run_loop(spec, make_series(pressures), replicas=3)
    # the high half never holds for 60 s and the max over any window is high: nothing moves
    assert (replicas, decisions) == (3, [])


def test_at_most_one_change_per_cooldown_under_sustained_pressure() -> None:
    spec = make_autoscaling(max_replicas=10)
    series = make_series([0.99] * 40)
    times: list[float] = []
    replicas, last = 1, None
    for i, sample in enumerate(series):
        d = decide_scale(
            spec,
            series[: i + 1],
            current_replicas=replicas,
            now_s=sample.time_s,
            last_change_s=last,
            rolling_out=False,
        )
        if d is not None and d.to_replicas is not None:
            times.append(sample.time_s)
            replicas, last = d.to_replicas, sample.time_s
    assert len(times) >= 2
    assert all(b - a > spec.scale_up_stabilization_seconds for a, b in itertools.pairwise(times))


def test_a_single_outlier_scrape_changes_nothing() -> None:
    spec = make_autoscaling()
    calm = make_series([0.5] * 30, hit_rates=0.6)
    spiked = list(calm)
    spiked[15] = Sample(time_s=spiked[15].time_s, memory_pressure=1.0, hit_rate=0.0)
    assert run_loop(spec, spiked, replicas=2) == run_loop(spec, calm, replicas=2)
    assert run_loop(spec, spiked, replicas=2)[1] == []


def test_low_pressure_scales_in_one_step_and_names_the_drained_ordinal() -> None:
    spec = make_autoscaling()
    replicas, decisions = run_loop(spec, make_series([0.2] * 13), replicas=3)
    assert [(d.from_replicas, d.to_replicas) for d in decisions] == [(3, 2)]
    assert replicas == 2
    assert decisions[0].leaving == (2,)
    assert "draining ordinals 2" in decisions[0].reason


def test_dry_run_decides_but_changes_nothing() -> None:
    spec = make_autoscaling(mode="DryRun")
    replicas, decisions = run_loop(spec, make_series([0.95] * 20), replicas=2)
    assert replicas == 2
    assert decisions and all(not d.applied and d.mode == Mode.DRY_RUN for d in decisions)
    assert decisions[0].to_status("t")["applied"] is False


def test_off_and_rollout_and_hibernation_decide_nothing() -> None:
    series = make_series([0.95] * 20)
    assert (
        decide_scale(
            make_autoscaling(mode="Off"),
            series,
            current_replicas=2,
            now_s=190.0,
            last_change_s=None,
            rolling_out=False,
        )
        is None
    )
    assert (
        decide_scale(
            make_autoscaling(), series, current_replicas=2, now_s=190.0, last_change_s=None, rolling_out=True
        )
        is None
    )
    assert (
        decide_scale(
            make_autoscaling(), series, current_replicas=0, now_s=190.0, last_change_s=None, rolling_out=False
        )
        is None
    )


def test_every_decision_is_explained_with_numbers() -> None:
    spec = make_autoscaling()
    for pressures, replicas in (([0.95] * 10, 2), ([0.1] * 15, 4)):
        _, decisions = run_loop(spec, make_series(pressures), replicas=replicas)
        assert decisions
        for d in decisions:
            assert d.reason and d.numbers and "->" in d.action
            assert str(d.numbers["samples"]) in d.reason.replace(".0", "")


pressure = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
hit = st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0, allow_nan=False))


@settings(max_examples=150, deadline=None)
@given(
    series=st.lists(st.tuples(pressure, hit), min_size=1, max_size=40),
    min_r=st.integers(1, 5),
    span=st.integers(0, 5),
    start=st.integers(1, 12),
    up=st.integers(1, 4),
    down=st.integers(1, 4),
)
def test_bounds_and_steps_always_hold(
    series: list[tuple[float, float | None]], min_r: int, span: int, start: int, up: int, down: int
) -> None:
    spec = make_autoscaling(
        min_replicas=min_r,
        max_replicas=min_r + span,
        max_scale_up_step=up,
        max_scale_down_step=down,
        scale_up_stabilization_seconds=20,
        scale_down_stabilization_seconds=30,
    )
    samples = make_series([p for p, _ in series], [h for _, h in series])
    replicas = start
    last: float | None = None
    for i, sample in enumerate(samples):
        d = decide_scale(
            spec,
            samples[: i + 1],
            current_replicas=replicas,
            now_s=sample.time_s,
            last_change_s=last,
            rolling_out=False,
        )
        if d is None:
            continue
        assert d.from_replicas == replicas and d.to_replicas is not None
        assert spec.min_replicas <= d.to_replicas <= spec.max_replicas
        in_bounds = spec.min_replicas <= replicas <= spec.max_replicas
        if in_bounds:
            assert -spec.max_scale_down_step <= d.to_replicas - replicas <= spec.max_scale_up_step
            assert d.to_replicas != replicas
        assert d.reason and d.numbers
        replicas, last = d.to_replicas, sample.time_s


def make_tuning(**overrides: object) -> Tuning:
    fields: dict[str, object] = {
        "mode": "Auto",
        "max_tokens_min": 1024,
        "max_tokens_max": 65536,
        "compression_ratio_min": 0.25,
        "compression_ratio_max": 1.0,
        "interval_seconds": 60,
    }
    fields.update(overrides)
    return Tuning.model_validate(fields)


def live(max_tokens: int, use_compression: bool = False, compression_ratio: float = 1.0) -> TunedConfig:
    return TunedConfig(max_tokens, use_compression, compression_ratio)


def tune(
    spec: Tuning,
    effective: dict[str, Any],
    pressures: Sequence[float],
    *,
    p95: float = 5.0,
    device: int = 0,
) -> Decision | None:
    samples = [
        Sample(
            time_s=i * INTERVAL,
            memory_pressure=p,
            hit_rate=0.3,
            p95_latency_ms=p95,
            device_memory_total=device,
        )
        for i, p in enumerate(pressures)
    ]
    return decide_tuning(
        spec,
        0.8,
        live(**effective),
        samples,
        now_s=samples[-1].time_s,
        last_change_s=None,
        rolling_out=False,
        fp16_bytes_per_token=1024.0,
    )


def test_tuning_enables_compression_under_pressure_when_latency_allows() -> None:
    d = tune(
        make_tuning(), {"max_tokens": 8192, "use_compression": False, "compression_ratio": 0.5}, [0.95] * 7
    )
    assert d is not None and dict(d.changes) == {"use_compression": True, "compression_ratio": 0.5}
    assert d.action == "compressionRatio off -> 0.5, useCompression False -> True"
    assert d.numbers["p95LatencyMs"] == 5.0


def test_tuning_holds_when_latency_is_over_budget_or_at_the_bound() -> None:
    assert tune(make_tuning(), {"max_tokens": 8192, "use_compression": False}, [0.95] * 7, p95=500.0) is None
    at_floor = {"max_tokens": 8192, "use_compression": True, "compression_ratio": 0.25}
    assert tune(make_tuning(), at_floor, [0.95] * 7) is None


def test_tuning_relaxes_compression_when_pressure_is_low() -> None:
    d = tune(
        make_tuning(), {"max_tokens": 8192, "use_compression": True, "compression_ratio": 0.5}, [0.1] * 7
    )
    assert d is not None and dict(d.changes) == {"use_compression": False, "compression_ratio": 1.0}


def test_tuning_sizes_max_tokens_to_device_memory_within_bounds() -> None:
    d = tune(make_tuning(), {"max_tokens": 8192, "use_compression": False}, [0.5] * 7, device=40 * 2**20)
    assert d is not None and d.changes["max_tokens"] == 34816  # 0.85 * 40 MiB / 1 KiB per token
    capped = tune(make_tuning(max_tokens_max=16384), {"max_tokens": 8192}, [0.5] * 7, device=40 * 2**20)
    assert capped is not None and capped.changes["max_tokens"] == 16384


def test_tuning_dry_run_and_interval() -> None:
    spec = make_tuning(mode="DryRun")
    d = tune(spec, {"max_tokens": 8192, "use_compression": False}, [0.95] * 7)
    assert d is not None and not d.applied
    assert (
        tune(make_tuning(), {"max_tokens": 8192, "use_compression": False}, [0.95] * 3) is None
    )  # < interval


@settings(max_examples=100, deadline=None)
@given(
    pressures=st.lists(pressure, min_size=1, max_size=20),
    ratio=st.sampled_from([0.25, 0.5, 1.0]),
    enabled=st.booleans(),
    tokens=st.integers(16, 2**20),
    device=st.integers(0, 2**36),
    low=st.sampled_from([0.25, 0.5]),
    high=st.sampled_from([0.5, 1.0]),
)
def test_tuning_bounds_always_hold(
    pressures: list[float], ratio: float, enabled: bool, tokens: int, device: int, low: float, high: float
) -> None:
    spec = make_tuning(interval_seconds=30, compression_ratio_min=low, compression_ratio_max=high)
    d = tune(
        spec,
        {"max_tokens": tokens, "use_compression": enabled, "compression_ratio": ratio},
        pressures,
        device=device,
    )
    if d is None:
        return
    assert d.reason and d.numbers
    if "max_tokens" in d.changes:
        assert spec.max_tokens_min <= d.changes["max_tokens"] <= spec.max_tokens_max
    if "compression_ratio" in d.changes:
        assert d.changes["compression_ratio"] == 1.0 or low <= d.changes["compression_ratio"] <= high


def test_decide_takes_one_typed_input_and_proposes_scale_and_tuning() -> None:
    samples = tuple(
        Sample(time_s=i * INTERVAL, memory_pressure=0.95, hit_rate=0.2, p95_latency_ms=5.0) for i in range(7)
    )
    given = PolicyInput(
        autoscaling=make_autoscaling(),
        tuning=make_tuning(),
        samples=samples,
        current_replicas=2,
        live=live(8192),
        fp16_bytes_per_token=1024.0,
        now_s=samples[-1].time_s,
    )
    proposals = decide(given)
    assert proposals.scale is not None and proposals.scale.action == "replicas 2 -> 3"
    assert proposals.tune is not None and dict(proposals.tune.changes) == {
        "use_compression": True,
        "compression_ratio": 0.5,
    }
    assert [d.kind for d in proposals] == ["Scale", "Tune"]
    # the same input after both changes (cooldowns start now) and during a rollout proposes nothing
    later = PolicyInput(**{**given.__dict__, "last_scale_s": given.now_s, "last_tune_s": given.now_s})
    assert list(decide(later)) == []
    assert decide(PolicyInput(**{**given.__dict__, "rolling_out": True})) == Proposals()
