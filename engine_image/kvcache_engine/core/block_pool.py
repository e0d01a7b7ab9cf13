"""Block pool: one preallocated tensor per tier, carved into fixed-size slots.

The pool is a single ``uint8`` tensor ``[num_slots, slot_bytes]`` allocated once (pinned when it is
a CPU tier behind a GPU); a slot holds one encoded block, its fields at the offsets of the codec's
``PayloadLayout``. Free slots sit on a stack with the lowest index on top, so allocate and free
are O(1) and nothing is allocated per request. ``compact()`` moves live slots to the front.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcache_engine.contract.cache import PayloadLayout
from kvcache_engine.core.compression import torch_dtype
from kvcache_engine.core.hashing import BlockHash

log = logging.getLogger("kvcache_engine.block_pool")

__all__ = ["BlockPool", "ScatterSums", "StoredBlock", "payload_checksum", "payload_checksums"]

Payload = dict[str, torch.Tensor]

_CHECK_BATCH = 64  # slots gathered per checksum pass in checksums() (bounds the scratch copy)


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


_MASK64 = (1 << 64) - 1
# Words summed per step (rows x columns): bounds the int64 scratch (8 bytes a word). On the CPU it
# stays in cache (2 MiB); on a GPU, 128 MiB covers a whole put in a few large kernels (measured on
# an H100: 256 K-word steps ran at 13.5 GB/s, launch-bound).
_CHUNK_ELEMENTS = 1 << 18
_CHUNK_ELEMENTS_GPU = 1 << 24
# The blocked CPU form (_field_sums_blocked): words per block, and float64 elements per step.
_BLOCK_WORDS = 1024
_F64_STEP = 1 << 20


def _load_native() -> ctypes.CDLL | None:
    """The C kernels (``_wordsums.c``, built by setup.py as an optional extension), or None when
    they were not built; the torch forms below give the same digests."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_wordsums{suffix}"
        if not path.exists():
            continue
        try:
            lib = ctypes.CDLL(str(path))
            sums, scatter = lib.kv_word_sums, lib.kv_scatter_planes
        except (OSError, AttributeError) as exc:
            log.warning("checksum kernel %s unusable (%s): using the torch form, ~3x slower", path, exc)
            return None
        sums.restype = scatter.restype = None
        size, ptr = ctypes.c_size_t, ctypes.c_void_p
        sums.argtypes = [ptr, size, size, size, ptr]
        scatter.argtypes = [ctypes.c_char_p, size, ptr, size, size, size, ptr, ptr]
        return lib
    return None


_NATIVE = _load_native()
# The C kernels (ctypes releases the GIL for each call). Tests and benchmarks set them to None
# to run the torch forms and the plain scatter.
NATIVE_SUMS: Callable[..., None] | None = _NATIVE.kv_word_sums if _NATIVE is not None else None
NATIVE_SCATTER: Callable[..., None] | None = _NATIVE.kv_scatter_planes if _NATIVE is not None else None


class ScatterSums:
    """A put body in the wire layout (planes of ``plane_bytes``: one ``piece`` per block, then a
    tail) copied into its blocks' slots as it arrives, piece j of plane p to ``targets[j][p *
    piece:]``, with each block's checksum folded in on the way by the C kernel while the bytes
    are in cache. ``digests()`` then equals :func:`payload_checksum` of each target's payload
    (the raw rows of a pool whose rows are their payload), with no second pass over the blocks.
    Targets that are None (blocks already cached) and the tails are dropped. ``piece`` must be a
    multiple of 4; check ``available()`` first."""

    def __init__(
        self, targets: Sequence[memoryview | None], piece: int, plane_bytes: int, total: int
    ) -> None:
        kernel = NATIVE_SCATTER
        if kernel is None:
            raise RuntimeError("ScatterSums: the C kernel was not built")
        if piece <= 0 or piece % 4 or plane_bytes < len(targets) * piece:
            raise ValueError(
                f"ScatterSums: {len(targets)} pieces of {piece} bytes (a multiple of 4) "
                f"do not fit planes of {plane_bytes}"
            )
        planes = -(-total // plane_bytes)  # the kernel writes up to planes * piece bytes per target
        if any(t is not None and (t.readonly or t.nbytes < planes * piece) for t in targets):
            raise ValueError(f"ScatterSums: every target must be a writable buffer of {planes * piece} bytes")
        self._kernel = kernel
        self._targets = list(targets)  # keeps the buffers the pointers below point into alive
        n = len(targets)
        addrs = [ctypes.addressof(ctypes.c_char.from_buffer(t)) if t is not None else None for t in targets]
        self._blk = (ctypes.c_void_p * n)(*addrs)
        self._args = (self._blk, n, piece, plane_bytes)
        self._pos = ctypes.c_uint64(0)
        self._sums = (ctypes.c_uint64 * (2 * n))()
        self._state = (ctypes.byref(self._pos), self._sums)
        self.total = total
        self.filled = 0

    @staticmethod
    def available() -> bool:
        return NATIVE_SCATTER is not None

    def feed(self, chunk: bytes) -> None:
        """Copy ``chunk``, the body's next bytes, into place."""
        if self.filled + len(chunk) > self.total:
            raise ValueError(f"ScatterSums: {self.filled} + {len(chunk)} bytes exceed {self.total}")
        self._kernel(chunk, len(chunk), *self._args, *self._state)
        self.filled += len(chunk)

    def digests(self) -> list[str]:
        """The checksum of each target that is set, in order."""
        if self.filled != self.total:
            raise ValueError(f"ScatterSums: {self.filled} of {self.total} bytes fed")
        sums = list(self._sums)
        return [_digest(sums[2 * j], sums[2 * j + 1]) for j, t in enumerate(self._targets) if t is not None]


def _field_sums(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``words`` int32 ``[n, W]`` -> (sum x_j, sum x_j * (j + 1)) per row, int64 ``[n]`` on the
    words' device. int64 arithmetic wraps modulo 2**64, so any summation order (CPU vectorised,
    CUDA tree reductions, chunking, the C kernel's lanes) gives the same result. No host sync."""
    if words.device.type == "cpu":
        if NATIVE_SUMS is not None and words.stride(1) == 1 and words.numel():
            return _field_sums_native(words, NATIVE_SUMS)
        if words.shape[1] >= _BLOCK_WORDS:
            return _field_sums_blocked(words)
    return _field_sums_chunked(words)


def _field_sums_native(words: torch.Tensor, kernel: Callable[..., None]) -> tuple[torch.Tensor, torch.Tensor]:
    """The C kernel's form of :func:`_field_sums` (CPU rows of contiguous words, any row stride).
    Large batches split their rows across up to ``_SUM_THREADS`` threads (the caller's and
    pooled ones; the kernel runs without the GIL)."""
    n, width = words.shape
    out = torch.empty((n, 2), dtype=torch.int64)
    stride = words.stride(0) * 4
    parts = min(n, _SUM_THREADS, max(1, words.numel() * 4 // _SUM_PART_BYTES))
    bounds = [n * i // parts for i in range(parts + 1)]
    runs = [
        (words[a].data_ptr(), b - a, stride, width, out[a].data_ptr()) for a, b in itertools.pairwise(bounds)
    ]
    pending = [_sum_threads().submit(kernel, *run) for run in runs[1:]]
    kernel(*runs[0])
    for f in pending:
        f.result()
    return out[:, 0], out[:, 1]


# Threads for the C kernel's large batches: one part per thread, at least _SUM_PART_BYTES each.
_SUM_THREADS = max(1, min(4, os.cpu_count() or 1))
_SUM_PART_BYTES = 8 << 20


@functools.cache
def _sum_threads() -> ThreadPoolExecutor:
    """The pooled threads (started on first use; the caller's thread runs one part itself)."""
    return ThreadPoolExecutor(max_workers=3, thread_name_prefix="kvcache-sums")


def _field_sums_blocked(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU form of :func:`_field_sums`, 2-3x faster than int64 multiply-adds: each row is a
    grid of ``b`` blocks of ``k`` words, x[i * k + c]. Then sum x_j = sum of the block sums S_i
    and sum x_j * (j + 1) = k * sum i * S_i + sum (c + 1) * C_c, where C_c are the column sums.
    S and C are plain float64 sums, which are exact here: every partial sum is an integer below
    2**53 (k * 2**31 for S, b * 2**31 with b < 2**22 for C), so the order does not matter. The
    tail words that do not fill a block go through the chunked form."""
    n, width = words.shape
    k = _BLOCK_WORDS
    b = width // k
    head = b * k
    grid = words[:, :head].reshape(n, b, k)
    block_sums = torch.empty((n, b), dtype=torch.float64)
    col_sums = torch.zeros((n, k), dtype=torch.float64)
    step = max(1, _F64_STEP // k)  # blocks converted to float64 per step (a cache-sized scratch)
    if b <= step:  # several whole rows per step
        rows = step // b
        scratch = torch.empty((min(rows, n), b, k), dtype=torch.float64)
        for r in range(0, n, rows):
            x = scratch[: min(rows, n - r)]
            x.copy_(grid[r : r + rows])
            torch.sum(x, 2, out=block_sums[r : r + rows])
            col_sums[r : r + rows] += x.sum(1)
    else:  # one row in several steps
        scratch = torch.empty((step, k), dtype=torch.float64)
        for r in range(n):
            for i in range(0, b, step):
                x = scratch[: min(step, b - i)]
                x.copy_(grid[r, i : i + step])
                torch.sum(x, 1, out=block_sums[r, i : i + step])
                col_sums[r] += x.sum(0)
    s = block_sums.to(torch.int64)
    c = col_sums.to(torch.int64)
    s1 = s.sum(1)
    s2 = (s * torch.arange(b, dtype=torch.int64)).sum(1) * k
    s2 += (c * torch.arange(1, k + 1, dtype=torch.int64)).sum(1)
    if head < width:
        t1, t2 = _field_sums_chunked(words[:, head:])
        s1 += t1
        s2 += t2 + t1 * head
    return s1, s2


def _field_sums_chunked(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_field_sums` by int64 multiply-adds over column chunks (any device, any width)."""
    n, width = words.shape
    s1 = torch.zeros(n, dtype=torch.int64, device=words.device)
    s2 = torch.zeros(n, dtype=torch.int64, device=words.device)
    if n == 0 or width == 0:
        return s1, s2
    budget = _CHUNK_ELEMENTS if words.device.type == "cpu" else _CHUNK_ELEMENTS_GPU
    chunk = max(1, min(width, budget // n))
    buf = torch.empty((n, chunk), dtype=torch.int64, device=words.device)
    weights = torch.arange(1, chunk + 1, dtype=torch.int64, device=words.device)
    for start in range(0, width, chunk):
        c = min(chunk, width - start)
        b = buf[:, :c]
        b.copy_(words[:, start : start + c])
        part = b.sum(1)
        s1 += part
        # sum x_j * (start + j + 1) = sum x_j * (j + 1) + start * sum x_j over this chunk
        if words.device.type == "cpu":
            s2 += torch.mv(b, weights[:c])  # int64 mv: one pass, no temporary (CPU only)
        else:
            s2 += b.mul_(weights[:c]).sum(1)
        s2 += part * start
    return s1, s2


def _byte_words(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``raw`` uint8 ``[n, nbytes]`` -> (int32 words ``[n, nbytes // 4]``, int64 value of the
    zero-padded last partial word ``[n]`` or None when nbytes is a multiple of 4)."""
    nbytes = raw.shape[1]
    full = nbytes // 4
    head = raw[:, : full * 4]
    if head.shape[0] == 1:  # a single row: its row stride is irrelevant
        head = head[0]
    if head.stride(-1) != 1 or head.storage_offset() % 4 or (head.dim() > 1 and head.stride(0) % 4):
        head = torch.empty_like(head, memory_format=torch.contiguous_format).copy_(head)
    words = head.view(torch.int32).reshape(raw.shape[0], full)
    if nbytes % 4 == 0:
        return words, None
    tail = raw[:, full * 4 :].to(torch.int64)
    shifts = torch.arange(tail.shape[1], device=raw.device, dtype=torch.int64) * 8
    return words, (tail << shifts).sum(1)


def _digests(s1: torch.Tensor, s2: torch.Tensor) -> list[str]:
    """One host sync for the whole batch: the two sums of each row as 32 hex digits."""
    pairs = torch.stack((s1, s2), dim=1).cpu().tolist()
    return [_digest(a, b) for a, b in pairs]


def _digest(s1: int, s2: int) -> str:
    return f"{s1 & _MASK64:016x}{s2 & _MASK64:016x}"


def _checksum_rows(fields: list[torch.Tensor]) -> list[str]:
    """Checksums of n payloads given as their fields' uint8 ``[n, nbytes]`` views, in the
    payload's sorted-name order (see payload_checksum)."""
    s1: torch.Tensor | None = None
    s2: torch.Tensor | None = None
    base = 0  # index of the field's first word in the payload's word stream
    for raw in fields:
        words, tail = _byte_words(raw)
        f1, f2 = _field_sums(words)
        f2 = f2 + f1 * base
        width = words.shape[1]
        if tail is not None:
            f1 = f1 + tail
            f2 = f2 + tail * (base + width + 1)
            width += 1
        base += width
        s1 = f1 if s1 is None else s1 + f1
        s2 = f2 if s2 is None else s2 + f2
    if s1 is None or s2 is None:
        raise ValueError("payload: expected at least one field")
    return _digests(s1, s2)


def _uint8_rows(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``t`` (any dtype, leading ``lead`` dims kept as one row dim) as uint8 ``[n, bytes]``."""
    raw = t.detach()
    if not raw.is_contiguous():
        raw = raw.contiguous()
    n = math.prod(raw.shape[:lead]) if lead else 1
    return raw.reshape(n, -1).view(torch.uint8) if raw.numel() else raw.reshape(n, 0).view(torch.uint8)


def payload_checksum(payload: dict[str, torch.Tensor]) -> str:
    """Checksum of one payload: 32 hex digits (16 bytes), computed on the tensors' device.

    The payload's bytes, fields in sorted-name order each zero-padded to a multiple of 4 bytes,
    are read as little-endian int32 words x_0, x_1, ...; the digest is s1 = sum x_i and
    s2 = sum x_i * (i + 1), both modulo 2**64. Detection guarantees: a change confined to one
    word (any flipped byte or bits) always changes s1, since |delta| < 2**32; swapping two
    different words i < j changes s2 by (x_i - x_j) * (j - i) != 0 (|.| < 2**63). Integer sums
    wrap deterministically, so CPU and CUDA give the same digest for the same bytes.
    """
    return payload_checksums({k: v.unsqueeze(0) for k, v in payload.items()})[0]


def payload_checksums(payloads: dict[str, torch.Tensor]) -> list[str]:
    """payload_checksum of each of n payloads given with a leading n on every field (one pass
    on the tensors' device, one host sync)."""
    if not payloads:
        raise ValueError("payload: expected at least one field")
    return _checksum_rows([_uint8_rows(payloads[name], 1) for name in sorted(payloads)])


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
        # Checksums read the fields in sorted-name order (payload_checksum's order), never padding.
        self._sum_fields = sorted((f.name, f.offset, f.nbytes) for f in layout.fields)
        # One field at offset 0 filling the slot: a payload's bytes already are its slot rows.
        single = layout.fields[0] if len(layout.fields) == 1 else None
        self.rows_are_payload = (
            single is not None and single.offset == 0 and single.nbytes == layout.slot_bytes
        )

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

    @property
    def high_water(self) -> int:
        """One past the highest slot in use (0 when empty): the slot range the blocks span."""
        return self._in_use.rfind(1) + 1

    @property
    def fragmentation(self) -> float:
        """Share of the spanned slot range that is holes: ``1 - used / high_water`` (0.0 when
        empty or packed, as after ``compact()``). Holes cost no capacity (any free slot takes any
        block) but scatter chains, so gets gather rows instead of slicing them."""
        span = self.high_water
        return 1.0 - self.used / span if span else 0.0

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

    def rows_of(self, payloads: Payload) -> torch.Tensor:
        """``[n, slot_bytes]`` uint8 rows on the payloads' device holding n payloads (leading n on
        every field): a reinterpretation when the layout is one slot-filling field, else one copy
        per field into a staging tensor whose padding is zero."""
        first = next(iter(payloads.values()))
        n = first.shape[0]
        if self.rows_are_payload:
            name = self._fields[0][0]
            return payloads[name].contiguous().reshape(n, -1).view(torch.uint8)
        rows = torch.zeros((n, self.layout.slot_bytes), dtype=torch.uint8, device=first.device)
        for name, view in self.views(rows).items():
            view.copy_(payloads[name])
        return rows

    def write_rows(self, slots: Sequence[int], rows: torch.Tensor) -> None:
        """Store ``rows`` (``[len(slots), slot_bytes]``, any device) into ``slots``: a slice copy
        when the slots are consecutive, else one indexed copy."""
        if not slots:
            return
        first = slots[0]
        if list(slots) == list(range(first, first + len(slots))):
            self.storage[first : first + len(slots)].copy_(rows)
            return
        index = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        self.storage.index_copy_(0, index, rows.to(self.device))

    def store(self, slots: Sequence[int], payloads: Payload) -> torch.Tensor:
        """Write n payloads (leading n on every field) into ``slots`` and return their rows (for
        checksumming): encoded straight into the pool when the slots are consecutive, else via
        one staging tensor and one indexed copy."""
        first = slots[0]
        if list(slots) != list(range(first, first + len(slots))):
            rows = self.rows_of(payloads)
            self.write_rows(slots, rows)
            return rows
        target = self.storage[first : first + len(slots)]
        for name, view in self.views(target).items():
            view.copy_(payloads[name])
        return target

    def row_checksums(self, rows: torch.Tensor) -> list[str]:
        """payload_checksum of each ``[n, slot_bytes]`` row's payload (padding ignored), computed
        on the rows' device with one host sync."""
        return _checksum_rows([rows[:, off : off + n] for _, off, n in self._sum_fields])

    def checksums(self, slots: Sequence[int]) -> list[str]:
        """payload_checksum of each slot's payload, ``_CHECK_BATCH`` slots per pass: a view of
        the pool when they are consecutive, else a gathered copy."""
        out: list[str] = []
        for i in range(0, len(slots), _CHECK_BATCH):
            part = list(slots[i : i + _CHECK_BATCH])
            if part == list(range(part[0], part[0] + len(part))):
                rows = self.storage[part[0] : part[0] + len(part)]
            else:
                rows = self.storage.index_select(0, torch.tensor(part, dtype=torch.long, device=self.device))
            out += self.row_checksums(rows)
        return out

    def checksum(self, slot: int) -> str:
        return self.row_checksums(self.storage[slot : slot + 1])[0]

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
