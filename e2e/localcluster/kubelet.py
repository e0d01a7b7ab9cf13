"""The local kubelet: every Pod in the API runs as real host processes.

Per pod: a loopback IP (its ``podIP``), a directory per volume (PVC = a persistent directory
under the cluster's state dir, shared by every pod that claims it; emptyDir = a per-pod directory;
ConfigMap/Secret/projected = files written from the objects and refreshed while the pod runs),
one process per container (init containers first, to completion), probes (httpGet, tcpSocket,
exec) that decide started/Ready/liveness restarts, ``restartPolicy`` with ``restartCount`` and a
crash-loop back-off, and graceful deletion: preStop, SIGTERM, ``terminationGracePeriodSeconds``,
SIGKILL.

A container's status reads as a node writes it: ``state`` (running / waiting with its reason, e.g.
``CrashLoopBackOff`` during the back-off / terminated), ``lastState.terminated`` with exitCode,
reason, finishedAt and ``message``: the contents of the container's termination-message file
(``terminationMessagePath``, a per-container file under the pod's directory that the path is
remapped to, emptied before each start, at most 4096 bytes), or with
``terminationMessagePolicy: FallbackToLogsOnError`` and an empty file after a failure, the tail of
that run's log (80 lines, 2048 bytes).

Deletion is made graceful the way a node makes it graceful: the kubelet puts its own finalizer on
every pod it runs, so a DELETE only marks the pod (``deletionTimestamp``); the kubelet stops the
containers and then removes the finalizer, and only then is the pod gone. A StatefulSet therefore
never has two processes of the same ordinal on the same PVC.

Timing deviations (to keep tests short, documented in e2e/README.md): probes run at most every
``max_probe_period_s`` seconds, with their failure threshold scaled so that the *time* a probe may
fail before it counts is the manifest's; the crash-loop back-off starts at 0.5 s and doubles up to
8 s (a node: 10 s up to 5 min).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from e2e.localcluster import podenv
from e2e.localcluster.kubeapi import ClusterAPI
from e2e.localcluster.procs import ProcessRegistry

log = logging.getLogger("localcluster.kubelet")

FINALIZER = "localcluster.kvcache.dev/kubelet"
NODE_NAME = "localcluster"  # the API server's one Node (apiserver.node_object)


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class KubeletConfig:
    state_dir: Path
    bin_dir: Path
    max_probe_period_s: float = 1.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    sync_period_s: float = 0.3
    entrypoints: Mapping[str, list[str]] = field(default_factory=lambda: dict(podenv.DEFAULT_ENTRYPOINTS))


TERMINATION_MESSAGE_PATH = "/dev/termination-log"  # the API's default terminationMessagePath
MAX_TERMINATION_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048


class PodNotReadyError(Exception):
    """A pod cannot start yet (a ConfigMap, Secret or PVC it needs is missing); retried."""


# --------------------------------------------------------------------------------------------- probes


@dataclass
class ProbeTiming:
    """A probe's schedule with the period capped; the failure threshold keeps the manifest's window."""

    initial_delay_s: float
    period_s: float
    timeout_s: float
    failure_threshold: int
    success_threshold: int

    @classmethod
    def of(cls, probe: Mapping[str, Any], max_period_s: float) -> ProbeTiming:
        period = float(probe.get("periodSeconds", 10))
        capped = min(period, max_period_s)
        failures = int(probe.get("failureThreshold", 3))
        return cls(
            initial_delay_s=float(probe.get("initialDelaySeconds", 0)),
            period_s=capped,
            timeout_s=float(probe.get("timeoutSeconds", 1)),
            failure_threshold=max(failures, math.ceil(failures * period / capped)),
            success_threshold=int(probe.get("successThreshold", 1)),
        )


def _port(value: Any, ports: Mapping[str, int]) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    if value in ports:
        return ports[value]
    raise ValueError(f"probe port {value!r} is neither a number nor a named container port")


# ----------------------------------------------------------------------------------------- containers


class ContainerRunner:
    """One container of one pod: its process across restarts, its probes, its status."""

    def __init__(self, pod: PodWorker, spec: Mapping[str, Any], *, init: bool = False) -> None:
        self.pod = pod
        self.spec = spec
        self.name = str(spec["name"])
        self.init = init
        self.proc: subprocess.Popen[bytes] | None = None
        self.restart_count = 0
        self.ready = False
        self.started = False
        self.state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict[str, Any] = {}
        self.env: dict[str, str] = {}
        self.mounts: dict[str, str] = {}
        self.done = False  # terminated and will not restart
        self.runs = 0  # processes started so far; run N writes log_file(N)
        self._kill_reason: str | None = None
        self._stopping = False

    def log_file(self, run: int) -> Path:
        """Output of this container's ``run``-th process (0-based), like a node's ``<restart>.log``:
        ``kubectl logs`` reads the last one, ``--previous`` the one before."""
        return self.pod.log_dir / self.name / f"{run}.log"

    # -- status
    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }

    # -- main loop
    async def run(self) -> int:
        """Run until terminated for good (restart policy); returns the last exit code."""
        policy = (
            self.pod.restart_policy
            if not self.init
            else ("OnFailure" if self.pod.restart_policy == "Always" else self.pod.restart_policy)
        )
        backoff = self.pod.kubelet.config.backoff_initial_s
        while True:
            try:
                argv, env = await self.pod.container_process_spec(self.spec)
            except (PodNotReadyError, ValueError) as exc:
                self.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
                await asyncio.sleep(1.0)
                continue
            code, ran_s = await self._run_once(argv, env)
            self.ready = False
            self.started = False
            if self._stopping:
                self.done = True
                return code
            if not (policy == "Always" or (policy == "OnFailure" and code != 0)):
                self.done = True
                return code
            if ran_s > 30:
                backoff = self.pod.kubelet.config.backoff_initial_s
            waiting = {"reason": "CrashLoopBackOff" if code != 0 else "Restarting"}
            if code != 0:
                pod = f"{self.pod.name}_{self.pod.namespace}({self.pod.uid})"
                waiting["message"] = (
                    f"back-off {backoff:g}s restarting failed container={self.name} pod={pod}"
                )
            self.state = {"waiting": waiting}
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.pod.kubelet.config.backoff_max_s)
            self.restart_count += 1

    async def _run_once(self, argv: list[str], env: dict[str, str]) -> tuple[int, float]:
        self.env = env
        log_path = self.log_file(self.runs)
        self.runs += 1
        cwd = self.pod.workdir(self.spec)
        message_file = self.pod.termination_message_file(self.spec)
        message_file.write_bytes(b"")  # a fresh file per container start, as a node mounts one
        log_start = log_path.stat().st_size if log_path.exists() else 0
        proc = self.pod.kubelet.procs.spawn(argv, env=env, cwd=cwd, log_path=log_path)
        self.proc = proc
        started_at = now_iso()
        t0 = time.monotonic()
        self.state = {"running": {"startedAt": started_at}}
        self._kill_reason = None
        probes = [] if self.init else self._start_probes()
        try:
            while proc.poll() is None:
                await asyncio.sleep(0.1)
        finally:
            for task in probes:
                task.cancel()
        code = proc.returncode
        self.pod.kubelet.procs.forget(proc)
        exit_code = 128 - code if code < 0 else code  # a signal N reads as 128+N, like a runtime
        reason = "Completed" if exit_code == 0 else "Error"
        message = self._termination_message(message_file, exit_code, log_path, log_start)
        self.state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": reason,
                "startedAt": started_at,
                "finishedAt": now_iso(),
                **({"message": message} if message else {}),
            }
        }
        self.last_state = self.state
        return exit_code, time.monotonic() - t0

    def _termination_message(self, message_file: Path, exit_code: int, log_path: Path, log_start: int) -> str:
        """The termination-message file; after a failure with FallbackToLogsOnError and an empty
        file, this run's log tail; else the kubelet's own reason for a kill (a failed probe)."""
        with contextlib.suppress(OSError):
            with message_file.open("rb") as fh:
                text = fh.read(MAX_TERMINATION_MESSAGE_BYTES).decode("utf-8", errors="replace").strip()
            if text:
                return text
        if exit_code != 0 and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError):
                with log_path.open("rb") as fh:
                    fh.seek(log_start)
                    lines = fh.read().decode("utf-8", errors="replace").splitlines()[-FALLBACK_LOG_LINES:]
                tail = "\n".join(lines).encode()[-FALLBACK_LOG_BYTES:].decode("utf-8", errors="ignore")
                if tail.strip():
                    return tail.strip()
        return self._kill_reason or ""

    # -- probes
    def _start_probes(self) -> list[asyncio.Task[None]]:
        startup = self.spec.get("startupProbe")
        if not startup:
            self.started = True
        tasks = [
            asyncio.create_task(self._probe_loop(kind, self.spec[kind]))
            for kind in ("startupProbe", "livenessProbe", "readinessProbe")
            if self.spec.get(kind)
        ]
        if not self.spec.get("readinessProbe"):
            tasks.append(asyncio.create_task(self._ready_when_started()))
        return tasks

    async def _ready_when_started(self) -> None:
        while not self.started:
            await asyncio.sleep(0.1)
        self.ready = True

    async def _probe_loop(self, kind: str, probe: Mapping[str, Any]) -> None:
        timing = ProbeTiming.of(probe, self.pod.kubelet.config.max_probe_period_s)
        if kind != "startupProbe":
            while not self.started:
                await asyncio.sleep(0.1)
        await asyncio.sleep(timing.initial_delay_s)
        successes = failures = 0
        while True:
            ok = await self.pod.run_probe(probe, self, timing.timeout_s)
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            if kind == "startupProbe":
                if ok:
                    self.started = True
                    return
                if failures >= timing.failure_threshold:
                    await self.kill_for_restart(f"startup probe failed {failures} times")
                    return
            elif kind == "readinessProbe":
                if successes >= timing.success_threshold:
                    self.ready = True
                elif failures >= timing.failure_threshold:
                    self.ready = False
            elif failures >= timing.failure_threshold:
                await self.kill_for_restart(f"liveness probe failed {failures} times")
                return
            await asyncio.sleep(timing.period_s)

    async def kill_for_restart(self, reason: str) -> None:
        """A failed liveness/startup probe: stop the container gracefully; the run loop restarts it."""
        log.info("%s/%s: %s; restarting", self.pod.name, self.name, reason)
        self._kill_reason = reason
        await self.stop_process(self.pod.grace_period_s())

    # -- stopping
    async def stop(self, grace_s: float) -> None:
        """Stop for good (pod deletion)."""
        self._stopping = True
        await self.stop_process(grace_s)

    async def stop_process(self, grace_s: float) -> None:
        """preStop hook, then SIGTERM, then SIGKILL once ``grace_s`` (counted from the start) is over."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        deadline = time.monotonic() + grace_s
        pre_stop = (self.spec.get("lifecycle") or {}).get("preStop")
        if pre_stop:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.pod.run_handler(pre_stop, self), timeout=max(0.1, grace_s))
        ProcessRegistry.signal_group(proc, signal.SIGTERM)
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if proc.poll() is None:
            log.info("%s/%s did not stop within %.0fs; SIGKILL", self.pod.name, self.name, grace_s)
        ProcessRegistry.signal_group(proc, signal.SIGKILL)  # also reaps leftovers in its group
        while proc.poll() is None:
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------- pods


class PodWorker:
    """Runs one pod from admission to deletion."""

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.name: str = meta["name"]
        self.namespace: str = meta.get("namespace") or "default"
        self.uid: str = meta.get("uid") or ""
        self.dir = kubelet.config.state_dir / "pods" / self.namespace / f"{self.name}-{self.uid or 'x'}"
        # Logs outlive the pod's directory (dev logs, a finished Job's output), as /var/log/pods does.
        pod_key = f"{self.namespace}_{self.name}_{self.uid or 'x'}"
        self.log_dir = kubelet.config.state_dir / "logs" / "pods" / pod_key
        spec = pod.get("spec", {})
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.ip: str | None = None
        self.init_runners = [ContainerRunner(self, c, init=True) for c in spec.get("initContainers") or []]
        self.runners = [ContainerRunner(self, c) for c in spec.get("containers") or []]
        self.phase = "Pending"
        self.start_time = now_iso()
        self.volume_dirs: dict[str, Path] = {}
        self.pending_reason = ""
        self.task: asyncio.Task[None] | None = None
        self.terminating: asyncio.Task[None] | None = None

    # -- lifecycle
    async def run(self) -> None:
        try:
            self.ip = self.kubelet.ips.allocate()
            while True:
                try:
                    await self.prepare_volumes()
                    break
                except PodNotReadyError as exc:
                    self.pending_reason = str(exc)
                    await asyncio.sleep(1.0)
            self.pending_reason = ""
            for runner in self.init_runners:
                if await runner.run() != 0:
                    self.phase = "Failed"
                    return
            self.phase = "Running"
            codes = await asyncio.gather(*(r.run() for r in self.runners))
            self.phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
        finally:
            if self.phase in ("Succeeded", "Failed"):
                self.kubelet.ips.release(self.ip)

    async def terminate(self, grace_s: float) -> None:
        """Graceful stop of every container (concurrently), then cancel the pod's run loop."""
        await asyncio.gather(*(r.stop(grace_s) for r in self.runners + self.init_runners))
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        self.kubelet.ips.release(self.ip)
        # The pod's own directories (emptyDir, projected files) go with it; PVC directories stay.
        shutil.rmtree(self.dir, ignore_errors=True)

    def grace_period_s(self) -> float:
        """The pod's ``terminationGracePeriodSeconds``, or a shorter positive one the DELETE asked for.

        A ``deletionGracePeriodSeconds`` of 0 is ignored: the emulator writes 0 on every graceful
        deletion (it does not model grace periods), which would turn each stop into a SIGKILL."""
        spec_value = float(self.pod.get("spec", {}).get("terminationGracePeriodSeconds", 30))
        requested = self.pod.get("metadata", {}).get("deletionGracePeriodSeconds")
        return min(spec_value, float(requested)) if requested else spec_value

    # -- status
    def _gates(self) -> list[str]:
        return [str(g.get("conditionType")) for g in self.pod.get("spec", {}).get("readinessGates") or []]

    def gates_true(self) -> bool:
        """Whether every readiness gate's condition is True in the pod as last read (no gate: True)."""
        conditions = {
            c.get("type"): c.get("status") for c in (self.pod.get("status") or {}).get("conditions") or []
        }
        return all(conditions.get(g) == "True" for g in self._gates())

    def status(self) -> dict[str, Any]:
        """The status the kubelet publishes. Readiness gates (``spec.readinessGates``): the pod is
        Ready only when its containers are and every gate's condition, written by someone else
        into the stored status, is True; those conditions are carried over as stored."""
        containers_ready = self.phase == "Running" and all(r.ready for r in self.runners)
        stored = {c.get("type"): c for c in (self.pod.get("status") or {}).get("conditions") or []}
        gate_conditions = [stored[g] for g in self._gates() if g in stored]
        ready = containers_ready and self.gates_true()
        conditions = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": str(all(r.done for r in self.init_runners)).capitalize()},
            {"type": "ContainersReady", "status": str(containers_ready).capitalize()},
            {"type": "Ready", "status": str(ready).capitalize()},
            *gate_conditions,
        ]
        status: dict[str, Any] = {
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": [r.status() for r in self.runners],
        }
        if self.init_runners:
            status["initContainerStatuses"] = [r.status() for r in self.init_runners]
        if self.ip and self.phase not in ("Succeeded", "Failed"):
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        if self.pending_reason:
            status["message"] = self.pending_reason
        return status

    # -- volumes
    def _volume_host_dir(self, volume: Mapping[str, Any]) -> Path:
        name = str(volume["name"])
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            return self.kubelet.pvc_dir(self.namespace, claim)
        if "hostPath" in volume:
            return Path(volume["hostPath"]["path"])
        return self.dir / "volumes" / name

    async def prepare_volumes(self) -> None:
        """Create every volume's directory and write ConfigMap/Secret files (PodNotReadyError if missing)."""
        volumes = self.pod.get("spec", {}).get("volumes") or []
        for volume in volumes:
            host = self._volume_host_dir(volume)
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if await self.kubelet.api.get("PersistentVolumeClaim", self.namespace, claim) is None:
                    raise PodNotReadyError(f"persistentvolumeclaim {claim!r} not found")
            host.mkdir(parents=True, exist_ok=True)
            self.volume_dirs[str(volume["name"])] = host
        # Files last: their contents are remapped against every mount, so all must be known.
        for volume in volumes:
            await self._write_projected(volume, self.volume_dirs[str(volume["name"])])

    async def _write_projected(self, volume: Mapping[str, Any], host: Path) -> None:
        sources: list[Mapping[str, Any]] = []
        if "configMap" in volume:
            sources.append({"configMap": volume["configMap"]})
        if "secret" in volume:
            sources.append({"secret": volume["secret"]})
        sources.extend((volume.get("projected") or {}).get("sources") or [])
        for source in sources:
            files = await self._source_files(source)
            for rel, original in files.items():
                path = host / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                remapped = podenv.remap_paths(original, self.all_mounts())
                text = podenv.rewrite_hosts(remapped, self.ip or "127.0.0.1", self.kubelet.resolve_service)
                if not path.exists() or path.read_text() != text:
                    tmp = path.with_name(f".{path.name}.tmp")
                    tmp.write_text(text)
                    tmp.replace(path)  # atomic, like the kubelet's symlink swap

    async def _source_files(self, source: Mapping[str, Any]) -> dict[str, str]:
        if "configMap" in source:
            ref = source["configMap"]
            obj = await self.kubelet.api.get("ConfigMap", self.namespace, ref["name"])
            data = None if obj is None else {k: str(v) for k, v in (obj.get("data") or {}).items()}
        elif "secret" in source:
            ref = source["secret"]
            secret_name = ref.get("secretName") or ref.get("name")
            obj = await self.kubelet.api.get("Secret", self.namespace, secret_name)
            data = None if obj is None else podenv.decode_secret(obj)
        else:
            return {}  # downwardAPI/serviceAccountToken: an empty directory is enough here
        if data is None:
            if ref.get("optional"):
                return {}
            raise PodNotReadyError(
                f"{next(iter(source))} {ref.get('name') or ref.get('secretName')!r} not found"
            )
        items = ref.get("items")
        if items:
            return {str(i["path"]): data[i["key"]] for i in items if i["key"] in data}
        return data

    async def refresh_volumes(self) -> None:
        """Keep ConfigMap/Secret files current, as a node does (eventually consistent)."""
        for volume in self.pod.get("spec", {}).get("volumes") or []:
            host = self.volume_dirs.get(str(volume["name"]))
            if host is not None:
                with contextlib.suppress(PodNotReadyError):
                    await self._write_projected(volume, host)

    def container_mounts(self, spec: Mapping[str, Any]) -> dict[str, str]:
        mounts = {}
        for m in spec.get("volumeMounts") or []:
            host = self.volume_dirs.get(str(m["name"]))
            if host is None:
                raise PodNotReadyError(f"volume {m['name']!r} is not mounted")
            if m.get("subPath"):
                host = host / m["subPath"]
            mounts[str(m["mountPath"])] = str(host)
        if "/tmp" not in mounts:  # the container's own /tmp (its image's), never the host's
            mounts["/tmp"] = str(self.tmp_dir(mounts))
        return mounts

    def all_mounts(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for c in self.pod.get("spec", {}).get("containers") or []:
            with contextlib.suppress(PodNotReadyError):
                out.update(self.container_mounts(c))
        return out

    def termination_message_file(self, spec: Mapping[str, Any]) -> Path:
        """The host file behind a container's ``terminationMessagePath``."""
        path = self.dir / "termination" / str(spec["name"])
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def tmp_dir(self, mounts: Mapping[str, str]) -> Path:
        """The container's ``/tmp`` (its TMPDIR): the volume mounted there, else the pod's own
        directory; never the host's /tmp (profiles and temp files stay with the pod)."""
        path = Path(mounts["/tmp"]) if "/tmp" in mounts else self.dir / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def workdir(self, spec: Mapping[str, Any]) -> Path:
        if spec.get("workingDir"):
            mapped = Path(podenv.remap_paths(str(spec["workingDir"]), self.container_mounts(spec)))
            if mapped.is_absolute() and mapped.exists():
                return mapped
        cwd = self.dir / "cwd" / str(spec["name"])
        cwd.mkdir(parents=True, exist_ok=True)
        return cwd

    # -- env and argv
    async def container_process_spec(self, spec: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
        """argv and env of a container, with paths, listen address and Service names rewritten."""
        cfg = self.kubelet.config
        mounts = self.container_mounts(spec)
        message_path = str(spec.get("terminationMessagePath") or TERMINATION_MESSAGE_PATH)
        mounts[message_path] = str(self.termination_message_file(spec))
        home = self.dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        base = podenv.base_env(self.name, home, cfg.bin_dir, self.tmp_dir(mounts))
        own = await self._env_from(spec)
        own.update(await self._env(spec, {**base, **own}))

        def fix(value: str) -> str:
            value = podenv.remap_paths(value, mounts)
            return podenv.rewrite_hosts(value, self.ip or "127.0.0.1", self.kubelet.resolve_service)

        # Only the pod's own values name in-container paths and Service names: the base
        # environment (PATH to this venv, HOME) is already host-side, and remapping it breaks when
        # the host path happens to start with a mount path (a checkout under /tmp with a /tmp mount).
        env = {**base, **{k: fix(v) for k, v in own.items()}}
        argv = [fix(podenv.expand_vars(a, env)) for a in podenv.container_argv(spec, cfg.entrypoints)]
        argv[0] = podenv.resolve_executable(argv[0], cfg.bin_dir)
        return argv, env

    async def _lookup(self, kind: str, ref: Mapping[str, Any]) -> dict[str, str] | None:
        name = ref.get("name")
        obj = await self.kubelet.api.get(kind, self.namespace, str(name))
        if obj is None:
            if ref.get("optional"):
                return None
            raise PodNotReadyError(f"{kind.lower()} {name!r} not found")
        if kind == "Secret":
            return podenv.decode_secret(obj)
        return {k: str(v) for k, v in (obj.get("data") or {}).items()}

    async def _env_from(self, spec: Mapping[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for source in spec.get("envFrom") or []:
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            data = await self._lookup(kind, source.get("configMapRef") or source.get("secretRef") or {})
            prefix = str(source.get("prefix", ""))
            out.update({prefix + k: v for k, v in (data or {}).items()})
        return out

    async def _env(self, spec: Mapping[str, Any], base: Mapping[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in spec.get("env") or []:
            name = str(item["name"])
            if "value" in item:
                out[name] = podenv.expand_vars(str(item["value"]), {**base, **out})
                continue
            source = item.get("valueFrom") or {}
            if "fieldRef" in source:
                out[name] = podenv.field_ref(self.pod, source["fieldRef"]["fieldPath"], self.ip or "")
            elif "resourceFieldRef" in source:
                out[name] = podenv.resource_field_ref(spec, source["resourceFieldRef"])
            else:
                kind, ref = (
                    ("ConfigMap", source.get("configMapKeyRef"))
                    if "configMapKeyRef" in source
                    else ("Secret", source.get("secretKeyRef"))
                )
                data = await self._lookup(kind, ref or {})
                if data is not None and ref and ref["key"] in data:
                    out[name] = data[ref["key"]]
                elif ref and not ref.get("optional"):
                    raise PodNotReadyError(
                        f"{kind.lower()} {ref.get('name')!r} has no key {ref.get('key')!r}"
                    )
        return out

    # -- probes and handlers
    async def run_probe(self, probe: Mapping[str, Any], runner: ContainerRunner, timeout_s: float) -> bool:
        ports = {
            str(p["name"]): int(p["containerPort"]) for p in runner.spec.get("ports") or [] if p.get("name")
        }
        try:
            if "httpGet" in probe:
                return await self._http_get(probe["httpGet"], ports, timeout_s)
            if "tcpSocket" in probe:
                port = _port(probe["tcpSocket"]["port"], ports)
                _, writer = await asyncio.wait_for(asyncio.open_connection(self.ip, port), timeout_s)
                writer.close()
                return True
            if "exec" in probe:
                return await self._exec(probe["exec"]["command"], runner, timeout_s) == 0
        except (TimeoutError, OSError, aiohttp.ClientError, ValueError):
            return False
        return False

    async def run_handler(self, handler: Mapping[str, Any], runner: ContainerRunner) -> None:
        """A lifecycle hook (preStop): exec or httpGet; its outcome does not block the stop."""
        ports = {
            str(p["name"]): int(p["containerPort"]) for p in runner.spec.get("ports") or [] if p.get("name")
        }
        with contextlib.suppress(OSError, asyncio.TimeoutError, aiohttp.ClientError, ValueError):
            if "exec" in handler:
                await self._exec(handler["exec"]["command"], runner, self.grace_period_s())
            elif "httpGet" in handler:
                await self._http_get(handler["httpGet"], ports, self.grace_period_s())
            elif "sleep" in handler:
                await asyncio.sleep(float(handler["sleep"].get("seconds", 0)))

    async def _http_get(self, spec: Mapping[str, Any], ports: Mapping[str, int], timeout_s: float) -> bool:
        host = spec.get("host") or self.ip
        scheme = str(spec.get("scheme", "HTTP")).lower()
        url = f"{scheme}://{host}:{_port(spec['port'], ports)}{spec.get('path', '/')}"
        headers = {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
        async with self.kubelet.http.get(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as r:
            return 200 <= r.status < 400

    def exec_spec(
        self, runner: ContainerRunner, command: list[str]
    ) -> tuple[list[str], dict[str, str], Path]:
        """argv, env and working directory of a command run in a container (exec probes, hooks,
        ``kubectl exec``): the container's environment, its paths and addresses rewritten."""
        mounts = self.container_mounts(runner.spec)
        argv = [
            podenv.rewrite_hosts(
                podenv.remap_paths(str(c), mounts), self.ip or "", self.kubelet.resolve_service
            )
            for c in command
        ]
        argv[0] = podenv.resolve_executable(argv[0], self.kubelet.config.bin_dir)
        env = runner.env or podenv.base_env(
            self.name, self.dir / "home", self.kubelet.config.bin_dir, self.tmp_dir(mounts)
        )
        return argv, env, self.workdir(runner.spec)

    async def _exec(self, command: list[str], runner: ContainerRunner, timeout_s: float) -> int:
        argv, env, cwd = self.exec_spec(runner, command)
        log_path = self.log_dir / runner.name / "exec.log"
        proc = self.kubelet.procs.spawn(argv, env=env, cwd=cwd, log_path=log_path)
        deadline = time.monotonic() + timeout_s
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    ProcessRegistry.signal_group(proc, signal.SIGKILL)
                    raise TimeoutError
                await asyncio.sleep(0.05)
            return proc.returncode
        finally:
            if proc.poll() is None:
                proc.wait()
            self.kubelet.procs.forget(proc)


# ------------------------------------------------------------------------------------------- kubelet


class Kubelet:
    """Watches Pods (by polling the API) and runs them; the single node of the local cluster."""

    def __init__(
        self,
        api: ClusterAPI,
        config: KubeletConfig,
        procs: ProcessRegistry,
        ips: podenv.IPPool,
        resolve_service: Callable[[str], str | None] = lambda _: None,
    ) -> None:
        self.api = api
        self.config = config
        self.procs = procs
        self.ips = ips
        self.resolve_service = resolve_service
        self.workers: dict[tuple[str, str, str], PodWorker] = {}
        self.shutting_down = False
        self._published: dict[tuple[str, str, str], str] = {}
        self.http: aiohttp.ClientSession = None  # type: ignore[assignment]  # set in run()

    def pvc_dir(self, namespace: str, claim: str) -> Path:
        """The directory backing a PVC: it outlives pods, so a restarted engine finds its data."""
        return self.config.state_dir / "volumes" / namespace / claim

    def worker(self, namespace: str, name: str) -> PodWorker | None:
        live = [w for (ns, n, _), w in self.workers.items() if ns == namespace and n == name]
        return live[-1] if live else None

    async def run(self, shutdown_grace_s: float = 10.0) -> None:
        """Sync pods until cancelled; then stop every pod (grace capped at ``shutdown_grace_s``)."""
        async with aiohttp.ClientSession() as self.http:
            last_refresh = 0.0
            try:
                while True:
                    refresh = time.monotonic() - last_refresh > 2.0
                    if refresh:
                        last_refresh = time.monotonic()
                    try:
                        await self.sync_once(refresh_volumes=refresh)
                    except Exception:  # the kubelet outlives API hiccups, like a node
                        log.exception("kubelet sync failed")
                    await asyncio.sleep(self.config.sync_period_s)
            finally:
                await self.shutdown(grace_cap_s=shutdown_grace_s)

    async def sync_once(self, *, refresh_volumes: bool = False) -> None:
        pods = await self.api.list("Pod")
        seen: set[tuple[str, str, str]] = set()
        for pod in pods:
            meta = pod["metadata"]
            key = (meta.get("namespace") or "default", meta["name"], meta.get("uid") or "")
            seen.add(key)
            worker = self.workers.get(key)
            if meta.get("deletionTimestamp"):
                if worker is not None:
                    worker.pod = pod
                await self._delete(key, worker)
            elif worker is None:
                await self._admit(key, pod)
            else:
                worker.pod = pod
                if refresh_volumes and worker.phase in ("Pending", "Running"):
                    await worker.refresh_volumes()
                await self._publish(key, worker)
        for key in [k for k in self.workers if k not in seen]:
            # Deleted behind our back (no finalizer honoured): stop it all the same.
            worker = self.workers[key]
            if worker.terminating is None:
                worker.terminating = asyncio.create_task(self._stop(key, worker))

    async def _admit(self, key: tuple[str, str, str], pod: dict[str, Any]) -> None:
        if self.shutting_down:
            return  # the node is going away: start nothing new
        finalizers = list(pod["metadata"].get("finalizers") or [])
        if FINALIZER not in finalizers:
            patched = await self.api.patch(  # bound to this node, as the scheduler would have
                "Pod",
                key[0],
                key[1],
                {"metadata": {"finalizers": [*finalizers, FINALIZER]}, "spec": {"nodeName": NODE_NAME}},
            )
            if patched is None:
                return
        worker = PodWorker(self, pod)
        self.workers[key] = worker
        worker.task = asyncio.create_task(worker.run(), name=f"pod {key[0]}/{key[1]}")
        await self._publish(key, worker)

    async def _publish(self, key: tuple[str, str, str], worker: PodWorker) -> None:
        if not worker.gates_true():
            # a gate's condition is written by someone else (the operator): read it fresh, so this
            # status write neither drops it nor misses it turning True (once True it stays True)
            fresh = await self.api.get("Pod", key[0], key[1])
            if fresh is not None and (fresh.get("metadata") or {}).get("uid") == key[2]:
                worker.pod = fresh
        status = worker.status()
        encoded = json.dumps(status, sort_keys=True)
        if self._published.get(key) != encoded and (
            await self.api.patch("Pod", key[0], key[1], {"status": status}, subresource="status") is not None
        ):
            self._published[key] = encoded

    async def _delete(self, key: tuple[str, str, str], worker: PodWorker | None) -> None:
        if worker is not None and worker.terminating is None:
            worker.terminating = asyncio.create_task(self._stop_then_release(key, worker))
        elif worker is None:
            await self._release(key)

    async def _stop_then_release(self, key: tuple[str, str, str], worker: PodWorker) -> None:
        await self._stop(key, worker)
        await self._release(key)

    async def _stop(
        self, key: tuple[str, str, str], worker: PodWorker, grace_cap_s: float | None = None
    ) -> None:
        grace = worker.grace_period_s() if grace_cap_s is None else min(worker.grace_period_s(), grace_cap_s)
        await worker.terminate(grace)
        self.workers.pop(key, None)
        self._published.pop(key, None)

    async def _release(self, key: tuple[str, str, str]) -> None:
        pod = await self.api.get("Pod", key[0], key[1])
        if pod is None:
            return
        finalizers = [f for f in pod["metadata"].get("finalizers") or [] if f != FINALIZER]
        await self.api.patch("Pod", key[0], key[1], {"metadata": {"finalizers": finalizers}})

    async def shutdown(self, grace_cap_s: float) -> None:
        """Stop every pod (the node going away): preStop + SIGTERM, grace capped at ``grace_cap_s``."""
        self.shutting_down = True
        await asyncio.gather(
            *(self._stop(k, w, grace_cap_s) for k, w in list(self.workers.items())), return_exceptions=True
        )
