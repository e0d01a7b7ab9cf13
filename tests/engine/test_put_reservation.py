"""Zero-copy puts (reserve_put -> write the slots -> commit_put / release_put): the same stored
bytes and checksums as put(), nothing indexed or leaked when the bytes never come, the races
with eviction and a concurrent put of the same chain, and the structural operations waiting
for reservations in flight."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_engine.core.reservations import PutReservation
from kvcache_engine.engine import KVCacheEngine
from tests.engine.helpers import make_engine, make_kv, make_tokens

BT = 4


def fill(res: PutReservation, kv: torch.Tensor) -> None:
    """Write block j's raw payload ``kv[:, :, j*bt:(j+1)*bt]`` into each target (as the server
    does from the wire, piece by piece)."""
    for j, target in enumerate(res.targets):
        if target is not None:
            block = kv[:, :, j * BT : (j + 1) * BT].contiguous()
            target[:] = block.view(-1).view(torch.uint8).numpy().data


def chain_kv(chain: int, blocks: int) -> torch.Tensor:
    """Chain ``chain``'s KV for its first ``blocks`` blocks (prefixes agree across lengths)."""
    return make_kv(4 * BT, seed=chain)[:, :, : blocks * BT]


def reserve(engine: KVCacheEngine, chain: int, blocks: int) -> PutReservation:
    res = engine.reserve_put(engine.block_hashes(make_tokens(chain, blocks)))
    assert res is not None
    return res


def used_and_reserved(engine: KVCacheEngine) -> tuple[int, int]:
    return engine.get_stats()["used_blocks"], len(engine.cached_hashes())


def test_reserved_put_stores_what_put_stores(engine_factory: Any) -> None:
    direct, zero_copy = engine_factory(), engine_factory()
    tokens, kv = make_tokens(1, 3), chain_kv(1, 3)
    assert direct.put(tokens, kv) == 3
    res = reserve(zero_copy, 1, 3)
    assert [t is not None for t in res.targets] == [True, True, True]
    fill(res, kv)
    assert zero_copy.commit_put(res) == 3
    assert torch.equal(zero_copy.get(tokens), kv)
    assert [b.checksum for b in zero_copy.export_blocks()] == [b.checksum for b in direct.export_blocks()]
    assert zero_copy.validate_cache_integrity()["is_valid"]
    # A longer chain over the cached prefix: only the new block gets a target.
    longer = reserve(zero_copy, 1, 4)
    assert longer.present == 3 and [t is not None for t in longer.targets] == [False, False, False, True]
    fill(longer, chain_kv(1, 4))
    assert zero_copy.commit_put(longer) == 1
    assert zero_copy.lookup(make_tokens(1, 4)) == 4 * BT


def test_commit_takes_the_writers_checksums(engine_factory: Any) -> None:
    """A writer that folded the checksums in while writing (the server's scatter) hands them
    over: they are stored as given (validate then recomputes and compares), one per reserved
    block or a ValueError that leaves the reservation open."""
    direct, engine = engine_factory(), engine_factory()
    tokens, kv = make_tokens(1, 2), chain_kv(1, 2)
    direct.put(tokens, kv)
    sums = [b.checksum for b in direct.export_blocks()]
    res = reserve(engine, 1, 2)
    fill(res, kv)
    with pytest.raises(ValueError, match="1 given for 2 reserved blocks"):
        engine.commit_put(res, sums[:1])
    assert engine.commit_put(res, sums) == 2
    assert engine.validate_cache_integrity()["is_valid"]
    bad = reserve(engine, 2, 1)
    fill(bad, chain_kv(2, 1))
    engine.commit_put(bad, ["0" * 32])
    assert not engine.validate_cache_integrity()["is_valid"]  # a wrong sum is caught, not hidden


def rows_of(kv: torch.Tensor, blocks: int) -> torch.Tensor:
    """The slot rows of a chain's first blocks: row j = block j's [2, L, bt, H, D] bytes."""
    two, layers, _, heads, dim = kv.shape
    per_block = kv[:, :, : blocks * BT].reshape(two, layers, blocks, BT, heads, dim).permute(2, 0, 1, 3, 4, 5)
    return per_block.contiguous().view(torch.uint8).reshape(blocks, -1)


@pytest.mark.parametrize("with_sums", [False, True], ids=["computed", "given"])
def test_put_rows_stores_what_put_stores_and_evicts(engine_factory: Any, with_sums: bool) -> None:
    """The staged raw put: rows copied as they are, evicting when full, checksums taken as
    given or computed; the same bytes and checksums as put()."""
    direct, engine = engine_factory(), engine_factory()
    tokens, kv = make_tokens(1, 3), chain_kv(1, 3)
    direct.put(tokens, kv)
    sums = [b.checksum for b in direct.export_blocks()] if with_sums else None
    hashes = engine.block_hashes(tokens)
    assert engine.put_rows(hashes[:2], rows_of(kv, 2), sums[:2] if sums else None) == 2
    assert engine.put_rows(hashes, rows_of(kv, 3), sums) == 1  # over a cached prefix
    assert torch.equal(engine.get(tokens), kv)
    assert [b.checksum for b in engine.export_blocks()] == [b.checksum for b in direct.export_blocks()]
    assert engine.validate_cache_integrity()["is_valid"]
    assert engine.put_rows(hashes, rows_of(kv, 3), sums) == 0  # all cached: nothing new
    with pytest.raises(ValueError, match=r"rows: expected uint8 \[3, "):
        engine.put_rows(hashes, rows_of(kv, 2))
    with pytest.raises(ValueError, match="checksums: 1 given for 3 blocks"):
        engine.put_rows(hashes, rows_of(kv, 3), ["0" * 32])


def test_put_rows_encodes_when_the_codec_changed(engine_factory: Any) -> None:
    """A codec switched between the server's check and the store: the rows are encoded."""
    engine = engine_factory()
    engine.reconfigure(use_compression=True, compression_codec="int8")
    assert not engine.stores_raw_rows
    tokens, kv = make_tokens(2, 2), chain_kv(2, 2)
    assert engine.put_rows(engine.block_hashes(tokens), rows_of(kv, 2)) == 2
    got = engine.get(tokens)
    assert got is not None and (got.float() - kv.float()).abs().max() < 0.1
    assert engine.validate_cache_integrity()["is_valid"]


def test_release_leaves_nothing_behind(engine_factory: Any) -> None:
    engine = engine_factory()
    engine.put(make_tokens(1, 2), chain_kv(1, 2))
    before = used_and_reserved(engine)
    res = reserve(engine, 2, 3)
    assert engine.get_stats()["used_blocks"] == before[0] + 3
    engine.release_put(res)
    engine.release_put(res)  # idempotent
    assert used_and_reserved(engine) == before
    assert engine.lookup(make_tokens(2, 3)) == 0
    assert engine.validate_cache_integrity()["is_valid"]
    with pytest.raises(ValueError, match="reservation"):
        engine.commit_put(res)


def test_commit_after_the_prefix_was_evicted_stores_nothing(engine_factory: Any) -> None:
    engine = engine_factory(max_tokens=8 * BT)
    engine.put(make_tokens(1, 2), chain_kv(1, 2))
    res = reserve(engine, 1, 4)  # blocks 3 and 4 reserved behind the cached 2
    engine.clear_cache()  # the cached prefix is gone
    fill(res, chain_kv(1, 4))
    assert engine.commit_put(res) == 0
    assert used_and_reserved(engine) == (0, 0)
    assert engine.validate_cache_integrity()["is_valid"]


def test_commit_after_a_concurrent_put_of_the_same_chain(engine_factory: Any) -> None:
    engine = engine_factory()
    tokens, kv = make_tokens(1, 2), chain_kv(1, 2)
    res = reserve(engine, 1, 2)
    assert engine.put(tokens, kv) == 2  # another request stored it first
    fill(res, kv)
    assert engine.commit_put(res) == 0
    assert used_and_reserved(engine) == (2, 2)
    assert torch.equal(engine.get(tokens), kv)
    assert engine.validate_cache_integrity()["is_valid"]


def test_reservation_never_evicts(engine_factory: Any) -> None:
    """The bytes are not here yet: a reservation takes free slots only, so a put whose body
    never arrives cannot cost the cache a block; without room the caller stages the put."""
    engine = engine_factory(max_tokens=4 * BT)
    engine.put(make_tokens(1, 2), chain_kv(1, 2))
    engine.put(make_tokens(2, 1), chain_kv(2, 1))
    before = engine.cached_hashes()
    assert engine.reserve_put(engine.block_hashes(make_tokens(1, 4))) is None  # needs 2, 1 free
    assert engine.cached_hashes() == before
    res = reserve(engine, 1, 3)  # needs exactly the free one
    assert res.present == 2 and len(res.slots) == 1
    fill(res, chain_kv(1, 3))
    assert engine.commit_put(res) == 1
    assert torch.equal(engine.get(make_tokens(1, 3)), chain_kv(1, 3))
    assert engine.lookup(make_tokens(2, 1)) == BT


def test_no_reservation_unless_raw_rows(engine_factory: Any) -> None:
    engine = engine_factory(use_compression=True, compression_ratio=0.5)  # int8: encoded payloads
    assert not engine.stores_raw_rows
    assert engine.reserve_put(engine.block_hashes(make_tokens(1, 1))) is None


@pytest.mark.parametrize(
    "operation",
    [
        lambda e: e.compact_cache(),
        lambda e: e.validate_cache_integrity(),
        lambda e: e.reconfigure(max_tokens=16 * BT),
    ],
    ids=["compact", "validate", "resize"],
)
def test_structural_operations_wait_for_reservations(engine_factory: Any, operation: Any) -> None:
    engine = engine_factory(max_tokens=8 * BT)
    engine.put(make_tokens(1, 1), chain_kv(1, 1))
    engine.put(make_tokens(2, 1), chain_kv(2, 1))
    engine.lookup(make_tokens(1, 1))
    res = reserve(engine, 3, 2)
    finished = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            operation(engine)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finished.set()

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.2)
    assert not finished.is_set(), "the operation must wait for the reservation in flight"
    assert engine.reserve_put(engine.block_hashes(make_tokens(4, 1))) is None  # refused meanwhile
    assert engine.lookup(make_tokens(1, 1)) == BT  # reads go on
    fill(res, chain_kv(3, 2))
    assert engine.commit_put(res) == 2
    worker.join(timeout=10)
    assert finished.is_set() and not errors
    assert torch.equal(engine.get(make_tokens(3, 2)), chain_kv(3, 2))
    assert engine.validate_cache_integrity()["is_valid"]


ops = st.lists(
    st.tuples(st.sampled_from(["put", "reserve", "commit", "release"]), st.integers(0, 3), st.integers(1, 4)),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_invariants_under_interleaved_puts_and_reservations(script: list[tuple[str, int, int]]) -> None:
    """Used slots are always the indexed blocks plus the open reservations' slots; once every
    reservation ended, the cache validates and every cached prefix holds its chain's bytes."""
    engine = make_engine(max_tokens=8 * BT)
    open_: list[PutReservation] = []
    try:
        for op, chain, blocks in script:
            if op == "put":
                engine.put(make_tokens(chain, blocks), chain_kv(chain, blocks))
            elif op == "reserve":
                res = engine.reserve_put(engine.block_hashes(make_tokens(chain, blocks)))
                if res is not None:
                    fill(res, chain_kv(chain, blocks))
                    open_.append(res)
            elif open_:
                res = open_.pop(chain % len(open_))
                engine.commit_put(res) if op == "commit" else engine.release_put(res)
            reserved = sum(len(r.slots) for r in open_)
            used, cached = used_and_reserved(engine)
            assert used == cached + reserved <= 8
        for res in open_:
            engine.commit_put(res)
        assert engine.validate_cache_integrity()["is_valid"]
        for chain in range(4):
            tokens = make_tokens(chain, 4)
            n = engine.lookup(tokens)
            if n:
                assert torch.equal(engine.get(tokens[:n]), chain_kv(chain, 4)[:, :, :n])
    finally:
        engine.close()
