"""Turning a Pod's container spec into a host process: argv, environment, directories.

Pure functions (plus :class:`IPPool`), so they are unit-tested without processes.

Deviations from a node, all deliberate and documented in e2e/README.md:

* Images are not run. ``command`` (or, when absent, the entrypoint registered for the image name)
  runs from the local virtualenv: ``kvcache-engine`` resolves to the venv's entry point.
* Mounts are not bind-mounted (that needs root). Each volume is a host directory, and the mount
  paths the process will see in its command, args, env values and ConfigMap/Secret file contents
  are rewritten to those directories (longest mount path first, single pass, path boundaries only).
* A listen address ``0.0.0.0`` in args/env is rewritten to the pod's own loopback IP, since every
  pod shares the host's network namespace; Service DNS names are rewritten to the local proxy's IP.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Image-name fragment -> entrypoint, for containers that rely on the image's ENTRYPOINT.
DEFAULT_ENTRYPOINTS: dict[str, list[str]] = {
    "kvcache-engine": ["kvcache-engine"],
    "engine": ["kvcache-engine"],
    "kvcache-operator": ["kvcache-operator"],
    "operator": ["kvcache-operator"],
}

# Host variables a process needs to run at all (locale, offline switches); nothing else of the host
# environment leaks into a pod (not TMPDIR either: a pod has its own, see base_env).
_PASSTHROUGH_ENV = ("LANG", "LC_ALL", "TZ", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

_PATH_PREFIX_CHARS = r"[\w.\-/]"


class IPPool:
    """Loopback addresses ``<prefix>.N`` (N in 2..254) for pods and Services of one cluster.

    Linux routes all of 127.0.0.0/8 to ``lo``, so any such address can be bound without setup. Each
    cluster picks its own ``127.X.Y`` prefix so two local clusters on one machine never collide.
    """

    def __init__(self, prefix: str) -> None:
        parts = prefix.split(".")
        if len(parts) != 3 or parts[0] != "127":
            raise ValueError(f"ip prefix must look like '127.X.Y', got {prefix!r}")
        self.prefix = prefix
        self._free = list(range(2, 255))
        self._used: set[str] = set()

    def allocate(self) -> str:
        if not self._free:
            raise RuntimeError(f"no free address left in {self.prefix}.0/24")
        ip = f"{self.prefix}.{self._free.pop(0)}"
        self._used.add(ip)
        return ip

    def release(self, ip: str | None) -> None:
        if ip in self._used:
            self._used.discard(ip)
            # Reuse last: a just-released address may still have sockets in TIME_WAIT.
            self._free.append(int(ip.rsplit(".", 1)[1]))


def remap_paths(value: str, mounts: Mapping[str, str]) -> str:
    """Rewrite container paths under any mount path to the host directory backing it.

    A mount path matches only at a path start (not preceded by a path character) and only up to a
    path boundary, so ``/data`` rewrites ``/data/cache`` and ``--dir=/data`` but not ``/database``
    or ``/x/data``. One pass: a host path is never rewritten again.
    """
    if not mounts:
        return value
    ordered = sorted(mounts, key=len, reverse=True)
    pattern = re.compile(
        rf"(?<!{_PATH_PREFIX_CHARS})("
        + "|".join(re.escape(m.rstrip("/") or "/") for m in ordered)
        + r")(?=$|[/\s\"':,;=\]}})])"
    )
    lookup = {m.rstrip("/") or "/": h for m, h in mounts.items()}
    return pattern.sub(lambda m: lookup[m.group(1)], value)


def rewrite_hosts(value: str, pod_ip: str, resolve: Callable[[str], str | None]) -> str:
    """The pod's own addresses (``0.0.0.0``, ``127.0.0.1``, ``localhost``: in a pod they all mean
    the pod) → the pod IP; ``name.ns.svc[.cluster.local]`` → what ``resolve`` says (if anything)."""
    value = re.sub(r"(?<![\d.])(?:0\.0\.0\.0|127\.0\.0\.1)(?![\d.])", pod_ip, value)
    value = re.sub(r"(?<=//)localhost(?=[:/]|$)|^localhost$", pod_ip, value)

    def _dns(match: re.Match[str]) -> str:
        return resolve(match.group(1)) or match.group(0)

    return re.sub(r"\b((?:[a-z0-9-]+\.){2,3}svc)(?:\.cluster\.local)?\b", _dns, value)


def expand_vars(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined variables are substituted, ``$$`` escapes."""

    def _sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", _sub, value)


def resolve_executable(argv0: str, bin_dir: Path) -> str:
    """Map an image path of a program (``/opt/venv/bin/kvcache-engine``, ``python``) to this host."""
    name = Path(argv0).name
    if name in {"python", "python3"} or re.fullmatch(r"python3\.\d+", name):
        return sys.executable
    local = bin_dir / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    return argv0


def container_argv(container: Mapping[str, Any], entrypoints: Mapping[str, Sequence[str]]) -> list[str]:
    """``command + args``, or the image's registered entrypoint + args when command is absent."""
    args = [str(a) for a in container.get("args") or []]
    command = [str(c) for c in container.get("command") or []]
    if command:
        return command + args
    image = str(container.get("image", ""))
    repo = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
    for fragment, entry in entrypoints.items():
        if fragment in repo:
            return [*entry, *args]
    raise ValueError(
        f"container {container.get('name')!r}: no command and no local entrypoint for image {image!r}; "
        f"known image names: {', '.join(sorted(entrypoints))}"
    )


def base_env(pod_name: str, home: Path, bin_dir: Path, tmp: Path | None = None) -> dict[str, str]:
    """The environment every container starts from (before the pod's own env); ``tmp`` is the
    pod's own temp directory (TMPDIR), so nothing a container writes lands in the host's /tmp."""
    env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(home)
    env["TMPDIR"] = str(tmp or home)
    env["HOSTNAME"] = pod_name
    env["PYTHONUNBUFFERED"] = "1"
    return env


def decode_secret(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's ``data`` (base64) and ``stringData`` as text."""
    out = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    out.update({k: str(v) for k, v in (secret.get("stringData") or {}).items()})
    return out


def field_ref(pod: Mapping[str, Any], path: str, pod_ip: str) -> str:
    """Downward API ``fieldRef.fieldPath`` for the fields pods commonly use."""
    meta = pod.get("metadata", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": "localcluster",
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", "default"),
        "status.hostIP": "127.0.0.1",
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
    }
    if path not in simple:
        raise ValueError(f"fieldRef.fieldPath {path!r} is not supported by the local kubelet")
    return str(simple[path])


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes quantity (``512Mi``, ``250m``, ``2``) as a number."""
    m = _QUANTITY.match(str(text))
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def resource_field_ref(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    """``resourceFieldRef``: a container's request/limit divided by ``divisor`` (ceil, like the kubelet)."""
    kind, _, resource = str(ref.get("resource", "")).partition(".")
    value = (container.get("resources", {}).get(kind) or {}).get(resource)
    if value is None:
        return "0"
    divisor = parse_quantity(ref.get("divisor", "1"))
    quotient = parse_quantity(value) / divisor
    return str(int(-(-quotient // 1)))
