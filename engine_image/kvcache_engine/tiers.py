"""Tiers: where blocks live. The primary tier is on the resolved device; on CUDA a pinned CPU
tier sits behind it, taking blocks the GPU tier evicts (demotion) and giving them back on a hit
(promotion/prefetch) with non_blocking copies on a side stream. On a CPU-only host there is one
tier and the CPU-tier options are ignored (logged once), never an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvcache_engine.block_pool import BlockPool
from kvcache_engine.eviction import EvictionStrategy

__all__ = ["PRIMARY", "SECONDARY", "Tier", "TierCopier", "resolve_device"]

log = logging.getLogger("kvcache_engine.tiers")

PRIMARY = 0
SECONDARY = 1


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available else CPU; a CUDA device that is absent falls back to the
    CPU with a logged warning (the engine starts degraded rather than crashing)."""
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("device=%s: CUDA is not available; using the CPU (blocks live in host memory)", spec)
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device())
    dev = torch.device(spec)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        log.warning("device=%s: only %d CUDA devices; using cuda:0", spec, torch.cuda.device_count())
        return torch.device("cuda", 0)
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


@dataclass
class Tier:
    """A pool and the strategy that orders its blocks (PRIMARY or SECONDARY)."""

    level: int
    pool: BlockPool
    strategy: EvictionStrategy


class TierCopier:
    """Copies slots between tiers. Host->device and device->host copies run on a side CUDA
    stream with ``non_blocking`` (pinned memory makes them truly asynchronous); ``sync()``
    makes the default stream wait before anything reads the destination."""

    def __init__(self, device: torch.device, non_blocking: bool) -> None:
        self.non_blocking = non_blocking
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]

    def copy(self, src: BlockPool, src_slot: int, dst: BlockPool, dst_slot: int) -> None:
        self.copy_many(src, [src_slot], dst, [dst_slot])

    def copy_many(self, src: BlockPool, src_slots: list[int], dst: BlockPool, dst_slots: list[int]) -> None:
        """Queue the slot copies ``src_slots[i] -> dst_slots[i]`` as if done in order (a
        destination named twice ends with its last source), batched: the source rows are gathered
        in one kernel and copied as one transfer per run of consecutive destination slots. On CUDA
        the side stream first waits for work already queued on the current stream (the writes
        that filled the source slots)."""
        last = dict(zip(dst_slots, src_slots, strict=True))
        if not last:
            return
        pairs = sorted((d, s) for d, s in last.items())
        if self.stream is None:
            _copy_rows(src, [s for _, s in pairs], dst, [d for d, _ in pairs], non_blocking=False)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            _copy_rows(src, [s for _, s in pairs], dst, [d for d, _ in pairs], self.non_blocking)

    def sync(self) -> None:
        """Order later default-stream work (and reuse of source slots) after queued copies."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def host_sync(self) -> None:
        """Block until queued copies finished (before the host reads a pinned destination)."""
        if self.stream is not None:
            self.stream.synchronize()


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """(start index, length) of each maximal run of consecutive values in ``slots``."""
    runs: list[tuple[int, int]] = []
    for i, slot in enumerate(slots):
        if runs and slots[i - 1] + 1 == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _rows(pool: BlockPool, slots: list[int]) -> torch.Tensor:
    """The rows of ``slots`` in order: a view when consecutive, else one gather on the pool's device."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return pool.storage[slots[0] : slots[0] + len(slots)]
    return pool.storage.index_select(0, torch.tensor(slots, dtype=torch.long, device=pool.device))


def _copy_rows(
    src: BlockPool, src_slots: list[int], dst: BlockPool, dst_slots: list[int], non_blocking: bool
) -> None:
    """Copy rows ``src_slots[i] -> dst_slots[i]`` (destinations distinct and ascending)."""
    if src.device.type == "cpu" and dst.device.type != "cpu":
        # Host -> device: pinned source runs straight into a device staging tensor (a gather on
        # the host would land in pageable memory and make the upload synchronous).
        staged = torch.empty((len(src_slots), src.storage.shape[1]), dtype=torch.uint8, device=dst.device)
        for start, length in _runs(src_slots):
            first = src_slots[start]
            staged[start : start + length].copy_(
                src.storage[first : first + length], non_blocking=non_blocking
            )
        dst.write_rows(dst_slots, staged)
        return
    rows = _rows(src, src_slots)
    for start, length in _runs(dst_slots):
        first = dst_slots[start]
        dst.storage[first : first + length].copy_(rows[start : start + length], non_blocking=non_blocking)
