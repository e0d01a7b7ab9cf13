"""Why ``kvcache-engine serve`` stopped, said where Kubernetes looks: the termination message.

A container may name a file (``terminationMessagePath``, by default ``/dev/termination-log``) whose
contents the kubelet copies into ``status.containerStatuses[].lastState.terminated.message`` when
the container ends; the operator reads it from there and turns the KVCache ``Degraded`` with the
engine's own reason. The pod template passes the path in ``KVCACHE_TERMINATION_MESSAGE_PATH``;
outside a pod nothing is written (the variable is unset), and a path that cannot be written is
skipped silently: the same line also goes to stderr.

The message is one line, ``<Reason>: <detail>``, at most 4096 bytes (what the kubelet reads).
Reasons, with the exit code that goes with them:

* ``PoolAllocationFailed`` (2): the block pool does not fit the memory its device can give;
* ``CudaUnavailable`` (1): CUDA failed to initialise (driver, device, or a CPU-only torch asked
  for CUDA); a node simply without CUDA is not this: the engine then serves from the CPU;
* ``InvalidConfig`` (2): the config file or a ``KVCACHE_*`` variable is invalid;
* ``ListenFailed`` (1): the address or port cannot be bound;
* ``EngineFailed`` (1): anything else (a bug: its traceback follows on stderr).
"""

from __future__ import annotations

import errno
import os
import re
import sys
from dataclasses import dataclass

from kvcache_engine.contract import ConfigError

ENV_VAR = "KVCACHE_TERMINATION_MESSAGE_PATH"
MAX_BYTES = 4096  # the kubelet reads at most this much of the file

POOL_ALLOCATION_FAILED = "PoolAllocationFailed"
CUDA_UNAVAILABLE = "CudaUnavailable"
INVALID_CONFIG = "InvalidConfig"
LISTEN_FAILED = "ListenFailed"
ENGINE_FAILED = "EngineFailed"

_CUDA_TEXT = re.compile(r"\bCUDA\b|NVIDIA driver")  # "CUDA error: ...", "not compiled with CUDA", ...


@dataclass(frozen=True)
class Failure:
    """A classified failure: ``line`` is the termination message (and the stderr line)."""

    reason: str
    detail: str
    exit_code: int

    @property
    def line(self) -> str:
        return _cap(f"{self.reason}: {self.detail}")

    @property
    def expected(self) -> bool:
        """A failure of the environment or the config, reported in one line (no traceback)."""
        return self.reason != ENGINE_FAILED


def classify(exc: BaseException) -> Failure:
    """The reason ``serve`` failed with ``exc`` (see the module docstring for the reasons)."""
    detail = _one_line(str(exc)) or type(exc).__name__
    if _is_pool_allocation_error(exc):
        return Failure(POOL_ALLOCATION_FAILED, detail, 2)
    if _is_cuda_error(exc):
        return Failure(CUDA_UNAVAILABLE, detail, 1)
    if isinstance(exc, (ConfigError, ValueError, FileNotFoundError)):
        return Failure(INVALID_CONFIG, detail, 2)
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
        return Failure(LISTEN_FAILED, detail, 1)
    return Failure(ENGINE_FAILED, f"{type(exc).__name__}: {detail}", 1)


def write(line: str, path: str | None = None) -> bool:
    """Write ``line`` to ``path`` (default: ``$KVCACHE_TERMINATION_MESSAGE_PATH``); False when there
    is no path or it cannot be written."""
    target = path if path is not None else os.environ.get(ENV_VAR)
    if not target:
        return False
    try:
        with open(target, "w", encoding="utf-8") as fh:
            fh.write(_cap(line))
    except OSError:
        return False
    return True


def _is_pool_allocation_error(exc: BaseException) -> bool:
    if "torch" not in sys.modules:  # the pool is allocated only after torch is loaded
        return False
    from kvcache_engine.core.tiers import PoolAllocationError

    return isinstance(exc, PoolAllocationError)


def _is_cuda_error(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    cuda_types = tuple(
        t
        for t in (
            getattr(torch.cuda, "CudaError", None),
            getattr(torch.cuda, "DeferredCudaCallError", None),
            getattr(torch, "AcceleratorError", None),
        )
        if isinstance(t, type)
    )
    if cuda_types and isinstance(exc, cuda_types):
        return True
    return isinstance(exc, (RuntimeError, AssertionError)) and bool(_CUDA_TEXT.search(str(exc)))


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def _cap(line: str) -> str:
    encoded = line.encode("utf-8")
    if len(encoded) <= MAX_BYTES:
        return line
    return encoded[: MAX_BYTES - 3].decode("utf-8", errors="ignore") + "..."
