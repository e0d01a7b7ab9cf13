"""What the operator and the engine agree on about restarts and rolling updates.

``GET /readyz`` answers ``{"status": "ready", ..., WARM_RATIO_KEY: r}`` once the persisted cache is
loaded: ``r`` = blocks loaded / blocks the persisted cache named (1.0 when it named none). The
operator's rolling update moves the StatefulSet's partition past a restarted replica only when it is
ready with ``r`` at least ``spec.rollout.minWarmRatio``.

Warm join: every engine pod carries the readiness gate ``WARM_GATE``. A new pod (a scale-out, a
replaced or rolled replica) is Ready, so routed to, only once the operator has had its peers copy it
the chains it owns in the new replica set and set the gate's condition True. On SIGTERM an engine
copies its chains to the peers that take them while it is away (for at most ``SHUTDOWN_HANDOFF_S``),
then persists: the grace period is sized for both.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "HANDOFF_MIB_S",
    "PERSIST_BYTES_PER_S",
    "SHUTDOWN_HANDOFF_S",
    "WARM_GATE",
    "WARM_RATIO_KEY",
    "handoff_timeout_s",
    "persist_grace_seconds",
    "warm_ratio_of",
]

WARM_RATIO_KEY = "warm_ratio"
WARM_GATE = "kvcache.dev/warm"
"""The pod readiness gate (condition type) the operator sets True once a pod holds its share."""
SHUTDOWN_HANDOFF_S = 10
"""The engine's default time budget for copying its chains to peers on SIGTERM."""
HANDOFF_MIB_S = 256.0
"""The engine's default bandwidth cap of a drain, a warm-join copy or a shutdown hand-off."""
PERSIST_BYTES_PER_S = 100 * 1024 * 1024
"""A conservative write rate of the final persist on SIGTERM (network block storage; the engine's
own segment writes run faster): what the grace period is sized for."""
PERSIST_MARGIN_S = 30


def persist_grace_seconds(cache_bytes: int) -> int:
    """Seconds a stopping engine needs to hand off to its peers, drain requests and write a full
    cache of ``cache_bytes`` (pool and tier) once: the floor of a KVCache's termination grace period."""
    return PERSIST_MARGIN_S + SHUTDOWN_HANDOFF_S + -(-max(0, cache_bytes) // PERSIST_BYTES_PER_S)


def warm_ratio_of(readyz: Any) -> float | None:
    """The warm ratio in a ``/readyz`` answer (None: not ready, or an engine that does not say)."""
    if not isinstance(readyz, dict) or readyz.get("status") != "ready":
        return None
    value = readyz.get(WARM_RATIO_KEY)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return min(1.0, max(0.0, float(value)))


def handoff_timeout_s(cache_bytes: int) -> float:
    """How long the operator waits for a drain or a warm-join copy of up to ``cache_bytes``: twice
    the time at the engines' default bandwidth cap, plus two minutes (never less than two minutes)."""
    return 120.0 + 2.0 * max(0, cache_bytes) / (HANDOFF_MIB_S * 1024 * 1024)
