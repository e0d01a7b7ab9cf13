"""The hit-rate curve an engine predicts for its own traffic, on the wire and merged.

Every engine keeps a sampled shadow of its block stream (``kvcache_engine.core.curve``) and
reports, on ``/v1/stats`` and ``/metrics``, the hit rate it predicts at ``CURVE_MULTIPLES`` times
its current capacity (in blocks, after compression) and its ceiling (the hit rate of an infinite
cache: every block that was seen before). The operator merges the curves of a KVCache's replicas
with :func:`merge_curves`: capacities add (placement spreads chains over the replicas, so N
replicas of C blocks behave like one cache of N x C blocks serving all of them), and each
replica's prediction is weighted by the blocks it was asked for.

Invariants of a ``HitRateCurve``: ``hit_rates`` has one entry per multiple, each in [0, 1],
non-decreasing, and none above ``ceiling``; ``capacity_blocks > 0`` (an engine without a pool
reports no curve).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CLIENT_MISS_REASONS",
    "CURVE_MULTIPLES",
    "MISS_REASONS",
    "MOVED_WINDOW_S",
    "HitRateCurve",
    "merge_curves",
    "multiple_label",
]

CURVE_MULTIPLES: tuple[float, ...] = tuple(2 ** (k / 2) for k in range(-4, 11))
"""Capacity multiples the curve is reported at: 1/4x to 32x in half-octaves (1/4, 1/2, 1, 2, 4
and 8 are among them)."""

MISS_REASONS: tuple[str, ...] = (
    "never_seen",
    "moved",
    "capacity",
    "retune",
    "cleared",
    "namespace_mismatch",
    "client_timeout",
    "client_error",
)
"""Why a requested block was not served (label ``reason`` of ``kvcache_misses_by_reason``):
never stored here before; never stored here because its chain moved here lately (the replica
set changed: the client says so); evicted to make room; dropped by a live retune (a smaller pool or a
codec change); dropped by an admin clear; asked under another namespace (model key) than the
engine's; the client's call ran out of time; the client's call failed."""


MOVED_WINDOW_S = 600.0
"""How long after the replica set changed a client says ``moved`` for a chain whose owner changed
(its new owner never saw it; the curve leaves those blocks out)."""

CLIENT_MISS_REASONS: tuple[str, ...] = ("client_timeout", "client_error")
"""The reasons a client reports itself (on its next lookup: the ``client_misses`` of its body)."""


def multiple_label(multiple: float) -> str:
    """The label value of a capacity multiple (``0.25``, ``0.7071``, ``1``, ``11.31``)."""
    return f"{multiple:.4g}"


_BY_LABEL = {multiple_label(m): i for i, m in enumerate(CURVE_MULTIPLES)}


@dataclass(frozen=True)
class HitRateCurve:
    """Predicted hit rate (blocks served / blocks asked) at ``CURVE_MULTIPLES x capacity_blocks``.

    ``samples`` is how many sampled block references stand behind the prediction (its precision;
    the operator treats a curve with few samples as still warming up). ``weight`` is the blocks the
    engine was asked for while the curve was collected (recent traffic weighs the same in
    both): it weighs replicas against each other when curves are merged.
    """

    capacity_blocks: float
    hit_rates: tuple[float, ...]
    ceiling: float
    samples: float
    weight: float

    def __post_init__(self) -> None:
        if len(self.hit_rates) != len(CURVE_MULTIPLES):
            n = len(CURVE_MULTIPLES)
            raise ValueError(f"hit_rates: expected {n} values (one per multiple), got {len(self.hit_rates)}")
        if not self.capacity_blocks > 0:
            raise ValueError(f"capacity_blocks: expected > 0, got {self.capacity_blocks}")

    def points(self) -> list[tuple[float, float]]:
        """(capacity in blocks, predicted hit rate), smallest capacity first."""
        return [(m * self.capacity_blocks, r) for m, r in zip(CURVE_MULTIPLES, self.hit_rates, strict=True)]

    def at(self, capacity_blocks: float) -> float:
        """Predicted hit rate at ``capacity_blocks``: interpolated in log(capacity) between the
        points; below the smallest point, proportional to capacity (a cache of 0 blocks hits
        nothing); beyond the largest, the largest point's (the curve does not guess past what it
        measured; the ceiling says what no size can pass)."""
        pts = self.points()
        if capacity_blocks <= 0:
            return 0.0
        lo_cap, lo_rate = pts[0]
        if capacity_blocks <= lo_cap:
            return lo_rate * capacity_blocks / lo_cap
        for hi_cap, hi_rate in pts[1:]:
            if capacity_blocks <= hi_cap:
                f = math.log(capacity_blocks / lo_cap) / math.log(hi_cap / lo_cap)
                return lo_rate + f * (hi_rate - lo_rate)
            lo_cap, lo_rate = hi_cap, hi_rate
        return lo_rate

    def smallest_capacity_for(self, hit_rate: float) -> float | None:
        """The smallest capacity (blocks) the curve predicts ``hit_rate`` at, or None when no
        reported capacity reaches it (inverse of :meth:`at`)."""
        pts = self.points()
        first_cap, first_rate = pts[0]
        if hit_rate <= 0:
            return 0.0
        if hit_rate <= first_rate:
            return first_cap * hit_rate / first_rate
        for (lo_cap, lo_rate), (hi_cap, hi_rate) in itertools.pairwise(pts):
            if lo_rate < hit_rate <= hi_rate:
                f = (hit_rate - lo_rate) / (hi_rate - lo_rate)
                return float(lo_cap * (hi_cap / lo_cap) ** f)
        return None

    def to_dict(self) -> dict[str, object]:
        """The ``/v1/stats`` form (``curve`` key): JSON-ready."""
        return {
            "capacity_blocks": self.capacity_blocks,
            "multiples": [multiple_label(m) for m in CURVE_MULTIPLES],
            "hit_rates": list(self.hit_rates),
            "ceiling": self.ceiling,
            "samples": self.samples,
            "weight": self.weight,
        }

    @classmethod
    def from_labels(
        cls,
        capacity_blocks: float,
        by_label: Mapping[str, float],
        *,
        ceiling: float,
        samples: float,
        weight: float,
    ) -> HitRateCurve | None:
        """A curve from ``multiple`` label values (as ``/metrics`` carries them); None when the
        capacity is 0 or a multiple is missing (an engine from before the curve, or without one)."""
        rates: list[float | None] = [None] * len(CURVE_MULTIPLES)
        for label, rate in by_label.items():
            i = _BY_LABEL.get(label)
            if i is not None:
                rates[i] = rate
        if capacity_blocks <= 0 or any(r is None for r in rates):
            return None
        return cls(capacity_blocks, tuple(r for r in rates if r is not None), ceiling, samples, weight)


def merge_curves(curves: Iterable[HitRateCurve]) -> HitRateCurve | None:
    """One curve for replicas that share a workload: capacities add, each point is the average
    of the replicas' points at the same multiple weighted by ``weight`` (unweighted when no
    replica was asked anything yet), ``samples`` add. None for no curves."""
    cs: Sequence[HitRateCurve] = list(curves)
    if not cs:
        return None
    total = sum(c.weight for c in cs)
    weights = [c.weight / total for c in cs] if total > 0 else [1 / len(cs)] * len(cs)
    rates = tuple(
        sum(w * c.hit_rates[i] for w, c in zip(weights, cs, strict=True)) for i in range(len(CURVE_MULTIPLES))
    )
    return HitRateCurve(
        capacity_blocks=sum(c.capacity_blocks for c in cs),
        hit_rates=rates,
        ceiling=sum(w * c.ceiling for w, c in zip(weights, cs, strict=True)),
        samples=sum(c.samples for c in cs),
        weight=total,
    )
