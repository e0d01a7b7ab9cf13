from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kvcache_engine.core.hashing import chain_hashes


def test_one_hash_per_full_block_partial_tail_ignored() -> None:
    assert len(chain_hashes("m", list(range(11)), 4)) == 2
    assert chain_hashes("m", list(range(11)), 4) == chain_hashes("m", list(range(8)), 4)
    assert chain_hashes("m", [1, 2, 3], 4) == []


def test_hash_names_the_whole_prefix() -> None:
    a = chain_hashes("m", [1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = chain_hashes("m", [9, 2, 3, 4, 5, 6, 7, 8], 4)
    # Same second block's tokens, different first block: the second hash differs too.
    assert a[0] != b[0] and a[1] != b[1]


def test_namespace_separates_models() -> None:
    assert chain_hashes("llama", [1, 2, 3, 4], 4) != chain_hashes("qwen", [1, 2, 3, 4], 4)


def test_values_are_unsigned_64_bit_and_stable() -> None:
    hs = chain_hashes("default", list(range(32)), 16)
    assert all(0 <= h < 2**64 for h in hs)
    assert hs == chain_hashes("default", list(range(32)), 16)


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="block_tokens"):
        chain_hashes("m", [1, 2], 0)
    with pytest.raises(ValueError, match="tokens"):
        chain_hashes("m", [2**70, 1, 2, 3], 4)


@given(
    st.lists(st.integers(min_value=0, max_value=2**31), max_size=40), st.integers(min_value=1, max_value=8)
)
def test_prefix_property(tokens: list[int], bt: int) -> None:
    full = chain_hashes("ns", tokens, bt)
    for cut in range(0, len(tokens) + 1):
        assert chain_hashes("ns", tokens[:cut], bt) == full[: cut // bt]


def test_tensor_tokens_hash_like_lists() -> None:
    t = torch.arange(16, dtype=torch.int32)
    assert chain_hashes("m", t.tolist(), 4) == chain_hashes("m", list(range(16)), 4)
