"""Hit rate of every strategy x budget x codec on the packaged conversation trace (Mooncake
format, 512-token blocks), through the engine's real index and eviction code (kvcache_engine.replay).

    python -m bench.hitrate [--budgets 1000,10000,...] [--strategies lru,lfu,adaptive]
                            [--codecs none,fp8,int8,int4] [--trace FILE] [--json]

Budgets are in fp16 blocks; with a codec, as many compressed blocks fit as those bytes allow.
The last table checks the issue's requirements against the measured figures.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from kvcache_engine.replay import effective_capacity, load_trace, replay

BUDGETS = [1_000, 10_000, 20_000, 30_000, 35_000, 50_000, 100_000]
REFERENCE_LRU = {1_000: 0.044, 10_000: 0.211, 30_000: 0.326, 50_000: 0.355, 100_000: 0.364}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def checks(rates: dict[tuple[str, str, int], float]) -> list[tuple[str, float, float, bool]]:
    """(requirement, measured, bound, ok) for the figures present in ``rates``."""
    out = []
    for n, ref in REFERENCE_LRU.items():
        if ("lru", "none", n) in rates:
            got = rates["lru", "none", n]
            out.append((f"lru {n}: reference {ref} +-0.01", got, ref, abs(got - ref) <= 0.01))
    for n in (1_000, 10_000, 30_000):
        if ("adaptive", "none", n) in rates and ("lru", "none", n) in rates:
            bound = rates["lru", "none", n] - 0.01
            got = rates["adaptive", "none", n]
            out.append((f"adaptive {n} >= lru - 0.01", got, bound, got >= bound))
    # The codec requirement is stated against the reference strategy; adaptive is held to it too.
    # Plain LFU (no aging) trails LRU by 8 points at 10k on this trace and is only reported.
    for codec, ref_budget in (("int8", 20_000), ("int4", 35_000)):
        for strategy in ("lru", "adaptive"):
            key, ref_key = (strategy, codec, 10_000), (strategy, "none", ref_budget)
            if key in rates and ref_key in rates:
                bound = rates[ref_key] - 0.01
                out.append(
                    (
                        f"{strategy} {codec}@10k >= none@{ref_budget // 1000}k - 0.01",
                        rates[key],
                        bound,
                        rates[key] >= bound,
                    )
                )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.hitrate", description="hit-rate tables from the trace replay"
    )
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--strategies", default="lru,lfu,adaptive")
    parser.add_argument("--codecs", default="none,fp8,int8,int4")
    parser.add_argument("--trace", help="trace file (default: the packaged conversation trace)")
    parser.add_argument("--json", action="store_true", help="one JSON object per replay")
    args = parser.parse_args(argv)
    budgets = [int(b) for b in _csv(args.budgets)]
    trace = list(load_trace(args.trace))
    rates: dict[tuple[str, str, int], float] = {}
    console = Console(width=160)
    for codec in _csv(args.codecs):
        table = Table(
            title=f"hit rate, codec={codec} (budget in fp16 blocks; effective capacity in brackets)"
        )
        table.add_column("strategy")
        for n in budgets:
            table.add_column(f"{n:,} [{effective_capacity(n, codec):,}]", justify="right")
        for strategy in _csv(args.strategies):
            row = [strategy]
            for n in budgets:
                result = replay(trace, n, strategy, codec)
                rates[strategy, codec, n] = result.hit_rate
                row.append(f"{result.hit_rate:.4f}")
                if args.json:
                    print(json.dumps(result.to_dict()))
            table.add_row(*row)
        if not args.json:
            console.print(table)
    failed = 0
    table = Table(title="requirements (issue 2)")
    for col in ("requirement", "measured", "bound", "ok"):
        table.add_column(col)
    for name, got, bound, ok in checks(rates):
        failed += not ok
        table.add_row(name, f"{got:.4f}", f"{bound:.4f}", "yes" if ok else "NO")
    if not args.json:
        console.print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
