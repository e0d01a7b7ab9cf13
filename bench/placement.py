"""Placement of the packaged trace's chains over replicas, by route depth.

    python -m bench.placement [--replicas 4]

For each route depth: requests per replica (rendezvous hashing on the block at that depth, the
function the client and the server's drain share), max/mean, and the share of routing keys that
move when one replica is added.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from kvcache_engine.contract import rendezvous_owner, route_key
from kvcache_engine.core.hashing import chain_hashes
from kvcache_engine.replay import load_trace

BLOCK_TOKENS = 16


def _chains(depth: int) -> list[list[int]]:
    """Leading ``depth`` block hashes of every request (a trace block id = 16 distinct tokens)."""
    out = []
    for ids in load_trace():
        tokens = [b * BLOCK_TOKENS + i for b in ids[:depth] for i in range(BLOCK_TOKENS)]
        out.append([int(h) for h in chain_hashes("default", tokens, BLOCK_TOKENS)])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.placement", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--replicas", type=int, default=4, help="replicas to place over (default 4)")
    args = parser.parse_args(argv)
    nodes = [f"http://10.0.0.{i}:8080" for i in range(1, args.replicas + 1)]
    grown = [*nodes, f"http://10.0.0.{args.replicas + 1}:8080"]
    table = Table(
        title=f"packaged trace ({sum(1 for _ in load_trace())} requests) over {args.replicas} replicas"
    )
    for column in ("routeDepth", "requests per replica", "max / mean", f"keys moved by replica {len(grown)}"):
        table.add_column(column)
    for depth in (1, 2, 3):
        keys = [route_key(c, depth) for c in _chains(depth)]
        load = Counter(rendezvous_owner(k, nodes) for k in keys)
        per = [load.get(n, 0) for n in nodes]
        unique = set(keys)
        moved = sum(rendezvous_owner(k, nodes) != rendezvous_owner(k, grown) for k in unique)
        table.add_row(
            str(depth),
            " / ".join(str(p) for p in per),
            f"{max(per) / (sum(per) / len(per)):.3f}",
            f"{moved / len(unique):.1%} of {len(unique)}",
        )
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
