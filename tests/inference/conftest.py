"""Tiny worlds for the inference tests: a random-weight Llama, a byte tokenizer, a dict store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from kvcache_engine.core.hashing import BlockHash, chain_hashes
from kvcache_engine.inference import KVGeometry, ModelIdentity

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
    """An in-memory ``KVStore``: block hash → that block's KV ``[2, L, bt, H, D]``. Stores that
    share ``blocks`` but are bound to different identities model two models on one cache."""

    def __init__(
        self,
        identity: ModelIdentity,
        *,
        geometry: KVGeometry = TINY_GEOMETRY,
        block_tokens: int = 4,
        blocks: dict[int, torch.Tensor] | None = None,
    ) -> None:
        self.blocks: dict[int, torch.Tensor] = {} if blocks is None else blocks
        self.namespace = identity.namespace("test")
        self._geometry, self._bt = geometry, block_tokens

    @property
    def block_tokens(self) -> int:
        return self._bt

    @property
    def geometry(self) -> KVGeometry:
        return self._geometry

    @property
    def dtype(self) -> str:
        return "float32"

    def hashes(self, tokens: Sequence[int]) -> list[BlockHash]:
        return chain_hashes(self.namespace, tokens, self._bt)

    def fetch_prefix(self, tokens: Sequence[int]) -> torch.Tensor | None:
        found = []
        for h in self.hashes(tokens):
            if h not in self.blocks:
                break
            found.append(self.blocks[h])
        return torch.cat(found, dim=2) if found else None

    def store(self, tokens: Sequence[int], kv: torch.Tensor) -> int:
        hashes = self.hashes(tokens)
        assert kv.shape[2] == len(hashes) * self._bt == len(tokens)
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


class EngineServerProcess:
    """A real ``kvcache-engine serve`` on 127.0.0.1:<free port> with a token file."""

    TOKEN = "inference-test-token"

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "engine.json"
        self.config_path.write_text(json.dumps(config))
        self.token_file = workdir / "token"
        self.token_file.write_text(self.TOKEN + "\n")
        self.log = workdir / "engine.log"
        args = [
            sys.executable, "-m", "kvcache_engine.cli", "serve", "--config", str(self.config_path),
            "--host", "127.0.0.1", "--port", "0", "--token-file", str(self.token_file),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"engine did not start: {line!r}\n{self.log.read_text()[-3000:]}")
        self.url = line.strip().rsplit(" ", 1)[-1]
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.url} not ready after {timeout_s}s")

    def get_json(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def engine_server(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``engine_server(**config)`` -> a started EngineServerProcess (killed after)."""
    made: list[EngineServerProcess] = []

    def factory(**config: Any) -> EngineServerProcess:
        server = EngineServerProcess(tmp_path / f"engine{len(made)}", config)
        made.append(server)
        return server

    yield factory
    for server in made:
        server.stop()
