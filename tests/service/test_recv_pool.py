"""The client's warm receive buffers (``client.buffers.RecvPool``): a tensor handed to a caller is never
reused while the caller (or a view, or an array sharing its memory) can still reach it."""

from __future__ import annotations

import gc

import torch

from kvcache_engine.client.buffers import RecvPool


def test_a_held_result_is_never_handed_out_again() -> None:
    pool = RecvPool(1 << 20)
    first = pool.tensor([4, 8], torch.float16)
    first.fill_(1.0)
    second = pool.tensor([4, 8], torch.float16)
    second.fill_(2.0)
    assert torch.all(first == 1.0), "a live result was overwritten"
    assert first.data_ptr() != second.data_ptr()


def test_a_view_or_array_keeps_the_memory_reserved() -> None:
    pool = RecvPool(1 << 20)
    result = pool.tensor([2, 16], torch.float16)
    ptr = result.data_ptr()
    view = result[1]
    array = result.numpy()
    del result
    gc.collect()
    assert pool.tensor([2, 16], torch.float16).data_ptr() != ptr  # the view still holds it
    del view
    gc.collect()
    assert pool.tensor([2, 16], torch.float16).data_ptr() != ptr  # the array still holds it
    del array
    gc.collect()
    assert pool.tensor([2, 16], torch.float16).data_ptr() == ptr  # now free: reused warm


def test_budget_bounds_the_pool_and_zero_disables_it() -> None:
    pool = RecvPool(1024)
    held = pool.tensor([256], torch.float16)  # 512 bytes, pooled
    other = pool.tensor([256], torch.float16)  # the remaining 512 bytes
    extra = pool.tensor([256], torch.float16)  # over budget: a plain tensor, not pooled
    assert len({held.data_ptr(), other.data_ptr(), extra.data_ptr()}) == 3
    assert sum(len(b) for b in pool._bufs) <= 1024
    off = RecvPool(0)
    a = off.tensor([8], torch.float16)
    assert not off._bufs and a.shape == (8,)


def test_free_smaller_buffers_make_room_for_a_larger_one() -> None:
    pool = RecvPool(1024)
    small = pool.tensor([128], torch.float16)  # 256 bytes
    del small
    big = pool.tensor([512], torch.float16)  # 1024 bytes: the free small one is dropped
    assert big.shape == (512,) and [len(b) for b in pool._bufs] == [1024]
