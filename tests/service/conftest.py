"""Fixtures for the engine service: in-process servers (fast) and real ``kvcache-engine serve``
subprocesses (for kill -9, SIGTERM and SIGSTOP)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp import web

from kvcache_engine.contract import KVCacheConfig
from kvcache_engine.engine import KVCacheEngine
from kvcache_engine.server import EngineServer, ServerSettings
from kvcache_engine.server.limits import GuardedSite, runner_kwargs

TOKEN = "test-token"
GEOMETRY: dict[str, Any] = {
    "block_tokens": 4,
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 8,
    "dtype": "float16",
    "device": "cpu",
    "enable_gc": False,
}


def make_config(**overrides: Any) -> KVCacheConfig:
    """A tiny CPU geometry (one block = 4 tokens x 2 layers x 2 heads x 8 dims)."""
    fields = {**GEOMETRY, "max_tokens": 1024, "persist_interval_s": 0.0, **overrides}
    return KVCacheConfig(**fields)


def make_kv(cfg: KVCacheConfig, n_tokens: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, cfg.num_layers, n_tokens, cfg.num_kv_heads, cfg.head_dim)
    return torch.randn(shape, generator=gen).to(torch.float16)


def make_tokens(n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    return torch.randint(0, 32_000, (n,), generator=gen).tolist()


class LiveServer:
    """An EngineServer on 127.0.0.1:<free port>, its event loop in a background thread."""

    def __init__(self, engine: KVCacheEngine, settings: ServerSettings, *, load: bool = True) -> None:
        self.engine = engine
        self.server = EngineServer(engine, settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.runner = web.AppRunner(
            self.server.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=1.0,
            **runner_kwargs(settings),
        )
        self._call(self.runner.setup())
        self.site = GuardedSite(self.runner, settings, self.server.headers_seen)
        self._call(self.site.start())
        self.port = self.site.port
        self.url = f"http://127.0.0.1:{self.port}"
        if load:
            self.server.load_in_background().join(timeout=30)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self, persist: bool = False) -> None:
        if self.loop.is_closed():
            return  # stopped by the test already
        self._call(self.runner.cleanup())
        if persist:
            self._call(self.server.shutdown())
        else:
            self.server.persister.stop()
            self.server.executor.shutdown(wait=True)
            self.server.commit_executor.shutdown(wait=True)
            self.engine.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def live_server() -> Iterator[Any]:
    """Factory: ``live_server(config=..., token=TOKEN, **settings)`` -> LiveServer (stopped after)."""
    made: list[LiveServer] = []

    def factory(
        config: KVCacheConfig | None = None, token: str | None = TOKEN, **settings: Any
    ) -> LiveServer:
        engine = KVCacheEngine(config or make_config(), load_on_start=False)
        srv = LiveServer(engine, ServerSettings(host="127.0.0.1", port=0, token=token, **settings))
        made.append(srv)
        return srv

    yield factory
    for srv in made:
        srv.stop()


def http(
    method: str, url: str, body: bytes | None = None, token: str | None = TOKEN, **headers: str
) -> tuple[int, bytes]:
    """One request with urllib; (status, body) for every status."""
    req = urllib.request.Request(url, data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in headers.items():
        req.add_header(k.replace("_", "-"), v)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def http_json(method: str, url: str, doc: Any = None, token: str | None = TOKEN) -> tuple[int, Any]:
    status, raw = http(method, url, None if doc is None else json.dumps(doc).encode(), token)
    return status, json.loads(raw) if raw else None


# --- subprocess servers ------------------------------------------------------------------------


class EngineProcess:
    """A real ``kvcache-engine serve`` process on a free port."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, extra_args: list[str] | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "engine.json"
        self.config_path.write_text(json.dumps(config))
        self.token_file = workdir / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.port = 0  # 0 until the first start; restarts reuse the same port
        self.log = workdir / "engine.log"

    def start(self, wait_ready: bool = True) -> EngineProcess:
        args = [
            sys.executable, "-m", "kvcache_engine.cli", "serve", "--config", str(self.config_path),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--token-file", str(self.token_file), *self.extra_args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
        log = open(self.log, "a")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"engine did not start: {line!r}\n{self.log.read_text()[-3000:]}")
        self.url = line.strip().rsplit(" ", 1)[-1]
        self.port = int(self.url.rsplit(":", 1)[1])
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if http("GET", self.url + "/readyz", token=None)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.url} not ready after {timeout}s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._close_pipes()

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._close_pipes()
        return code

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close_pipes()


def process_config(tmp: Path, **overrides: Any) -> dict[str, Any]:
    return {
        **GEOMETRY,
        "max_tokens": 4096,
        "persistence_path": str(tmp / "cache"),
        "persist_interval_s": 0,
        **overrides,
    }


@pytest.fixture
def engine_process(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``engine_process(name, **config)`` -> started EngineProcess (killed after)."""
    made: list[EngineProcess] = []

    def factory(
        name: str = "e0", start: bool = True, extra_args: list[str] | None = None, **config: Any
    ) -> EngineProcess:
        proc = EngineProcess(
            tmp_path / name, process_config(tmp_path / name, **config), extra_args=extra_args
        )
        made.append(proc)
        return proc.start() if start else proc

    yield factory
    for proc in made:
        proc.stop()
