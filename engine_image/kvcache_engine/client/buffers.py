"""Tensors the client sends from and receives into: dtype names, zero-copy byte views of
tensors, and the pool of warm receive buffers for gets without ``out=``."""

from __future__ import annotations

import math
import sys
import threading
from typing import TYPE_CHECKING

from kvcache_engine.contract.cache import DTYPE_BYTES

if TYPE_CHECKING:
    import torch

__all__ = ["RecvPool", "byte_view", "reusable", "torch_dtype"]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a KV dtype name (the contract's ``DTYPE_BYTES``: ``float16``, ``bfloat16``,
    ``float32``); the name -> dtype map itself is the core's."""
    from kvcache_engine.core.compression import torch_dtype as any_torch_dtype

    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype {name!r}: supported: {', '.join(DTYPE_BYTES)}")
    return any_torch_dtype(name)


class RecvPool:
    """Warm receive buffers for gets without ``out=``, at most ``max_bytes`` in total.

    A fresh 128 MiB result costs about as much in page faults as its transfer. Results are
    therefore tensors over pooled ``bytearray``s (``torch.frombuffer``), and a buffer is handed out
    again only when **no tensor the caller got from it is alive**: such a tensor, every view of
    it and every array sharing its memory hold a reference to the bytearray (the buffer export),
    so its reference count tells. Invariant: memory returned to a caller is never written again
    while the caller can still reach it. The price: up to ``max_bytes`` stay allocated after the
    caller dropped its results; ``max_bytes == 0`` turns pooling off (a fresh tensor per get)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"recv_pool_mb must be >= 0, got {max_bytes // (1024 * 1024)}")
        self.max_bytes = max_bytes
        self._bufs: list[bytearray] = []
        self._lock = threading.Lock()
        probe = [bytearray(1)]
        # References a free pooled buffer has when read as self._bufs[i] (the list's + the call's);
        # measured rather than assumed, since interpreters differ in temporary references.
        self._free_refs = sys.getrefcount(probe[0])

    def _is_free(self, i: int) -> bool:
        return sys.getrefcount(self._bufs[i]) == self._free_refs

    def tensor(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape``, over a warm pooled buffer when one is
        free (else a new pooled one within the budget, else a plain ``torch.empty``)."""
        import torch

        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if nbytes == 0 or nbytes > self.max_bytes:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            free = [i for i in range(len(self._bufs)) if self._is_free(i)]
            fits = [i for i in free if len(self._bufs[i]) >= nbytes]
            if fits:
                buf = self._bufs[min(fits, key=lambda i: len(self._bufs[i]))]
            else:
                held = sum(len(b) for b in self._bufs)
                # Make room by dropping free buffers too small for this size, smallest first.
                for i in sorted(free, key=lambda i: len(self._bufs[i])):
                    if held + nbytes <= self.max_bytes:
                        break
                    held -= len(self._bufs[i])
                    self._bufs[i] = bytearray()
                self._bufs = [b for b in self._bufs if len(b)]
                if held + nbytes > self.max_bytes:
                    return torch.empty(shape, dtype=dtype)
                buf = bytearray(nbytes)
                self._bufs.append(buf)
            return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)


def reusable(out: torch.Tensor, dtype: torch.dtype, numel: int) -> bool:
    return out.dtype == dtype and out.device.type == "cpu" and out.is_contiguous() and out.numel() >= numel


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (writable: gets receive into it)."""
    import torch

    return t.view(-1).view(torch.uint8).numpy().data
