"""``LocalCluster``: the whole local Kubernetes in one context manager.

::

    with LocalCluster() as cluster:               # API server, controllers, kubelet, proxy, operator
        cluster.apply("crds/samples/cpu-only.yaml")
        cluster.wait_for(lambda: cluster.ready_replicas("smollm-cpu") == 2, timeout=120)

A background thread runs one asyncio loop with the API server (served over HTTP for the
operator, whose kubeconfig :attr:`kubeconfig` points at it), the StatefulSet/Job/CronJob
controllers, the kubelet and the Service proxy; they use the emulator's Python API directly.
The operator runs as a subprocess, ``kvcache-operator run``, exactly as in a pod.

Leaving the context (normally, by exception or Ctrl-C) stops the operator, then every pod
gracefully (preStop, SIGTERM, grace capped at ``shutdown_grace_s``), then the server; anything
still alive is killed by process group. ``atexit`` and SIGTERM/SIGHUP handlers do the same if the
interpreter goes away, and ``PR_SET_PDEATHSIG`` covers a SIGKILL of this process.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from e2e.localcluster import procs as procs_mod
from e2e.localcluster.apiserver import EmulatorAPI, LocalAPIServer, load_crds
from e2e.localcluster.controllers import (
    MANUAL_RUN_ANNOTATION,
    CronJobController,
    JobController,
    StatefulSetController,
    VolumeController,
    is_ready,
    job_from_cronjob,
)
from e2e.localcluster.kubeapi import ApiError
from e2e.localcluster.kubelet import Kubelet, KubeletConfig
from e2e.localcluster.podenv import IPPool
from e2e.localcluster.proxy import ServiceProxy

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = (REPO / "crds" / "kvcache.dev_kvcaches.yaml",)
BIN_DIR = Path(sys.executable).parent

log = logging.getLogger("localcluster")
T = TypeVar("T")


class ApplyError(ValueError):
    """The API server rejected a manifest; the message is the server's (it names the field)."""


class LocalCluster:
    """A local Kubernetes (emulated API, real processes) with the operator running against it."""

    def __init__(
        self,
        state_dir: Path | None = None,
        *,
        namespace: str = "default",
        operator: bool = True,
        operator_args: Iterable[str] = (),
        operator_env: Mapping[str, str] | None = None,
        crd_files: Iterable[Path] = CRD_FILES,
        max_probe_period_s: float = 1.0,
        shutdown_grace_s: float = 10.0,
        keep_state: bool = False,
    ) -> None:
        self._own_state = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="localcluster-"))
        self.namespace = namespace
        self.operator_enabled = operator
        self.operator_args = list(operator_args)
        self.operator_env = dict(operator_env or {})
        self.crd_files = list(crd_files)
        self.shutdown_grace_s = shutdown_grace_s
        self.keep_state = keep_state
        self.procs = procs_mod.ProcessRegistry()
        # Each cluster gets its own 127.X.Y.0/24, so concurrent clusters never share an address.
        self.ips = IPPool(f"127.{random.randint(10, 250)}.{random.randint(0, 255)}")
        self.kubelet_config = KubeletConfig(self.state_dir, BIN_DIR, max_probe_period_s=max_probe_period_s)
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.server_url = ""
        self.emulator: LocalAPIServer | None = None
        self.api: EmulatorAPI | None = None
        self.kubelet: Kubelet | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    # ----------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0) -> None:
        procs_mod.register(self.procs)
        self._thread = threading.Thread(target=self._thread_main, name="localcluster", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            self.stop()
            raise RuntimeError(f"local cluster did not start: {self._error!r}")
        if self.operator_enabled:
            self.start_operator()

    def stop(self) -> None:
        """Operator, then pods (gracefully), then the server; then anything left, by process group."""
        self.stop_operator()
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=self.shutdown_grace_s + 20)
        self.procs.kill_all(grace_s=1.0)
        procs_mod.unregister(self.procs)
        if self._own_state and not self.keep_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start() / logged; the thread must not die silently
            self._error = exc
            log.exception("local cluster loop failed")
        finally:
            self._ready.set()
            loop.close()

    async def _main(self) -> None:
        import kmock
        from tests.kube_emulator import write_kubeconfig

        self._stop = asyncio.Event()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        async with LocalAPIServer() as emu, kmock.Server(emu) as server:
            self.emulator = emu
            for path in self.crd_files:
                docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
                for schema in load_crds([path]):
                    emu.add_crd(schema, next(d for d in docs if d.get("kind") == "CustomResourceDefinition"))
            if self.namespace != "default":
                emu.create("v1/namespaces", {"metadata": {"name": self.namespace}})
            self.server_url = str(server.url).rstrip("/")
            write_kubeconfig(self.state_dir, self.server_url, namespace=self.namespace)
            self.api = EmulatorAPI(emu)
            self.kubelet = Kubelet(self.api, self.kubelet_config, self.procs, self.ips)
            emu.node = self.kubelet  # pods/log, exec and portforward are served from the kubelet
            proxy = ServiceProxy(self.api, self.ips, self._pod_ip)
            self.kubelet.resolve_service = proxy.resolve
            tasks = [
                asyncio.create_task(c, name=type(c).__name__)
                for c in (
                    StatefulSetController(self.api).run(),
                    JobController(self.api).run(),
                    CronJobController(self.api).run(),
                    VolumeController(self.api, self.state_dir / "volumes").run(),
                    proxy.run(),
                )
            ]
            kubelet_task = asyncio.create_task(self.kubelet.run(shutdown_grace_s=self.shutdown_grace_s))
            self._ready.set()
            await self._stop.wait()
            # Controllers first (nothing new gets created), then the node (its run loop stops every
            # pod on the way out), then the proxy and the server.
            for task in tasks[:-1]:
                task.cancel()
            kubelet_task.cancel()
            await asyncio.gather(kubelet_task, return_exceptions=True)
            tasks[-1].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _pod_ip(self, namespace: str, name: str) -> str | None:
        worker = self.kubelet.worker(namespace, name) if self.kubelet else None
        return worker.ip if worker else None

    # ----------------------------------------------------------------------------- operator
    def start_operator(self) -> subprocess.Popen[bytes]:
        """``kvcache-operator run`` against this cluster (KUBECONFIG), logs in ``logs/operator.log``."""
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1", **self.operator_env}
        # Standalone (no peering), no liveness or metrics port: several local clusters may run at once.
        argv = [
            str(BIN_DIR / "kvcache-operator"),
            "run",
            "--namespace",
            self.namespace,
            "--standalone",
            "--liveness",
            "",
            "--metrics-port",
            "0",
            *self.operator_args,
        ]
        self.operator = self.procs.spawn(argv, env=env, cwd=self.state_dir, log_path=self.operator_log_path)
        return self.operator

    def stop_operator(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        proc, self.operator = self.operator, None
        if proc is None:
            return
        self.procs.signal_group(proc, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.procs.signal_group(proc, signal.SIGKILL)
            proc.wait()
        self.procs.forget(proc)

    @property
    def operator_log_path(self) -> Path:
        return self.state_dir / "logs" / "operator.log"

    def operator_log(self) -> str:
        path = self.operator_log_path
        return path.read_text(errors="replace") if path.exists() else ""

    # ----------------------------------------------------------------------------- sync API
    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run a coroutine on the cluster's loop and wait for its result."""
        assert self._loop is not None, "cluster not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _api(self) -> EmulatorAPI:
        assert self.api is not None, "cluster not started"
        return self.api

    def apply(
        self, manifest: Mapping[str, Any] | str | Path, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        """Create or merge-patch each document (a dict, YAML text or a path), like ``kubectl apply``.

        Raises :class:`ApplyError` with the API server's message when it rejects one."""
        docs = _documents(manifest)
        out = []
        for raw in docs:
            doc = dict(raw)
            doc["metadata"] = {
                **doc.get("metadata", {}),
                "namespace": doc.get("metadata", {}).get("namespace") or namespace or self.namespace,
            }
            out.append(self.run(self._apply_one(doc)))
        return out

    async def _apply_one(self, doc: dict[str, Any]) -> dict[str, Any]:
        api = self._api()
        meta = doc["metadata"]
        try:
            created = await api.create(doc)
            if created is not None:
                return created
            body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "status")}
            patched = await api.patch(doc["kind"], meta["namespace"], meta["name"], body)
        except ApiError as exc:
            raise ApplyError(exc.message) from exc
        if patched is None:
            raise ApplyError(f"{doc['kind']} {meta['name']} vanished while applying")
        return patched

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return self.run(self._api().get(kind, namespace or self.namespace, name))

    def list(
        self, kind: str, namespace: str | None = None, selector: Mapping[str, str] | None = None
    ) -> builtins.list[dict[str, Any]]:
        return self.run(self._api().list(kind, namespace or self.namespace, selector))

    def patch(
        self,
        kind: str,
        name: str,
        patch: Mapping[str, Any],
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> dict[str, Any] | None:
        try:
            return self.run(
                self._api().patch(kind, namespace or self.namespace, name, patch, subresource=subresource)
            )
        except ApiError as exc:
            raise ApplyError(exc.message) from exc

    def delete(self, kind: str, name: str, namespace: str | None = None) -> bool:
        return self.run(self._api().delete(kind, namespace or self.namespace, name))

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout_s: float = 60.0,
        interval_s: float = 0.25,
        what: str = "condition",
    ) -> T:
        """Poll ``predicate`` until truthy; TimeoutError (with the operator log tail) otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                tail = "\n".join(self.operator_log().splitlines()[-30:])
                raise TimeoutError(
                    f"timed out after {timeout_s:.0f}s waiting for {what}\noperator log tail:\n{tail}"
                )
            time.sleep(interval_s)

    # ----------------------------------------------------------------------------- pods & workloads
    def pods(
        self, selector: Mapping[str, str] | None = None, namespace: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        return self.list("Pod", namespace, selector)

    def ready_pods(self, selector: Mapping[str, str] | None = None) -> builtins.list[dict[str, Any]]:
        return [p for p in self.pods(selector) if is_ready(p)]

    def container_pid(
        self, pod: str, container: str | None = None, namespace: str | None = None
    ) -> int | None:
        """PID of a running container process (for kill -9 scenarios)."""
        worker = self.kubelet.worker(namespace or self.namespace, pod) if self.kubelet else None
        if worker is None:
            return None
        for runner in worker.runners:
            if (container is None or runner.name == container) and runner.proc and runner.proc.poll() is None:
                return runner.proc.pid
        return None

    def kill_container(self, pod: str, sig: int = signal.SIGKILL, namespace: str | None = None) -> int:
        pid = self.container_pid(pod, namespace=namespace)
        if pid is None:
            raise LookupError(f"pod {pod!r} has no running container")
        os.kill(pid, sig)
        return pid

    def pod_logs(self, pod: str, container: str | None = None, namespace: str | None = None) -> str:
        """Everything a pod's containers wrote, run after run (``""`` if it never ran); for a pod
        that is gone too, from its newest incarnation's log directory."""
        root = self.state_dir / "logs" / "pods"
        dirs = sorted(root.glob(f"{namespace or self.namespace}_{pod}_*"), key=lambda p: p.stat().st_mtime)
        if not dirs:
            return ""
        runs = [
            path
            for sub in sorted(dirs[-1].iterdir())
            if sub.is_dir() and container in (None, sub.name)
            for path in sorted(sub.glob("*.log"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
            if path.stem.isdigit()
        ]
        return "".join(path.read_text(errors="replace") for path in runs)

    def pvc_dir(self, claim: str, namespace: str | None = None) -> Path:
        return self.kubelet_config.state_dir / "volumes" / (namespace or self.namespace) / claim

    def run_cronjob(self, name: str, job_name: str | None = None, namespace: str | None = None) -> str:
        """``kubectl create job <job_name> --from=cronjob/<name>``; returns the Job's name."""
        cronjob = self.get("CronJob", name, namespace)
        if cronjob is None:
            raise LookupError(f"cronjob {name!r} not found")
        job_name = job_name or f"{name}-manual-{int(time.time())}"
        self.run(self._api().create(job_from_cronjob(cronjob, job_name)))
        return job_name

    def trigger_cronjob(self, name: str, token: str, namespace: str | None = None) -> None:
        """On-demand run through the CronJob controller (annotation ``localcluster.kvcache.dev/run-now``)."""
        self.patch("CronJob", name, {"metadata": {"annotations": {MANUAL_RUN_ANNOTATION: token}}}, namespace)

    def live_pids(self) -> builtins.list[int]:
        return self.procs.pids()


def _documents(manifest: Mapping[str, Any] | str | Path) -> list[Mapping[str, Any]]:
    if isinstance(manifest, Mapping):
        return [manifest]
    text = (
        manifest.read_text()
        if isinstance(manifest, Path)
        else (
            Path(manifest).read_text()
            if "\n" not in manifest and manifest.endswith((".yaml", ".yml"))
            else manifest
        )
    )
    return [d for d in yaml.safe_load_all(text) if d]
