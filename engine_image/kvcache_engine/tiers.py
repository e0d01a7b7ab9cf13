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
        """Queue one slot copy per pair; on CUDA the side stream first waits for work already
        queued on the current stream (the writes that filled the source slots)."""
        if self.stream is None:
            for s, d in zip(src_slots, dst_slots, strict=True):
                dst.storage[d].copy_(src.storage[s])
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            for s, d in zip(src_slots, dst_slots, strict=True):
                dst.storage[d].copy_(src.storage[s], non_blocking=self.non_blocking)

    def sync(self) -> None:
        """Order later default-stream work (and reuse of source slots) after queued copies."""
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)

    def host_sync(self) -> None:
        """Block until queued copies finished (before the host reads a pinned destination)."""
        if self.stream is not None:
            self.stream.synchronize()
