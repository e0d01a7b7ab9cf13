"""Temporary H9 device check (deleted after the run)."""
import json, sys, time, traceback
import torch
from kvcache_engine import block_pool
from kvcache_engine.block_pool import payload_checksums
from bench import gpu

def emit(rows):
    for r in rows:
        print("ROW", json.dumps(r, default=str), flush=True)

g = torch.Generator().manual_seed(0)
p = {"a": torch.randint(0, 256, (8, 4097), dtype=torch.uint8, generator=g), "b": torch.randn(8, 3, 1000, generator=g).half()}
emit([{"bench": "checksum cpu==cuda", "ok": payload_checksums(p) == payload_checksums({k: v.cuda() for k, v in p.items()})}])
rows = torch.randint(0, 256, (64, 2 << 20), dtype=torch.uint8, device="cuda")
t = gpu._cuda_time(lambda: gpu._discard(block_pool._checksum_rows([rows])))
emit([{"bench": "checksum cuda 64x2MiB", "GBps": rows.numel() / t / 1e9}])
del rows
secs = [("codecs", lambda: gpu.bench_codecs(64)), ("engine tier", gpu.bench_engine_tier),
        ("transfers", lambda: gpu.bench_transfers(256)), ("http", gpu.bench_http_gpu_tier)]
for name, fn in secs:
    t0 = time.time()
    try:
        emit(fn())
    except Exception:
        traceback.print_exc()
    print("SECTION", name, "took", round(time.time() - t0, 1), flush=True)
