"""The put body's scatter into slots (server.body.BodyViews.for_blocks): the bytes land where the
wire layout says, whatever the chunking, and with the C kernel each block's checksum, folded in
as its bytes land (block_pool.ScatterSums), equals the checksum of its payload."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_engine.core import block_pool
from kvcache_engine.core.block_pool import payload_checksum
from kvcache_engine.server import BadRequestError
from kvcache_engine.server.body import BodyViews


def chunked(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=120, deadline=None)
@given(
    planes=st.integers(1, 4),
    words_per_piece=st.integers(1, 6),
    present=st.lists(st.booleans(), min_size=1, max_size=4),
    tail=st.sampled_from([0, 3, 8]),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
    native=st.booleans(),
)
def test_scatter_places_bytes_and_checksums_whatever_the_chunking(
    planes: int, words_per_piece: int, present: list[bool], tail: int, cuts: list[int], native: bool
) -> None:
    if native and not block_pool.ScatterSums.available():
        pytest.skip("C kernel not built (covered by test_checksum's build check)")
    piece = 4 * words_per_piece
    n = len(present)
    slots = [bytearray(planes * piece) if p else None for p in present]
    targets = [memoryview(s) if s is not None else None for s in slots]
    plane_bytes = n * piece + tail
    body = os.urandom(planes * plane_bytes)
    saved = block_pool.NATIVE_SCATTER
    if not native:
        block_pool.NATIVE_SCATTER = None
    try:
        views = BodyViews.for_blocks(targets, planes, plane_bytes, piece)
        assert (views.sums is not None) == native
        for i, part in enumerate(chunked(body, cuts)):
            views.feed(part if i % 2 else memoryview(bytearray(part)))  # bytes or a buffer
        with pytest.raises(BadRequestError, match="longer than its Content-Length"):
            views.feed(b"x")
    finally:
        block_pool.NATIVE_SCATTER = saved
    for j, slot in enumerate(slots):
        if slot is None:
            continue
        want = b"".join(
            body[p * plane_bytes + j * piece : p * plane_bytes + (j + 1) * piece] for p in range(planes)
        )
        assert bytes(slot) == want
    if native:
        assert views.sums is not None
        want_sums = [
            payload_checksum({"kv": torch.frombuffer(bytearray(s), dtype=torch.uint8)})
            for s in slots
            if s is not None
        ]
        assert views.sums.digests() == want_sums


def test_scatter_digests_need_the_whole_body() -> None:
    if not block_pool.ScatterSums.available():
        pytest.skip("C kernel not built (covered by test_checksum's build check)")
    views = BodyViews.for_blocks([memoryview(bytearray(8))], 2, 4, 4)
    assert views.sums is not None
    views.feed(b"abcde")
    with pytest.raises(ValueError, match="5 of 8 bytes fed"):
        views.sums.digests()


def test_scatter_refuses_targets_it_would_overrun() -> None:
    """The kernel writes planes x piece bytes into each target: a shorter or read-only one is
    refused up front, never written past."""
    if not block_pool.ScatterSums.available():
        pytest.skip("C kernel not built (covered by test_checksum's build check)")
    with pytest.raises(ValueError, match="writable buffer of 8 bytes"):
        block_pool.ScatterSums([memoryview(bytearray(4))], 4, 4, 8)
    with pytest.raises(ValueError, match="writable buffer of 8 bytes"):
        block_pool.ScatterSums([memoryview(bytes(8))], 4, 4, 8)


def test_unaligned_pieces_take_the_plain_scatter() -> None:
    """A piece that is not whole words (odd geometries) cannot fold per piece: the engine then
    checksums the slots at commit."""
    views = BodyViews.for_blocks([memoryview(bytearray(6))], 2, 3, 3)
    assert views.sums is None
    views.feed(b"abcdef")
    assert views.filled == 6
