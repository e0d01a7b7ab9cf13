"""Autoscaling and tuning decisions: pure, deterministic, every one explained with its numbers.

``decide()`` takes one typed ``PolicyInput`` (the observations the scrape loop made, ``Sample``, one
per scrape, oldest first; the KVCache's ``spec.autoscaling`` / ``spec.tuning`` bounds; the current
replicas and live config; the clock and the last change times; whether a rollout runs) and returns
``Proposals``: at most one scale and one tuning ``Decision``, each explained with its numbers.
Nothing here reads a clock, a random source or the network, so the same input always yields the
same proposals.

Invariants (tested with scripted series and hypothesis):

* a decision's target replicas lie in ``[minReplicas, maxReplicas]`` and differ from the current
  count by at most ``maxScaleUpStep`` / ``maxScaleDownStep`` (except hibernation, ``replicas: 0``,
  which the policy never touches);
* a signal acts only when every sample of its stabilization window agrees and the window lies
  entirely after the last change (so one outlier scrape changes nothing, and at most one change
  happens per cooldown = stabilization window);
* no decision while a rollout is in progress or while the mode is ``Off``;
* tuned values stay within ``spec.tuning`` bounds; a tuning change waits ``intervalSeconds``;
* ``DryRun`` decisions are returned with ``applied=False``: the caller records them and acts on none.

Sizing from the miss-ratio curve (when the engines report one with enough samples; until then the
threshold rules above decide, and say the curve is warming up): the total capacity (replicas x
effective blocks per replica) goes to the smallest size the curve predicts ``targetHitRate`` at,
or, when no measured size reaches it, to the knee, past which a doubling buys less than
``minGainPerDoubling``. A replica is never added when the curve says it buys less than that (per
doubling of the capacity it adds), and one is removed only when the target still holds without
it or the capacity exceeds the knee by REMOVE_MARGIN (so a stationary curve never flaps). int8
compression is weighed with the same curve: it nearly doubles the capacity without new pods, so
when it buys what a replica would, the tuner turns it on instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvcache_engine.contract import CODEC_BYTES_PER_FP16_BYTE, HitRateCurve
from kvcache_operator.api import Autoscaling, Mode, Tuning

SCALE_IN_HEADROOM = 0.9
"""Scale in only if the pressure projected onto one replica fewer stays below target × this (hysteresis)."""
RELAX_PRESSURE_FRACTION = 0.5
"""Tuning relaxes compression when every sample's pressure is below target × this."""
LATENCY_BUDGET_MS = 50.0
"""Compression is raised only while the p95 lookup latency stays under this budget."""
DEVICE_MEMORY_HEADROOM = 0.85
"""Fraction of device memory the pool may take when sizing max_tokens to the device."""
MAX_TOKENS_CHANGE_FRACTION = 0.1
"""A device-sized max_tokens differing from the current one by less than this is left alone."""
COMPRESSION_STEPS = (1.0, 0.5, 0.25)
"""Compression ratios tuning moves through (none → int8 → int4); bounded by spec.tuning."""
MIN_CURVE_SAMPLES = 200.0
"""Sampled block references the merged curve needs before the policy sizes by it."""
REMOVE_MARGIN = 1.25
"""Past the knee, replicas are removed only once the capacity exceeds the knee by this factor
(then down to the knee): the band between keeps a stationary curve from flapping."""


@dataclass(frozen=True)
class Sample:
    """One scrape of every ready engine of a KVCache, reduced to the numbers the policy uses.

    ``hit_rate`` and ``eviction_rate`` come from counter deltas since the previous scrape (None
    when nothing was requested); ``memory_pressure`` is the mean over the engines (0..1).
    """

    time_s: float
    memory_pressure: float
    hit_rate: float | None = None
    eviction_rate: float = 0.0
    p95_latency_ms: float | None = None
    ready_replicas: int = 0
    device_memory_total: int = 0
    curve: HitRateCurve | None = None  # merged over the ready engines (None: not every one reports)


@dataclass(frozen=True)
class TunedConfig:
    """The live fields the tuner reads and changes, as the engines run them (snake_case)."""

    max_tokens: int
    use_compression: bool = False
    compression_ratio: float = 1.0

    def get(self, name: str) -> int | bool | float:
        return {
            "max_tokens": self.max_tokens,
            "use_compression": self.use_compression,
            "compression_ratio": self.compression_ratio,
        }[name]


LiveValue = int | bool | float


@dataclass(frozen=True)
class Decision:
    """A scaling or tuning decision: what, why, the numbers behind it, and whether it is applied."""

    kind: Literal["Scale", "Tune"]
    mode: Mode
    action: str
    reason: str
    numbers: Mapping[str, float]
    from_replicas: int | None = None
    to_replicas: int | None = None
    changes: Mapping[str, LiveValue] = field(default_factory=dict)  # snake_case live fields (Tune)

    @property
    def applied(self) -> bool:
        return self.mode == Mode.AUTO

    @property
    def leaving(self) -> tuple[int, ...]:
        """Ordinals of the replicas a scale-in removes (they are drained first)."""
        if self.to_replicas is None or self.from_replicas is None:
            return ()
        return tuple(range(self.to_replicas, self.from_replicas))

    def to_status(self, time: str) -> dict[str, str | bool]:
        """The ``status.decisions[]`` entry (camelCase, api.Decision)."""
        return {
            "time": time,
            "kind": self.kind,
            "mode": self.mode.value,
            "applied": self.applied,
            "action": self.action,
            "reason": self.reason,
        }


def _window(samples: Sequence[Sample], now_s: float, window_s: float, since_s: float | None) -> list[Sample]:
    """Samples of the last ``window_s`` seconds, or [] when the window is not fully observed.

    Fully observed = a sample at or before the window's start, taken after the last change
    (samples from before a change describe another replica count). A zero window is the
    latest sample alone.
    """
    usable = [s for s in samples if s.time_s <= now_s and (since_s is None or s.time_s > since_s)]
    if not usable:
        return []
    if window_s <= 0:
        return usable[-1:]
    start = now_s - window_s
    if usable[0].time_s > start:
        return []
    return [s for s in usable if s.time_s >= start] or usable[-1:]


def _scale_up_signal(s: Sample, spec: Autoscaling) -> bool:
    # Evictions cost hits: pressure is high AND the hit rate is under target. High pressure with
    # a good hit rate is a full, working cache, not a reason to buy replicas.
    return (
        s.memory_pressure > spec.target_memory_pressure
        and s.hit_rate is not None
        and s.hit_rate < spec.target_hit_rate
    )


def _projected(pressure: float, current: int, target: int) -> float:
    return pressure * current / max(target, 1)


# --- capacity from the miss-ratio curve ----------------------------------------------------------


@dataclass(frozen=True)
class CapacityPlan:
    """What the merged curve says about a KVCache's size. Capacities are effective blocks (after
    compression) over all replicas; ``replicas`` is where the policy takes the replica count
    (bounded), ``capacity_blocks`` the capacity the curve recommends (``replicas`` x
    ``blocks_per_replica``). ``warming_up``: too few samples, the threshold rules decide."""

    capacity_blocks: float
    blocks_per_replica: float
    predicted_hit_rate: float
    ceiling: float
    samples: float
    recommended_capacity_blocks: float
    goal_capacity_blocks: float
    replicas: int
    reason: str
    warming_up: bool = False
    int8_gain_per_doubling: float | None = None  # what switching none -> int8 buys (None: n/a)
    curve: HitRateCurve | None = field(default=None, repr=False, compare=False)

    def predicted_at(self, capacity_blocks: float) -> float:
        """The curve's hit rate at ``capacity_blocks`` (the current prediction without a curve)."""
        return self.curve.at(capacity_blocks) if self.curve is not None else self.predicted_hit_rate


def gain_per_doubling(curve: HitRateCurve, low: float, high: float) -> float:
    """Hit rate the curve says growing from ``low`` to ``high`` blocks buys, per doubling."""
    if low <= 0 or high <= low:
        return 0.0
    return (curve.at(high) - curve.at(low)) / math.log2(high / low)


def _knee(curve: HitRateCurve, min_gain: float) -> float:
    """The smallest capacity (in eighth-octave steps) from which on every doubling buys less than
    ``min_gain``, among those whose doubling the curve measured (a curve can pay more per doubling
    further on: its convex start); the largest measured capacity when the last doubling measured
    still pays (the knee lies beyond: grow, and measure further)."""
    points = curve.points()
    x, last = points[0][0], points[-1][0]
    knee = x
    while 2 * x <= last * (1 + 1e-9):
        step = x * 2 ** (1 / 8)
        if curve.at(2 * x) - curve.at(x) >= min_gain:
            knee = step if 2 * step <= last * (1 + 1e-9) else last
        x = step
    return knee


def _kblocks(blocks: float) -> str:
    return f"{blocks / 1000:.3g}k" if blocks >= 1000 else f"{blocks:.0f}"


def plan_capacity(
    spec: Autoscaling, sample: Sample, current_replicas: int, *, codec: str = "none"
) -> CapacityPlan | None:
    """The curve's plan for ``sample`` (None when not every ready engine reports a curve).
    ``codec``: what the engines store with now (the int8 weighing needs it)."""
    curve = sample.curve
    if curve is None or sample.ready_replicas <= 0 or current_replicas <= 0:
        return None
    per = curve.capacity_blocks / sample.ready_replicas
    now = per * current_replicas
    predicted, ceiling = curve.at(now), curve.ceiling
    warming = CapacityPlan(
        capacity_blocks=now, blocks_per_replica=per, predicted_hit_rate=predicted, ceiling=ceiling,
        samples=curve.samples, recommended_capacity_blocks=now, goal_capacity_blocks=now,
        replicas=current_replicas, warming_up=True, curve=curve,
        reason=f"curve warming up ({curve.samples:.0f} of {MIN_CURVE_SAMPLES:.0f} samples)",
    )  # fmt: skip
    if curve.samples < MIN_CURVE_SAMPLES:
        return warming
    target, g = spec.target_hit_rate, spec.min_gain_per_doubling
    reach = curve.smallest_capacity_for(target)
    if reach is not None:
        goal = reach
        why = f"target {target:.2f} predicted at {_kblocks(goal)} blocks"
    else:
        goal = _knee(curve, g)
        largest = curve.points()[-1][0]
        limit = (
            f"predicted ceiling {ceiling:.2f}"
            if target > ceiling
            else f"{curve.at(largest):.2f} at the largest measured size ({_kblocks(largest)} blocks)"
        )
        sized = f"sized to {_kblocks(goal)} blocks for {curve.at(goal):.2f}"
        why = f"target {target:.2f} unreachable: {limit}; {sized}"
    replicas, step_why = _replicas_for(spec, curve, per, current_replicas, goal, reachable=reach is not None)
    int8 = None
    if codec == "none":
        factor = CODEC_BYTES_PER_FP16_BYTE["none"] / CODEC_BYTES_PER_FP16_BYTE["int8"]
        int8 = gain_per_doubling(curve, now, now * factor)
    return dataclasses.replace(
        warming, recommended_capacity_blocks=replicas * per, goal_capacity_blocks=goal, replicas=replicas,
        reason=why + step_why, warming_up=False, int8_gain_per_doubling=int8,
    )  # fmt: skip


def _replicas_for(
    spec: Autoscaling, curve: HitRateCurve, per: float, current: int, goal: float, *, reachable: bool
) -> tuple[int, str]:
    """The bounded replica count toward ``goal``: up while each added replica buys at least
    minGainPerDoubling (per doubling of the capacity it adds); down while the target still holds
    without the replica, or (past the knee) to the knee once the capacity exceeds it by
    REMOVE_MARGIN. With why a step stops short of the goal."""
    g = spec.min_gain_per_doubling
    want = min(max(math.ceil(goal / per - 1e-9), spec.min_replicas), spec.max_replicas)
    r = current
    while r < want and gain_per_doubling(curve, r * per, (r + 1) * per) >= g:
        r += 1
    if r < want:
        gain = gain_per_doubling(curve, r * per, (r + 1) * per)
        return r, (f"; replica {r + 1} would buy {gain:.4f} per doubling < minGainPerDoubling {g}: not added")
    if reachable:
        while r > max(want, spec.min_replicas) and curve.at((r - 1) * per) >= spec.target_hit_rate:
            r -= 1
    elif r * per > goal * REMOVE_MARGIN:
        r = max(want, spec.min_replicas)
    return min(max(r, spec.min_replicas), spec.max_replicas), ""


def _plans(spec: Autoscaling, window: Sequence[Sample], current: int) -> list[CapacityPlan] | None:
    """The curve's plan for every sample of the window, or None when one has no usable curve."""
    plans = [plan_capacity(spec, s, current) for s in window]
    if any(p is None or p.warming_up for p in plans):
        return None
    return [p for p in plans if p is not None]


def _curve_scale(
    spec: Autoscaling, samples: Sequence[Sample], current: int, now_s: float, last_change_s: float | None
) -> Decision | None:
    """The replica decision the curve makes: every plan of the (up or down) window agrees."""
    up = _window(samples, now_s, spec.scale_up_stabilization_seconds, last_change_s)
    plans = _plans(spec, up, current) if up else None
    if plans and all(p.replicas > current for p in plans):
        target = min(*(p.replicas for p in plans), current + spec.max_scale_up_step)
        return _curve_decision(spec, plans, current, target, spec.scale_up_stabilization_seconds)
    down = _window(samples, now_s, spec.scale_down_stabilization_seconds, last_change_s)
    plans = _plans(spec, down, current) if down else None
    if plans and all(p.replicas < current for p in plans):
        target = max(*(p.replicas for p in plans), current - spec.max_scale_down_step)
        return _curve_decision(spec, plans, current, target, spec.scale_down_stabilization_seconds)
    return None


def _curve_decision(
    spec: Autoscaling, plans: Sequence[CapacityPlan], current: int, target: int, window_s: int
) -> Decision:
    p = plans[-1]
    numbers = {
        "predictedHitRate": round(p.predicted_hit_rate, 4),
        "predictedCeiling": round(p.ceiling, 4),
        "predictedHitRateAfter": round(p.predicted_at(target * p.blocks_per_replica), 4),
        "capacityBlocks": round(p.capacity_blocks),
        "recommendedCapacityBlocks": round(p.recommended_capacity_blocks),
        "blocksPerReplica": round(p.blocks_per_replica),
        "targetHitRate": spec.target_hit_rate,
        "minGainPerDoubling": spec.min_gain_per_doubling,
        "curveSamples": round(p.samples),
        "windowSeconds": window_s,
        "samples": len(plans),
    }
    reason = (
        f"{p.reason}: {current} -> {target} replicas ({_kblocks(target * p.blocks_per_replica)} blocks) "
        f"predicted {numbers['predictedHitRateAfter']:.3f} (now {p.predicted_hit_rate:.3f}), "
        f"held over {len(plans)} samples in {window_s}s"
    )
    if target < current:
        reason += f"; draining ordinals {', '.join(str(i) for i in range(target, current))} first"
    return Decision(
        "Scale", Mode(spec.mode), f"replicas {current} -> {target}", reason, numbers, current, target
    )


def decide_scale(
    spec: Autoscaling,
    samples: Sequence[Sample],
    *,
    current_replicas: int,
    now_s: float,
    last_change_s: float | None,
    rolling_out: bool,
) -> Decision | None:
    """The replica decision for now, or None (Off, rollout, hibernating, cooling down, no signal)."""
    mode = Mode(spec.mode)
    if mode == Mode.OFF or rolling_out or current_replicas == 0:
        return None
    bounded = min(max(current_replicas, spec.min_replicas), spec.max_replicas)
    if bounded != current_replicas:
        return Decision(
            "Scale",
            mode,
            f"replicas {current_replicas} -> {bounded}",
            f"replicas {current_replicas} outside [{spec.min_replicas}, {spec.max_replicas}]",
            {"minReplicas": spec.min_replicas, "maxReplicas": spec.max_replicas},
            current_replicas,
            bounded,
        )
    latest = plan_capacity(spec, samples[-1], current_replicas) if samples else None
    if latest is not None and not latest.warming_up:
        return _curve_scale(spec, samples, current_replicas, now_s, last_change_s)
    fallback = _threshold_scale(spec, samples, current_replicas, now_s, last_change_s)
    if fallback is None:
        return None
    why = latest.reason if latest is not None else "the engines report no miss-ratio curve"
    return dataclasses.replace(fallback, reason=f"{fallback.reason} (threshold rules: {why})")


def _threshold_scale(
    spec: Autoscaling,
    samples: Sequence[Sample],
    current_replicas: int,
    now_s: float,
    last_change_s: float | None,
) -> Decision | None:
    """The fallback: memory pressure and the measured hit rate against their targets."""
    up = _window(samples, now_s, spec.scale_up_stabilization_seconds, last_change_s)
    if up and current_replicas < spec.max_replicas and all(_scale_up_signal(s, spec) for s in up):
        return _scale_up(spec, up, current_replicas)
    down = _window(samples, now_s, spec.scale_down_stabilization_seconds, last_change_s)
    if down and current_replicas > spec.min_replicas:
        return _scale_down(spec, down, current_replicas)
    return None


def _scale_up(spec: Autoscaling, window: Sequence[Sample], current: int) -> Decision:
    low = min(s.memory_pressure for s in window)
    worst_hit = max(s.hit_rate or 0.0 for s in window)
    wanted = math.ceil(current * low / spec.target_memory_pressure)
    target = min(max(wanted, current + 1), current + spec.max_scale_up_step, spec.max_replicas)
    numbers = {
        "memoryPressureMin": round(low, 4),
        "targetMemoryPressure": spec.target_memory_pressure,
        "hitRateMax": round(worst_hit, 4),
        "targetHitRate": spec.target_hit_rate,
        "windowSeconds": spec.scale_up_stabilization_seconds,
        "samples": len(window),
    }
    reason = (
        f"memory pressure >= {low:.2f} (target {spec.target_memory_pressure:.2f}) and hit rate "
        f"<= {worst_hit:.2f} (target {spec.target_hit_rate:.2f}) for {len(window)} samples over "
        f"{spec.scale_up_stabilization_seconds}s"
    )
    return Decision(
        "Scale", Mode(spec.mode), f"replicas {current} -> {target}", reason, numbers, current, target
    )


def _scale_down(spec: Autoscaling, window: Sequence[Sample], current: int) -> Decision | None:
    high = max(s.memory_pressure for s in window)
    ceiling = spec.target_memory_pressure * SCALE_IN_HEADROOM
    target = current
    while (
        target - 1 >= spec.min_replicas
        and current - (target - 1) <= spec.max_scale_down_step
        and _projected(high, current, target - 1) < ceiling
    ):
        target -= 1
    if target == current:
        return None
    numbers = {
        "memoryPressureMax": round(high, 4),
        "projectedPressure": round(_projected(high, current, target), 4),
        "ceiling": round(ceiling, 4),
        "windowSeconds": spec.scale_down_stabilization_seconds,
        "samples": len(window),
    }
    reason = (
        f"memory pressure <= {high:.2f} for {len(window)} samples over "
        f"{spec.scale_down_stabilization_seconds}s; with {target} replicas it would be "
        f"{_projected(high, current, target):.2f} < {ceiling:.2f}; draining ordinals "
        f"{', '.join(str(i) for i in range(target, current))} first"
    )
    return Decision(
        "Scale", Mode(spec.mode), f"replicas {current} -> {target}", reason, numbers, current, target
    )


def _step_compression(ratio: float, bounds: tuple[float, float], tighter: bool) -> float:
    """The next ratio along COMPRESSION_STEPS (tighter = smaller), clamped to bounds."""
    low, high = bounds
    steps = [r for r in COMPRESSION_STEPS if low <= r <= high] or [min(max(ratio, low), high)]
    if tighter:
        candidates = [r for r in steps if r < ratio]
        return max(candidates) if candidates else ratio
    candidates = [r for r in steps if r > ratio]
    return min(candidates) if candidates else ratio


def decide_tuning(
    spec: Tuning,
    target_pressure: float,
    live: TunedConfig,
    samples: Sequence[Sample],
    *,
    now_s: float,
    last_change_s: float | None,
    rolling_out: bool,
    fp16_bytes_per_token: float,
    plan: CapacityPlan | None = None,
    min_gain_per_doubling: float = 0.01,
) -> Decision | None:
    """Compression and max_tokens changes within ``spec`` bounds, or None.

    With a ``plan`` from a warm curve, compression follows the curve instead of the pressure
    thresholds: int8 is switched on when the capacity should grow and the curve says the near
    doubling buys at least ``min_gain_per_doubling``, off when the capacity without it still
    meets the plan (the target, or a loss under half that gain).

    ``live`` is the engines' live config. Compression is tightened one step when every sample of
    the interval shows pressure above ``target_pressure`` and p95 latency under LATENCY_BUDGET_MS,
    relaxed one step when every sample is below target × RELAX_PRESSURE_FRACTION; max_tokens is
    sized to the device memory when the engines report one.
    """
    mode = Mode(spec.mode)
    if mode == Mode.OFF or rolling_out:
        return None
    window = _window(samples, now_s, spec.interval_seconds, last_change_s)
    if not window:
        return None
    changes: dict[str, LiveValue] = {}
    reasons: list[str] = []
    numbers: dict[str, float] = {
        "targetMemoryPressure": target_pressure,
        "samples": len(window),
        "intervalSeconds": spec.interval_seconds,
    }
    if plan is not None and not plan.warming_up:
        _tune_compression_by_curve(
            spec, plan, live, min_gain_per_doubling, changes=changes, reasons=reasons, numbers=numbers
        )
    else:
        _tune_compression(
            spec, target_pressure, live, window, changes=changes, reasons=reasons, numbers=numbers
        )
        if changes and plan is not None:
            reasons[-1] += f" (threshold rules: {plan.reason})"
    _tune_max_tokens(
        spec,
        live,
        window,
        fp16_bytes_per_token=fp16_bytes_per_token,
        changes=changes,
        reasons=reasons,
        numbers=numbers,
    )
    if not changes:
        return None
    return Decision(
        "Tune", mode, _describe_changes(live, changes), "; ".join(reasons), numbers, changes=changes
    )


def _describe_changes(live: TunedConfig, changes: Mapping[str, LiveValue]) -> str:
    """``field old -> new`` for the fields that really change; a ratio while compression was off
    reads ``off``, so switching compression on says what it switches to."""
    parts = []
    for key, new in sorted(changes.items()):
        old: LiveValue | str = live.get(key)
        if key == "compression_ratio" and not live.use_compression:
            old = "off"
        if old != new:
            parts.append(f"{_camel(key)} {old} -> {new}")
    return ", ".join(parts)


def _tune_compression(
    spec: Tuning,
    target: float,
    live: TunedConfig,
    window: Sequence[Sample],
    *,
    changes: dict[str, LiveValue],
    reasons: list[str],
    numbers: dict[str, float],
) -> None:
    enabled = live.use_compression
    ratio = live.compression_ratio if enabled else 1.0
    bounds = (spec.compression_ratio_min, spec.compression_ratio_max)
    low = min(s.memory_pressure for s in window)
    high = max(s.memory_pressure for s in window)
    latencies = [s.p95_latency_ms for s in window if s.p95_latency_ms is not None]
    p95 = max(latencies) if latencies else 0.0
    numbers.update(
        {
            "memoryPressureMin": round(low, 4),
            "memoryPressureMax": round(high, 4),
            "p95LatencyMs": round(p95, 3),
            "latencyBudgetMs": LATENCY_BUDGET_MS,
        }
    )
    if low > target and p95 < LATENCY_BUDGET_MS:
        new = _step_compression(ratio, bounds, tighter=True)
        if new < ratio:
            changes.update({"use_compression": True, "compression_ratio": new})
            reasons.append(
                f"memory pressure >= {low:.2f} > {target:.2f} with p95 latency {p95:.1f}ms < "
                f"{LATENCY_BUDGET_MS:.0f}ms: compression ratio {ratio} -> {new}"
            )
    elif enabled and high < target * RELAX_PRESSURE_FRACTION:
        new = _step_compression(ratio, bounds, tighter=False)
        if new > ratio:
            changes.update({"use_compression": new < 1.0, "compression_ratio": new})
            reasons.append(
                f"memory pressure <= {high:.2f} < {target * RELAX_PRESSURE_FRACTION:.2f}: "
                f"compression ratio {ratio} -> {new}"
            )


def live_codec(live: TunedConfig) -> str:
    """The codec the engines store with for these live values (KVCacheConfig.codec's rule)."""
    if not live.use_compression:
        return "none"
    return "int8" if live.compression_ratio >= 0.5 else "int4"


def _tune_compression_by_curve(
    spec: Tuning,
    plan: CapacityPlan,
    live: TunedConfig,
    min_gain: float,
    *,
    changes: dict[str, LiveValue],
    reasons: list[str],
    numbers: dict[str, float],
) -> None:
    codec = live_codec(live)
    factor = CODEC_BYTES_PER_FP16_BYTE["none"] / CODEC_BYTES_PER_FP16_BYTE["int8"]
    now = plan.capacity_blocks
    allowed = spec.compression_ratio_min <= 0.5 <= spec.compression_ratio_max
    if codec == "none" and allowed and plan.goal_capacity_blocks > now:
        gain = gain_per_doubling_of(plan, now, now * factor)
        numbers.update({"int8GainPerDoubling": round(gain, 4), "minGainPerDoubling": min_gain})
        if gain >= min_gain:
            changes.update({"use_compression": True, "compression_ratio": 0.5})
            reasons.append(
                f"{plan.reason}: int8 takes the capacity {_kblocks(now)} -> {_kblocks(now * factor)} blocks "
                f"without new replicas, predicted {plan.predicted_at(now):.3f} -> "
                f"{plan.predicted_at(now * factor):.3f} ({gain:.4f} per doubling >= {min_gain})"
            )
    elif codec == "int8" and spec.compression_ratio_max >= 1.0:
        without = now / factor
        gain = gain_per_doubling_of(plan, without, now)
        numbers.update({"int8GainPerDoubling": round(gain, 4), "minGainPerDoubling": min_gain})
        if plan.goal_capacity_blocks <= without or gain < min_gain / 2:
            changes.update({"use_compression": False, "compression_ratio": 1.0})
            reasons.append(
                f"{plan.reason}: without int8 the capacity {_kblocks(now)} -> {_kblocks(without)} blocks "
                f"loses {gain:.4f} per doubling (predicted {plan.predicted_at(without):.3f}): compression off"
            )


def gain_per_doubling_of(plan: CapacityPlan, low: float, high: float) -> float:
    """gain_per_doubling on the plan's curve (0 without one)."""
    return gain_per_doubling(plan.curve, low, high) if plan.curve is not None else 0.0


def _tune_max_tokens(
    spec: Tuning,
    live: TunedConfig,
    window: Sequence[Sample],
    *,
    fp16_bytes_per_token: float,
    changes: dict[str, LiveValue],
    reasons: list[str],
    numbers: dict[str, float],
) -> None:
    current = live.max_tokens
    device = window[-1].device_memory_total
    if device > 0 and fp16_bytes_per_token > 0:
        fit = int(device * DEVICE_MEMORY_HEADROOM / fp16_bytes_per_token)
        numbers.update({"deviceMemoryBytes": device, "fitTokens": fit})
        wanted = min(max(fit, spec.max_tokens_min), spec.max_tokens_max)
        why = f"{DEVICE_MEMORY_HEADROOM:.0%} of {device} device bytes holds {fit} tokens"
    else:
        wanted = min(max(current, spec.max_tokens_min), spec.max_tokens_max)
        why = f"bounds [{spec.max_tokens_min}, {spec.max_tokens_max}]"
    if wanted != current and (
        abs(wanted - current) > current * MAX_TOKENS_CHANGE_FRACTION
        or not spec.max_tokens_min <= current <= spec.max_tokens_max
    ):
        changes["max_tokens"] = wanted
        reasons.append(f"maxTokens {current} -> {wanted}: {why}")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


@dataclass(frozen=True)
class PolicyInput:
    """Everything one decision round looks at, typed: no dicts, no clock of its own."""

    autoscaling: Autoscaling
    tuning: Tuning
    samples: tuple[Sample, ...]
    current_replicas: int
    live: TunedConfig
    fp16_bytes_per_token: float
    now_s: float
    last_scale_s: float | None = None
    last_tune_s: float | None = None
    rolling_out: bool = False


@dataclass(frozen=True)
class Proposals:
    """What the policy proposes this round; the caller records each and applies the ``applied`` ones."""

    scale: Decision | None = None
    tune: Decision | None = None
    plan: CapacityPlan | None = None  # the curve's view this round (None without a curve)

    def __iter__(self) -> Iterator[Decision]:
        return iter([d for d in (self.scale, self.tune) if d is not None])


def decide(given: PolicyInput) -> Proposals:
    """The scale and tuning proposals for one round (either may be None). When the curve makes
    the tuner switch int8 on (applied), a scale-up waits: the next rounds size with the new
    capacity."""
    plan = (
        plan_capacity(
            given.autoscaling, given.samples[-1], given.current_replicas, codec=live_codec(given.live)
        )
        if given.samples
        else None
    )
    scale = decide_scale(
        given.autoscaling,
        given.samples,
        current_replicas=given.current_replicas,
        now_s=given.now_s,
        last_change_s=given.last_scale_s,
        rolling_out=given.rolling_out,
    )
    tune = decide_tuning(
        given.tuning,
        given.autoscaling.target_memory_pressure,
        given.live,
        given.samples,
        now_s=given.now_s,
        last_change_s=given.last_tune_s,
        rolling_out=given.rolling_out,
        fp16_bytes_per_token=given.fp16_bytes_per_token,
        plan=plan,
        min_gain_per_doubling=given.autoscaling.min_gain_per_doubling,
    )
    by_curve = plan is not None and not plan.warming_up
    compressing = (
        by_curve and tune is not None and tune.applied and tune.changes.get("use_compression") is True
    )
    if compressing and scale is not None and (scale.to_replicas or 0) > (scale.from_replicas or 0):
        scale = None
    return Proposals(scale, tune, plan)
