"""The symptoms of the troubleshooting guide, reproduced on purpose against real engines.

``EngineProcess`` runs ``kvcache-engine serve`` on 127.0.0.1 (a free port) with a config file,
a token file and a persistence directory under a scratch directory. Each scenario (the name in a
doc's ``<!-- reproduce: NAME -->``) builds an engine in the state of one symptom and returns the
environment the doc's commands see (``KVCACHE_URL``, ``KVCACHE_TOKEN``, ``KVCACHE_DATA``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.docs.harness import BIN

TOKEN = "doc-test-token"
# A toy geometry: one 4-token block is 2 x 2 layers x 4 tokens x 2 heads x 8 dims x 2 bytes = 512 B.
GEOMETRY: dict[str, Any] = {
    "blockTokens": 4,
    "numLayers": 2,
    "numKvHeads": 2,
    "headDim": 8,
    "dtype": "float16",
    "device": "cpu",
    "maxTokens": 4096,
    "persistIntervalS": 0,
    "enableProfiling": True,
    "numWorkers": 2,
}


LIVE: set[EngineProcess] = set()
"""Engines started and not closed yet (tests/docs/conftest.py closes them after each test, so a
scenario that fails half-way leaves no process behind)."""


class EngineProcess:
    """One ``kvcache-engine serve`` subprocess; ``start()`` returns once /readyz answers 200."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.config = {**GEOMETRY, "persistencePath": str(self.data), **config}
        self.cleanups: list[Callable[[], None]] = []
        self.peers: list[EngineProcess] = []
        """Engines of the same scenario (a baseline, other replicas), closed with this one."""
        self.extra_env: dict[str, str] = {}
        """More variables for the doc's commands (the peers' addresses)."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = workdir / "engine.log"

    def start(self, timeout_s: float = 60.0) -> EngineProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config))
        token_file = self.workdir / "token"
        token_file.write_text(TOKEN)
        argv = [str(BIN / "kvcache-engine"), "serve", "--config", str(cfg_path), "--host", "127.0.0.1",
                "--port", "0", "--token-file", str(token_file)]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HOME": str(self.workdir),
               "KVCACHE_PROFILE_DIR": str(self.workdir / "profiles")}  # fmt: skip
        env.pop("KVCACHE_TOKEN_FILE", None)
        env.pop("KVCACHE_TOKEN", None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, env=env, cwd=self.workdir)
        LIVE.add(self)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            raise RuntimeError(f"engine did not start: {line!r}\n{self.log()}")
        self.url = match.group(1)
        deadline = time.monotonic() + timeout_s
        while request("GET", self.url + "/readyz")[0] != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"engine not ready after {timeout_s}s\n{self.log()}")
            time.sleep(0.05)
        return self

    def env(self) -> dict[str, str]:
        own = {"KVCACHE_URL": self.url, "KVCACHE_TOKEN": TOKEN, "KVCACHE_DATA": str(self.data)}
        return {**own, **self.extra_env}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Stop the engine and its peers and undo what the scenario did to the host (chattr, modes)."""
        self.stop()
        for peer in self.peers:
            peer.close()
        for undo in reversed(self.cleanups):
            undo()
        self.cleanups.clear()
        LIVE.discard(self)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def request(method: str, url: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
    """One JSON request; (status, decoded body or text); (0, error) when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except OSError as exc:
        return 0, str(exc)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


# --- traffic ---------------------------------------------------------------------------------------


def prompts(count: int, blocks: int, block_tokens: int, seed: int = 0) -> list[list[int]]:
    """``count`` prompts of ``blocks`` full blocks, distinct from their first token on."""
    return [[seed * 1_000_000 + p * 10_000 + t for t in range(blocks * block_tokens)] for p in range(count)]


def put_and_lookup(url: str, tokens_list: list[list[int]], *, rounds: int = 1) -> None:
    """Put every prompt's KV once, then look every prompt up ``rounds`` times (client library)."""
    import torch

    from kvcache_engine.client import KVCacheClient

    client = KVCacheClient([url], token=TOKEN, strict=True, timeout_s=10.0)
    try:
        geometry = request("GET", url + "/v1/config")[1]
        shape = (2, geometry["numLayers"], 0, geometry["numKvHeads"], geometry["headDim"])
        for tokens in tokens_list:
            kv = torch.randn(shape[0], shape[1], len(tokens), shape[3], shape[4]).to(torch.float16)
            client.put(tokens, kv, wait=True)
        for _ in range(rounds):
            for tokens in tokens_list:
                client.lookup(tokens)
    finally:
        client.close()


def serve_like_inference(url: str, requests: list[list[int]]) -> None:
    """What an inference server does per request: lookup; on a partial hit, put the whole KV."""
    import torch

    from kvcache_engine.client import KVCacheClient

    client = KVCacheClient([url], token=TOKEN, strict=True, timeout_s=10.0)
    try:
        geometry = request("GET", url + "/v1/config")[1]
        for tokens in requests:
            if client.lookup(tokens) < len(tokens):
                shape = (2, geometry["numLayers"], len(tokens), geometry["numKvHeads"], geometry["headDim"])
                client.put(tokens, torch.randn(shape).to(torch.float16), wait=True)
    finally:
        client.close()


# --- scenarios ----------------------------------------------------------------------------------------


@dataclass
class Scenario:
    """Builds one symptom; ``slow`` ones run under ``make e2e`` (pytest -m slow)."""

    name: str
    build: Callable[[Path], EngineProcess]
    slow: bool
    what: str


def _default(workdir: Path) -> EngineProcess:
    engine = EngineProcess(workdir, {}).start()
    put_and_lookup(engine.url, prompts(8, 4, 4), rounds=2)
    return engine


def _low_hit_rate(workdir: Path) -> EngineProcess:
    # 16 blocks of capacity against a working set of 12 prompts x 4 blocks, cycled: LRU thrashes.
    engine = EngineProcess(workdir, {"maxTokens": 64, "cacheStrategy": "LRU"}).start()
    serve_like_inference(engine.url, prompts(12, 4, 4, seed=1) * 3)
    return engine


# Blocks of 16 tokens x 4 layers x 4 heads x 64 dims (64 KiB in fp16): big enough that decoding
# dominates a get, so the codec, not HTTP or scheduling noise, sets the latency.
LATENCY_GEOMETRY: dict[str, Any] = {"blockTokens": 16, "numLayers": 4, "numKvHeads": 4, "headDim": 64,
                                    "maxTokens": 32768}  # fmt: skip


def _high_latency(workdir: Path) -> EngineProcess:
    """An int4 engine and, as ``KVCACHE_BASELINE_URL``, a twin with codec ``none``, sent the same
    traffic: 4 prompts of 64 blocks (4 MiB of fp16 each) put once, then 20 rounds of a lookup and
    a get of each, the two engines alternating call by call (a burst of load on the host then
    slows both alike), so their latencies differ by the codec alone."""
    import torch

    from kvcache_engine.client import KVCacheClient

    baseline = EngineProcess(workdir / "baseline", {**LATENCY_GEOMETRY, "compressionCodec": "none"}).start()
    engine = EngineProcess(workdir, {**LATENCY_GEOMETRY, "compressionCodec": "int4"})
    engine.peers.append(baseline)
    engine.start()
    engine.extra_env["KVCACHE_BASELINE_URL"] = baseline.url
    urls = (engine.url, baseline.url)
    clients = [KVCacheClient([url], token=TOKEN, strict=True, timeout_s=30.0) for url in urls]
    try:
        tokens_list = prompts(4, 64, LATENCY_GEOMETRY["blockTokens"], seed=2)
        for tokens in tokens_list:
            shape = (2, LATENCY_GEOMETRY["numLayers"], len(tokens), LATENCY_GEOMETRY["numKvHeads"],
                     LATENCY_GEOMETRY["headDim"])  # fmt: skip
            kv = torch.randn(shape).to(torch.float16)
            for client in clients:
                client.put(tokens, kv, wait=True)
        for _ in range(20):
            for tokens in tokens_list:
                for client in clients:
                    assert client.lookup(tokens) == len(tokens)
                    assert client.get(tokens) is not None
    finally:
        for client in clients:
            client.close()
    return engine


def _low_throughput(workdir: Path) -> EngineProcess:
    # Blocks big enough (16 tokens x 4 layers x 4 heads x 64 dims: 64 KiB in fp16) that int4
    # quantisation on one worker, not HTTP, bounds the request rate; the doc's bench drives traffic.
    geometry = {"blockTokens": 16, "numLayers": 4, "numKvHeads": 4, "headDim": 64, "maxTokens": 32768}
    return EngineProcess(workdir, {**geometry, "compressionCodec": "int4", "numWorkers": 1}).start()


def _gpu_missing(workdir: Path) -> EngineProcess:
    return EngineProcess(workdir, {"device": "cuda"}).start()


def _full_pool(workdir: Path) -> EngineProcess:
    """64 tokens = 16 blocks; 40 prompts x 4 blocks keep the pool full and evicting, then 300
    requests of the packaged trace (``kvcache-engine bench``'s workload) warm the engine up, so
    the doc's RSS comparison over the next requests measures growth, not first-use buffers."""
    from kvcache_engine.loadgen import BenchSpec, run_bench

    engine = EngineProcess(workdir, {"maxTokens": 64}).start()
    put_and_lookup(engine.url, prompts(40, 4, 4, seed=3), rounds=1)
    report = run_bench(BenchSpec((engine.url,), TOKEN, concurrency=2, requests=300, seconds=None, trace=None))
    assert report.errors == 0, report
    return engine


FRAGMENT_SEED = 10
"""Token seed of the fragmentation scenario's chains (the doc's commands rebuild its prompts)."""


def fragmentation_chains() -> list[list[int]]:
    """16 chains of 2 to 6 blocks of 4 tokens (62 blocks): chain i is ``10_000_000 + i * 10_000 + t``."""
    return [[FRAGMENT_SEED * 1_000_000 + i * 10_000 + t for t in range((2 + i % 5) * 4)] for i in range(16)]


def _fragmented(workdir: Path) -> EngineProcess:
    """Churn that leaves holes in the pool's slot range. 64 slots; the 16 chains of varying length
    fill slots 0-61 in put order; lookups make the odd chains the most recent; then background gc
    (LRU, gcThreshold 0.5) evicts 30 blocks of the even chains and no put takes their slots: 32
    blocks spread over 62 slots. gc is off while filling and on only for that eviction, so which
    slots empty does not depend on timing."""
    engine = EngineProcess(workdir, {"maxTokens": 256, "cacheStrategy": "LRU", "enableGc": False}).start()
    chains = fragmentation_chains()
    put_and_lookup(engine.url, chains, rounds=0)
    for tokens in chains[1::2]:
        assert request("POST", engine.url + "/v1/lookup", {"tokens": tokens})[0] == 200
    assert request("POST", engine.url + "/admin/config", {"enableGc": True, "gcThreshold": 0.5})[0] == 200
    deadline = time.monotonic() + 30
    while request("GET", engine.url + "/v1/stats")[1]["used_blocks"] > 32:
        if time.monotonic() > deadline:
            raise RuntimeError(f"background gc did not evict down to 32 blocks\n{engine.log()}")
        time.sleep(0.05)
    assert request("POST", engine.url + "/admin/config", {"gcThreshold": 0.9})[0] == 200
    return engine


def _readonly_persistence(workdir: Path) -> EngineProcess:
    """The PVC is not writable by the engine (a root-owned volume and a non-root engine): mode
    0555, and when the test itself runs as root (which ignores modes) the directory is also made
    immutable with ``chattr +i`` (root gets EPERM, as a non-root user gets EACCES)."""
    data = workdir / "data"
    data.mkdir(parents=True)
    data.chmod(0o555)
    engine = EngineProcess(workdir, {})
    engine.cleanups.append(lambda: data.chmod(0o755))
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(data)], check=True, capture_output=True)
        engine.cleanups.append(lambda: subprocess.run(["chattr", "-i", str(data)], check=False))
    engine.start()
    put_and_lookup(engine.url, prompts(4, 4, 4, seed=4))
    return engine


def _corrupt_segment(workdir: Path) -> EngineProcess:
    """A persisted segment whose bytes changed on disk (bit rot, a bad copy): flipped mid-file."""
    engine = EngineProcess(workdir, {}).start()
    put_and_lookup(engine.url, prompts(6, 4, 4, seed=5))
    assert request("POST", engine.url + "/admin/persist")[1]["ok"]
    put_and_lookup(engine.url, prompts(6, 4, 4, seed=6))
    assert request("POST", engine.url + "/admin/persist")[1]["ok"]
    engine.stop(signal.SIGKILL)  # no final persist: the two segments on disk stay as they are
    segment = sorted(engine.data.glob("seg-*.safetensors"))[0]
    raw = bytearray(segment.read_bytes())
    middle = len(raw) - 64
    raw[middle : middle + 8] = bytes(b ^ 0xFF for b in raw[middle : middle + 8])
    segment.write_bytes(bytes(raw))
    return engine.start()


def _killed_mid_persist(workdir: Path) -> EngineProcess:
    """SIGKILL while a persist is writing a segment (a temp file exists), then a restart."""
    engine = EngineProcess(workdir, {"maxTokens": 131072}).start()
    put_and_lookup(engine.url, prompts(8, 4, 4, seed=7))
    assert request("POST", engine.url + "/admin/persist")[1]["ok"]
    put_and_lookup(engine.url, prompts(2000, 16, 4, seed=8))  # ~16 MiB: the next persist takes a while
    assert engine.proc is not None
    pid = engine.proc.pid
    for _attempt in range(5):
        # Persist in the background; freeze the engine as soon as a temp file shows, then kill it.
        poster = subprocess.Popen(
            ["curl", "-s", "-m", "30", "-X", "POST", "-H", f"Authorization: Bearer {TOKEN}",
             engine.url + "/admin/persist"], stdout=subprocess.DEVNULL,
        )  # fmt: skip
        caught = _wait_for_temp_file(engine.data, timeout_s=10.0)
        if caught:
            os.kill(pid, signal.SIGSTOP)
            os.kill(pid, signal.SIGKILL)
        poster.wait()
        if caught:
            break
    else:
        raise RuntimeError("could not catch the engine mid-persist in 5 attempts")
    engine.stop(signal.SIGKILL)
    return engine.start()


def _wait_for_temp_file(directory: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with os.scandir(directory) as entries:
            if any(e.name.startswith(".tmp-") for e in entries):
                return True
    return False


def _geometry_changed(workdir: Path) -> EngineProcess:
    """The cache was persisted for another model geometry (numLayers changed in the spec)."""
    engine = EngineProcess(workdir, {}).start()
    put_and_lookup(engine.url, prompts(4, 4, 4, seed=9))
    assert request("POST", engine.url + "/admin/persist")[1]["ok"]
    engine.stop()
    engine.config["numLayers"] = 4
    return engine.start()


def _unbalanced(workdir: Path) -> EngineProcess:
    """Three replicas of a cache whose spec sets ``routeDepth: 1`` (placement by the first block),
    then the first 120 requests of the packaged trace through clients that read that setting
    (``kvcache-engine bench``, 2 workers, each sharding over the three): every chain of the trace
    starts with block 0 (one shared system prompt), so every chain has the same key and one
    replica gets all the traffic. ``KVCACHE_REPLICA_URLS`` lists the three (this one first)."""
    from kvcache_engine.loadgen import BenchSpec, run_bench

    replicas = [EngineProcess(workdir / f"replica-{i}", {"routeDepth": 1}).start() for i in range(3)]
    engine = replicas[0]
    engine.peers.extend(replicas[1:])
    urls = tuple(r.url for r in replicas)
    engine.extra_env["KVCACHE_REPLICA_URLS"] = " ".join(urls)
    report = run_bench(BenchSpec(urls, TOKEN, concurrency=2, requests=120, seconds=None, trace=None))
    assert report.errors == 0, report
    return engine


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("default", _default, False, "a healthy engine with some traffic"),
        Scenario("low-hit-rate", _low_hit_rate, False, "maxTokens far below the working set"),
        Scenario("high-latency", _high_latency, True, "int4 on every put and get, next to an fp16 twin"),
        Scenario("low-throughput", _low_throughput, False, "int4 on big blocks with one worker"),
        Scenario("gpu-missing", _gpu_missing, True, "device: cuda on a host without CUDA"),
        Scenario("full-pool", _full_pool, True, "a pool full and evicting (bounded memory)"),
        Scenario("fragmented-pool", _fragmented, False, "churn left holes in the pool's slot range"),
        Scenario(
            "readonly-persistence", _readonly_persistence, False, "a persistence dir the engine cannot write"
        ),
        Scenario("corrupt-segment", _corrupt_segment, False, "a persisted segment corrupted on disk"),
        Scenario("killed-mid-persist", _killed_mid_persist, True, "SIGKILL during a persist, then restart"),
        Scenario("geometry-changed", _geometry_changed, True, "persisted for another model geometry"),
        Scenario("unbalanced-replicas", _unbalanced, False, "3 replicas, clients placing by the first block"),
    )
}
