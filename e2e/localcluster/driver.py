"""The scenario :class:`~e2e.scenarios.Driver` for the local cluster."""

from __future__ import annotations

import builtins
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from e2e.localcluster.cluster import LocalCluster

T = TypeVar("T")


class LocalDriver:
    engine_image: str | None = None  # images are not run locally

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.namespace = cluster.namespace

    def apply(self, manifest: Mapping[str, Any]) -> None:
        self.cluster.apply(manifest)  # ApplyError is a ValueError carrying the server's message

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.cluster.get(kind, name)

    def list(self, kind: str, selector: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        return self.cluster.list(kind, selector=selector)

    def patch(self, kind: str, name: str, patch: Mapping[str, Any]) -> None:
        self.cluster.patch(kind, name, patch)

    def delete(self, kind: str, name: str) -> None:
        self.cluster.delete(kind, name)

    def wait_for(self, predicate: Callable[[], T | None], timeout_s: float, what: str) -> T:
        value = self.cluster.wait_for(predicate, timeout_s, what=what)
        assert value is not None  # wait_for returns only a truthy value
        return value

    def endpoint(self, pod: Mapping[str, Any]) -> str:
        return f"http://{pod['status']['podIP']}:8080"  # every pod has its own loopback address

    def kill_engine(self, pod: str) -> None:
        self.cluster.kill_container(pod, signal.SIGKILL)

    def job_logs(self, job: str) -> str:
        pods = self.cluster.list("Pod", selector={"job-name": job})
        return "".join(self.cluster.pod_logs(p["metadata"]["name"]) for p in pods)

    def run_cronjob(self, cronjob: str) -> str:
        return self.cluster.run_cronjob(cronjob, f"{cronjob}-{int(time.time() * 1000) % 10**8}")

    def engine_processes(self, name: str) -> builtins.list[int]:
        kubelet = self.cluster.kubelet
        if kubelet is None:
            return []
        workers = [
            w
            for w in list(kubelet.workers.values())
            if (w.pod["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") == name
        ]
        return [
            r.proc.pid for w in workers for r in w.runners if r.proc is not None and r.proc.poll() is None
        ]
