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
``http_gpu_tier_hook`` is where the service benchmarks drive the same tier through HTTP.
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
    from kvcache_engine.block_pool import BlockPool
    from kvcache_engine.config import payload_layout
    from kvcache_engine.tiers import TierCopier

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

    # One copy per slot, as demotion and prefetch issue them (slots are not merged into runs).
    order = list(range(blocks))

    def slots_d2h() -> None:
        copier.copy_many(gpu, order, cpu, order)
        copier.sync()

    def slots_h2d() -> None:
        copier.copy_many(cpu, order, gpu, order)
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
    ok = torch.equal(gpu.storage[: min(blocks, 4)].cpu(), cpu.storage[: min(blocks, 4)])
    rows.append({"bench": "transfer round trip bit-exact", "ok": ok})
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
        gen = torch.Generator().manual_seed(0)
        kvs = []
        t0 = time.perf_counter()
        for c in range(chains):
            tokens = [c * 100_000 + i for i in range(blocks_per_chain * bt)]
            kv = torch.randn(
                2, g["num_layers"], len(tokens), g["num_kv_heads"], g["head_dim"], generator=gen
            ).half()
            kvs.append((tokens, kv))
            engine.put(tokens, kv)
        torch.cuda.synchronize()
        put_s = time.perf_counter() - t0
        stats = engine.get_stats()
        demotions = stats["demotions"]
        t0 = time.perf_counter()
        hits = sum(engine.lookup(tokens) for tokens, _ in kvs[:8])  # oldest chains: in the CPU tier
        torch.cuda.synchronize()
        promote_s = time.perf_counter() - t0
        exact = all(torch.equal(engine.get(tokens), kv) for tokens, kv in kvs[:8] + kvs[-4:])
        after = engine.get_stats()
        report = engine.validate_cache_integrity()
        stored = chains * blocks_per_chain
        return [
            {
                "bench": "engine put (GPU tier full: each put demotes)",
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


def bench_codecs(blocks: int) -> list[dict[str, Any]]:
    """Encode/decode GB/s of fp16 input for each lossy codec, on a batch of blocks."""
    from kvcache_engine.compression import make_codec, relative_error

    rows = []
    g = LLAMA8B
    kv = torch.randn(
        blocks, 2, g["num_layers"], g["block_tokens"], g["num_kv_heads"], g["head_dim"], device="cuda"
    )
    kv = kv.half()
    nbytes = kv.numel() * 2
    for name in ("int8", "int4", "fp8"):
        codec = make_codec(name, **g)
        t0 = time.perf_counter()
        payload = codec.encode_batch(kv)
        decoded = codec.decode_batch(payload)
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - t0  # includes torch.compile
        t_enc = _cuda_time(lambda c=codec: _discard(c.encode_batch(kv)))
        t_dec = _cuda_time(lambda c=codec, p=payload: _discard(c.decode_batch(p)))
        t_both = _cuda_time(lambda c=codec: _discard(c.decode_batch(c.encode_batch(kv))))
        rows.append(
            {
                "bench": f"codec {name}",
                "blocks": blocks,
                "encode_GBps": nbytes / t_enc / 1e9,
                "decode_GBps": nbytes / t_dec / 1e9,
                "encode+decode_GBps": nbytes / t_both / 1e9,
                "rel_error": relative_error(kv[:4], decoded[:4]),
                "ratio": codec.ratio(),
                "first_call_s": first_call_s,
            }
        )
    return rows


def http_gpu_tier_hook(base_url: str, token: str | None = None) -> list[dict[str, Any]]:
    """Drive a running engine's GPU tier over HTTP. Today: read its device figures from
    /v1/stats. The service benchmarks extend this with put/get traffic through the client."""
    request = urllib.request.Request(f"{base_url.rstrip('/')}/v1/stats")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        stats = json.load(response)
    keys = ("device", "num_blocks", "used_blocks", "cpu_tier_blocks", "demotions", "promotions", "prefetches")
    return [{"bench": "http engine GPU tier", **{k: stats.get(k) for k in keys}}]


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
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA GPU on this host; nothing to measure")
        return 0
    sections: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("transfers", lambda: bench_transfers(args.blocks)),
        ("engine tier", bench_engine_tier),
        ("codecs", lambda: bench_codecs(min(args.blocks, 64))),
    ]
    if args.url:
        sections.append(("http", lambda: http_gpu_tier_hook(args.url, args.token)))
    rows: list[dict[str, Any]] = []
    failed = 0
    for name, section in sections:
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
