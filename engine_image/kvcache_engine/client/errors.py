"""Errors raised in strict mode, the per-endpoint circuit breaker with the scope that reports
one attempt to it, and the mapping of transport failures onto the errors.

Invariant: every failure a call meets ends as a :class:`KVCacheClientError` subclass (counted,
and raised only in strict mode); a breaker changes state only through its own lock.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from kvcache_engine.client.metrics import M_BREAKER_OPEN
from kvcache_engine.wire import WireError

__all__ = [
    "NO_ENDPOINT",
    "Attempt",
    "CacheProtocolError",
    "CacheServerError",
    "CacheTimeoutError",
    "CacheUnavailableError",
    "CircuitBreaker",
    "KVCacheClientError",
    "RetryableConnError",
    "remaining",
    "wire_exc",
]

NO_ENDPOINT = "no endpoint available (none configured, or every breaker is open)"


class KVCacheClientError(Exception):
    """Base of the errors raised in strict mode."""

    kind = "error"


class CacheUnavailableError(KVCacheClientError):
    """No endpoint could be reached (connection refused/reset, breaker open, none configured)."""

    kind = "unavailable"


class CacheTimeoutError(KVCacheClientError):
    """The call's deadline passed."""

    kind = "timeout"


class CacheProtocolError(KVCacheClientError):
    """The server answered something that is not a valid response."""

    kind = "protocol"


class CacheServerError(KVCacheClientError):
    """The server answered with an error status."""

    kind = "server"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class RetryableConnError(CacheUnavailableError):
    """A connection failed before any response byte arrived (safe to retry on a new socket)."""


# --- circuit breaker -----------------------------------------------------------------------------


class CircuitBreaker:
    """Per-endpoint breaker: closed → open after ``failure_threshold`` consecutive failures;
    open → half-open after ``reset_timeout_s`` (doubling per failed probe up to
    ``max_reset_timeout_s``, 2 s by default: an endpoint that answers again is probed within two
    seconds however long it was down; a probe is one call's deadline, so the cost of probing a
    dead endpoint stays one call every 2 s); half-open lets exactly one probe through — its
    success closes the breaker, its failure re-opens it. Thread-safe; asyncio code uses it from
    one thread."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 3,
        reset_timeout_s: float = 1.0,
        max_reset_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.base_reset_s = reset_timeout_s
        self.max_reset_s = max(max_reset_timeout_s, reset_timeout_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._reset_s = reset_timeout_s
        self._open_until = 0.0
        self._probe_since: float | None = None
        self.state = "closed"

    def allow(self) -> bool:
        """May a call go to this endpoint now? (In half-open, only the one probe may.)"""
        with self._lock:
            now = self._clock()
            if self.state == "closed":
                return True
            if self.state == "open" and now >= self._open_until:
                self.state = "half_open"
                self._probe_since = now
                return True
            # A probe that never reported (its caller vanished) must not wedge the breaker.
            if (
                self.state == "half_open"
                and self._probe_since is not None
                and now - self._probe_since > self._reset_s
            ):
                self._probe_since = now
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self.state = "closed"
            self._failures = 0
            self._reset_s = self.base_reset_s
            self._probe_since = None
        M_BREAKER_OPEN.labels(self.name).set(0)

    def record_failure(self) -> None:
        with self._lock:
            now = self._clock()
            if self.state == "half_open":
                self._reset_s = min(self._reset_s * 2, self.max_reset_s)
                self._open(now)
            else:
                self._failures += 1
                if self._failures >= self.failure_threshold:
                    self._open(now)

    def _open(self, now: float) -> None:
        self.state = "open"
        self._open_until = now + self._reset_s
        self._probe_since = None
        M_BREAKER_OPEN.labels(self.name).set(1)


class Attempt:
    """``with`` scope of one attempt at an endpoint: reports its outcome to the endpoint's breaker
    and lets any exception through. A 4xx answer is our fault (the endpoint is healthy); a 5xx or
    anything else raised (garbage, timeout, cancellation) is the endpoint's."""

    __slots__ = ("_breaker",)

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if exc is None or (isinstance(exc, CacheServerError) and exc.status < 500):
            self._breaker.record_success()
        else:
            self._breaker.record_failure()


# --- deadlines and transport failures ------------------------------------------------------------


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise CacheTimeoutError("deadline exceeded")
    return left


def wire_exc(exc: BaseException) -> KVCacheClientError:
    if isinstance(exc, KVCacheClientError):
        return exc
    if isinstance(exc, TimeoutError | socket.timeout):
        return CacheTimeoutError("deadline exceeded")
    if isinstance(exc, WireError):
        return CacheProtocolError(str(exc))
    return CacheUnavailableError(f"{type(exc).__name__}: {exc}")
