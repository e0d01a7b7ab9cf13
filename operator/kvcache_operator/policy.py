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
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

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
) -> Decision | None:
    """Compression and max_tokens changes within ``spec`` bounds, or None.

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
    _tune_compression(spec, target_pressure, live, window, changes=changes, reasons=reasons, numbers=numbers)
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

    def __iter__(self) -> Iterator[Decision]:
        return iter([d for d in (self.scale, self.tune) if d is not None])


def decide(given: PolicyInput) -> Proposals:
    """The scale and tuning proposals for one round (either may be None)."""
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
    )
    return Proposals(scale, tune)
