"""Operator benchmark: the real ``kvcache-operator run`` process against the API emulator.

Measures (1) the time from creating one KVCache to all of its children existing, over several
caches created one after another, and (2) reconcile latency with many KVCaches created at once:
per-cache time from creation to a written status (``observedGeneration``), p50/p99, overall
throughput, and the operator process's resident memory (VmRSS) afterwards.

    python -m bench.operator_bench [--caches 200] [--sequential 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kmock
from rich.console import Console
from rich.table import Table
from tests.kube_emulator import KubeEmulator, write_kubeconfig

NS = "bench"
KVCACHES = "kvcache.dev/v1alpha1/kvcaches"
CHILDREN = (
    "v1/configmaps",
    "v1/secrets",
    "v1/services",
    "apps/v1/statefulsets",
    "policy/v1/poddisruptionbudgets",
)
EXPECTED_CHILDREN = 7  # 2 ConfigMaps, 1 Secret, 2 Services, 1 StatefulSet, 1 PDB


def make_kvcache(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kvcache.dev/v1alpha1",
        "kind": "KVCache",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": 2,
            "metrics": {"scrapeInterval": "60s"},
            "cache": {"maxTokens": 4096, "numLayers": 2, "numKvHeads": 2, "headDim": 16, "device": "cpu"},
        },
    }


def child_count(emu: KubeEmulator, name: str) -> int:
    selector = f"app.kubernetes.io/instance={name}"
    return sum(len(emu.list(res, NS, label_selector=selector)) for res in CHILDREN)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        await asyncio.sleep(0.005)


async def run(caches: int, sequential: int) -> dict[str, float]:
    async with KubeEmulator() as emu, kmock.Server(emu) as server:
        workdir = Path(tempfile.mkdtemp(prefix="operator-bench-"))
        kubeconfig = write_kubeconfig(workdir, str(server.url), namespace=NS)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONWARNINGS": "ignore"}
        command = [
            sys.executable,
            "-m",
            "kvcache_operator.cli",
            "run",
            "-n",
            NS,
            "--standalone",
            "--liveness",
            f"http://127.0.0.1:{free_port()}/healthz",
            "--metrics-port",
            "0",
        ]
        with (workdir / "operator.log").open("wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                return await measure(emu, proc, caches, sequential)
            finally:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 30)


async def measure(
    emu: KubeEmulator, proc: subprocess.Popen[bytes], caches: int, sequential: int
) -> dict[str, float]:
    # warm-up: the operator is up once it has reconciled a first cache
    emu.create(KVCACHES, make_kvcache("warmup"))
    await wait_until(lambda: child_count(emu, "warmup") == EXPECTED_CHILDREN, 60)
    idle_rss = rss_mib(proc.pid)

    single: list[float] = []
    for i in range(sequential):
        name = f"seq-{i}"
        started = time.perf_counter()
        emu.create(KVCACHES, make_kvcache(name))
        await wait_until(lambda n=name: child_count(emu, n) == EXPECTED_CHILDREN, 60)
        single.append(time.perf_counter() - started)

    created: dict[str, float] = {}
    done: dict[str, float] = {}

    def on_change(event: str, resource: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if (
            resource == "kvcache.dev/v1alpha1/kvcaches"
            and name.startswith("many-")
            and name not in done
            and (obj.get("status") or {}).get("observedGeneration") == 1
        ):
            done[name] = time.perf_counter()

    unsubscribe = emu.subscribe(on_change)
    started = time.perf_counter()
    for i in range(caches):
        created[f"many-{i}"] = time.perf_counter()
        emu.create(KVCACHES, make_kvcache(f"many-{i}"))
    await wait_until(lambda: len(done) == caches, 600)
    total = time.perf_counter() - started
    unsubscribe()
    latencies = [done[name] - created[name] for name in created]
    return {
        "single_p50_s": statistics.median(single),
        "single_max_s": max(single),
        "many_p50_s": percentile(latencies, 0.5),
        "many_p99_s": percentile(latencies, 0.99),
        "many_total_s": total,
        "throughput_per_s": caches / total,
        "idle_rss_mib": idle_rss,
        "rss_mib": rss_mib(proc.pid),
        "caches": caches,
        "sequential": sequential,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.operator_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--caches", type=int, default=200, help="KVCaches created at once (default 200)")
    parser.add_argument("--sequential", type=int, default=20, help="caches timed one by one (default 20)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    result = asyncio.run(run(args.caches, args.sequential))
    table = Table(title=f"kvcache-operator against the API emulator ({os.cpu_count()} CPUs)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(
        f"creation -> all {EXPECTED_CHILDREN} children, p50 over {args.sequential}",
        f"{result['single_p50_s'] * 1000:.0f} ms",
    )
    table.add_row("creation -> all children, max", f"{result['single_max_s'] * 1000:.0f} ms")
    table.add_row(f"{args.caches} caches at once: creation -> status, p50", f"{result['many_p50_s']:.2f} s")
    table.add_row(f"{args.caches} caches at once: creation -> status, p99", f"{result['many_p99_s']:.2f} s")
    table.add_row(f"{args.caches} caches: all reconciled in", f"{result['many_total_s']:.2f} s")
    table.add_row("reconcile throughput", f"{result['throughput_per_s']:.1f} caches/s")
    table.add_row("operator RSS after 1 cache", f"{result['idle_rss_mib']:.0f} MiB")
    table.add_row(
        f"operator RSS with {args.caches + args.sequential + 1} caches", f"{result['rss_mib']:.0f} MiB"
    )
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
