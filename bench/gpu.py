"""GPU benchmarks: the CUDA tier, GPU<->CPU block transfers and the codecs on the GPU.

    python -m bench.gpu [--blocks 256] [--json]

On a host without CUDA it prints that there is no GPU and exits 0. On CUDA it measures, for a
Llama-8B-shaped block (32 layers, 8 KV heads, head_dim 128, 16 tokens, fp16: 2 MiB):
1. a raw pinned copy of N blocks' bytes as one tensor, host->device and device->host;
2. the same bytes moved slot by slot by the engine's TierCopier between a GPU pool and a pinned
   CPU pool (what demotion and prefetch do), and its ratio to (1) (target >= 90 %);
3. an engine on CUDA with a CPU tier: puts that demote, lookups that promote (prefetch), a
   bit-exact round trip and a clean integrity check;
4. int8/int4/fp8 encode, decode and encode+decode GB/s of fp16 input (target >= 200 GB/s).
5. a real ``kvcache-engine serve`` on CUDA with a CPU tier, driven through KVCacheClient over HTTP:
   4 chains of 16 blocks into a 48-block GPU tier (earlier chains demote), each read back
   bit-exact, GB/s both ways.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import torch

LLAMA8B = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "block_tokens": 16}
GIB = 1024**3


def _cuda_time(fn: Callable[[], None], repeat: int = 5) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs, timed with CUDA events after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def _discard(_: object) -> None:
    """Timed lambdas must return None; the result's kernels are already queued."""


def _block_bytes() -> int:
    g = LLAMA8B
    return 2 * g["num_layers"] * g["block_tokens"] * g["num_kv_heads"] * g["head_dim"] * 2


def bench_transfers(blocks: int) -> list[dict[str, Any]]:
    """Raw pinned copy vs TierCopier slot copies, both directions."""
    from kvcache_engine.contract import payload_layout
    from kvcache_engine.core.block_pool import BlockPool
    from kvcache_engine.core.tiers import TierCopier

    device = torch.device("cuda", torch.cuda.current_device())
    layout = payload_layout("none", **LLAMA8B)
    gpu = BlockPool(layout, blocks, device)
    cpu = BlockPool(layout, blocks, torch.device("cpu"), pin_memory=True)
    gpu.storage.random_(0, 255)
    nbytes = gpu.nbytes
    copier = TierCopier(device, non_blocking=True)

    def raw_d2h() -> None:
        cpu.storage.copy_(gpu.storage, non_blocking=True)

    def raw_h2d() -> None:
        gpu.storage.copy_(cpu.storage, non_blocking=True)

    # Scattered source slots, as eviction victims are: the copier gathers them (one kernel on the
    # GPU side) and moves each run of consecutive destination slots in one transfer.
    order = list(range(blocks))
    scattered = torch.randperm(blocks, generator=torch.Generator().manual_seed(0)).tolist()

    def slots_d2h() -> None:
        copier.copy_many(gpu, scattered, cpu, order)
        copier.sync()

    def slots_h2d() -> None:
        copier.copy_many(cpu, scattered, gpu, order)
        copier.sync()

    rows = []
    for direction, raw, slots in (("GPU->CPU", raw_d2h, slots_d2h), ("CPU->GPU", raw_h2d, slots_h2d)):
        t_raw = _cuda_time(raw)
        t_slots = _cuda_time(slots)
        rows.append(
            {
                "bench": f"transfer {direction}",
                "blocks": blocks,
                "raw_pinned_GBps": nbytes / t_raw / 1e9,
                "tier_slots_GBps": nbytes / t_slots / 1e9,
                "ratio": t_raw / t_slots,
            }
        )
    torch.cuda.synchronize()
    copier.copy_many(gpu, scattered, cpu, order)
    copier.host_sync()
    moved = torch.tensor(scattered[: min(blocks, 4)], device=device)
    ok = torch.equal(gpu.storage[moved].cpu(), cpu.storage[: min(blocks, 4)])
    rows.append({"bench": "transfer scattered slots bit-exact", "ok": ok})
    return rows


def bench_engine_tier(gpu_blocks: int = 64, cpu_blocks: int = 256) -> list[dict[str, Any]]:
    """An engine on CUDA with a pinned CPU tier: demotion, prefetch/promotion, integrity."""
    from kvcache_engine.engine import KVCacheEngine

    g = LLAMA8B
    bt = g["block_tokens"]
    engine = KVCacheEngine(
        device="cuda",
        max_tokens=gpu_blocks * bt,
        cpu_tier_tokens=cpu_blocks * bt,
        enable_prefetch=True,
        prefetch_size=16,
        enable_gc=False,
        cache_strategy="LRU",
        **g,
    )
    try:
        chains = 48
        blocks_per_chain = 4
        gen = torch.Generator(device="cuda").manual_seed(0)
        kvs = []
        # KV generated up front, on the GPU (where a model's KV lives): the timed loop measures the
        # engine's put (encode, batched write and checksum, batched demotion), not torch.randn.
        for c in range(chains):
            tokens = [c * 100_000 + i for i in range(blocks_per_chain * bt)]
            shape = (2, g["num_layers"], len(tokens), g["num_kv_heads"], g["head_dim"])
            kvs.append((tokens, torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16)))
        engine.put(*kvs[0])  # warm-up (allocator, first kernels); its block counts as stored
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for tokens, kv in kvs[1:]:
            engine.put(tokens, kv)
        torch.cuda.synchronize()
        put_s = time.perf_counter() - t0
        stats = engine.get_stats()
        demotions = stats["demotions"]
        t0 = time.perf_counter()
        hits = sum(engine.lookup(tokens) for tokens, _ in kvs[:8])  # oldest chains: in the CPU tier
        torch.cuda.synchronize()
        promote_s = time.perf_counter() - t0
        exact = all(torch.equal(engine.get(tokens), kv.cpu()) for tokens, kv in kvs[:8] + kvs[-4:])
        after = engine.get_stats()
        report = engine.validate_cache_integrity()
        stored = (chains - 1) * blocks_per_chain
        return [
            {
                "bench": "engine put, GPU-resident KV (GPU tier full: each put demotes)",
                "blocks": stored,
                "blocks_per_s": stored / put_s,
                "GBps": stored * _block_bytes() / put_s / 1e9,
                "demotions": demotions,
            },
            {
                "bench": "engine lookup of CPU-tier chains (promotion + prefetch)",
                "hit_tokens": hits,
                "promotions": after["promotions"],
                "prefetches": after["prefetches"],
                "seconds": promote_s,
            },
            {
                "bench": "engine GPU tier consistency",
                "round_trip_bit_exact": exact,
                "integrity_valid": report["is_valid"],
                "errors": report["errors"][:3],
                "gpu_used_blocks": after["used_blocks"],
                "cpu_tier_used_blocks": after["cpu_tier_used_blocks"],
                "device_memory_allocated_GiB": after["device_memory_allocated"] / GIB,
            },
        ]
    finally:
        engine.close()


def bench_codecs(blocks: int, codecs: Sequence[str] = ("int8", "int4")) -> list[dict[str, Any]]:
    """Encode/decode GB/s of fp16 input for each lossy codec, on a batch of blocks."""
    from kvcache_engine.core.compression import make_codec, relative_error

    rows = []
    g = LLAMA8B
    kv = torch.randn(
        blocks, 2, g["num_layers"], g["block_tokens"], g["num_kv_heads"], g["head_dim"], device="cuda"
    )
    kv = kv.half()
    nbytes = kv.numel() * 2
    for name in codecs:
        codec = make_codec(name, **g)
        t0 = time.perf_counter()
        payload = codec.encode_batch(kv)
        decoded = codec.decode_batch(payload)
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - t0  # includes torch.compile
        codec.decode_sequence(payload)  # compile the engine's get layout outside the timings
        torch.cuda.synchronize()
        t_enc = _cuda_time(lambda c=codec: _discard(c.encode_batch(kv)))
        t_dec = _cuda_time(lambda c=codec, p=payload: _discard(c.decode_batch(p)))
        t_seq = _cuda_time(lambda c=codec, p=payload: _discard(c.decode_sequence(p)))
        t_both = _cuda_time(lambda c=codec: _discard(c.decode_batch(c.encode_batch(kv))))
        rows.append(
            {
                "bench": f"codec {name}",
                "blocks": blocks,
                "encode_GBps": nbytes / t_enc / 1e9,
                "decode_GBps": nbytes / t_dec / 1e9,
                "decode_sequence_GBps": nbytes / t_seq / 1e9,
                "encode+decode_GBps": nbytes / t_both / 1e9,
                "rel_error": relative_error(kv[:4], decoded[:4]),
                "sequence_layout_exact": bool(
                    torch.equal(
                        codec.decode_sequence(payload),
                        decoded.permute(1, 2, 0, 3, 4, 5).reshape(2, g["num_layers"], -1, *kv.shape[-2:]),
                    )
                ),
                "ratio": codec.ratio(),
                "first_call_s": first_call_s,
            }
        )
    return rows


def http_gpu_tier_hook(base_url: str, token: str | None = None) -> list[dict[str, Any]]:
    """Read a running engine's device and tier figures from /v1/stats."""
    request = urllib.request.Request(f"{base_url.rstrip('/')}/v1/stats")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        stats = json.load(response)
    keys = (
        "device",
        "num_blocks",
        "used_blocks",
        "cpu_tier_blocks",
        "cpu_tier_used_blocks",
        "demotions",
        "promotions",
        "prefetches",
    )
    return [{"bench": "http engine GPU tier (stats)", **{k: stats.get(k) for k in keys}}]


def bench_http_gpu_tier(
    chains: int = 4, chain_blocks: int = 16, gpu_blocks: int = 48
) -> list[dict[str, Any]]:
    """Start a real ``kvcache-engine serve`` on CUDA with a pinned CPU tier behind it, then put
    ``chains`` chains of ``chain_blocks`` Llama-8B blocks (2 MiB) through KVCacheClient, more in
    all than the GPU tier holds: later puts demote the earlier chains to the CPU tier (a single
    put cannot demote its own new blocks, so each chain fits the GPU tier). Then get every chain
    back (reading both tiers) and check each bit-exact, and that the stats show demotions."""
    import os
    import socket
    import subprocess
    import sys
    import tempfile

    from kvcache_engine.client import KVCacheClient

    if chain_blocks > gpu_blocks or chains * chain_blocks <= gpu_blocks:
        raise ValueError("need chain_blocks <= gpu_blocks < chains * chain_blocks to exercise demotion")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    block_tokens = LLAMA8B["block_tokens"]
    env = {
        **os.environ,
        "KVCACHE_DEVICE": "cuda",
        "KVCACHE_NUM_LAYERS": str(LLAMA8B["num_layers"]),
        "KVCACHE_NUM_KV_HEADS": str(LLAMA8B["num_kv_heads"]),
        "KVCACHE_HEAD_DIM": str(LLAMA8B["head_dim"]),
        "KVCACHE_BLOCK_TOKENS": str(block_tokens),
        "KVCACHE_MAX_TOKENS": str(gpu_blocks * block_tokens),
        "KVCACHE_CPU_TIER_TOKENS": str(2 * chains * chain_blocks * block_tokens),
        "KVCACHE_ENABLE_PREFETCH": "true",
        "KVCACHE_CACHE_STRATEGY": "LRU",
        "KVCACHE_ENABLE_GC": "false",
    }
    with tempfile.TemporaryDirectory() as tmp:
        token_file = os.path.join(tmp, "token")
        with open(token_file, "w") as fh:
            fh.write("gpu-bench-token")
        cmd = [
            sys.executable,
            "-m",
            "kvcache_engine.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--token-file",
            token_file,
        ]
        proc = subprocess.Popen(cmd, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, timeout_s=120)
            client = KVCacheClient([url], token="gpu-bench-token", timeout_s=60.0, strict=True)
            gen = torch.Generator().manual_seed(0)
            data = []
            for c in range(chains):
                tokens = [c * 1_000_000 + i for i in range(chain_blocks * block_tokens)]
                shape = (2, LLAMA8B["num_layers"], len(tokens), LLAMA8B["num_kv_heads"], LLAMA8B["head_dim"])
                data.append((tokens, torch.randn(shape, generator=gen).half()))
            nbytes = sum(kv.numel() * kv.element_size() for _, kv in data)
            t0 = time.perf_counter()
            for tokens, kv in data:
                client.put(tokens, kv, wait=True)
            put_s = time.perf_counter() - t0
            after_put = http_gpu_tier_hook(url, "gpu-bench-token")[0]
            exact: list[bool] = []
            t0 = time.perf_counter()
            for tokens, kv in data:  # oldest first: those chains were demoted to the CPU tier
                got = client.get(tokens)
                exact.append(got is not None and got.shape == kv.shape and bool(torch.equal(got, kv)))
            get_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for tokens, _ in data:  # again: now promoted (prefetch) to the GPU tier
                client.get(tokens)
            get_again_s = time.perf_counter() - t0
            client.close()
            label = f"{chains}x{chain_blocks}x2MiB chains, GPU tier {gpu_blocks} blocks + CPU tier"
            return [
                {
                    "bench": f"http put+get {label}",
                    "put_GBps": nbytes / put_s / 1e9,
                    "get_GBps": nbytes / get_s / 1e9,
                    "get_again_GBps": nbytes / get_again_s / 1e9,
                    "bit_exact_chains": f"{sum(exact)}/{chains}",
                    "demoted_ok": bool(after_put["demotions"]) and bool(after_put["cpu_tier_used_blocks"]),
                },
                {**after_put, "bench": "http engine GPU tier after the puts (stats)"},
                *http_gpu_tier_hook(url, "gpu-bench-token"),
            ]
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"engine at {url} not ready after {timeout_s}s")


def _print(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"GPU benchmarks on {torch.cuda.get_device_name()}")
    table.add_column("bench")
    table.add_column("figures")
    for row in rows:
        figures = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "bench"
        )
        table.add_row(str(row["bench"]), figures)
    Console(width=200).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.gpu", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--blocks", type=int, default=256, help="blocks per transfer/codec batch (2 MiB each)"
    )
    parser.add_argument("--url", help="also drive a running engine over HTTP (http_gpu_tier_hook)")
    parser.add_argument("--token", help="bearer token for --url")
    parser.add_argument("--codecs", default="int8,int4", help="codecs to time (int8,int4,fp8)")
    parser.add_argument("--eager", action="store_true", help="run the codecs without torch.compile")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA GPU on this host; nothing to measure")
        return 0
    if args.eager:
        from kvcache_engine.core import compression

        compression.COMPILE_ON_CUDA = False
    sections: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("transfers", lambda: bench_transfers(args.blocks)),
        ("engine tier", bench_engine_tier),
        ("codecs", lambda: bench_codecs(min(args.blocks, 64), args.codecs.split(","))),
    ]
    sections.append(("http GPU tier", bench_http_gpu_tier))
    if args.url:
        sections.append(("http (--url)", lambda: http_gpu_tier_hook(args.url, args.token)))
    rows: list[dict[str, Any]] = []
    failed = 0
    for name, section in sections:
        print(f"bench.gpu: {name} ...", flush=True)
        try:
            rows += section()
        except Exception as exc:  # keep measuring the other sections; report this one
            traceback.print_exc()
            rows.append({"bench": f"{name} FAILED", "error": f"{type(exc).__name__}: {exc}"})
            failed += 1
    _print(rows, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
