from __future__ import annotations

import pytest

from kvcache_engine.core.hashing import BlockHash
from kvcache_engine.core.prefix_index import BlockEntry, PrefixIndex


def make_index(edges: list[tuple[int, int | None]]) -> PrefixIndex:
    """Index blocks (hash, parent) in the given order, one slot each."""
    index = PrefixIndex()
    for slot, (h, parent) in enumerate(edges):
        index.add(BlockEntry(BlockHash(h), None if parent is None else BlockHash(parent), 0, slot, "c"))
    return index


def test_leading_counts_consecutive_chain_members() -> None:
    index = make_index([(1, None), (2, 1), (3, 2), (9, None)])
    assert index.leading([BlockHash(x) for x in (1, 2, 3, 4)]) == 3
    assert index.leading([BlockHash(x) for x in (1, 3)]) == 1  # 3's parent is 2, not 1
    assert index.leading([BlockHash(x) for x in (2, 3)]) == 0  # 2 is not a root
    assert index.leading([BlockHash(x) for x in (2, 3)], parent=BlockHash(1)) == 2


def test_add_refuses_orphans_and_duplicates() -> None:
    index = make_index([(1, None)])
    with pytest.raises(ValueError, match="parent"):
        index.add(BlockEntry(BlockHash(5), BlockHash(4), 0, 1, "c"))
    with pytest.raises(ValueError, match="already"):
        index.add(BlockEntry(BlockHash(1), None, 0, 2, "c"))
    assert len(index) == 1


def test_subtree_lists_children_before_parents() -> None:
    index = make_index([(1, None), (2, 1), (3, 2), (4, 1), (5, 4)])
    order = index.subtree(BlockHash(1))
    assert sorted(order) == [1, 2, 3, 4, 5] and order[-1] == 1
    assert order.index(3) < order.index(2) and order.index(5) < order.index(4)
    for h in order:
        index.remove(h)
    assert len(index) == 0 and index.check() == []


def test_topological_puts_parents_first() -> None:
    index = make_index([(1, None), (2, 1), (3, 2), (7, None), (8, 7)])
    order = index.topological()
    assert sorted(order) == [1, 2, 3, 7, 8]
    assert order.index(1) < order.index(2) < order.index(3) and order.index(7) < order.index(8)


def test_check_reports_dangling_chain_and_shared_slot() -> None:
    index = make_index([(1, None), (2, 1)])
    index._entries.pop(BlockHash(1))  # planted: a parent vanished without its child
    index.add(BlockEntry(BlockHash(3), None, 0, 1, "c"))  # planted: slot 1 used twice
    errors = index.check()
    assert any("dangling" in e and f"{2:016x}" in e for e in errors)
    assert any("share tier 0 slot 1" in e for e in errors)
