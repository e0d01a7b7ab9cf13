"""Tiny worlds for the inference tests: a random-weight Llama, a byte tokenizer, a dict store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcache_engine.hashing import BlockHash
from kvcache_engine.inference import KVGeometry

TINY_GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=16)
BOS, EOS = 256, 257


def make_tiny_llama(geometry: KVGeometry = TINY_GEOMETRY, seed: int = 0, vocab_size: int = 260) -> Any:
    """A float32 LlamaForCausalLM with random weights and the given KV geometry.

    initializer_range is large so logits are peaked: greedy argmax is then far from ties and
    the comparison with/without the cache tests the KV, not float rounding luck.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = geometry.num_kv_heads * 2
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=heads * geometry.head_dim,
        intermediate_size=4 * heads * geometry.head_dim,
        num_hidden_layers=geometry.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=geometry.num_kv_heads,
        head_dim=geometry.head_dim,
        max_position_embeddings=1024,
        initializer_range=0.2,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model


def make_byte_tokenizer() -> Any:
    """Byte-level tokenizer: ids 0..255 are bytes, 256 = <s> (prepended), 257 = </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), _byte_chars(), strict=True)}
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {c: b for b, c in byte_to_char.items()}
    vocab["<s>"], vocab["</s>"] = BOS, EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def _byte_chars() -> list[str]:
    """GPT-2's printable-character mapping of the 256 byte values (what ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def make_model_dir(root: Path, geometry: KVGeometry = TINY_GEOMETRY, seed: int = 0) -> Path:
    """A local Hugging Face directory (config, safetensors weights, tokenizer) of a tiny Llama."""
    path = root / f"tiny-llama-{seed}"
    make_tiny_llama(geometry, seed).save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


class DictKVStore:
    """An in-memory ``KVStore``: hash → one block's KV ``[2, L, bt, H, D]``; chains must be
    stored root first (a block is only stored when its parent is present or it is a root)."""

    def __init__(
        self, geometry: KVGeometry = TINY_GEOMETRY, block_tokens: int = 4, namespace: str = "t"
    ) -> None:
        self.blocks: dict[int, torch.Tensor] = {}
        self.lookups = 0
        self._geometry, self._bt, self._ns = geometry, block_tokens, namespace

    @property
    def block_tokens(self) -> int:
        return self._bt

    @property
    def geometry(self) -> KVGeometry:
        return self._geometry

    @property
    def namespace(self) -> str:
        return self._ns

    @property
    def dtype(self) -> str:
        return "float32"

    def lookup_hashes(self, hashes: Sequence[BlockHash]) -> int:
        self.lookups += 1
        n = 0
        while n < len(hashes) and hashes[n] in self.blocks:
            n += 1
        return n

    def get_hashes(self, hashes: Sequence[BlockHash]) -> torch.Tensor:
        n = 0
        while n < len(hashes) and hashes[n] in self.blocks:
            n += 1
        g = self._geometry
        if n == 0:
            return torch.empty(2, g.num_layers, 0, g.num_kv_heads, g.head_dim)
        return torch.cat([self.blocks[h] for h in hashes[:n]], dim=2)

    def put_hashes(self, hashes: Sequence[BlockHash], kv: torch.Tensor, *, known_blocks: int = 0) -> int:
        assert kv.shape[2] == len(hashes) * self._bt
        assert all(h in self.blocks for h in hashes[:known_blocks])
        stored = 0
        for i, h in enumerate(hashes):
            if h not in self.blocks:
                self.blocks[h] = kv[:, :, i * self._bt : (i + 1) * self._bt].clone()
                stored += 1
        return stored


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    return make_tiny_llama()


@pytest.fixture(scope="session")
def byte_tokenizer() -> Any:
    return make_byte_tokenizer()
