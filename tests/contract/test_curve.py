"""contract.curve: the hit-rate curve's interpolation, its inverse, the merge across replicas
(capacities add) and its wire form."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_engine.contract import CURVE_MULTIPLES, HitRateCurve, merge_curves
from kvcache_engine.contract.curve import multiple_label


def make(capacity: float, rates: list[float] | None = None, weight: float = 1.0) -> HitRateCurve:
    rates = rates or [min(0.5, 0.05 * (i + 1)) for i in range(len(CURVE_MULTIPLES))]
    return HitRateCurve(capacity, tuple(rates), ceiling=max(rates), samples=100.0, weight=weight)


def test_the_multiples_hold_the_issues_six_and_label_plainly() -> None:
    for m in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        assert any(math.isclose(m, x) for x in CURVE_MULTIPLES)
    assert [multiple_label(m) for m in CURVE_MULTIPLES[:5]] == ["0.25", "0.3536", "0.5", "0.7071", "1"]


def test_at_hits_the_points_and_interpolates_in_log_capacity() -> None:
    c = make(1000)
    for cap, rate in c.points():
        assert c.at(cap) == pytest.approx(rate)
    lo, hi = c.points()[4], c.points()[5]  # 1x and 1.414x
    assert c.at(math.sqrt(lo[0] * hi[0])) == pytest.approx((lo[1] + hi[1]) / 2)
    assert c.at(0) == 0.0 and c.at(125) == pytest.approx(c.points()[0][1] / 2)
    assert c.at(10**9) == c.points()[-1][1]  # no guess past the largest measured size


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=len(CURVE_MULTIPLES), max_size=len(CURVE_MULTIPLES)),
    st.floats(0.0, 1.0),
)
def test_smallest_capacity_for_inverts_at(raw: list[float], target: float) -> None:
    rates = sorted(raw)
    c = make(5000, rates)
    cap = c.smallest_capacity_for(target)
    if target > rates[-1]:
        assert cap is None
        return
    assert cap is not None
    assert c.at(cap) == pytest.approx(target, abs=1e-9)
    assert cap == 0.0 or c.at(cap * 0.999) <= target + 1e-9


def test_merge_adds_capacities_and_weighs_replicas_by_their_traffic() -> None:
    a = make(1000, [0.1] * len(CURVE_MULTIPLES), weight=3.0)
    b = make(3000, [0.5] * len(CURVE_MULTIPLES), weight=1.0)
    m = merge_curves([a, b])
    assert m is not None
    assert m.capacity_blocks == 4000 and m.samples == 200 and m.weight == 4.0
    assert m.hit_rates[0] == pytest.approx(0.2) and m.ceiling == pytest.approx(0.2)
    assert merge_curves([]) is None
    idle = merge_curves([make(1000, [0.1] * 15, weight=0), make(1000, [0.3] * 15, weight=0)])
    assert idle is not None and idle.hit_rates[0] == pytest.approx(0.2)


def test_wire_form_round_trips_and_refuses_a_partial_curve() -> None:
    c = make(2048)
    doc = c.to_dict()
    back = HitRateCurve.from_labels(
        doc["capacity_blocks"],  # type: ignore[arg-type]
        dict(zip(doc["multiples"], doc["hit_rates"], strict=True)),  # type: ignore[call-overload]
        ceiling=c.ceiling,
        samples=c.samples,
        weight=c.weight,
    )
    assert back == c
    assert HitRateCurve.from_labels(2048, {"1": 0.5}, ceiling=0.5, samples=1, weight=1) is None
    with pytest.raises(ValueError, match="hit_rates: expected 15 values"):
        HitRateCurve(10, (0.1,), 0.1, 1, 1)
    with pytest.raises(ValueError, match="capacity_blocks"):
        HitRateCurve(0, c.hit_rates, 0.1, 1, 1)
