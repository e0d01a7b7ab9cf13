"""Model-side prefix reuse: run a causal LM on only the uncached part of a prompt.

The engine stores KV in the layout ``[2, num_layers, n_tokens, num_kv_heads, head_dim]``
(K then V, every layer, token-major). A transformers model keeps it in a ``DynamicCache`` whose
layers hold ``[batch, num_kv_heads, n_tokens, head_dim]`` tensors. This module converts
between the two, and runs the four stages of a cached request:

1. hash the prompt's full blocks under a namespace that includes the model identity
   (name, revision, dtype), so two models never share entries;
2. fetch the longest cached prefix and load it into a ``DynamicCache``;
3. prefill only the suffix (at least one token is always recomputed: the logits of the last
   prompt token are needed to pick the first output token, and the cache holds no logits);
4. greedy decode, then store the new full blocks.

Greedy output equals a run without the cache as long as the stored KV is bit-exact (the engine
dtype equals the model dtype and the codec is ``none``); a lossy codec trades that for space.

``ModelRunner(engine)`` is what ``KVCacheEngine.process_request`` delegates to; the
transformers helper (``kvcache_engine.integrations.transformers``) drives the same
``PrefixCachedGenerator`` with a remote client instead of an in-process engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from kvcache_engine.core.hashing import BlockHash, chain_hashes

if TYPE_CHECKING:
    from kvcache_engine.contract import KVCacheConfig
    from kvcache_engine.engine import KVCacheEngine

__all__ = [
    "EngineKVStore",
    "GenerationResult",
    "KVGeometry",
    "KVStore",
    "LoadedModel",
    "ModelIdentity",
    "ModelRunner",
    "PrefixCachedGenerator",
    "dynamic_cache_to_kv",
    "kv_to_dynamic_cache",
    "load_model",
    "model_identity",
    "parse_request",
]

MAX_NEW_TOKENS_LIMIT = 4096
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


# --- geometry and identity ------------------------------------------------------------------------


@dataclass(frozen=True)
class KVGeometry:
    """The shape of one token's KV: what must agree between a model and a cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_model_config(cls, config: Any) -> KVGeometry:
        """Geometry of a transformers (text) config; GQA models have fewer KV heads than heads."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
        return cls(int(text.num_hidden_layers), int(kv_heads), int(head_dim))

    @classmethod
    def from_engine_config(cls, config: KVCacheConfig) -> KVGeometry:
        return cls(config.num_layers, config.num_kv_heads, config.head_dim)

    def require_match(self, cache: KVGeometry, *, what: str = "model") -> None:
        """Raise ValueError naming every field that differs (model value vs cache value)."""
        diffs = [
            f"{name}: {what} has {getattr(self, name)}, cache has {getattr(cache, name)}"
            for name in ("num_layers", "num_kv_heads", "head_dim")
            if getattr(self, name) != getattr(cache, name)
        ]
        if diffs:
            raise ValueError(
                "KV geometry mismatch between the " + what + " and the cache: " + "; ".join(diffs)
            )


@dataclass(frozen=True)
class ModelIdentity:
    """Who produced a KV tensor. Part of every block key: KV from two models is never shared."""

    name: str
    revision: str
    dtype: str

    def namespace(self, base: str) -> str:
        """The hashing namespace: the cache's own namespace plus this identity. Kept within a
        config namespace's 253 characters (a long one is replaced by its digest)."""
        full = f"{base}|model={self.name}|revision={self.revision}|dtype={self.dtype}"
        if len(full) <= 253:
            return full
        return f"{base[:200]}|model-id={hashlib.blake2b(full.encode(), digest_size=16).hexdigest()}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fingerprint_parameters(model: Any) -> str:
    """Config plus a strided sample of every parameter: distinguishes checkpoints (and random
    initialisations with different seeds) without hashing every weight."""
    digest = hashlib.blake2b(digest_size=8)
    # Private keys (_name_or_path, _commit_hash, ...) name where the checkpoint was loaded from,
    # not what it is; transformers_version does not change the weights.
    shape = {
        k: v
        for k, v in model.config.to_dict().items()
        if not k.startswith("_") and k != "transformers_version"
    }
    digest.update(json.dumps(shape, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            sample = flat[::step][:256].to(torch.float32).cpu().contiguous()
            digest.update(name.encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def model_identity(model: Any, *, name: str | None = None, revision: str | None = None) -> ModelIdentity:
    """Identity of an in-memory model. ``revision`` defaults to the hub commit when known,
    else to a fingerprint of the config and weights."""
    config = model.config
    source = str(getattr(config, "name_or_path", "") or "")
    # A local checkpoint is named by its directory name, not its mount path: two pods that
    # mount one checkpoint at different paths must share entries.
    default_name = Path(source).name if source and Path(source).exists() else source
    quant = getattr(config, "quantization_config", None)
    gguf_file = quant.get("gguf_file") if isinstance(quant, dict) else getattr(quant, "gguf_file", None)
    if gguf_file:  # a GGUF checkpoint is named by its file, not by the directory holding it
        default_name = Path(str(gguf_file)).stem
    resolved_name = name or default_name or type(model).__name__
    resolved_rev = revision or getattr(config, "_commit_hash", None) or _fingerprint_parameters(model)
    return ModelIdentity(str(resolved_name), str(resolved_rev), _dtype_name(model.dtype))


# --- loading ------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and its identity."""

    model: Any
    tokenizer: Any
    identity: ModelIdentity


def load_model(
    model_path: str | os.PathLike[str], dtype: str = "float32", device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a local Hugging Face directory or a ``.gguf`` file (dequantised by transformers).

    Never reaches the network (``local_files_only``). Raises ValueError naming ``model_path``
    when it is neither.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(_TORCH_DTYPES)}, got {dtype!r}")
    path = Path(model_path)
    torch_dtype = _TORCH_DTYPES[dtype]
    model: Any
    if path.is_file() and path.suffix == ".gguf":
        kwargs: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch_dtype, **kwargs)
    elif path.is_dir() and (path / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)
    else:
        raise ValueError(
            f"model_path: expected a Hugging Face model directory (with config.json) or a .gguf file, "
            f"got {str(path)!r}"
        )
    model.to(device).eval()
    return LoadedModel(model, tokenizer, model_identity(model))


# --- layout conversion --------------------------------------------------------------------------------


def kv_to_dynamic_cache(kv: torch.Tensor, model_config: Any, device: torch.device | str = "cpu") -> Any:
    """``[2, L, n, H, D]`` → a ``DynamicCache`` holding n tokens (batch 1).

    Refuses models whose layers are not plain full attention (sliding windows, shared or
    linear-attention layers): their cache is not a per-token KV prefix.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache: Any = DynamicCache(config=model_config)
    unsupported = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if unsupported:
        raise ValueError(
            f"model: only full-attention layers can reuse cached KV; this model has {unsupported}"
        )
    if kv.dim() != 5 or kv.shape[0] != 2 or kv.shape[1] != len(cache.layers):
        raise ValueError(
            f"kv: expected [2, {len(cache.layers)}, n_tokens, num_kv_heads, head_dim], got {list(kv.shape)}"
        )
    # One host-to-device copy and one transposing copy for the whole prefix, instead of two
    # small strided copies per layer (60 of them for a 30-layer model).
    heads_major = kv.to(device).permute(0, 1, 3, 2, 4).contiguous()  # [2, L, H, n, D]
    for index, layer in enumerate(cache.layers):
        layer.update(heads_major[0, index].unsqueeze(0), heads_major[1, index].unsqueeze(0))
    return cache


def dynamic_cache_to_kv(cache: Any, start: int, end: int) -> torch.Tensor:
    """Tokens ``[start, end)`` of a batch-1 ``DynamicCache`` as a contiguous CPU ``[2, L, n, H, D]``."""
    keys = [layer.keys[0, :, start:end, :].permute(1, 0, 2) for layer in cache.layers]
    values = [layer.values[0, :, start:end, :].permute(1, 0, 2) for layer in cache.layers]
    return torch.stack([torch.stack(keys), torch.stack(values)]).cpu().contiguous()


# --- the store a generator talks to ---------------------------------------------------------------


@runtime_checkable
class KVStore(Protocol):
    """What the generator needs from a cache, already bound to one model identity: the store
    hashes token blocks under a namespace that includes the identity, so two models never
    share entries."""

    @property
    def block_tokens(self) -> int: ...

    @property
    def geometry(self) -> KVGeometry: ...

    @property
    def dtype(self) -> str: ...

    def fetch_prefix(self, tokens: Sequence[int]) -> torch.Tensor | None:
        """KV ``[2, L, n, H, D]`` of the longest cached prefix (n a multiple of block_tokens),
        or None when nothing is cached. Counts as one lookup in the cache's statistics."""
        ...

    def store(self, tokens: Sequence[int], kv: torch.Tensor) -> int:
        """Store the full blocks of ``tokens`` (``kv`` covers them all, from the first token);
        blocks already cached are kept. Returns blocks stored (or queued)."""
        ...


class EngineKVStore:
    """``KVStore`` over an in-process ``KVCacheEngine`` (hash-level API, identity namespace)."""

    def __init__(self, engine: KVCacheEngine, identity: ModelIdentity) -> None:
        self._engine = engine
        self.namespace = identity.namespace(engine.config.namespace)

    @property
    def block_tokens(self) -> int:
        return self._engine.config.block_tokens

    @property
    def geometry(self) -> KVGeometry:
        return KVGeometry.from_engine_config(self._engine.config)

    @property
    def dtype(self) -> str:
        return self._engine.config.dtype

    def _hashes(self, tokens: Sequence[int]) -> list[BlockHash]:
        return chain_hashes(self.namespace, tokens, self.block_tokens)

    def fetch_prefix(self, tokens: Sequence[int]) -> torch.Tensor | None:
        hashes = self._hashes(tokens)
        if not hashes or self._engine.lookup_hashes(hashes) == 0:
            return None
        kv = self._engine.get_hashes(hashes)
        return kv if kv.shape[2] else None

    def store(self, tokens: Sequence[int], kv: torch.Tensor) -> int:
        # The engine touches blocks it already holds and stores the rest, parents first.
        return self._engine.put_blocks_raw(self._hashes(tokens), kv)


# --- generation -----------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """Outcome of one cached request. Token counts refer to the prompt."""

    prompt_ids: list[int]
    output_ids: list[int]
    cached_tokens: int
    computed_tokens: int
    stored_blocks: int
    ttft_ms: float
    latency_ms: float
    timings_ms: dict[str, float] = field(default_factory=dict)


class PrefixCachedGenerator:
    """Greedy generation for one batch-1 causal LM with its KV prefix kept in a ``KVStore``.

    Invariants: ``cached_tokens + computed_tokens == len(prompt)``; ``computed_tokens >= 1``;
    ``cached_tokens`` is what was actually loaded (a block evicted between lookup and get
    shrinks it, never breaks the request).
    """

    def __init__(self, model: Any, store: KVStore) -> None:
        KVGeometry.from_model_config(model.config).require_match(store.geometry)
        self.model = model
        self.store = store
        self._device = next(model.parameters()).device
        # transformers >= 5.2x calls the cache argument ``cache`` (``past_key_values`` is
        # deprecated there); older releases only know ``past_key_values``.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._dtype = model.dtype

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> GenerationResult:
        """Prefill the uncached suffix, decode greedily, store new full blocks."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("prompt: expected at least one token")
        started = time.perf_counter()
        marks: dict[str, float] = {}

        # Stage 1-2: the longest cached prefix, loaded into the model's cache object.
        cache, cached, have_tokens = self._load_prefix(ids)
        marks["load_ms"] = (time.perf_counter() - started) * 1e3

        # Stage 3: prefill the suffix; its last position's logits give the first token.
        suffix = torch.tensor([ids[cached:]], dtype=torch.long, device=self._device)
        # logits_to_keep=1: only the last position's logits are needed (a 2k-token prompt's full
        # logits over a 49k vocabulary would be 400 MB of float32).
        out = self._forward(suffix, cache, logits_to_keep=1)
        cache = _cache_of(out)
        next_token = int(out.logits[0, -1].argmax())
        ttft_ms = (time.perf_counter() - started) * 1e3
        marks["prefill_ms"] = ttft_ms - marks["load_ms"]

        # Stage 4: greedy decode, then store every full block whose KV the cache now holds.
        output = self._decode(cache, next_token, max_new_tokens, _eos_set(eos_token_id))
        decode_done = time.perf_counter()
        marks["decode_ms"] = (decode_done - started) * 1e3 - ttft_ms
        stored = self._store(cache, ids + output[:-1], have_tokens)
        marks["store_ms"] = (time.perf_counter() - decode_done) * 1e3
        return GenerationResult(
            prompt_ids=ids,
            output_ids=output,
            cached_tokens=cached,
            computed_tokens=len(ids) - cached,
            stored_blocks=stored,
            ttft_ms=ttft_ms,
            latency_ms=(time.perf_counter() - started) * 1e3,
            timings_ms=marks,
        )

    def _load_prefix(self, ids: list[int]) -> tuple[Any, int, int]:
        """Returns (cache or None, tokens loaded, tokens the store holds).

        The fetched tensor's length is the truth (blocks may be evicted between a lookup and
        a get). The last prompt token always stays uncached: its logits are needed.
        """
        if len(ids) < self.store.block_tokens:
            return None, 0, 0
        kv = self.store.fetch_prefix(ids)
        have = 0 if kv is None else int(kv.shape[2])
        usable = min(have, len(ids) - 1)
        if kv is None or usable <= 0:
            return None, 0, have
        kv = kv[:, :, :usable].to(self._dtype)
        return kv_to_dynamic_cache(kv, self.model.config, self._device), usable, have

    def _forward(self, input_ids: torch.Tensor, cache: Any, **kwargs: Any) -> Any:
        return self.model(input_ids=input_ids, use_cache=True, **{self._cache_arg: cache}, **kwargs)

    def _decode(self, cache: Any, first: int, max_new_tokens: int, eos: set[int]) -> list[int]:
        output = [first] if max_new_tokens > 0 else []
        while output and len(output) < max_new_tokens and output[-1] not in eos:
            step = torch.tensor([[output[-1]]], dtype=torch.long, device=self._device)
            out = self._forward(step, cache)
            cache = _cache_of(out)
            output.append(int(out.logits[0, -1].argmax()))
        return output

    def _store(self, cache: Any, kv_ids: list[int], have_tokens: int) -> int:
        """Store the full blocks of ``kv_ids`` (the tokens whose KV ``cache`` holds) when the
        store lacks some. Generated tokens are stored too: a follow-up turn's prompt contains
        them."""
        bt = self.store.block_tokens
        full = min(len(kv_ids), int(cache.get_seq_length())) // bt * bt
        if full <= have_tokens:
            return 0
        kv = dynamic_cache_to_kv(cache, 0, full).to(_TORCH_DTYPES[self.store.dtype])
        return self.store.store(kv_ids[:full], kv)


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _eos_set(eos: int | Sequence[int] | None) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(t) for t in eos}


# --- requests -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceRequest:
    """A validated ``process_request`` body."""

    text: str | None
    input_ids: list[int] | None
    max_new_tokens: int
    return_text: bool


def parse_request(request: Any) -> InferenceRequest:
    """Validate a request dict: ``text`` (str) or ``input_ids`` (list of ints), optional
    ``max_new_tokens`` (0..4096, default 0: prefill only) and ``return_text`` (default True)."""
    if not isinstance(request, dict):
        raise ValueError(f"request: expected a dict, got {type(request).__name__}")
    unknown = sorted(set(request) - {"text", "input_ids", "max_new_tokens", "return_text"})
    if unknown:
        raise ValueError(
            f"request: unknown fields {unknown}; supported: text, input_ids, max_new_tokens, return_text"
        )
    text, ids = request.get("text"), request.get("input_ids")
    if (text is None) == (ids is None):
        raise ValueError("request: expected exactly one of 'text' (str) or 'input_ids' (list of ints)")
    if text is not None and (not isinstance(text, str) or not text):
        raise ValueError("text: expected a non-empty string")
    if ids is not None and (
        not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids)
    ):
        raise ValueError("input_ids: expected a non-empty list of non-negative ints")
    max_new = request.get("max_new_tokens", 0)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or not 0 <= max_new <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens: expected an int in 0..{MAX_NEW_TOKENS_LIMIT}, got {max_new!r}")
    return_text = request.get("return_text", True)
    if not isinstance(return_text, bool):
        raise ValueError(f"return_text: expected a bool, got {return_text!r}")
    return InferenceRequest(text, ids, max_new, return_text)


class ModelRunner:
    """Serves ``process_request`` for an engine whose config names a ``model_path``.

    The model is loaded in the engine's dtype (so stored KV round-trips bit-exactly with the
    ``none`` codec) and must match the engine's KV geometry. Requests are serialised on one
    lock: a batch-1 model forward is not re-entrant, and running two at once on shared cores
    only slows both.
    """

    def __init__(self, engine: KVCacheEngine, loaded: LoadedModel | None = None) -> None:
        if loaded is None:
            if not engine.config.model_path:
                raise ValueError("model_path: process_request needs the engine config's model_path set")
            # On the engine's device: a GPU engine runs its model on that GPU too.
            loaded = load_model(engine.config.model_path, engine.config.dtype, engine.device)
        self.engine = engine
        self.loaded = loaded
        self.generator = PrefixCachedGenerator(loaded.model, EngineKVStore(engine, loaded.identity))
        self._lock = threading.Lock()

    def tokenize(self, req: InferenceRequest) -> list[int]:
        if req.input_ids is not None:
            return list(req.input_ids)
        ids: list[int] = self.loaded.tokenizer(req.text, add_special_tokens=True)["input_ids"]
        return ids

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request, synchronously. Returns cached/computed tokens, timings, output."""
        req = parse_request(request)
        ids = self.tokenize(req)
        tokenizer = self.loaded.tokenizer
        with self._lock:
            result = self.generator.generate(
                ids, req.max_new_tokens, getattr(tokenizer, "eos_token_id", None)
            )
        answer: dict[str, Any] = {
            "prompt_tokens": len(ids),
            "cached_tokens": result.cached_tokens,
            "computed_tokens": result.computed_tokens,
            "stored_blocks": result.stored_blocks,
            "latency_ms": result.latency_ms,
            "ttft_ms": result.ttft_ms,
            "output_ids": result.output_ids,
        }
        if req.return_text and req.max_new_tokens > 0:
            answer["text"] = tokenizer.decode(result.output_ids, skip_special_tokens=True)
        return answer

    async def process_request(self, request: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self.run, request)

    def process_request_sync(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.run(request)

    async def process_batch_optimized(
        self, requests: list[dict[str, Any]], batch_size: int = 20
    ) -> list[dict[str, Any]]:
        """Runs requests in chunks of ``batch_size``; answers come back in input order.

        Within a chunk, requests are ordered by token sequence so that those sharing a prefix
        run back to back: the first computes and stores the shared blocks, the rest load them.
        Identical prompts in a chunk are computed once. Errors in one request are reported in
        its answer (``{"error": ...}``) and do not fail the batch.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not isinstance(requests, list):
            raise ValueError(f"requests: expected a list of request dicts, got {type(requests).__name__}")
        answers: list[dict[str, Any]] = [{} for _ in requests]
        for start in range(0, len(requests), batch_size):
            chunk = list(range(start, min(start + batch_size, len(requests))))
            await asyncio.to_thread(self._run_chunk, requests, chunk, answers)
        return answers

    def _run_chunk(
        self, requests: list[dict[str, Any]], indices: list[int], answers: list[dict[str, Any]]
    ) -> None:
        keyed: list[tuple[tuple[int, ...], int, int]] = []
        for index in indices:
            try:
                req = parse_request(requests[index])
                keyed.append((tuple(self.tokenize(req)), req.max_new_tokens, index))
            except ValueError as exc:
                answers[index] = {"error": str(exc)}
        done: dict[tuple[tuple[int, ...], int, bool], dict[str, Any]] = {}
        for ids, max_new, index in sorted(keyed):
            req_dict = dict(requests[index])
            key = (ids, max_new, bool(req_dict.get("return_text", True)))
            if key in done:
                answers[index] = {**done[key], "deduplicated": True}
                continue
            req_dict.pop("text", None)
            req_dict["input_ids"] = list(ids)
            answer = self.run(req_dict)
            done[key] = answer
            answers[index] = answer
