from __future__ import annotations

import pytest
import torch

from kvcache_engine.contract import payload_layout
from kvcache_engine.core.block_pool import BlockPool, payload_checksum
from kvcache_engine.core.compression import make_codec


def make_pool(slots: int = 4, codec: str = "none") -> BlockPool:
    return BlockPool(
        payload_layout(codec, num_layers=1, block_tokens=4, num_kv_heads=1, head_dim=8),
        slots,
        torch.device("cpu"),
    )


def test_allocate_lowest_first_until_full_then_none() -> None:
    pool = make_pool(3)
    assert [pool.allocate(), pool.allocate(), pool.allocate(), pool.allocate()] == [0, 1, 2, None]
    pool.free(1)
    assert pool.used == 2 and pool.free_count == 1
    assert pool.allocate() == 1


def test_double_free_is_refused() -> None:
    pool = make_pool(2)
    slot = pool.allocate()
    assert slot is not None
    pool.free(slot)
    with pytest.raises(ValueError, match="not in use"):
        pool.free(slot)


def test_storage_is_one_preallocated_tensor_that_never_moves() -> None:
    pool = make_pool(8, "int4")
    ptr, shape = pool.storage.data_ptr(), tuple(pool.storage.shape)
    codec = make_codec("int4", num_layers=1, block_tokens=4, num_kv_heads=1, head_dim=8)
    for i in range(64):
        slot = pool.allocate()
        assert slot is not None
        pool.write(slot, codec.encode(torch.randn(2, 1, 4, 1, 8).half()))
        if i % 8 != 7:  # keep every 8th block: the pool ends up full, never over
            pool.free(slot)
    assert pool.used == 8 and pool.allocate() is None
    assert pool.storage.data_ptr() == ptr and tuple(pool.storage.shape) == shape
    assert pool.nbytes == 8 * codec.stored_bytes()


def test_write_read_round_trip_and_checksum_matches_payload() -> None:
    pool = make_pool(2)
    kv = torch.randn(2, 1, 4, 1, 8).half()
    slot = pool.allocate()
    assert slot is not None
    pool.write(slot, {"kv": kv})
    assert torch.equal(pool.read(slot)["kv"], kv)
    assert pool.checksum(slot) == payload_checksum({"kv": kv})
    pool.storage[slot, 3] ^= 1
    assert pool.checksum(slot) != payload_checksum({"kv": kv})


def test_compact_moves_live_slots_to_the_front() -> None:
    pool = make_pool(6)
    slots = [pool.allocate() for _ in range(6)]
    assert slots == [0, 1, 2, 3, 4, 5]
    for i in range(6):
        pool.storage[i].fill_(i)
    for s in (0, 2, 3):
        pool.free(s)
    moves = pool.compact()
    assert moves == {4: 0, 5: 2}
    assert [int(pool.storage[i, 0]) for i in (0, 1, 2)] == [4, 1, 5]
    assert [pool.in_use(i) for i in range(6)] == [True, True, True, False, False, False]
    assert pool.allocate() == 3
