"""Tiers: where blocks live. The primary tier is on the resolved device; on CUDA a pinned CPU
tier sits behind it, taking blocks the GPU tier evicts (demotion) and giving them back on a hit
(promotion/prefetch) with non_blocking copies on a side stream. On a CPU-only host there is one
tier and the CPU-tier options are ignored (logged once), never an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcache_engine.contract.cache import ConfigError, PayloadLayout
from kvcache_engine.core.block_pool import BlockPool
from kvcache_engine.core.eviction import EvictionStrategy

__all__ = [
    "PRIMARY",
    "SECONDARY",
    "PoolAllocationError",
    "Tier",
    "TierCopier",
    "allocate_pool",
    "available_bytes",
    "resolve_device",
]

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


class PoolAllocationError(ConfigError):
    """The configured pool does not fit the memory its device can give (a config problem: the
    engine refuses to start, or a live resize is refused, with the sizes in the message)."""


_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _cgroup_headroom() -> int | None:
    """Bytes left under this container's memory limit (None when unlimited or unknown): in a pod
    the limit, not the node's free memory, decides when the kernel kills the process."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or int(limit_text) >= 1 << 60:  # v1 writes a huge number for "none"
            return None
        return max(0, int(limit_text) - usage)
    return None


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes a new allocation on ``device`` can get now, where that figure comes from). On the CPU:
    the host's available memory, capped by the container's memory limit; on CUDA: the device's
    free memory (``torch.cuda.mem_get_info``)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    import psutil

    host = int(psutil.virtual_memory().available)
    headroom = _cgroup_headroom()
    if headroom is not None and headroom < host:
        return headroom, "left under the container's memory limit"
    return host, "available host memory"


def allocate_pool(
    layout: PayloadLayout, num_slots: int, device: torch.device, *, sized_by: str, pin_memory: bool = False
) -> BlockPool:
    """A BlockPool of ``num_slots`` slots, or PoolAllocationError naming ``sized_by`` (the config
    field that set the size), the bytes asked and the bytes available. The pool is written in full
    at allocation (zeroed), so a pool larger than what the device can give is refused up front
    instead of ending in the kernel's OOM killer; an allocation the allocator still refuses (a
    fragmented GPU) gets the same message rather than a traceback."""
    asked = num_slots * layout.slot_bytes
    available, source = available_bytes(device)
    if asked > available:
        raise PoolAllocationError(_too_big(asked, available, source, device, sized_by))
    try:
        return BlockPool(layout, num_slots, device, pin_memory=pin_memory)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "memory" not in str(exc).lower():
            raise  # not an allocation failure: a bug, keep its traceback
        raise PoolAllocationError(
            _too_big(asked, available, source, device, sized_by) + f" (allocator: {str(exc).splitlines()[0]})"
        ) from None


def _too_big(asked: int, available: int, source: str, device: torch.device, sized_by: str) -> str:
    gib = 2**30
    return (
        f"cannot allocate the block pool: {sized_by} asks {asked} bytes ({asked / gib:.1f} GiB) on "
        f"{device}, {available} bytes ({available / gib:.1f} GiB) {source}. Fix: lower max_tokens "
        "(or memory_pool_size), store blocks compressed (use_compression: true), or on a GPU keep "
        "a smaller GPU pool with a CPU tier behind it (cpu_tier_tokens)"
    )


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
