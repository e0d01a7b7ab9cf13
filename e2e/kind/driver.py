"""The scenario :class:`~e2e.scenarios.Driver` for a real cluster, through ``kubectl``.

The cluster must already run the operator (``e2e/kind/setup.sh`` creates a kind cluster, builds
both images from the Dockerfile, loads them into kind and installs the Helm chart). Engine pods are
reached through one ``kubectl port-forward`` per pod; ``kill -9`` of an engine goes through the
kind node's container runtime (``crictl``), because PID 1 of a container cannot be killed from
inside it. Environment: ``E2E_NAMESPACE`` (default ``kvcache-e2e``), ``E2E_ENGINE_IMAGE`` (default
``kvcache-engine:e2e``), ``KUBECTL`` (default ``kubectl``).
"""

from __future__ import annotations

import builtins
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_PLURALS = {"KVCache": "kvcaches.kvcache.dev", "PodDisruptionBudget": "poddisruptionbudgets.policy"}


class KindDriver:
    def __init__(self, namespace: str, engine_image: str, kubectl: str = "kubectl") -> None:
        self.namespace = namespace
        self.engine_image: str | None = engine_image
        self.kubectl = kubectl
        self._forwards: dict[str, tuple[subprocess.Popen[str], str]] = {}

    @classmethod
    def from_env(cls) -> KindDriver:
        return cls(
            os.environ.get("E2E_NAMESPACE", "kvcache-e2e"),
            os.environ.get("E2E_ENGINE_IMAGE", "kvcache-engine:e2e"),
            os.environ.get("KUBECTL", "kubectl"),
        )

    def __enter__(self) -> KindDriver:
        self._run("create", "namespace", self.namespace, check=False)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc, _ in self._forwards.values():
            proc.terminate()
            proc.wait(timeout=10)
        self._run("delete", "namespace", self.namespace, "--wait=true", "--timeout=120s", check=False)

    # -- kubectl
    def _run(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl, *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
        )
        if check and proc.returncode != 0:
            raise ValueError(proc.stderr.strip() or proc.stdout.strip())
        return proc

    @staticmethod
    def _resource(kind: str) -> str:
        return _PLURALS.get(kind, kind.lower())

    def apply(self, manifest: Mapping[str, Any]) -> None:
        self._run("apply", "-n", self.namespace, "-f", "-", stdin=yaml.safe_dump(dict(manifest)))

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        proc = self._run("get", self._resource(kind), name, "-n", self.namespace, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise ValueError(proc.stderr.strip())
        obj: dict[str, Any] = json.loads(proc.stdout)
        return obj

    def list(self, kind: str, selector: Mapping[str, str] | None = None) -> builtins.list[dict[str, Any]]:
        args = ["get", self._resource(kind), "-n", self.namespace, "-o", "json"]
        if selector:
            args += ["-l", ",".join(f"{k}={v}" for k, v in selector.items())]
        items: builtins.list[dict[str, Any]] = json.loads(self._run(*args).stdout)["items"]
        return items

    def patch(self, kind: str, name: str, patch: Mapping[str, Any]) -> None:
        self._run(
            "patch",
            self._resource(kind),
            name,
            "-n",
            self.namespace,
            "--type",
            "merge",
            "-p",
            json.dumps(dict(patch)),
        )

    def delete(self, kind: str, name: str) -> None:
        self._run(
            "delete", self._resource(kind), name, "-n", self.namespace, "--wait=false", "--ignore-not-found"
        )

    def wait_for(self, predicate: Callable[[], T | None], timeout_s: float, what: str) -> T:
        deadline = time.monotonic() + timeout_s * 2  # a real cluster pulls, schedules and binds: slower
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(1.0)

    # -- pods
    def endpoint(self, pod: Mapping[str, Any]) -> str:
        uid = pod["metadata"]["uid"]
        if uid not in self._forwards or self._forwards[uid][0].poll() is not None:
            proc = subprocess.Popen(
                [
                    self.kubectl,
                    "port-forward",
                    "-n",
                    self.namespace,
                    f"pod/{pod['metadata']['name']}",
                    ":8080",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert proc.stdout is not None
            line = proc.stdout.readline()
            found = re.search(r"127\.0\.0\.1:(\d+)", line)
            if not found:
                proc.terminate()
                raise RuntimeError(f"port-forward to {pod['metadata']['name']} failed: {line}")
            self._forwards[uid] = (proc, f"http://127.0.0.1:{found.group(1)}")
        return self._forwards[uid][1]

    def kill_engine(self, pod: str) -> None:
        node = self._run("get", "pod", pod, "-n", self.namespace, "-o", "jsonpath={.spec.nodeName}").stdout
        crictl = ["docker", "exec", node, "crictl"]
        container = subprocess.run(
            [
                *crictl,
                "ps",
                "-q",
                "--label",
                f"io.kubernetes.pod.name={pod}",
                "--label",
                "io.kubernetes.container.name=engine",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[0]
        pid = subprocess.run(
            [*crictl, "inspect", "--output", "go-template", "--template", "{{.info.pid}}", container],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        subprocess.run(["docker", "exec", node, "kill", "-9", pid], check=True)

    def job_logs(self, job: str) -> str:
        return self._run("logs", f"job/{job}", "-n", self.namespace, "--all-containers", check=False).stdout

    def run_cronjob(self, cronjob: str) -> str:
        name = f"{cronjob}-{int(time.time()) % 10**8}"
        self._run("create", "job", name, f"--from=cronjob/{cronjob}", "-n", self.namespace)
        return name

    def engine_processes(self, name: str) -> builtins.list[int]:
        return []  # processes live on the nodes; the scenarios check the pods are gone through the API
