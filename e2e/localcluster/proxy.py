"""A tiny kube-proxy and cluster DNS for the local cluster.

Every ClusterIP Service gets a loopback address of its own; a TCP listener on each of its ports
forwards connections round-robin to the Ready pods its selector matches (``targetPort`` by number
or by container-port name). A headless Service gets the same (as a convenience; its per-pod names
resolve to the pods). Names are resolved by :meth:`ServiceProxy.resolve`, which the kubelet uses
to rewrite ``svc`` host names in a pod's command, env and config files:

* ``<service>.<namespace>.svc`` → the Service's address;
* ``<pod>.<service>.<namespace>.svc`` → the pod's IP (StatefulSet pod DNS).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Mapping
from typing import Any

from e2e.localcluster.controllers import is_ready
from e2e.localcluster.kubeapi import ClusterAPI, matches
from e2e.localcluster.podenv import IPPool

log = logging.getLogger("localcluster.proxy")


class ServiceProxy:
    def __init__(self, api: ClusterAPI, ips: IPPool, pod_ip: Callable[[str, str], str | None]) -> None:
        self.api = api
        self.ips = ips
        self.pod_ip = pod_ip
        self.addresses: dict[tuple[str, str], str] = {}
        self._servers: dict[tuple[str, str], list[asyncio.Server]] = {}
        self._backends: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._services: dict[tuple[str, str], dict[str, Any]] = {}
        self._rr = itertools.count()

    def resolve(self, name: str) -> str | None:
        parts = name.split(".")
        if parts[-1] != "svc":
            return None
        if len(parts) == 3:
            return self.addresses.get((parts[1], parts[0]))
        if len(parts) == 4:
            return self.pod_ip(parts[2], parts[0])
        return None

    async def run(self, period_s: float = 0.5) -> None:
        try:
            while True:
                with contextlib.suppress(Exception):
                    await self.sync_once()
                await asyncio.sleep(period_s)
        finally:
            for key in list(self._servers):
                await self._close(key)

    async def sync_once(self) -> None:
        services = {
            (s["metadata"].get("namespace") or "default", s["metadata"]["name"]): s
            for s in await self.api.list("Service")
        }
        pods = await self.api.list("Pod")
        for key in [k for k in self._servers if k not in services]:
            await self._close(key)
        for key, svc in services.items():
            self._services[key] = svc
            selector = (svc.get("spec") or {}).get("selector")
            self._backends[key] = [
                p
                for p in pods
                if selector
                and is_ready(p)
                and (p["metadata"].get("namespace") or "default") == key[0]
                and matches(p["metadata"].get("labels"), selector)
            ]
            if key not in self._servers:
                await self._open(key, svc)

    async def _open(self, key: tuple[str, str], svc: Mapping[str, Any]) -> None:
        ip = self.ips.allocate()
        servers = []
        for port in (svc.get("spec") or {}).get("ports") or []:
            handler = self._handler(key, port)
            servers.append(await asyncio.start_server(handler, ip, int(port["port"])))
        self.addresses[key] = ip
        self._servers[key] = servers
        log.info("service %s/%s at %s", key[0], key[1], ip)

    async def _close(self, key: tuple[str, str]) -> None:
        for server in self._servers.pop(key, []):
            server.close()
        self.ips.release(self.addresses.pop(key, None))

    def _handler(self, key: tuple[str, str], port: Mapping[str, Any]) -> Callable[..., Any]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            backends = self._backends.get(key) or []
            if not backends:
                writer.close()
                return
            pod = backends[next(self._rr) % len(backends)]
            target = _target_port(pod, port)
            ip = pod.get("status", {}).get("podIP")
            try:
                up_reader, up_writer = await asyncio.open_connection(ip, target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True)

        return handle


def _target_port(pod: Mapping[str, Any], port: Mapping[str, Any]) -> int:
    target = port.get("targetPort", port["port"])
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for container in pod.get("spec", {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return int(port["port"])


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.close()
