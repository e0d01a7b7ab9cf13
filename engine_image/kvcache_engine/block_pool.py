"""Block pool: one preallocated tensor per tier, carved into fixed-size slots.

The pool is a single ``uint8`` tensor ``[num_slots, slot_bytes]`` allocated once (pinned when it is
a CPU tier behind a GPU); a slot holds one encoded block, its fields at the offsets of the codec's
``PayloadLayout``. Free slots sit on a stack with the lowest index on top, so allocate and free
are O(1) and nothing is allocated per request. ``compact()`` moves live slots to the front.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from kvcache_engine.compression import torch_dtype
from kvcache_engine.config import PayloadLayout
from kvcache_engine.hashing import BlockHash

__all__ = ["BlockPool", "StoredBlock", "payload_checksum"]

Payload = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StoredBlock:
    """A consistent copy of one cached block (what export_blocks yields and import_blocks takes)."""

    hash: BlockHash
    parent: BlockHash | None  # None for the first block of a chain
    codec: str  # "none" | "fp8" | "int8" | "int4"
    payload: dict[str, torch.Tensor]  # codec-specific contiguous CPU tensors
    checksum: str  # payload_checksum(payload)
    hits: int
    last_access: int


def _bytes_of(t: torch.Tensor) -> memoryview:
    raw = t.detach().contiguous()
    if raw.device.type != "cpu":
        raw = raw.cpu()
    return raw.reshape(-1).view(torch.uint8).numpy().data


def payload_checksum(payload: dict[str, torch.Tensor]) -> str:
    """blake2b (16-byte digest, hex) over the payload's bytes, fields in sorted-name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(payload):
        h.update(_bytes_of(payload[name]))
    return h.hexdigest()


class BlockPool:
    """``num_slots`` slots of ``layout.slot_bytes`` bytes in one preallocated tensor.

    Invariants: a slot is either on the free stack or in use, never both; ``used + free ==
    num_slots``; the storage tensor never changes size (resizing builds a new pool).
    """

    def __init__(self, layout: PayloadLayout, num_slots: int, device: torch.device, pin_memory: bool = False):
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self.layout = layout
        self.device = device
        pin = pin_memory and device.type == "cpu" and torch.cuda.is_available()
        self.storage = torch.zeros(
            (num_slots, layout.slot_bytes), dtype=torch.uint8, device=device, pin_memory=pin
        )
        self.pinned = pin
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._in_use = bytearray(num_slots)
        self._fields = [(f.name, f.offset, f.nbytes, torch_dtype(f.dtype), f.shape) for f in layout.fields]

    @property
    def num_slots(self) -> int:
        return int(self.storage.shape[0])

    @property
    def used(self) -> int:
        return self.num_slots - len(self._free)

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.storage.numel()

    def allocate(self) -> int | None:
        """A free slot (lowest first after compaction), or None when the pool is full."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._in_use[slot] = 1
        return slot

    def free(self, slot: int) -> None:
        if not self._in_use[slot]:
            raise ValueError(f"slot {slot} is not in use")
        self._in_use[slot] = 0
        self._free.append(slot)

    def in_use(self, slot: int) -> bool:
        return 0 <= slot < self.num_slots and bool(self._in_use[slot])

    def views(self, rows: torch.Tensor) -> Payload:
        """Typed field views of ``rows`` (``[slot_bytes]`` or ``[n, slot_bytes]`` uint8)."""
        lead = tuple(rows.shape[:-1])
        return {
            name: rows[..., off : off + n].view(dt).reshape(*lead, *shape)
            for name, off, n, dt, shape in self._fields
        }

    def read(self, slot: int) -> Payload:
        """Views of one slot's fields (no copy)."""
        return self.views(self.storage[slot])

    def write(self, slot: int, payload: Payload, non_blocking: bool = False) -> None:
        for name, view in self.read(slot).items():
            view.copy_(payload[name], non_blocking=non_blocking)

    def checksum(self, slot: int) -> str:
        return payload_checksum(self.read(slot))

    def compact(self) -> dict[int, int]:
        """Move live slots to the front; returns {old slot: new slot} for the moved ones."""
        used = self.used
        holes = [s for s in range(used) if not self._in_use[s]]
        tails = [s for s in range(used, self.num_slots) if self._in_use[s]]
        moves = dict(zip(tails, holes, strict=True))
        for src, dst in moves.items():
            self.storage[dst].copy_(self.storage[src])
            self._in_use[dst], self._in_use[src] = 1, 0
        self._free = list(range(self.num_slots - 1, used - 1, -1))
        return moves
