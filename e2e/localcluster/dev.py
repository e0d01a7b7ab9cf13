"""``kvcache-operator dev up|status|logs|down``: the local cluster as a background service.

``up`` starts ``python -m e2e.localcluster.dev serve`` detached (its own session; output in
``<state>/logs/cluster.log``), waits until the API server answers and prints
``export KUBECONFIG=<state>/kubeconfig`` on stdout (everything else goes to stderr, so
``eval "$(kvcache-operator dev up)"`` works). The service runs a :class:`LocalCluster`: the API
server, the controllers, the kubelet and, unless ``--no-operator``, ``kvcache-operator run``.

``down`` sends it SIGTERM (operator, then every pod gracefully, then the server) and then makes
sure nothing is left: every process whose working directory lies in the state directory (the
service, the operator, every container and ``kubectl exec`` process has one there) is killed and
reported. ``status`` and ``logs`` read the state directory and ask the API server.

State directory: ``--state``, else ``$KVCACHE_DEV_STATE``, else ``.localcluster/`` in the
checkout. ``up`` starts from an empty one (the API server keeps objects in memory only, so
nothing in an old state directory would match them); ``down`` keeps it for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
INFO_FILE = "cluster.json"
PID_FILE = "cluster.pid"


class DevError(ValueError):
    """A one-line error for the user (the CLI prints it after ``kvcache-operator dev <action>:``)."""


def default_state() -> Path:
    return Path(os.environ.get("KVCACHE_DEV_STATE") or REPO / ".localcluster")


def _eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ processes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False  # a zombie has finished; only its parent's wait is missing
    return True


def processes_in(state: Path) -> list[int]:
    """Live processes whose working directory is inside ``state`` (Linux /proc)."""
    root = str(state.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (cwd == root or cwd.startswith(root + os.sep)) and _alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if _alive(p)]
    return left


# ------------------------------------------------------------------------------------------ state


def read_info(state: Path) -> dict[str, Any] | None:
    """What the running service wrote once it was up (pid, server, kubeconfig); None if absent."""
    try:
        info: dict[str, Any] = json.loads((state / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info


def running_info(state: Path) -> dict[str, Any] | None:
    info = read_info(state)
    return info if info is not None and _alive(int(info.get("pid", 0))) else None


def _write_info(state: Path, info: dict[str, Any]) -> None:
    tmp = state / f".{INFO_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(state / INFO_FILE)


def _get(info: dict[str, Any], path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{info['server']}{path}", timeout=5) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


# ------------------------------------------------------------------------------------------ up


def up(state: Path, *, operator: bool, namespace: str, timeout_s: float) -> int:
    info = running_info(state)
    if info is not None:
        _eprint(f"local cluster already running (pid {info['pid']}), API server {info['server']}")
        print(f"export KUBECONFIG={info['kubeconfig']}")
        return 0
    leftovers = processes_in(state) if state.exists() else []
    if leftovers:
        raise DevError(
            f"processes {leftovers} still run in {state} (a cluster that was not stopped): "
            f"run `kvcache-operator dev down --state {state}` first"
        )
    if state.exists():
        shutil.rmtree(state)
    (state / "logs").mkdir(parents=True)
    argv = [
        sys.executable,
        "-m",
        "e2e.localcluster.dev",
        "serve",
        "--state",
        str(state),
        "--namespace",
        namespace,
    ]
    if not operator:
        argv.append("--no-operator")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    with (state / "logs" / "cluster.log").open("ab") as log:
        proc = subprocess.Popen(
            argv, cwd=state, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    (state / PID_FILE).write_text(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while (info := read_info(state)) is None or info.get("pid") != proc.pid:
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                _kill([proc.pid], signal.SIGTERM)
                _wait_gone([proc.pid], 20)
            tail = "\n".join(_read(state / "logs" / "cluster.log").splitlines()[-15:])
            raise DevError(f"the local cluster did not start (see {state / 'logs' / 'cluster.log'}):\n{tail}")
        time.sleep(0.1)
    what = "with the operator" if operator else "without the operator"
    _eprint(f"local cluster up {what}: API server {info['server']}, namespace {namespace}, state {state}")
    _eprint("next: kubectl apply -f crds/samples/local-demo.yaml; kvcache-operator dev status|logs|down")
    print(f"export KUBECONFIG={info['kubeconfig']}")
    missing = [tool for tool in ("kubectl", "kubectl-kvcache") if shutil.which(tool) is None]
    if missing:  # the checkout's own (scripts/get_tools.py, the venv), ahead on PATH
        print(f"export PATH={REPO / '.tools' / 'bin'}:{Path(sys.executable).parent}:$PATH")
    return 0


def serve(state: Path, *, operator: bool, namespace: str) -> int:
    """The background service: a LocalCluster until SIGTERM/SIGINT/SIGHUP."""
    from e2e.localcluster.cluster import LocalCluster

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    cluster = LocalCluster(state, namespace=namespace, operator=operator, keep_state=True)
    cluster.start()
    try:
        _write_info(
            state,
            {
                "pid": os.getpid(),
                "server": cluster.server_url,
                "kubeconfig": str(cluster.kubeconfig),
                "namespace": namespace,
                "operator": operator,
                "operator_pid": cluster.operator.pid if cluster.operator else None,
                "started": datetime.datetime.now(tz=datetime.UTC).isoformat(timespec="seconds"),
            },
        )
        logging.getLogger("localcluster").info("up: %s", cluster.server_url)
        while not stop.wait(1.0):
            pass
    finally:
        logging.getLogger("localcluster").info("stopping")
        cluster.stop()
        with contextlib.suppress(OSError):
            (state / INFO_FILE).unlink()
    return 0


# ------------------------------------------------------------------------------------------ down


def down(state: Path, *, timeout_s: float = 60.0) -> int:
    pid_text = _read(state / PID_FILE).strip()
    service = int(pid_text) if pid_text.isdigit() and _alive(int(pid_text)) else None
    before = processes_in(state) if state.exists() else []
    if service is None and not before:
        _eprint(f"no local cluster running in {state}")
        return 0
    if service is not None:
        _kill([service], signal.SIGTERM)  # the service stops the operator, then the pods, gracefully
        if _wait_gone([service], timeout_s):
            _kill([service], signal.SIGKILL)
            _wait_gone([service], 5)
    stragglers = processes_in(state)
    if stragglers:
        _kill(stragglers, signal.SIGTERM)
        _kill(_wait_gone(stragglers, 3), signal.SIGKILL)
    left = _wait_gone(processes_in(state), 5)
    with contextlib.suppress(OSError):
        (state / INFO_FILE).unlink()
    if left:
        raise DevError(f"processes {left} in {state} did not stop")
    extra = f"; killed {len(stragglers)} leftover process(es): {stragglers}" if stragglers else ""
    _eprint(
        f"local cluster stopped ({len(set(before) | ({service} if service else set()))} processes){extra}"
    )
    _eprint(f"state kept in {state} (logs: {state / 'logs'})")
    return 0


# ------------------------------------------------------------------------------------------ status


def _pod_line(pod: dict[str, Any]) -> str:
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    ready = sum(1 for c in containers if c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in containers)
    return (
        f"  {pod['metadata']['name']:<28} {status.get('phase', 'Pending'):<10} "
        f"{ready}/{len(containers)} ready  restarts {restarts}  {status.get('podIP', '')}"
    )


def status(state: Path, *, as_json: bool = False) -> int:
    info = running_info(state)
    if info is None:
        raise DevError(f"no local cluster running in {state}; start one: kvcache-operator dev up")
    ns = info.get("namespace", "default")
    try:
        pods = _get(info, f"/api/v1/namespaces/{ns}/pods").get("items", [])
        caches = _get(info, f"/apis/kvcache.dev/v1alpha1/namespaces/{ns}/kvcaches").get("items", [])
    except (OSError, urllib.error.URLError) as exc:
        raise DevError(f"the API server at {info['server']} does not answer: {exc}") from exc
    operator_pid = info.get("operator_pid")
    if not info.get("operator"):
        operator_state = "not started (--no-operator)"
    elif operator_pid and _alive(int(operator_pid)):
        operator_state = f"running (pid {operator_pid})"
    else:
        operator_state = "exited: see kvcache-operator dev logs operator"
    procs = processes_in(state)
    if as_json:
        summary = {**info, "operator_state": operator_state, "processes": procs}
        summary["pods"] = [p["metadata"]["name"] for p in pods]
        summary["kvcaches"] = [c["metadata"]["name"] for c in caches]
        print(json.dumps(summary, indent=2))
        return 0
    since = info.get("started", "?")
    print(f"local cluster: running (pid {info['pid']}, since {since}), {len(procs)} processes")
    print(f"API server:    {info['server']}  (export KUBECONFIG={info['kubeconfig']})")
    print(f"operator:      {operator_state}")
    print(f"KVCaches in {ns}: {len(caches)}")
    for cache in caches:
        st = cache.get("status") or {}
        phase = st.get("phase") or "-"
        print(f"  {cache['metadata']['name']:<28} {phase:<10} ready {st.get('readyReplicas', 0)}")
    print(f"pods in {ns}: {len(pods)}")
    for pod in pods:
        print(_pod_line(pod))
    return 0


# ------------------------------------------------------------------------------------------ logs


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def log_file(state: Path, target: str, container: str | None = None, namespace: str = "default") -> Path:
    """``operator``, ``cluster``, or a pod (its newest incarnation's current container run)."""
    if target in ("operator", "cluster"):
        return state / "logs" / f"{target}.log"
    pods = sorted(
        (state / "logs" / "pods").glob(f"{namespace}_{target}_*"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    if not pods:
        raise DevError(
            f"no logs for pod {target!r} in namespace {namespace} (targets: operator, cluster, a pod name)"
        )
    containers = sorted(p.name for p in pods[0].iterdir() if p.is_dir())
    if container is None and len(containers) != 1:
        raise DevError(f"pod {target} has containers {containers}: choose one with -c")
    chosen = container or containers[0]
    runs = sorted((pods[0] / chosen).glob("*.log"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
    runs = [r for r in runs if r.stem.isdigit()]
    if not runs:
        raise DevError(f"no logs for container {chosen!r} of pod {target}")
    return runs[-1]


def logs(state: Path, target: str, *, container: str | None, follow: bool, tail: int | None) -> int:
    info = read_info(state) or {}
    path = log_file(state, target, container, info.get("namespace", "default"))
    if not path.exists():
        raise DevError(f"{path} does not exist yet")
    text = _read(path)
    lines = text.splitlines(keepends=True)
    sys.stdout.write("".join(lines[-tail:] if tail is not None else lines))
    sys.stdout.flush()
    if follow:
        with path.open(errors="replace") as handle:
            handle.seek(len(text.encode()))
            while True:
                line = handle.readline()
                if line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                else:
                    time.sleep(0.2)
    return 0


# ------------------------------------------------------------------------------------------ entry points


def run(args: argparse.Namespace) -> int:
    """Dispatch a parsed ``kvcache-operator dev`` command (see kvcache_operator.dev)."""
    state = Path(args.state).resolve() if args.state else default_state()
    action = args.dev_command
    if action == "up":
        return up(state, operator=args.operator, namespace=args.namespace, timeout_s=args.timeout)
    if action == "down":
        return down(state)
    if action == "status":
        return status(state, as_json=args.json)
    if action == "logs":
        return logs(state, args.target, container=args.container, follow=args.follow, tail=args.tail)
    raise DevError(f"unknown action {action!r}")


def main(argv: list[str] | None = None) -> int:
    """``python -m e2e.localcluster.dev serve --state DIR [--no-operator] [--namespace NS]``."""
    parser = argparse.ArgumentParser(prog="python -m e2e.localcluster.dev")
    parser.add_argument("action", choices=["serve"])
    parser.add_argument("--state", required=True)
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--operator", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    return serve(Path(args.state), operator=args.operator, namespace=args.namespace)


if __name__ == "__main__":
    sys.exit(main())
