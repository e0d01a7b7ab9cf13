"""Prefix index: hash -> stored block entry, plus the parent/child links of the chains (torch-free).

Invariants (checked by ``check()`` and by the engine's validate_cache_integrity):
- every entry's parent is either None (a chain root) or an indexed hash;
- ``children[p]`` holds exactly the indexed hashes whose parent is ``p``;
- a (tier, slot) pair belongs to at most one entry.
A chain is served only from its root through consecutive indexed blocks, each naming the previous
one as parent, so a block whose parent is gone is never served.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvcache_engine.core.hashing import BlockHash

__all__ = ["BlockEntry", "PrefixIndex"]


@dataclass(slots=True)
class BlockEntry:
    """Where one cached block lives and what it should contain."""

    hash: BlockHash
    parent: BlockHash | None
    tier: int  # 0: the primary tier (device), 1: the pinned CPU tier behind a CUDA tier
    slot: int
    checksum: str  # 16-byte word-sum digest of the stored payload (block_pool.payload_checksum)
    hits: int = 0
    last_access: int = 0


class PrefixIndex:
    """Dict of entries keyed by hash, with child sets for cascading removals. O(1) per block."""

    def __init__(self) -> None:
        self._entries: dict[BlockHash, BlockEntry] = {}
        self._children: dict[BlockHash, set[BlockHash]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, h: object) -> bool:
        return h in self._entries

    def __iter__(self) -> Iterator[BlockEntry]:
        return iter(self._entries.values())

    def get(self, h: BlockHash) -> BlockEntry | None:
        return self._entries.get(h)

    def children(self, h: BlockHash) -> set[BlockHash]:
        return self._children.get(h, set())

    def leading(self, hashes: Sequence[BlockHash], parent: BlockHash | None = None) -> int:
        """How many leading ``hashes`` are indexed, each with the previous one as parent
        (the first with ``parent``)."""
        n = 0
        expected = parent
        for h in hashes:
            e = self._entries.get(h)
            if e is None or e.parent != expected:
                break
            n += 1
            expected = h
        return n

    def add(self, entry: BlockEntry) -> None:
        """Index a block. Raises ValueError when its parent is not indexed or it already is."""
        if entry.hash in self._entries:
            raise ValueError(f"block {entry.hash:016x} is already indexed")
        if entry.parent is not None and entry.parent not in self._entries:
            raise ValueError(f"block {entry.hash:016x}: parent {entry.parent:016x} is not indexed")
        self._entries[entry.hash] = entry
        if entry.parent is not None:
            self._children.setdefault(entry.parent, set()).add(entry.hash)

    def remove(self, h: BlockHash) -> BlockEntry:
        """Unindex one block. Its children (if any) must be removed first: see ``subtree``."""
        entry = self._entries.pop(h)
        if entry.parent is not None:
            siblings = self._children.get(entry.parent)
            if siblings is not None:
                siblings.discard(h)
                if not siblings:
                    del self._children[entry.parent]
        return entry

    def subtree(self, h: BlockHash) -> list[BlockHash]:
        """``h`` and its indexed descendants, children before parents (a safe removal order)."""
        out: list[BlockHash] = []
        stack: list[tuple[BlockHash, bool]] = [(h, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                out.append(node)
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in self._children.get(node, ()))
        return out

    def topological(self) -> list[BlockHash]:
        """Every indexed hash, parents before children (roots, and orphans, start their trees)."""
        out: list[BlockHash] = []
        roots = [e.hash for e in self._entries.values() if e.parent is None or e.parent not in self._entries]
        stack = list(reversed(roots))
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(self._children.get(node, ()))
        return out

    def clear(self) -> None:
        self._entries.clear()
        self._children.clear()

    def check(self) -> list[str]:
        """Index consistency problems, one line each (empty when consistent)."""
        errors: list[str] = []
        seen: dict[tuple[int, int], BlockHash] = {}
        for e in self._entries.values():
            if e.parent is not None and e.parent not in self._entries:
                errors.append(f"block {e.hash:016x}: parent {e.parent:016x} is missing (dangling chain)")
            key = (e.tier, e.slot)
            if key in seen:
                errors.append(f"blocks {seen[key]:016x} and {e.hash:016x} share tier {e.tier} slot {e.slot}")
            seen[key] = e.hash
        for p, kids in self._children.items():
            for c in kids:
                child = self._entries.get(c)
                if child is None or child.parent != p:
                    errors.append(f"child link {p:016x} -> {c:016x} does not match the index")
        return errors
