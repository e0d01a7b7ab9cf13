"""Accuracy and cost of the engine's miss-ratio curve against exact replays.

    python -m bench.curve_accuracy [--capacity 5000] [--rates 1,0.125,0.015625] [--requests 30000]
                                   [--seeds 3] [--write-generated FILE] [--json]

Two traces: the packaged conversation trace and a generated one (multi-turn conversations under
Zipf-popular system prompts, seeded; ``--write-generated`` saves it in Mooncake format). For each,
one engine's shadow (``core.curve.ShadowCurve``: the entry cap of a ``--capacity``-block pool of
Llama-8B-shaped 2 MiB blocks, 32,768 entries; no CPU budget here) is fed the trace as the engine
feeds it (lookup, then put of the whole chain), and its predicted hit rate at 1/4x to 8x the
capacity is compared with ``replay`` (the engine's exact LRU bookkeeping) at the same sizes. The
error columns are predicted - exact, in points; ``--seeds`` repeats the sampled rates with other
hash mixings (a different sample) and reports the worst error. The engine's ADAPTIVE and LFU
strategies are replayed too: the curve models LRU, and their distance from it is reported.
Cost: the shadow's time per block of the trace, its traced memory (tracemalloc) and entries.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvcache_engine.core.curve import ShadowCurve, curve_entries_for, mix_id
from kvcache_engine.replay import load_trace, replay

MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
LLAMA8B_BLOCK_BYTES = 2 * 32 * 16 * 8 * 128 * 2  # 2 MiB


def generated_trace(requests: int, seed: int = 7) -> list[list[int]]:
    """Multi-turn conversations: 40 system prompts of 1-4 blocks (Zipf popularity); 60 % of the
    requests continue a recent conversation (its whole chain plus 1-3 new blocks), the rest open a
    new one (a prompt of 2-12 blocks after the system prompt)."""
    rng = random.Random(seed)
    systems = [list(range(i * 4, i * 4 + rng.randint(1, 4))) for i in range(40)]
    weights = [1 / (i + 1) for i in range(len(systems))]
    next_id = 1000
    live: list[list[int]] = []
    out: list[list[int]] = []
    for _ in range(requests):
        if live and rng.random() < 0.6:
            chat = live[min(len(live) - 1, int(rng.expovariate(1 / 200)))]
            grow = rng.randint(1, 3)
        else:
            chat = list(rng.choices(systems, weights)[0])
            live.insert(0, chat)
            del live[2000:]
            grow = rng.randint(2, 12)
        chat.extend(range(next_id, next_id + grow))
        next_id += grow
        out.append(list(chat))
    return out


def write_trace(path: Path, requests: Sequence[list[int]]) -> None:
    lines = "".join(json.dumps({"timestamp": i * 100, "hash_ids": r}) + "\n" for i, r in enumerate(requests))
    path.write_bytes(gzip.compress(lines.encode()))


def shadow_run(
    requests: Sequence[list[int]], rate: float, entries: int, seed: int
) -> tuple[ShadowCurve, float]:
    """The shadow fed as the engine feeds it; (shadow, seconds spent in it)."""
    shadow = ShadowCurve(entries, rate, decay_samples=None)
    hashed = [[mix_id(i + seed * 10**12) for i in r] for r in requests]
    t0 = time.perf_counter()
    for chain in hashed:
        shadow.lookup(chain, 0)
        shadow.stored(chain)
    return shadow, time.perf_counter() - t0


def evaluate(
    name: str, requests: list[list[int]], capacity: int, rates: list[float], seeds: int
) -> dict[str, Any]:
    blocks = sum(map(len, requests))
    entries = curve_entries_for(capacity * LLAMA8B_BLOCK_BYTES)
    sizes = [int(m * capacity) for m in MULTIPLES]
    exact = {c: replay(requests, c).hit_rate for c in sizes}
    own = {s: {c: replay(requests, c, s).hit_rate for c in sizes} for s in ("adaptive", "lfu")}
    ceiling = replay(requests, 10**8).hit_rate
    rows = []
    for rate in rates:
        worst = 0.0
        first: dict[str, Any] = {}
        for seed in range(seeds if rate < 1 else 1):
            shadow, seconds = shadow_run(requests, rate, entries, seed)  # timed without tracing
            memory = 0
            if seed == 0:
                tracemalloc.start()
                traced, _ = shadow_run(requests, rate, entries, seed)
                memory = tracemalloc.get_traced_memory()[0]  # while the shadow is alive
                tracemalloc.stop()
                del traced
            errors = {c: shadow.hit_rate(c) - exact[c] for c in sizes}
            worst = max(worst, *(abs(e) for e in errors.values()), abs(shadow.ceiling() - ceiling))
            if seed == 0:
                first = {
                    "rate": rate,
                    "final_rate": shadow.rate,
                    "predicted": {c: round(shadow.hit_rate(c), 4) for c in sizes},
                    "error_points": {c: round(100 * e, 2) for c, e in errors.items()},
                    "ceiling": round(shadow.ceiling(), 4),
                    "entries": shadow.entries,
                    "traced_bytes": memory,
                    "ns_per_block": round(seconds / blocks * 1e9),
                }
        rows.append({**first, "worst_abs_error_points_over_seeds": round(100 * worst, 2)})
    return {
        "trace": name,
        "requests": len(requests),
        "blocks": blocks,
        "distinct_blocks": len({h for r in requests for h in r}),
        "capacity": capacity,
        "entry_cap": entries,
        "pool_bytes": capacity * LLAMA8B_BLOCK_BYTES,
        "exact_lru": {c: round(h, 4) for c, h in exact.items()},
        "exact_ceiling": round(ceiling, 4),
        "adaptive_minus_lru_points": {c: round(100 * (own["adaptive"][c] - exact[c]), 2) for c in sizes},
        "lfu_minus_lru_points": {c: round(100 * (own["lfu"][c] - exact[c]), 2) for c in sizes},
        "shadow": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    sizes = list(report["exact_lru"])
    head = "| | " + " | ".join(f"{c:,}" for c in sizes) + " | ceiling |"
    out = [
        f"**{report['trace']}**: {report['requests']:,} requests, {report['blocks']:,} blocks "
        f"({report['distinct_blocks']:,} distinct); capacity {report['capacity']:,} blocks "
        f"(entry cap {report['entry_cap']:,})",
        "",
        head,
        "|---" * (len(sizes) + 2) + "|",
        "| exact LRU (replay) | "
        + " | ".join(f"{h:.4f}" for h in report["exact_lru"].values())
        + f" | {report['exact_ceiling']:.4f} |",
    ]
    for row in report["shadow"]:
        out.append(
            f"| curve, rate {row['rate']:g}: predicted | "
            + " | ".join(f"{h:.4f}" for h in row["predicted"].values())
            + f" | {row['ceiling']:.4f} |"
        )
        out.append(
            f"| error (points); worst over seeds {row['worst_abs_error_points_over_seeds']} | "
            + " | ".join(f"{e:+.2f}" for e in row["error_points"].values())
            + " | |"
        )
    out.append(
        "| ADAPTIVE - LRU (points) | "
        + " | ".join(f"{e:+.2f}" for e in report["adaptive_minus_lru_points"].values())
        + " | |"
    )
    out.append(
        "| LFU - LRU (points) | "
        + " | ".join(f"{e:+.2f}" for e in report["lfu_minus_lru_points"].values())
        + " | |"
    )
    out.append("")
    out.append("| rate | final rate | entries | traced memory | share of the pool | ns per block |")
    out.append("|---:|---:|---:|---:|---:|---:|")
    for row in report["shadow"]:
        share = row["traced_bytes"] / report["pool_bytes"]
        out.append(
            f"| {row['rate']:g} | {row['final_rate']:.4g} | {row['entries']:,} | "
            f"{row['traced_bytes'] / 2**20:.1f} MiB | {100 * share:.3f} % | {row['ns_per_block']:,} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.curve_accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--capacity", type=int, default=5000, help="blocks of the engine the curve is for")
    parser.add_argument("--rates", default="1,0.125,0.015625", help="largest sampling rates to try")
    parser.add_argument("--requests", type=int, default=30000, help="requests of the generated trace")
    parser.add_argument("--seeds", type=int, default=3, help="hash mixings per sampled rate (worst error)")
    parser.add_argument(
        "--write-generated", metavar="FILE", help="save the generated trace (Mooncake format)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    generated = generated_trace(args.requests)
    if args.write_generated:
        write_trace(Path(args.write_generated), generated)
    reports = [
        evaluate("packaged conversation trace", list(load_trace()), args.capacity, rates, args.seeds),
        evaluate(
            f"generated trace (seed 7, {args.requests:,} requests)",
            generated,
            args.capacity,
            rates,
            args.seeds,
        ),
    ]
    if args.json:
        print(json.dumps(reports))
    else:
        print("\n\n".join(markdown(r) for r in reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
