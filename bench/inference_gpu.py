"""Inference with the cache on a CUDA GPU: TTFT of a 2,048-token prompt, 1,920 tokens cached.

Random-weight Llama models in SmolLM2-135M's and Llama-3-8B's shapes (float16 on the GPU; the
timing does not depend on the weights), the engine's pool on the GPU or on the CPU. Reports the
uncached and cached TTFT and where the cached path spends its time: the engine ``get`` of the
1,920 cached tokens, loading them into the model's ``DynamicCache``, and the 128-token prefill.
On a host without CUDA it says so and exits 0.

Run: ``python -m bench.inference_gpu [--reps N] [--shapes smollm2-135m,llama-8b]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

CACHED_TOKENS, SUFFIX_TOKENS = 1920, 128

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True,
    },
    "llama-8b": {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
    },
}  # fmt: skip


def bench_shape(name: str, pool: str, reps: int) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcache_engine.engine import KVCacheEngine
    from kvcache_engine.inference import EngineKVStore, PrefixCachedGenerator, model_identity

    cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=100000.0, **SHAPES[name])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    engine = KVCacheEngine(
        max_tokens=16384,
        block_tokens=16,
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        dtype="float16",
        device=pool,
        enable_gc=False,
    )
    store = EngineKVStore(engine, model_identity(model, name=name, revision="random"))
    gen = PrefixCachedGenerator(model, store)
    ids = torch.randint(
        0, 32000, (CACHED_TOKENS + SUFFIX_TOKENS * (reps + 1),), generator=torch.Generator().manual_seed(1)
    )
    shared, rest = ids[:CACHED_TOKENS].tolist(), ids[CACHED_TOKENS:].tolist()
    suffixes = [rest[i * SUFFIX_TOKENS : (i + 1) * SUFFIX_TOKENS] for i in range(reps + 1)]

    def first_token(prompt: list[int]) -> Any:
        torch.cuda.synchronize()
        result = gen.generate(prompt, 1)
        torch.cuda.synchronize()
        return result

    for _ in range(3):  # warm-up: kernels, allocator
        engine.clear_cache()
        first_token(shared + suffixes[0])
    uncached = []
    for suffix in suffixes[1:]:
        engine.clear_cache()
        uncached.append(first_token(shared + suffix).ttft_ms)
    engine.clear_cache()
    gen.generate(shared, 0)
    cached, gets, loads, prefills = [], [], [], []
    for suffix in suffixes[1:]:
        started = time.perf_counter()
        store.fetch_prefix(shared)
        gets.append((time.perf_counter() - started) * 1e3)
        result = first_token(shared + suffix)
        assert result.cached_tokens == CACHED_TOKENS, result.cached_tokens
        cached.append(result.ttft_ms)
        loads.append(result.timings_ms["load_ms"])
        prefills.append(result.timings_ms["prefill_ms"])
    engine.close()
    del model
    torch.cuda.empty_cache()
    med = statistics.median
    return {
        "uncached_ms": med(uncached), "cached_ms": med(cached), "engine_get_ms": med(gets),
        "load_ms": med(loads), "prefill_ms": med(prefills),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument(
        "--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}"
    )
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("inference_gpu: no CUDA device; nothing to measure")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"TTFT on {torch.cuda.get_device_name(0)}, 2,048 tokens, 1,920 cached (float16)")
    for column in (
        "shape",
        "pool",
        "uncached ms",
        "cached ms",
        "engine get ms",
        "load ms",
        "suffix prefill ms",
    ):
        table.add_column(column, justify="right")
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise ValueError(f"--shapes: unknown shape {name!r}; supported: {', '.join(SHAPES)}")
        for pool in ("cuda", "cpu"):
            r = bench_shape(name, pool, args.reps)
            table.add_row(
                name,
                pool,
                *(
                    f"{r[k]:.1f}"
                    for k in ("uncached_ms", "cached_ms", "engine_get_ms", "load_ms", "prefill_ms")
                ),
            )
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
