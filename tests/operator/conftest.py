"""Fixtures for the operator's tests: the API emulator, the real operator, real engine processes.

Engines are real ``kvcache-engine serve`` processes on 127.0.0.1, each on its own port; the pods
the tests create (standing in for the StatefulSet controller and the kubelet) carry that port as
their ``http`` container port, so the operator reaches them exactly as it reaches pod IPs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import kmock
import kopf
import kubernetes.config.kube_config
import pytest

from tests.kube_emulator import KubeEmulator, write_kubeconfig

NS = "team-a"
KVCACHES = "kvcache.dev/v1alpha1/kvcaches"
CHILD_RESOURCES = {
    "ConfigMap": "v1/configmaps",
    "Secret": "v1/secrets",
    "Service": "v1/services",
    "StatefulSet": "apps/v1/statefulsets",
    "PodDisruptionBudget": "policy/v1/poddisruptionbudgets",
    "PersistentVolumeClaim": "v1/persistentvolumeclaims",
    "CronJob": "batch/v1/cronjobs",
    "ServiceMonitor": "monitoring.coreos.com/v1/servicemonitors",
    "NetworkPolicy": "networking.k8s.io/v1/networkpolicies",
}
T = TypeVar("T")


def make_kvcache(name: str, **spec: Any) -> dict[str, Any]:
    """A small KVCache: tiny engine geometry, 1 s scrapes."""
    body: dict[str, Any] = {
        "replicas": 2,
        "metrics": {"scrapeInterval": "1s"},
        "cache": {
            "maxTokens": 256,
            "blockTokens": 16,
            "numLayers": 2,
            "numKvHeads": 2,
            "headDim": 16,
            "device": "cpu",
            "persistIntervalS": 0,
        },
        "resources": {"memoryOverhead": "64Mi"},
    }
    body.update(spec)
    return {
        "apiVersion": "kvcache.dev/v1alpha1",
        "kind": "KVCache",
        "metadata": {"name": name, "namespace": NS},
        "spec": body,
    }


async def wait_for(check: Callable[[], T | None], *, timeout: float = 20.0, what: str = "condition") -> T:
    """Poll ``check`` (sync, cheap) until it returns a truthy value; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except kmock.KubernetesError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def children(emu: KubeEmulator, name: str) -> dict[str, list[dict[str, Any]]]:
    """Every object of a child kind labelled as this KVCache's."""
    selector = f"app.kubernetes.io/instance={name}"
    found = {kind: emu.list(res, NS, label_selector=selector) for kind, res in CHILD_RESOURCES.items()}
    return {kind: objs for kind, objs in found.items() if objs}


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), None)


@dataclass
class Cluster:
    emu: KubeEmulator
    url: str
    kubeconfig: Path


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    async with KubeEmulator() as emu, kmock.Server(emu) as server:
        emu.create("v1/namespaces", {"metadata": {"name": NS}})  # Kopf serves namespaces that exist
        kubeconfig = write_kubeconfig(tmp_path, str(server.url), namespace=NS)
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        # the kubernetes client reads KUBECONFIG once, at import: point its default at ours
        monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        yield Cluster(emu, str(server.url), kubeconfig)


@contextlib.asynccontextmanager
async def running_operator(registry: kopf.OperatorRegistry | None = None) -> AsyncIterator[kopf.Memo]:
    """The real operator (our handlers, Kopf's reactor) watching NS, in a thread with its own loop.

    Not in the test's loop: on exit Kopf cancels every task created after it started, which in a
    shared loop includes the emulator's request handlers and the test's own teardown.
    """
    if registry is None:
        from kvcache_operator import handlers

        del handlers  # imported for its registrations (Kopf's default registry)
    stop, ready = threading.Event(), threading.Event()
    memo = kopf.Memo()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(
                kopf.operator(
                    namespaces=[NS],
                    standalone=True,
                    stop_flag=stop,
                    ready_flag=ready,
                    memo=memo,
                    registry=registry,
                )
            )
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=main, name="kopf-operator", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 15), "the operator did not start within 15 s"
    try:
        yield memo
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive(), "the operator did not stop within 30 s"
        assert not errors, errors


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[kopf.Memo]:
    async with running_operator() as memo:
        yield memo


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Engines:
    """Real engine processes started from the operator's own ConfigMap and token Secret."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.token = ""

    async def start(
        self, emu: KubeEmulator, name: str, count: int, extra_args: Sequence[str] = ()
    ) -> list[int]:
        # The operator creates the ConfigMap and the token Secret one after the other: wait for both.
        cm = await wait_for(
            lambda: emu.get("v1/configmaps", f"{name}-config", NS), what=f"ConfigMap {name}-config"
        )
        secret = await wait_for(
            lambda: emu.get("v1/secrets", f"{name}-token", NS), what=f"Secret {name}-token"
        )
        admin = await wait_for(
            lambda: emu.get("v1/secrets", f"{name}-admin-token", NS), what=f"Secret {name}-admin-token"
        )
        config = cm["data"]["config.yaml"]
        token = base64.b64decode(secret["data"]["token"]).decode()
        (self.tmp_path / "config.yaml").write_text(config)
        (self.tmp_path / "token").write_text(token)
        (self.tmp_path / "admin-token").write_text(base64.b64decode(admin["data"]["token"]).decode())
        self.token = token
        ports = [free_port() for _ in range(count)]
        for port in ports:
            with open(self.tmp_path / f"engine-{port}.log", "wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "kvcache_engine.cli",
                            "serve",
                            "--config",
                            str(self.tmp_path / "config.yaml"),
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(port),
                            "--token-file",
                            str(self.tmp_path / "token"),
                            "--admin-token-file",
                            str(self.tmp_path / "admin-token"),
                            *extra_args,
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "PYTHONWARNINGS": "ignore"},
                    )
                )
        async with aiohttp.ClientSession() as http:
            for port in ports:
                await self._ready(http, port)
        return ports

    async def _ready(self, http: aiohttp.ClientSession, port: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise AssertionError(f"engine on port {port} did not become ready")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Engines]:
    procs = Engines(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


def run_pods(emu: KubeEmulator, name: str, ports: list[int]) -> None:
    """Stand in for the StatefulSet controller and the kubelet: one Ready pod per engine port,
    and the StatefulSet's status saying every replica runs the current template."""
    sts = emu.get("apps/v1/statefulsets", name, NS)
    template = sts["spec"]["template"]
    owner = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": name,
        "uid": sts["metadata"]["uid"],
        "controller": True,
    }
    for ordinal, port in enumerate(ports):
        container = {**template["spec"]["containers"][0], "ports": [{"name": "http", "containerPort": port}]}
        emu.create(
            "v1/pods",
            {
                "metadata": {
                    "name": f"{name}-{ordinal}",
                    "namespace": NS,
                    "labels": template["metadata"]["labels"],
                    "ownerReferences": [owner],
                },
                "spec": {"containers": [container]},
            },
        )
        emu.patch(
            "v1/pods",
            f"{name}-{ordinal}",
            {
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "conditions": [{"type": "Ready", "status": "True"}],
                }
            },
            NS,
            subresource="status",
        )
    settle_statefulset(emu, name, len(ports))


def settle_statefulset(emu: KubeEmulator, name: str, ready: int) -> None:
    sts = emu.get("apps/v1/statefulsets", name, NS)
    emu.patch(
        "apps/v1/statefulsets",
        name,
        {
            "status": {
                "observedGeneration": sts["metadata"]["generation"],
                "replicas": ready,
                "readyReplicas": ready,
                "updatedReplicas": ready,
                "currentRevision": "r1",
                "updateRevision": "r1",
            }
        },
        NS,
        subresource="status",
    )
