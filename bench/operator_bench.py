"""Operator at scale: the real ``kvcache-operator run`` process against the API emulator.

    python -m bench.operator_bench [--caches 1000] [--burst 200] [--window 60] [--json]

1. ``--caches`` minus ``--burst`` KVCaches are created and left to settle (every one has a written
   status, then the API falls quiet or ``--settle-max`` passes);
2. ``--burst`` more are created at once: per cache, the time from its creation to a written status
   (``status.observedGeneration == metadata.generation``), p50/p95/p99/max;
3. with every cache idle, the API writes (POST/PUT/PATCH/DELETE, by resource) over ``--window`` s,
   and the reads beside them;
4. the operator's resident memory (VmRSS) with 0 caches and with all of them: RSS per cache.

The API server is the tests' emulator (``tests/kube_emulator``), served over HTTP from this process;
the operator is a subprocess, exactly as in a pod. No engines and no pods run: the figures are the
cost of managing the caches (children, status, the control loop's timers), not of scraping engines.
Both share the machine's cores; the report says how many.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import kmock
from rich.console import Console
from rich.table import Table
from tests.kube_emulator import KubeEmulator, write_kubeconfig

NS = "bench"
KVCACHES = "kvcache.dev/v1alpha1/kvcaches"
WRITE_VERBS = ("create", "update", "patch", "delete", "deletecollection")
READ_VERBS = ("get", "list")


def make_kvcache(name: str, scrape_interval: str) -> dict[str, Any]:
    return {
        "apiVersion": "kvcache.dev/v1alpha1",
        "kind": "KVCache",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": 2,
            "metrics": {"scrapeInterval": scrape_interval},
            "cache": {"maxTokens": 4096, "numLayers": 2, "numKvHeads": 2, "headDim": 16, "device": "cpu"},
        },
    }


def duration_s(text: str) -> float:
    """'30s', '500ms', '2m' -> seconds."""
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]) * factor
    raise ValueError(f"--scrape-interval: expected e.g. '30s', got {text!r}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Recorder:
    """Times each cache's first written status (observedGeneration == generation) via an emulator hook."""

    def __init__(self, emu: KubeEmulator) -> None:
        self.created: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self._unsubscribe = emu.subscribe(self._on_change)

    def _on_change(self, event: str, resource: str, obj: dict[str, Any]) -> None:
        if resource != KVCACHES or event == "DELETED":
            return
        name = obj["metadata"]["name"]
        observed = (obj.get("status") or {}).get("observedGeneration")
        if name not in self.done and observed is not None and observed == obj["metadata"].get("generation"):
            self.done[name] = time.perf_counter()

    def close(self) -> None:
        self._unsubscribe()


class Bench:
    def __init__(self, emu: KubeEmulator, proc: subprocess.Popen[bytes], args: argparse.Namespace) -> None:
        self.emu, self.proc, self.args = emu, proc, args
        self.recorder = Recorder(emu)

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the operator exited with code {self.proc.returncode} (see its log)")

    async def wait_until(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            await asyncio.sleep(0.02)

    def writes_since(self, start: int) -> int:
        return sum(1 for call in self.emu.calls[start:] if call[0] in WRITE_VERBS)

    async def settle(self) -> dict[str, float]:
        """Every cache has a status; then, after one scrape interval and a bit (so that every cache's
        control loop has run at least once), no API write for ``--quiet`` s (at most ``--settle-max`` s)."""
        names = set(self.recorder.created)
        await self.wait_until(lambda: names <= set(self.recorder.done), self.args.timeout, "every status")
        started = time.monotonic()
        await asyncio.sleep(1.2 * duration_s(self.args.scrape_interval))
        while time.monotonic() - started < self.args.settle_max:
            mark = len(self.emu.calls)
            await asyncio.sleep(self.args.quiet)
            self._check_alive()
            if self.writes_since(mark) == 0:
                return {"quiet": 1.0, "settle_s": time.monotonic() - started}
        return {"quiet": 0.0, "settle_s": time.monotonic() - started}

    def create(self, names: Sequence[str]) -> None:
        for name in names:
            self.recorder.created[name] = time.perf_counter()
            self.emu.create(KVCACHES, make_kvcache(name, self.args.scrape_interval))

    async def run(self) -> dict[str, Any]:
        args = self.args
        await self.wait_until(lambda: self.emu.count("watch", "kvcaches") > 0, 60, "the operator's watch")
        await asyncio.sleep(3.0)  # startup done: indexes listed, nothing to do
        rss_empty = rss_mib(self.proc.pid)

        base = [f"base-{i:04d}" for i in range(args.caches - args.burst)]
        t0 = time.perf_counter()
        self.create(base)
        base_settle = await self.settle()
        base_s = time.perf_counter() - t0

        burst = [f"burst-{i:04d}" for i in range(args.burst)]
        cpu0, own0 = cpu_s(self.proc.pid), own_cpu_s()
        t0 = time.perf_counter()
        self.create(burst)
        await self.wait_until(
            lambda: all(n in self.recorder.done for n in burst), args.timeout, "the burst's statuses"
        )
        burst_total = time.perf_counter() - t0
        burst_cpu, burst_own = cpu_s(self.proc.pid) - cpu0, own_cpu_s() - own0
        latencies = [self.recorder.done[n] - self.recorder.created[n] for n in burst]
        all_settle = await self.settle()

        mark, cpu0 = len(self.emu.calls), cpu_s(self.proc.pid)
        await asyncio.sleep(args.window)
        self._check_alive()
        idle_cpu = cpu_s(self.proc.pid) - cpu0
        window = self.emu.calls[mark:]
        writes = Counter(
            f"{v.upper()} {p}{'/' + s if s else ''}" for v, p, _, _, s in window if v in WRITE_VERBS
        )
        reads = Counter(f"{v.upper()} {p}" for v, p, _, _, _ in window if v in READ_VERBS)
        rss_full = rss_mib(self.proc.pid)
        return {
            "commit": git_commit(),
            "cpus": os.cpu_count(),
            "caches": args.caches,
            "burst": args.burst,
            "scrape_interval": args.scrape_interval,
            "base_created_and_settled_s": round(base_s, 2),
            "base_quiet": bool(base_settle["quiet"]),
            "burst_p50_s": round(percentile(latencies, 0.50), 3),
            "burst_p95_s": round(percentile(latencies, 0.95), 3),
            "burst_p99_s": round(percentile(latencies, 0.99), 3),
            "burst_max_s": round(max(latencies), 3),
            "burst_all_s": round(burst_total, 3),
            "burst_operator_cpu_s": round(burst_cpu, 2),
            "burst_emulator_cpu_s": round(burst_own, 2),
            "idle_quiet_before_window": bool(all_settle["quiet"]),
            "idle_window_s": args.window,
            "idle_writes": sum(writes.values()),
            "idle_writes_per_min": round(sum(writes.values()) * 60 / args.window, 1),
            "idle_writes_by_resource": dict(writes.most_common()),
            "idle_operator_cpu_percent": round(100 * idle_cpu / args.window, 1),
            "idle_reads": sum(reads.values()),
            "idle_reads_by_resource": dict(reads.most_common()),
            "rss_0_caches_mib": round(rss_empty, 1),
            "rss_all_caches_mib": round(rss_full, 1),
            "rss_per_cache_kib": round((rss_full - rss_empty) * 1024 / max(args.caches, 1), 1),
        }


async def _liveness(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with KubeEmulator() as emu, kmock.Server(emu) as server:
        emu.create("v1/namespaces", {"metadata": {"name": NS}})
        workdir = Path(tempfile.mkdtemp(prefix="operator-bench-"))
        kubeconfig = write_kubeconfig(workdir, str(server.url), namespace=NS)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONWARNINGS": "ignore"}
        health = f"http://127.0.0.1:{free_port()}/healthz"
        command = [sys.executable, "-m", "kvcache_operator.cli", "run", "-n", NS, "--standalone"]
        command += ["--liveness", health, "--metrics-port", "0"]
        log_path = workdir / "operator.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                result = await Bench(emu, proc, args).run()
                result["operator_alive"] = await _liveness(health)
                return result
            except (TimeoutError, RuntimeError) as exc:
                raise SystemExit(f"operator_bench: {exc}; operator log: {log_path}") from exc
            finally:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 60)


def render(result: dict[str, Any]) -> None:
    table = Table(
        title=(
            f"kvcache-operator at scale: {result['caches']} KVCaches, API emulator, "
            f"{result['cpus']} CPUs, commit {result['commit']}"
        )
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    base = result["caches"] - result["burst"]
    quiet = "quiet" if result["base_quiet"] else "never quiet"
    table.add_row(
        f"{base} caches created, status written, settled",
        f"{result['base_created_and_settled_s']:.1f} s ({quiet})",
    )
    for q in ("p50", "p95", "p99", "max"):
        table.add_row(
            f"{result['burst']} created at once: creation -> status, {q}", f"{result[f'burst_{q}_s']:.2f} s"
        )
    table.add_row(
        f"{result['burst']} created at once: all statuses written", f"{result['burst_all_s']:.2f} s"
    )
    table.add_row(
        "  CPU meanwhile: operator / emulator",
        f"{result['burst_operator_cpu_s']:.1f} s / {result['burst_emulator_cpu_s']:.1f} s",
    )
    table.add_row(
        f"idle {result['caches']} caches: API writes in {result['idle_window_s']:.0f} s",
        f"{result['idle_writes']} ({result['idle_writes_per_min']:.0f}/min)",
    )
    for name, count in result["idle_writes_by_resource"].items():
        table.add_row(f"  {name}", str(count))
    table.add_row(f"idle: API reads (GET/LIST) in {result['idle_window_s']:.0f} s", str(result["idle_reads"]))
    table.add_row("idle: operator CPU", f"{result['idle_operator_cpu_percent']:.1f} % of a core")
    table.add_row("operator RSS, 0 caches", f"{result['rss_0_caches_mib']:.0f} MiB")
    table.add_row(f"operator RSS, {result['caches']} caches", f"{result['rss_all_caches_mib']:.0f} MiB")
    table.add_row("operator RSS per cache", f"{result['rss_per_cache_kib']:.0f} KiB")
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.operator_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--caches", type=int, default=1000, help="KVCaches in all (default 1000)")
    parser.add_argument("--burst", type=int, default=200, help="of which created at once, last (default 200)")
    parser.add_argument(
        "--window", type=float, default=60.0, help="idle window for counting writes, s (default 60)"
    )
    parser.add_argument(
        "--scrape-interval", default="30s", help="spec.metrics.scrapeInterval (default 30s, the CRD's)"
    )
    parser.add_argument(
        "--quiet", type=float, default=3.0, help="settled = no API write for this long, s (default 3)"
    )
    parser.add_argument(
        "--settle-max", type=float, default=90.0, help="give up waiting for quiet after, s (default 90)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="for every status to be written, s (default 900)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not 0 < args.burst <= args.caches:
        parser.error("--burst: expected 1..--caches")
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
