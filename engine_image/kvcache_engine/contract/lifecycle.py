"""What the operator and the engine agree on about restarts and rolling updates.

``GET /readyz`` answers ``{"status": "ready", ..., WARM_RATIO_KEY: r}`` once the persisted cache is
loaded: ``r`` = blocks loaded / blocks the persisted cache named (1.0 when it named none). The
operator's rolling update moves the StatefulSet's partition past a restarted replica only when it is
ready with ``r`` at least ``spec.rollout.minWarmRatio``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WARM_RATIO_KEY", "warm_ratio_of"]

WARM_RATIO_KEY = "warm_ratio"


def warm_ratio_of(readyz: Any) -> float | None:
    """The warm ratio in a ``/readyz`` answer (None: not ready, or an engine that does not say)."""
    if not isinstance(readyz, dict) or readyz.get("status") != "ready":
        return None
    value = readyz.get(WARM_RATIO_KEY)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return min(1.0, max(0.0, float(value)))
