"""Block transfer: consistent copies out of the cache (persist, snapshot, drain) and verified
copies into it (load, restore, drain targets).

Invariants: exports list parents before children and copy each block under the engine lock;
an import stores a block only when its checksum, codec payload and geometry verify and its
parent is cached (or arrives earlier in the same chunk); the existing ancestors of a chunk stay
put while slots are found for it; every imported parent ends up at least as hot as its children.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch

from kvcache_engine.core.block_pool import StoredBlock, payload_checksum
from kvcache_engine.core.hashing import BlockHash
from kvcache_engine.core.prefix_index import BlockEntry
from kvcache_engine.core.slots import SlotAllocator
from kvcache_engine.core.state import EngineState
from kvcache_engine.core.store import as_hashes
from kvcache_engine.core.tiers import PRIMARY

__all__ = ["BlockTransfer"]

log = logging.getLogger("kvcache_engine")

_IMPORT_CHUNK = 256

Accepted = list[tuple[StoredBlock, dict[str, torch.Tensor]]]
"""Verified blocks of an import chunk with their payloads in the engine's codec."""


class BlockTransfer:
    """export_blocks / import_blocks of one engine."""

    def __init__(self, state: EngineState, slots: SlotAllocator) -> None:
        self._state = state
        self._slots = slots

    def cached_hashes(self) -> list[BlockHash]:
        """Every stored block, parents before children."""
        with self._state.lock:
            return self._state.index.topological()

    def export_blocks(self, hashes: Iterable[BlockHash] | None = None) -> Iterator[StoredBlock]:
        """Consistent copies of the given (None: all) cached blocks, parents before children.
        Each block is copied under the lock; unknown hashes are skipped."""
        st = self._state
        order = self.cached_hashes()
        if hashes is not None:
            wanted = set(as_hashes(hashes))
            order = [h for h in order if h in wanted]
        for h in order:
            with st.lock:
                e = st.index.get(h)
                if e is None:
                    continue
                st.copier.host_sync()
                pool = st.tiers[e.tier].pool
                payload = {
                    k: v.detach().to("cpu", copy=True).contiguous() for k, v in pool.read(e.slot).items()
                }
                block = StoredBlock(h, e.parent, st.codec.name, payload, e.checksum, e.hits, e.last_access)
            yield block

    def import_blocks(self, blocks: Iterable[StoredBlock]) -> int:
        """Store verified copies (see KVCacheEngine.import_blocks), in chunks of
        ``_IMPORT_CHUNK``, each chunk under the lock. Returns blocks newly stored."""
        stored = 0
        chunk: list[StoredBlock] = []
        for block in blocks:
            chunk.append(block)
            if len(chunk) == _IMPORT_CHUNK:
                stored += self._import_chunk(chunk)
                chunk = []
        if chunk:
            stored += self._import_chunk(chunk)
        return stored

    def _import_chunk(self, chunk: list[StoredBlock]) -> int:
        st = self._state
        with st.lock:
            accepted = self._accept(chunk)
            incoming = {b.hash for b, _ in accepted}
            # Existing ancestors of the chunk stay put while slots are found (new blocks are not in
            # any strategy yet, so they cannot be chosen either).
            ancestors = st.ancestors_of({b.parent for b, _ in accepted} - incoming - {None})
            slots = self._slots.allocate(len(accepted), set(ancestors))
            stored = self._store_accepted(accepted, slots)
            # Children first, then the existing ancestors from the deepest to the root: every
            # parent ends up at least as hot as its children.
            for h in reversed(stored):
                st.tiers[PRIMARY].strategy.insert(h)
            st.curve.imported([(h, st.entry(h).parent) for h in reversed(stored)])
            for h in ancestors:
                st.tiers[st.entry(h).tier].strategy.touch(h)
            st.counters.bytes_in += len(stored) * st.codec.stored_bytes()
            return len(stored)

    def _accept(self, chunk: list[StoredBlock]) -> Accepted:
        """Under the lock: the chunk's new blocks whose parent is cached or accepted before them
        and whose payload verifies (rejections are counted in import_rejected)."""
        st = self._state
        accepted: Accepted = []
        incoming: set[BlockHash] = set()
        for block in chunk:
            if block.hash in st.index or block.hash in incoming:
                continue
            if block.parent is not None and block.parent not in st.index and block.parent not in incoming:
                log.debug("import: block %016x skipped, parent %016x absent", block.hash, block.parent)
                continue
            payload = self._verified_payload(block)
            if payload is None:
                st.counters.import_rejected += 1
                continue
            accepted.append((block, payload))
            incoming.add(block.hash)
        return accepted

    def _store_accepted(self, accepted: Accepted, slots: list[int]) -> list[BlockHash]:
        """Under the lock: write and index the accepted blocks into ``slots`` in order; a block
        whose parent did not fit (no slot) is skipped. Returns the hashes stored."""
        st = self._state
        pool = st.tiers[PRIMARY].pool
        stored: list[BlockHash] = []
        for (block, payload), slot in zip(accepted, slots, strict=False):
            if block.parent is not None and block.parent not in st.index:
                pool.free(slot)  # its parent did not fit
                continue
            pool.write(slot, payload)
            checksum = block.checksum if block.codec == st.codec.name else payload_checksum(payload)
            st.index.add(
                BlockEntry(block.hash, block.parent, PRIMARY, slot, checksum, block.hits, block.last_access)
            )
            st.clock = max(st.clock, block.last_access)
            stored.append(block.hash)
        return stored

    def _verified_payload(self, block: StoredBlock) -> dict[str, torch.Tensor] | None:
        """``block``'s payload in the engine's codec, or None (logged) when its codec, geometry or
        checksum does not verify."""
        st = self._state
        try:
            codec = st.codec_for(block.codec)
            codec.check_payload(block.payload)
        except ValueError as exc:
            log.warning("import: block %016x rejected: %s", block.hash, exc)
            return None
        if payload_checksum(block.payload) != block.checksum:
            log.warning("import: block %016x rejected: checksum mismatch", block.hash)
            return None
        if codec is st.codec:
            return block.payload
        return st.codec.encode(codec.decode(block.payload))
