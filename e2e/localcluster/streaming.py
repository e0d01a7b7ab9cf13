"""The pod subresources kubectl streams from: ``log``, ``exec``, ``portforward``.

On a real cluster the API server proxies these to the node's kubelet; here the local kubelet's
state is at hand, so the API server answers them itself:

* ``GET .../pods/<name>/log`` (``container``, ``follow``, ``previous``, ``tailLines``,
  ``limitBytes``): the container's log file of its current run (or the run before, with
  ``previous``), followed until that run ends;
* ``.../pods/<name>/exec`` over a WebSocket with the ``v5.channel.k8s.io`` (or
  ``v4.channel.k8s.io``) subprotocol, what kubectl 1.30+ uses: each binary message starts with
  its channel (0 stdin, 1 stdout, 2 stderr, 3 the final ``Status``, 4 terminal resize; v5 adds
  ``255, <channel>`` = that channel is closed). The command runs like the container's own
  process: its environment, working directory, path and host rewriting, a terminal with ``-t``;
* ``.../pods/<name>/portforward`` over a WebSocket with the ``SPDY/3.1+portforward.k8s.io``
  subprotocol, what kubectl 1.31+ uses (see :mod:`e2e.localcluster.spdy`): per connection an error
  stream and a data stream; the data stream is piped to ``<pod IP>:<port>``.

Older clients that ask for a SPDY upgrade instead of a WebSocket get a 400 naming the kubectl
version needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import signal
import struct
import termios
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import kmock
from aiohttp import web

from e2e.localcluster import spdy
from e2e.localcluster.procs import _die_with_parent

if TYPE_CHECKING:
    from e2e.localcluster.kubelet import ContainerRunner, Kubelet, PodWorker

EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
PORTFORWARD_PROTOCOL = "SPDY/3.1+portforward.k8s.io"
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
_CHUNK = 32 * 1024


def _bad_request(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=400, reason="BadRequest", message=message, details={})


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def _worker(kubelet: Kubelet | None, namespace: str, name: str) -> PodWorker:
    worker = kubelet.worker(namespace, name) if kubelet else None
    if worker is None:  # not admitted by the kubelet yet (or already gone)
        raise _bad_request(f'pod "{name}" is waiting to start: ContainerCreating')
    return worker


def _container(worker: PodWorker, requested: str | None, *, init_ok: bool = True) -> ContainerRunner:
    """The container a request names; the only one when it names none (as the API server does)."""
    runners = worker.runners + (worker.init_runners if init_ok else [])
    if not requested:
        if len(worker.runners) != 1:
            names = " ".join(r.name for r in runners)
            raise _bad_request(
                f"a container name must be specified for pod {worker.name}, choose one of: [{names}]"
            )
        return worker.runners[0]
    for runner in runners:
        if runner.name == requested:
            return runner
    raise _bad_request(f"container {requested} is not valid for pod {worker.name}")


# ------------------------------------------------------------------------------------------ logs


def _tail(data: bytes, lines: int | None) -> bytes:
    if lines is None:
        return data
    if lines <= 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


async def serve_logs(
    request: web.BaseRequest, kubelet: Kubelet | None, namespace: str, name: str
) -> web.StreamResponse:
    query = request.query
    worker = _worker(kubelet, namespace, name)
    runner = _container(worker, query.get("container"))
    current = runner.runs - 1
    run = current - 1 if _truthy(query.get("previous")) else current
    if run < 0 or not runner.log_file(run).exists():
        if _truthy(query.get("previous")):
            raise _bad_request(f'previous terminated container "{runner.name}" in pod "{name}" not found')
        reason = ((runner.state.get("waiting") or {}).get("reason")) or "ContainerCreating"
        raise _bad_request(f'container "{runner.name}" in pod "{name}" is waiting to start: {reason}')
    path = runner.log_file(run)
    follow = _truthy(query.get("follow")) and run == current
    limit = int(query["limitBytes"]) if query.get("limitBytes") else None
    tail = int(query["tailLines"]) if query.get("tailLines") else None
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    sent = 0

    async def send(chunk: bytes) -> bool:
        nonlocal sent
        if limit is not None:
            chunk = chunk[: max(0, limit - sent)]
        if chunk:
            await response.write(chunk)
            sent += len(chunk)
        return limit is None or sent < limit

    with path.open("rb") as handle:
        more = await send(_tail(handle.read(), tail))
        while follow and more:
            chunk = handle.read(_CHUNK)
            if chunk:
                more = await send(chunk)
                continue
            if runner.runs - 1 != run or runner.proc is None or runner.proc.poll() is not None:
                more = await send(handle.read())  # the run ended: what it wrote last, then stop
                break
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(0.2)
    await response.write_eof()
    return response


# ------------------------------------------------------------------------------------------ exec


def _exit_status(code: int) -> dict[str, Any]:
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: error executing command, exit status {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


class _Exec:
    """One ``kubectl exec`` session on an open WebSocket."""

    def __init__(self, ws: web.WebSocketResponse, query: Mapping[str, str]) -> None:
        self.ws = ws
        self.v5 = ws.ws_protocol == "v5.channel.k8s.io"
        self.stdin = _truthy(query.get("stdin"))
        self.tty = _truthy(query.get("tty"))
        self.proc: asyncio.subprocess.Process | None = None
        self.master: int | None = None
        self.done = asyncio.Event()

    async def send(self, channel: int, data: bytes) -> None:
        if not self.ws.closed:
            await self.ws.send_bytes(bytes([channel]) + data)

    async def start(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        common: dict[str, Any] = {
            "env": env,
            "cwd": str(cwd),
            "start_new_session": True,
            "preexec_fn": _die_with_parent,
        }
        if self.tty:
            self.master, slave = pty.openpty()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=slave, stdout=slave, stderr=slave, **common
                )
            finally:
                os.close(slave)
            os.set_blocking(self.master, False)
        else:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if self.stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                **common,
            )

    async def pump(self, reader: asyncio.StreamReader | None, channel: int) -> None:
        while reader is not None:
            chunk = await reader.read(_CHUNK)
            if not chunk:
                return
            await self.send(channel, chunk)

    async def pump_tty(self) -> None:
        assert self.master is not None
        loop = asyncio.get_running_loop()
        while True:
            readable = asyncio.Event()
            loop.add_reader(self.master, readable.set)
            try:
                await readable.wait()
            finally:
                loop.remove_reader(self.master)
            try:
                chunk = os.read(self.master, _CHUNK)
            except BlockingIOError:
                continue
            except OSError:  # EIO: every writer of the terminal is gone
                return
            if not chunk:
                return
            await self.send(STDOUT, chunk)

    def resize(self, data: bytes) -> None:
        if self.master is None:
            return
        with contextlib.suppress(ValueError, OSError):
            size = json.loads(data)
            fcntl.ioctl(
                self.master, termios.TIOCSWINSZ, struct.pack("HHHH", size["Height"], size["Width"], 0, 0)
            )

    async def close_stdin(self) -> None:
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.write(self.master, b"\x04")  # ^D: end of input on a terminal
        elif self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()

    async def write_stdin(self, data: bytes) -> None:
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.write(self.master, data)
        elif self.proc is not None and self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.write(data)
            with contextlib.suppress(ConnectionError):
                await self.proc.stdin.drain()

    async def read_client(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.BINARY or not message.data:
                continue
            channel, payload = message.data[0], message.data[1:]
            if channel == STDIN:
                await self.write_stdin(payload)
            elif channel == RESIZE:
                self.resize(payload)
            elif channel == CLOSE and payload[:1] == bytes([STDIN]):
                await self.close_stdin()
        self.done.set()  # the client went away

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def run(self) -> None:
        """Pump until the command exits (then its Status on channel 3) or the client goes away
        (then the command is killed)."""
        proc = self.proc
        assert proc is not None
        client = asyncio.create_task(self.read_client())
        if self.master is not None:
            outputs = [asyncio.create_task(self.pump_tty())]
        else:
            outputs = [
                asyncio.create_task(self.pump(proc.stdout, STDOUT)),
                asyncio.create_task(self.pump(proc.stderr, STDERR)),
            ]

        async def finish() -> int:
            await asyncio.gather(*outputs)
            return await proc.wait()

        finished = asyncio.create_task(finish())
        gone = asyncio.create_task(self.done.wait())
        try:
            await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
            if finished.done() and finished.exception() is None:
                await self.send(ERROR, json.dumps(_exit_status(finished.result())).encode())
        finally:
            self.kill()
            for task in (client, gone, finished, *outputs):
                task.cancel()
            await asyncio.gather(client, gone, finished, *outputs, return_exceptions=True)
            if self.master is not None:
                os.close(self.master)


def _require_websocket(request: web.BaseRequest, what: str) -> None:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise _bad_request(
            f"{what}: the local cluster serves this over WebSocket only (kubectl 1.31 or newer; "
            f"got Upgrade: {request.headers.get('Upgrade') or 'none'})"
        )


async def serve_exec(
    request: web.BaseRequest, kubelet: Kubelet | None, namespace: str, name: str
) -> web.StreamResponse:
    _require_websocket(request, "exec")
    worker = _worker(kubelet, namespace, name)
    runner = _container(worker, request.query.get("container"), init_ok=False)
    command = request.query.getall("command", [])
    if not command:
        raise _bad_request("you must specify at least 1 command")
    if runner.proc is None or runner.proc.poll() is not None:
        raise _bad_request(f'unable to upgrade connection: container not found ("{runner.name}")')
    ws = web.WebSocketResponse(protocols=EXEC_PROTOCOLS)
    await ws.prepare(request)
    session = _Exec(ws, request.query)
    try:
        argv, env, cwd = worker.exec_spec(runner, command)
        if session.tty:
            env = {**env, "TERM": env.get("TERM", "xterm")}
        await session.start(argv, env, cwd)
    except OSError as exc:  # what a container runtime answers: the reason, then exit code 126/127
        reason = "executable file not found in $PATH" if isinstance(exc, FileNotFoundError) else exc.strerror
        message = (
            "OCI runtime exec failed: exec failed: unable to start container process: "
            f'exec: "{command[0]}": {reason}: unknown\r\n'
        )
        await session.send(STDOUT, message.encode())
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        await session.send(ERROR, json.dumps(_exit_status(code)).encode())
    else:
        await session.run()
    await ws.close()
    return ws


# ------------------------------------------------------------------------------------------ port-forward


class _PortForward:
    """The streams of one port-forward connection, paired by ``requestid``."""

    def __init__(self, worker: PodWorker) -> None:
        self.worker = worker
        self.pairs: dict[str, dict[str, spdy.Stream]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def on_stream(self, stream: spdy.Stream) -> None:
        request_id = stream.headers.get("requestid", "")
        pair = self.pairs.setdefault(request_id, {})
        pair[stream.headers.get("streamtype", "")] = stream
        if "data" in pair and "error" in pair:
            del self.pairs[request_id]
            task = asyncio.create_task(self.forward(pair["data"], pair["error"]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def forward(self, data: spdy.Stream, error: spdy.Stream) -> None:
        port_text = data.headers.get("port", "")
        try:
            port = int(port_text)
            reader, writer = await asyncio.open_connection(self.worker.ip, port)
        except (ValueError, OSError) as exc:
            reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
            message = (
                f"error forwarding port {port_text} to pod {self.worker.name}, uid {self.worker.uid}: "
                f"failed to connect to {self.worker.ip}:{port_text}: {reason.lower()}"
            )
            await error.write(message.encode())
            await error.close()
            await data.close()
            return

        async def upstream() -> None:  # client -> pod
            while (chunk := await data.received.get()) is not None:
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        async def downstream() -> None:  # pod -> client
            while chunk := await reader.read(_CHUNK):
                await data.write(chunk)

        up = asyncio.create_task(upstream())
        try:
            await downstream()
        except (ConnectionError, OSError):
            pass
        finally:
            await data.close()
            await error.close()
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)
            writer.close()

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def serve_portforward(
    request: web.BaseRequest, kubelet: Kubelet | None, namespace: str, name: str
) -> web.StreamResponse:
    _require_websocket(request, "port-forward")
    worker = _worker(kubelet, namespace, name)
    if worker.ip is None or worker.phase != "Running":
        raise _bad_request(
            f"unable to forward port because pod is not running. Current status={worker.phase}"
        )
    ws = web.WebSocketResponse(protocols=(PORTFORWARD_PROTOCOL,))
    await ws.prepare(request)
    forward = _PortForward(worker)
    session = spdy.Session(ws.send_bytes, forward.on_stream)
    try:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                await session.feed(message.data)
    except spdy.ProtocolError:
        pass
    finally:
        session.close()
        await forward.close()
        await ws.close()
    return ws
