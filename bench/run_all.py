"""Run every benchmark listed in BENCHES (``make bench``); each prints its own tables.

Add a module by appending its dotted name to BENCHES; it must expose ``main(argv) -> int``.
The run continues past a failing benchmark and exits non-zero if any failed.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from collections.abc import Sequence

BENCHES: list[str] = [
    "bench.hitrate",
    "bench.placement",
    "bench.engine_throughput",
    "bench.gpu",
    "bench.service_bench",
    "bench.operator_bench",
    "bench.inference_bench",
    "bench.inference_gpu",
    "bench.lifecycle",
]


def main(argv: Sequence[str] | None = None) -> int:
    only = list(argv if argv is not None else sys.argv[1:])
    failed: list[str] = []
    for name in BENCHES:
        if only and name not in only and name.rsplit(".", 1)[-1] not in only:
            continue
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            code = importlib.import_module(name).main([])
        except Exception:
            traceback.print_exc()
            code = 1
        print(f"=== {name}: exit {code} in {time.perf_counter() - t0:.1f}s ===", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
