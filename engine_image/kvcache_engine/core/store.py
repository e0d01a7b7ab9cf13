"""The data plane of the engine: put, lookup and get of hash-chained blocks.

The public KV layout is ``[2, num_layers, num_tokens, num_kv_heads, head_dim]`` (keys then
values) in the config's dtype. A chain is stored after its longest cached prefix; the cached
prefix (and a given parent's whole chain) survives the evictions a put makes room with. A chain
whose parent is not cached stores nothing. Lookups and gets touch their hit blocks leaf first,
so a parent is always at least as recent as its children.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kvcache_engine.contract.cache import DTYPE_BYTES
from kvcache_engine.contract.curve import CLIENT_MISS_REASONS
from kvcache_engine.core.compression import torch_dtype
from kvcache_engine.core.gc import BackgroundGC
from kvcache_engine.core.hashing import BlockHash, chain_hashes
from kvcache_engine.core.prefix_index import BlockEntry
from kvcache_engine.core.slots import SlotAllocator
from kvcache_engine.core.state import EngineState
from kvcache_engine.core.tiers import PRIMARY

__all__ = ["BlockStore", "as_hashes", "as_tokens"]

log = logging.getLogger("kvcache_engine")

_MAX_HASH = 2**64

PutPlan = tuple[int, list[BlockHash], list[int]]
"""(leading blocks already cached, hashes to store, their slots)."""


def as_tokens(tokens: Any) -> list[int]:
    """``tokens`` as a list of ints. Raises ValueError naming ``tokens``."""
    if isinstance(tokens, torch.Tensor):
        if (
            tokens.dim() != 1
            or tokens.dtype.is_floating_point
            or tokens.dtype.is_complex
            or tokens.dtype == torch.bool
        ):
            raise ValueError(
                f"tokens: expected a 1-D integer tensor, got {tokens.dtype} of shape {list(tokens.shape)}"
            )
        return [int(t) for t in tokens.tolist()]
    if isinstance(tokens, (list, tuple)):
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise ValueError("tokens: expected a list of ints")
        return list(tokens)
    raise ValueError(f"tokens: expected a list of ints or a 1-D integer tensor, got {type(tokens).__name__}")


def check_distinct(hashes: Sequence[int], parent: int | None = None) -> None:
    """ValueError naming the first repeated hash: a chain's blocks (and its parent) are distinct;
    a repeat would link a block as its own ancestor."""
    if len(set(hashes)) == len(hashes) and (parent is None or parent not in hashes):
        return
    seen: dict[int, int] = {} if parent is None else {int(parent): -1}
    for i, h in enumerate(hashes):
        if int(h) in seen:
            where = "the parent" if seen[int(h)] < 0 else f"hashes[{seen[int(h)]}]"
            raise ValueError(
                f"hashes[{i}]: {int(h):#018x} repeats {where}; a chain's block hashes are distinct"
            )
        seen[int(h)] = i


def as_hashes(hashes: Any) -> list[BlockHash]:
    """``hashes`` as a list of block hashes. Raises ValueError naming ``hashes``."""
    if isinstance(hashes, (str, bytes)) or not isinstance(hashes, Iterable):
        raise ValueError(f"hashes: expected a sequence of block hashes, got {type(hashes).__name__}")
    out = list(hashes)
    for h in out:
        if not isinstance(h, int) or isinstance(h, bool) or not 0 <= h < _MAX_HASH:
            raise ValueError(f"hashes: each must be an unsigned 64-bit int, got {h!r}")
    return [BlockHash(h) for h in out]


class BlockStore:
    """put / put_blocks_raw / put_rows, lookup, get: each under the engine lock, each recorded in
    the latency histograms; every put ends by waking background GC when it is due."""

    def __init__(self, state: EngineState, slots: SlotAllocator, gc: BackgroundGC) -> None:
        self._state = state
        self._slots = slots
        self._gc = gc

    def block_hashes(self, tokens: Any) -> list[BlockHash]:
        """Chained hashes of the full blocks of ``tokens`` under this engine's namespace."""
        cfg = self._state.config
        return chain_hashes(cfg.namespace, as_tokens(tokens), cfg.block_tokens)

    # -- puts

    def put(self, tokens: Any, kv: torch.Tensor) -> int:
        """Store the full blocks of ``tokens`` with their KV; returns blocks newly stored."""
        toks = as_tokens(tokens)
        bt = self._state.config.block_tokens
        if len(toks) < bt:
            raise ValueError(
                f"tokens: need at least block_tokens={bt} tokens to store a block, got {len(toks)}"
            )
        kv = self._check_kv(kv, len(toks))
        hashes = chain_hashes(self._state.config.namespace, toks, bt)
        return self.put_chain(hashes, kv[:, :, : len(hashes) * bt], None)

    def put_blocks_raw(
        self, hashes: Sequence[BlockHash], kv: torch.Tensor, parent: BlockHash | None = None
    ) -> int:
        """Store a chain given its hashes (``hashes[0]``'s parent is ``parent``); ``kv`` holds
        ``len(hashes) * block_tokens`` tokens. Returns blocks newly stored."""
        hs = as_hashes(hashes)
        if not hs:
            raise ValueError("hashes: need at least one block hash")
        kv = self._check_kv(kv, len(hs) * self._state.config.block_tokens)
        return self.put_chain(hs, kv, parent)

    def put_rows(
        self,
        hashes: Sequence[BlockHash],
        rows: torch.Tensor,
        checksums: Sequence[str] | None = None,
        parent: BlockHash | None = None,
    ) -> int:
        """Store a chain given as its blocks' raw payloads (uint8 ``[len(hashes), slot_bytes]``
        rows on the CPU): copied into their slots as they are, or encoded like put_blocks_raw when
        the pool does not store raw rows. Returns blocks newly stored."""
        hs = as_hashes(hashes)
        c = self._state.config
        width = c.block_tokens * self._state.token_elems() * DTYPE_BYTES[c.dtype]
        if not hs or rows.dtype != torch.uint8 or tuple(rows.shape) != (len(hs), width):
            raise ValueError(
                f"rows: expected uint8 [{len(hs)}, {width}] for {len(hs)} blocks, got "
                f"{rows.dtype} {list(rows.shape)}"
            )
        if checksums is not None and len(checksums) != len(hs):
            raise ValueError(f"checksums: {len(checksums)} given for {len(hs)} blocks")
        t0 = time.perf_counter()
        with self._state.lock:
            if not self._state.stores_raw_rows:
                return self.put_chain(hs, self._rows_as_kv(rows, len(hs)), parent)
            present, new, slots = self.plan_put(hs, parent)
            sums: list[str] = []
            if new:
                part = rows[present : present + len(new)]
                pool = self._state.tiers[PRIMARY].pool
                pool.write_rows(slots, part)
                sums = (
                    list(checksums[present : present + len(new)]) if checksums else pool.row_checksums(part)
                )
            self.link(hs, parent, present, list(zip(new, slots, sums, strict=True)))
            self._state.latency.record("put", (time.perf_counter() - t0) * 1000)
            self._gc.maybe_wake()
            return len(new)

    def _rows_as_kv(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Slot rows of ``n`` blocks as the public ``[2, L, n * T, H, D]`` layout."""
        c = self._state.config
        shape = (n, 2, c.num_layers, c.block_tokens, c.num_kv_heads, c.head_dim)
        blocks = rows.view(torch_dtype(c.dtype)).reshape(shape)
        return blocks.permute(1, 2, 0, 3, 4, 5).reshape(2, c.num_layers, -1, c.num_kv_heads, c.head_dim)

    def put_chain(self, hashes: list[BlockHash], kv: torch.Tensor, parent: BlockHash | None) -> int:
        """Encode and store the blocks of ``hashes`` after their cached prefix; ``kv`` holds the
        whole chain's tokens. Returns blocks newly stored."""
        st = self._state
        t0 = time.perf_counter()
        bt = st.config.block_tokens
        with st.lock:
            present, new, slots = self.plan_put(hashes, parent)
            checksums: list[str] = []
            if new:
                start = present * bt
                c = st.config
                span = kv[:, :, start : start + len(new) * bt]
                shape = (2, c.num_layers, len(new), bt, c.num_kv_heads, c.head_dim)
                blocks = span.reshape(shape).permute(2, 0, 1, 3, 4, 5)
                payload = st.codec.encode_for_store(blocks.to(st.device, non_blocking=c.non_blocking))
                pool = st.tiers[PRIMARY].pool
                # One batched write and one batched checksum (on the device, one host sync).
                checksums = pool.row_checksums(pool.store(slots, payload))
            self.link(hashes, parent, present, list(zip(new, slots, checksums, strict=True)))
            st.latency.record("put", (time.perf_counter() - t0) * 1000)
            self._gc.maybe_wake()
            return len(new)

    def plan_put(self, hashes: list[BlockHash], parent: BlockHash | None) -> PutPlan:
        """Under the lock: the put's plan, making room by evicting unprotected blocks."""
        plan = self.plan_put_or_none(hashes, parent, evict=True)
        assert plan is not None  # evicting plans always exist
        return plan

    def plan_put_or_none(
        self, hashes: list[BlockHash], parent: BlockHash | None, *, evict: bool
    ) -> PutPlan | None:
        """Under the lock: (leading blocks already cached, hashes to store, their slots). Stores
        nothing when ``parent`` is not cached. Slots come free or, with ``evict``, by evicting
        unprotected blocks; without, None when the free slots do not cover every new block.
        A chain that repeats a hash (or holds its parent) is refused before anything is taken."""
        check_distinct(hashes, parent)
        st = self._state
        if parent is not None and parent not in st.index:
            return 0, [], []
        present = st.index.leading(hashes, parent)
        new = hashes[present:]
        clash = next((i for i, h in enumerate(new) if h in st.index), None)
        if clash is not None:
            # The hash exists under another parent (a 64-bit collision, or a hostile chain): keep
            # the stored chain and store only the new blocks before it (nothing is allocated for
            # a block that could not be linked: a put leaves no trace it cannot index).
            log.warning("block %016x already cached with a different parent; not stored", new[clash])
            new = new[:clash]
        if not evict and len(new) > st.tiers[PRIMARY].pool.free_count:
            return None
        # The cached prefix (and a given parent's whole chain) must survive the evictions.
        protected = set(hashes[:present]) | set(st.ancestors_of({parent}))
        slots = self._slots.allocate(len(new), protected)
        return present, new[: len(slots)], slots

    def link(
        self,
        hashes: list[BlockHash],
        parent: BlockHash | None,
        present: int,
        stored: list[tuple[BlockHash, int, str]],
    ) -> None:
        """Under the lock: index the blocks just stored after the cached prefix ((hash, slot,
        checksum) each, in chain order) and touch the chain."""
        st = self._state
        prev = hashes[present - 1] if present else parent
        for h, slot, checksum in stored:
            st.index.add(BlockEntry(h, prev, PRIMARY, slot, checksum))
            prev = h
        new = {h for h, _, _ in stored}
        for h in reversed(hashes[: present + len(stored)]):
            st.touch(h, inserted=h in new)
        touched = hashes[: present + len(stored)]
        if touched and min(touched) < st.curve.threshold:
            st.curve.stored(
                touched, parent, requested_blocks=st.counters.cache_hits + st.counters.cache_misses
            )
        st.counters.bytes_in += len(stored) * st.codec.stored_bytes()

    def _check_kv(self, kv: Any, num_tokens: int) -> torch.Tensor:
        c = self._state.config
        expected = (2, c.num_layers, num_tokens, c.num_kv_heads, c.head_dim)
        if not isinstance(kv, torch.Tensor):
            raise ValueError(f"kv: expected a tensor of shape {list(expected)}, got {type(kv).__name__}")
        if tuple(kv.shape) != expected:
            raise ValueError(
                f"kv: expected shape {list(expected)} (2, layers, tokens, kv_heads, head_dim), "
                f"got {list(kv.shape)}"
            )
        if kv.dtype != self._state.codec.dtype:
            raise ValueError(f"kv: expected dtype {self._state.codec.dtype}, got {kv.dtype}")
        return kv

    # -- lookups and gets

    def lookup_hashes(
        self, hashes: Sequence[BlockHash], namespace: str | None = None, moved: bool = False
    ) -> int:
        """Leading cached blocks of this chain. Counts as a request (hits, misses, tokens); a
        caller that hashed it under another ``namespace`` has its misses counted as such."""
        hs = as_hashes(hashes)
        st = self._state
        t0 = time.perf_counter()
        bt = st.config.block_tokens
        with st.lock:
            n = st.index.leading(hs)
            for h in reversed(hs[:n]):
                st.touch(h)
            c = st.counters
            c.requests += 1
            c.requested_tokens += len(hs) * bt
            c.hit_tokens += n * bt
            c.cache_hits += n
            c.cache_misses += len(hs) - n
            st.history.record(hs, n)
            self._slots.prefetch(hs, n)
            mismatch = namespace is not None and namespace != st.config.namespace and n < len(hs)
            if mismatch:
                reasons = st.exact_miss_reasons
                reasons["namespace_mismatch"] = reasons.get("namespace_mismatch", 0) + len(hs) - n
            curve = st.curve
            if hs and min(hs) < curve.threshold:  # one check per lookup; the rest when sampled
                curve.lookup(
                    hs, len(hs) if mismatch else n,  # a mismatch's misses are counted above
                    requested_blocks=c.cache_hits + c.cache_misses,
                    lookup_seconds=st.latency.sums["lookup"] / 1000, moved=moved,
                )  # fmt: skip
            st.latency.record("lookup", (time.perf_counter() - t0) * 1000)
            return n

    def count_client_misses(self, reason: str, blocks: int) -> None:
        """Blocks a client's failed calls missed, as it reported them (see the facade)."""
        if reason not in CLIENT_MISS_REASONS:
            raise ValueError(f"reason: expected one of {', '.join(CLIENT_MISS_REASONS)}, got {reason!r}")
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0:
            raise ValueError(f"blocks: expected a non-negative int, got {blocks!r}")
        st = self._state
        with st.lock:
            st.exact_miss_reasons[reason] = st.exact_miss_reasons.get(reason, 0) + blocks

    def get_hashes(self, hashes: Sequence[BlockHash], out: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded KV of the leading cached blocks of this chain, ``[2, L, n * T, H, D]``, decoded
        into the front of ``out`` when that is large enough (see KVCacheEngine.get_hashes)."""
        hs = as_hashes(hashes)
        st = self._state
        t0 = time.perf_counter()
        with st.lock:
            n = st.index.leading(hs)
            entries = [st.entry(h) for h in hs[:n]]
            need = n * st.config.block_tokens * st.token_elems()
            if out is not None and entries and out.numel() >= need:
                out = self._decode_entries(entries, self._front(out, n))
            else:
                out = self._decode_entries(entries)
            for h in reversed(hs[:n]):
                st.touch(h)
            self._slots.prefetch(hs, n)
            st.counters.bytes_out += out.numel() * out.element_size()
            st.latency.record("get", (time.perf_counter() - t0) * 1000)
            return out

    def _front(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        """The front of ``buf`` as a ``[2, L, n * T, H, D]`` view. Raises ValueError naming ``out``
        unless ``buf`` is a contiguous CPU buffer of the config dtype."""
        st = self._state
        c = st.config
        if buf.dtype != st.codec.dtype or buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError(f"out: expected a contiguous CPU {st.codec.dtype} buffer")
        dst = buf.view(-1)[: n * c.block_tokens * st.token_elems()]
        return dst.view(2, c.num_layers, n * c.block_tokens, c.num_kv_heads, c.head_dim)

    def _decode_entries(self, entries: list[BlockEntry], out: torch.Tensor | None = None) -> torch.Tensor:
        """Gather the slots of ``entries`` onto the primary device (one gather), decode them in one
        pass into the sequence layout, return on the CPU: in ``out`` (a ``[2, L, n * T, H, D]``
        CPU tensor, e.g. the server's warm staging buffer) when given."""
        st = self._state
        c = st.config
        if not entries:
            return torch.empty((2, c.num_layers, 0, c.num_kv_heads, c.head_dim), dtype=st.codec.dtype)
        st.copier.sync()  # queued tier copies land before the gathers below read the slots
        primary = st.tiers[PRIMARY].pool
        payload = primary.views(self._gather_rows(entries))
        if st.device.type == "cpu":
            return st.codec.decode_sequence(payload, out)  # [2, L, n * T, H, D], one pass
        decoded = st.codec.decode_sequence(payload)
        # Into the caller's buffer, else pinned host memory (about twice as fast as a pageable
        # copy); then wait for it.
        host = out if out is not None else torch.empty(decoded.shape, dtype=decoded.dtype, pin_memory=True)
        host.copy_(decoded, non_blocking=True)
        torch.cuda.current_stream(st.device).synchronize()
        return host

    def _gather_rows(self, entries: list[BlockEntry]) -> torch.Tensor:
        """The slot rows of ``entries`` on the primary device, in order: a view when they are
        consecutive primary slots, else one gather (or a per-block copy when some sit in the CPU
        tier)."""
        st = self._state
        primary = st.tiers[PRIMARY].pool
        if all(e.tier == PRIMARY for e in entries):  # one gather (a view when the slots are consecutive)
            rows = primary.storage
            slots = [e.slot for e in entries]
            if slots != list(range(slots[0], slots[0] + len(slots))):
                return rows.index_select(0, torch.tensor(slots, dtype=torch.long, device=st.device))
            return rows[slots[0] : slots[0] + len(slots)]
        # Some blocks sit in the CPU tier: assemble the rows on the device.
        rows = torch.empty((len(entries), primary.layout.slot_bytes), dtype=torch.uint8, device=st.device)
        for i, e in enumerate(entries):
            rows[i].copy_(st.tiers[e.tier].pool.storage[e.slot], non_blocking=True)
        return rows
