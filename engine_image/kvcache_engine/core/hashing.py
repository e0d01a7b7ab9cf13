"""Chained block hashes: the identity of a cached KV block (torch-free).

A block's hash covers the namespace (model key), its parent's hash and its own token ids, so a
hash names the whole prefix up to and including that block: two prompts share a block exactly
when they share every token up to its end. Only full blocks are hashed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import NewType

__all__ = ["ROOT_PARENT", "BlockHash", "chain_hashes", "namespace_hasher"]

BlockHash = NewType("BlockHash", int)
"""Unsigned 64-bit block identity: blake2b (digest_size=8) of namespace, parent and token ids."""

ROOT_PARENT = 0
"""The parent value hashed into the first block of a chain."""

_PERSON = b"kvcache-blk-v1"


def namespace_hasher(namespace: str) -> hashlib.blake2b:
    """A blake2b state that already absorbed the namespace (copied once per block)."""
    h = hashlib.blake2b(digest_size=8, person=_PERSON)
    h.update(namespace.encode("utf-8") + b"\x00")
    return h


def chain_hashes(namespace: str, tokens: Sequence[int], block_tokens: int) -> list[BlockHash]:
    """One hash per FULL block: ``h_i = H(namespace, h_{i-1} (or 0), token ids of block i)``.

    Token ids are hashed as little-endian signed 64-bit integers. Raises ValueError naming
    ``tokens`` for ids outside that range and ``block_tokens`` when it is not positive.
    """
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    base = namespace_hasher(namespace)
    out: list[BlockHash] = []
    parent = ROOT_PARENT
    full = len(tokens) - len(tokens) % block_tokens
    try:
        packed = array("q", tokens[:full])
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"tokens: expected signed 64-bit integer token ids ({exc})") from None
    raw = packed.tobytes()
    step = block_tokens * 8
    for start in range(0, len(raw), step):
        h = base.copy()
        h.update(parent.to_bytes(8, "little"))
        h.update(raw[start : start + step])
        parent = int.from_bytes(h.digest(), "little")
        out.append(BlockHash(parent))
    return out
