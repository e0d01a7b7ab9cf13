"""Child processes of the local cluster: started in their own process group, tracked, reaped.

Invariant: every process the local cluster starts goes through :class:`ProcessRegistry.spawn`, so
``kill_all()`` (also run from ``atexit`` and from SIGTERM/SIGINT/SIGHUP handlers) leaves nothing
behind. Each child is the leader of a new session (its pgid is its pid), so signalling the group
also reaches anything it forked. On Linux the child also gets ``PR_SET_PDEATHSIG=SIGKILL``: if the
cluster process itself is killed with SIGKILL (no handler can run), the kernel kills the children.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec hook: ask the kernel to SIGKILL this child when its parent thread exits."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ProcessRegistry:
    """Every child process of one local cluster, by pid."""

    def __init__(self) -> None:
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | os.PathLike[str] | None = None,
        log_path: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as the leader of a new process group, output appended to ``log_path``."""
        out: Any = subprocess.DEVNULL
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed right after
        try:
            proc = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, async-signal-safe enough
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        with self._lock:
            self._procs[proc.pid] = proc
        return proc

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        """Drop a reaped process from the registry."""
        with self._lock:
            self._procs.pop(proc.pid, None)

    def pids(self) -> list[int]:
        with self._lock:
            return [pid for pid, proc in self._procs.items() if proc.poll() is None]

    @staticmethod
    def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        """Send ``sig`` to the process group led by ``proc`` (no-op once it is gone)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def kill_all(self, grace_s: float = 2.0) -> None:
        """SIGTERM every live group, wait up to ``grace_s``, SIGKILL what is left, reap all."""
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                self.signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for proc in procs:
            # The group may outlive its leader (a grandchild); SIGKILL the group regardless.
            self.signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2.0)
        with self._lock:
            for proc in procs:
                self._procs.pop(proc.pid, None)


_REGISTRIES: list[ProcessRegistry] = []
_HOOKS: dict[str, bool] = {"installed": False}


def _kill_everything() -> None:
    for registry in list(_REGISTRIES):
        registry.kill_all(grace_s=1.0)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # SIGINT is left alone (KeyboardInterrupt unwinds the LocalCluster context manager).
    _kill_everything()
    raise SystemExit(128 + signum)


def register(registry: ProcessRegistry) -> None:
    """Track ``registry`` for the process-wide atexit/signal cleanup (installed once, main thread)."""
    _REGISTRIES.append(registry)
    if _HOOKS["installed"]:
        return
    _HOOKS["installed"] = True
    atexit.register(_kill_everything)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


def unregister(registry: ProcessRegistry) -> None:
    with contextlib.suppress(ValueError):
        _REGISTRIES.remove(registry)
