"""Running the real kubectl (``scripts/get_tools.py``: the pinned v1.35) against a local cluster."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # kvcache-operator, kvcache-engine, kubectl-kvcache


def kubectl_path() -> str:
    """The pinned kubectl, fetched by scripts/get_tools.py on first use."""
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "get_tools.py"), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    path: str = json.loads(out.stdout)["kubectl"]
    return path


def tool_env(home: Path, kubeconfig: Path | None = None, **extra: str) -> dict[str, str]:
    """A user's shell: kubectl and the venv's commands on PATH, a scratch HOME (kubectl's cache)."""
    home.mkdir(parents=True, exist_ok=True)
    kubectl_dir = str(Path(kubectl_path()).parent)
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": os.pathsep.join([str(VENV_BIN), kubectl_dir, os.environ.get("PATH", "")]),
        **extra,
    }
    env.pop("KUBECONFIG", None)
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


class Kubectl:
    """``kubectl ...`` with one environment; failures show the command, stdout and stderr."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.binary = kubectl_path()

    def run(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.binary, *args],
            capture_output=True,
            text=True,
            env=self.env,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} -> {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def __call__(self, *args: str, input: str | None = None, timeout: float = 120) -> str:
        return self.run(*args, input=input, timeout=timeout).stdout

    def table(self, *args: str) -> list[list[str]]:
        """``kubectl get ...`` as rows of cells (columns split on two or more spaces)."""
        return [re.split(r"\s{2,}", line.strip()) for line in self(*args).splitlines() if line.strip()]

    @contextlib.contextmanager
    def port_forward(self, target: str, remote_port: int) -> Iterator[str]:
        """``kubectl port-forward TARGET :PORT``; yields ``http://127.0.0.1:<local port>``."""
        proc = subprocess.Popen(
            [self.binary, "port-forward", "--address", "127.0.0.1", target, f":{remote_port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()  # kubectl prints it once it listens (or exits)
            found = re.search(r"Forwarding from 127\.0\.0\.1:(\d+)", line)
            assert found, f"kubectl port-forward said {line!r}; stderr: {proc.stderr.read()}"
            yield f"http://127.0.0.1:{found.group(1)}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def run(
    argv: Sequence[str], env: Mapping[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, env=dict(env), timeout=timeout, check=False
    )
