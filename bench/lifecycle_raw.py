"""Day-2 events on raw engine processes (no operator, no cluster): the reference of bench.lifecycle.

``python -m bench.lifecycle_raw [--json] [--window S]`` (what ``bench.lifecycle`` measured before it
ran on the local cluster; its figures are the "before" column of docs/benchmarks.md) runs two real
``kvcache-engine serve`` processes (persistence on, a periodic persist) behind the sharding client,
under a steady prefix workload (Zipf-popular chains, lookup then put on a miss), and per event
compares the mean token hit rate in the ``--window`` seconds after the event with the window before:

* ``restart_cold``: one replica killed and restarted with an empty volume (what a replica without
  persistence, or with a new PVC, gets: today's cold start, the reference);
* ``kill``: one replica ``kill -9``-ed and restarted on its volume (loses what was not persisted yet);
* ``rolling_restart``: every replica in turn gets SIGTERM (drain, final persist), restarts, loads
  before it reports ready, and the next one waits for it;
* ``replace_cold``: one replica's volume lost (node gone) and the replica started empty;
* ``restore``: the same, but the replica's volume restored first from its latest object-store backup
  (what ``spec.restore``'s init container does), through the S3 API to a moto server on loopback.

Each event reports ``dip_points`` (before minus after, in hit-rate points), ``recovery_s`` (from the
event until a one-second bucket is back within 2 points of the before mean; null: not within the
window), ``client_errors`` (exceptions raised into the caller: must be 0) and ``blocks_lost`` (blocks
the event's replica held before minus after it came back). ``scale_out``/``scale_in`` are not
measured here (they need the operator's shard-map hand-off, not built yet): reported as null.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvcache_engine.client import KVCacheClient

TOKEN = "bench-token"
GEOMETRY: dict[str, Any] = {
    "block_tokens": 16,
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 32,
    "dtype": "float16",
    "device": "cpu",
}
CHAINS = 2000
CHAIN_TOKENS = 128
RECOVERY_POINTS = 2.0


class Engine:
    def __init__(self, root: Path, name: str) -> None:
        self.dir = root / name
        self.data = self.dir / "cache"
        self.dir.mkdir(parents=True, exist_ok=True)
        config = {
            **GEOMETRY,
            "max_tokens": CHAINS * CHAIN_TOKENS * 2,
            "persistence_path": str(self.data),
            "persist_interval_s": 5.0,
        }
        (self.dir / "engine.json").write_text(json.dumps(config))
        (self.dir / "token").write_text(TOKEN)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            sys.executable, "-m", "kvcache_engine.cli", "serve", "--config", str(self.dir / "engine.json"),
            "--host", "127.0.0.1", "--port", str(self.port), "--token-file", str(self.dir / "token"),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
        log = open(self.dir / "engine.log", "ab")  # noqa: SIM115 - the child's
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"engine {self.url} not ready; see {self.dir / 'engine.log'}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def sigterm(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)

    def blocks(self) -> int:
        req = urllib.request.Request(self.url + "/v1/stats", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(json.load(r)["cached_blocks"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Load:
    """A steady workload: Zipf-popular chains; lookup, and put the chain on a miss."""

    def __init__(self, urls: list[str], seed: int = 0) -> None:
        self.client = KVCacheClient(urls, token=TOKEN, timeout_s=2.0)
        rng = random.Random(seed)
        self.chains = [[rng.randrange(32000) for _ in range(CHAIN_TOKENS)] for _ in range(CHAINS)]
        weights = [1.0 / (i + 1) ** 0.8 for i in range(CHAINS)]
        self.order = rng.choices(range(CHAINS), weights=weights, k=200_000)
        shape = (2, GEOMETRY["num_layers"], CHAIN_TOKENS, GEOMETRY["num_kv_heads"], GEOMETRY["head_dim"])
        self.kv = torch.randn(shape).to(torch.float16)
        self.samples: list[tuple[float, float]] = []  # (time, token hit rate of one request)
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._i = 0

    def fill(self) -> None:
        for tokens in self.chains:
            self.client.put(tokens, self.kv, wait=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            tokens = self.chains[self.order[self._i % len(self.order)]]
            self._i += 1
            try:
                hit = self.client.lookup(tokens)  # tokens of the chain's prefix held
                if hit < len(tokens):
                    self.client.put(tokens, self.kv)
            except Exception:
                self.errors += 1
                continue
            self.samples.append((time.monotonic(), hit / len(tokens)))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.client.close()

    def mean(self, start: float, end: float) -> float | None:
        xs = [h for t, h in self.samples if start <= t < end]
        return sum(xs) / len(xs) if xs else None


def measure(load: Load, window: float, event: Callable[[], int]) -> dict[str, Any]:
    time.sleep(window)
    t0 = time.monotonic()
    before = load.mean(t0 - window, t0)
    errors0 = load.errors
    lost = event()
    time.sleep(window)
    after = load.mean(t0, t0 + window)
    recovery = None
    if before is not None:
        for k in range(int(window)):
            m = load.mean(t0 + k, t0 + k + 1)
            if m is not None and m >= before - RECOVERY_POINTS / 100:
                recovery = float(k + 1)
                break
    return {
        "dip_points": round(100 * (before - after), 2) if before is not None and after is not None else None,
        "recovery_s": recovery,
        "client_errors": load.errors - errors0,
        "blocks_lost": lost,
        "hit_rate_before": round(before, 4) if before is not None else None,
        "hit_rate_after": round(after, 4) if after is not None else None,
    }


def run(window: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="kvcache-lifecycle-"))
    engines = [Engine(root, f"e{i}") for i in range(2)]
    moto: subprocess.Popen[bytes] | None = None
    load: Load | None = None
    try:
        for e in engines:
            e.start()
        load = Load([e.url for e in engines])
        load.fill()
        load.start()
        victim = engines[1]

        def restart_cold() -> int:
            held = victim.blocks()
            victim.kill9()
            shutil.rmtree(victim.data, ignore_errors=True)
            victim.start()
            return held - victim.blocks()

        def kill() -> int:
            time.sleep(6)  # a periodic persist has run since the last event
            held = victim.blocks()
            victim.kill9()
            victim.start()
            return held - victim.blocks()

        def rolling_restart() -> int:
            lost = 0
            for e in engines:
                held = e.blocks()
                e.sigterm()
                e.start()
                lost += held - e.blocks()
            return lost

        def replace(restore: bool) -> Callable[[], int]:
            def event() -> int:
                held = victim.blocks()
                victim.kill9()
                shutil.rmtree(victim.data, ignore_errors=True)
                if restore:
                    _restore_from_store(store_args, victim.data)
                victim.start()
                return held - victim.blocks()

            return event

        results: dict[str, Any] = {"scale_out": None, "scale_in": None}
        results["restart_cold"] = measure(load, window, restart_cold)
        results["kill"] = measure(load, window, kill)
        results["rolling_restart"] = measure(load, window, rolling_restart)
        results["replace_cold"] = measure(load, window, replace(False))
        moto, store_args = _store(root)
        _backup_to_store(victim.url, store_args, root / "staging")
        results["restore"] = measure(load, window, replace(True))
        results["window_s"] = window
        return results
    finally:
        if load is not None:
            load.stop()
        for e in engines:
            e.stop()
        if moto is not None:
            moto.terminate()
            moto.wait()
        shutil.rmtree(root, ignore_errors=True)


def _store(root: Path) -> tuple[subprocess.Popen[bytes], list[str]]:
    from kvcache_engine.objectstore import ObjectStore, S3Client

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    with S3Client(ObjectStore(endpoint, "bench-backups", access_key="bench", secret_key="bench")) as c:
        c.create_bucket()
    return proc, ["--s3-endpoint", endpoint, "--s3-bucket", "bench-backups", "--replica", "e-1"]


def _backup_to_store(url: str, store_args: list[str], staging: Path) -> None:
    from kvcache_engine.cli import main

    token_file = staging.parent / "bench-token"
    token_file.write_text(TOKEN)
    argv = ["backup", "--url", url, "--token-file", str(token_file), "--dest", str(staging), *store_args]
    if main(argv) != 0:
        raise RuntimeError("backup to the object store failed")


def _restore_from_store(store_args: list[str], data: Path) -> None:
    from kvcache_engine.cli import main

    if main(["restore", "--from", "latest", "--to-dir", str(data), *store_args]) != 0:
        raise RuntimeError("restore from the object store failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lifecycle_raw", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by event")
    parser.add_argument("--window", type=float, default=60.0, help="seconds before/after each event")
    args = parser.parse_args(argv)
    results = run(args.window)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    cols = ("dip (pts)", "recovery s", "errors", "lost", "before", "after")
    print(f"{'event':16} {cols[0]:>10} {cols[1]:>11} {cols[2]:>7} {cols[3]:>6} {cols[4]:>7} {cols[5]:>7}")
    for name, r in results.items():
        if name == "window_s":
            continue
        if r is None:
            print(f"{name:16} {'not measured (needs the operator hand-off)':>50}")
            continue
        print(
            f"{name:16} {r['dip_points']!s:>10} {r['recovery_s']!s:>11} {r['client_errors']:>7} "
            f"{r['blocks_lost']:>6} {r['hit_rate_before']!s:>7} {r['hit_rate_after']!s:>7}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
