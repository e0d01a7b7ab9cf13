"""The only module that talks to the Kubernetes API (Kopf's own watching and patching aside).

The operator reads its children and pods from Kopf indexes fed by watches (``WATCHED``: Kopf
lists and watches them), and calls the API itself only to write: create/patch/delete children,
patch status, plus two reads (a user's own token Secret, an object a create found taken) and, once
at startup, the peering object.

A thin asyncio client on aiohttp, configured from the same credentials Kopf logs in with
(``kopf.ConnectionInfo``: kubeconfig or in-cluster). 404 and 409 are normal outcomes and come
back as values (``None`` / ``False``) or as ``ConflictError``; other failures raise ``ApiError``.

Every call is checked against ``API_CALLS``, the (apiGroup, resource, verb) table this module
uses; a test compares it with the RBAC the chart grants (``rbac.permission_set()``), so a new
call without a matching permission fails in tests, not in a cluster.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf
import orjson

from kvcache_operator import api

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    """A resource the operator reads or writes."""

    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def url(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        """The path of the collection or of one object; ``namespace`` None for cluster-scoped kinds."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        scope = f"/namespaces/{quote(namespace)}" if namespace is not None else ""
        path = f"{base}{scope}/{self.plural}"
        if name is not None:
            path += f"/{quote(name)}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


KVCACHES = Kind(api.GROUP, api.VERSION, api.PLURAL, api.KIND)
PODS = Kind("", "v1", "pods", "Pod")
SECRETS = Kind("", "v1", "secrets", "Secret")
JOBS = Kind("batch", "v1", "jobs", "Job")
PVCS = Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
KOPFPEERINGS = Kind("kopf.dev", "v1", "kopfpeerings", "KopfPeering")
CLUSTERKOPFPEERINGS = Kind("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering")

CHILD_KINDS: dict[str, Kind] = {
    k.kind: k
    for k in (
        Kind("", "v1", "configmaps", "ConfigMap"),
        SECRETS,
        Kind("", "v1", "services", "Service"),
        Kind("apps", "v1", "statefulsets", "StatefulSet"),
        Kind("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget"),
        PVCS,
        Kind("batch", "v1", "cronjobs", "CronJob"),
        Kind("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor"),
        Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
    )
}
"""Kinds ``resources.build_children`` produces (the reconciler creates, patches, deletes them)."""

WATCHED: tuple[Kind, ...] = (*CHILD_KINDS.values(), JOBS, PODS)
"""Kinds Kopf lists and watches to feed the operator's indexes (children, backup Jobs, engine pods)."""

API_CALLS: frozenset[tuple[str, str, str]] = frozenset(
    {(k.group, k.plural, verb) for k in CHILD_KINDS.values() for verb in ("get", "create", "patch", "delete")}
    | {
        (KVCACHES.group, KVCACHES.plural, "get"),
        (KVCACHES.group, f"{KVCACHES.plural}/status", "patch"),
        (PODS.group, f"{PODS.plural}/status", "patch"),  # the warm join's readiness gate
    }
)
"""Every (apiGroup, resource, verb) this module may call. Kopf itself additionally lists and
watches kvcaches and ``WATCHED``, patches kvcaches and posts events (declared in rbac.RULES)."""

PEERING_CALLS: frozenset[tuple[str, str, str]] = frozenset(
    {
        (KOPFPEERINGS.group, KOPFPEERINGS.plural, "get"),
        (CLUSTERKOPFPEERINGS.group, CLUSTERKOPFPEERINGS.plural, "get"),
    }
)
"""The startup check of the peering object (only when peering is on: the chart grants these then)."""


class ApiError(Exception):
    """A Kubernetes API failure other than the normal outcomes (404, 409)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class ConflictError(ApiError):
    """409: the object exists (create) or changed meanwhile (stale resourceVersion)."""


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    """TLS as the kubeconfig says (CA file or base64 CA data, client certificate files)."""
    if info.insecure:
        return False
    context = ssl.create_default_context()
    if info.ca_path:
        context.load_verify_locations(cafile=str(info.ca_path))
    if info.ca_data:
        raw = info.ca_data.encode() if isinstance(info.ca_data, str) else info.ca_data
        context.load_verify_locations(cadata=base64.b64decode(raw).decode())
    if info.certificate_path and info.private_key_path:
        context.load_cert_chain(str(info.certificate_path), str(info.private_key_path))
    return context


class KubeClient:
    """Async CRUD on namespaced objects; create it with ``connect()`` in the startup handler."""

    def __init__(self, session: aiohttp.ClientSession, server: str) -> None:
        self._session = session
        self._server = server.rstrip("/")

    @classmethod
    def connect(cls, info: kopf.ConnectionInfo, *, timeout_s: float = 30.0) -> KubeClient:
        headers = {"Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        auth = aiohttp.BasicAuth(info.username, info.password or "") if info.username else None
        session = aiohttp.ClientSession(
            headers=headers,
            auth=auth,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info), limit=64),
        )
        return cls(session, info.server)

    async def close(self) -> None:
        await self._session.close()

    async def _call(
        self,
        kind: Kind,
        verb: str,
        method: str,
        path: str,
        *,
        subresource: str | None = None,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> tuple[int, Any]:
        resource = f"{kind.plural}/{subresource}" if subresource else kind.plural
        if (kind.group, resource, verb) not in API_CALLS | PEERING_CALLS:
            raise AssertionError(f"undeclared API call {verb} {kind.group}/{resource}: add it to API_CALLS")
        headers = {"Content-Type": content_type or "application/json"} if json is not None else None
        data = orjson.dumps(json, option=orjson.OPT_NON_STR_KEYS) if json is not None else None
        async with self._session.request(
            method, self._server + path, data=data, params=params, headers=headers
        ) as response:
            raw = await response.read()
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:  # a proxy's or an old server's plain-text error
                body = raw.decode(errors="replace")
            if response.status >= 400 and response.status != 404:
                message = body.get("message", "") if isinstance(body, dict) else str(body or "")
                error = ConflictError if response.status == 409 else ApiError
                raise error(response.status, message)
            return response.status, body

    async def get(self, kind: Kind, namespace: str | None, name: str) -> Manifest | None:
        """One object (``namespace`` None for cluster-scoped kinds); None when it, or its kind, is absent."""
        status, body = await self._call(kind, "get", "GET", kind.url(namespace, name))
        return None if status == 404 else dict(body)

    async def list(
        self, kind: Kind, namespace: str, label_selector: str | None = None
    ) -> list[Manifest] | None:
        """Objects in a namespace; None when the resource itself is unknown (CRD not installed)."""
        params = {"labelSelector": label_selector} if label_selector else None
        status, body = await self._call(kind, "list", "GET", kind.url(namespace), params=params)
        return None if status == 404 else [dict(item) for item in body.get("items", [])]

    async def create(self, kind: Kind, obj: Manifest) -> Manifest | None:
        """Create; raises ConflictError if it exists; None when the resource is unknown."""
        status, body = await self._call(
            kind, "create", "POST", kind.url(obj["metadata"]["namespace"]), json=obj
        )
        return None if status == 404 else dict(body)

    async def patch(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        patch: Manifest,
        *,
        subresource: str | None = None,
        strategic: bool = False,
    ) -> Manifest | None:
        """JSON merge patch, or with ``strategic`` a strategic merge patch (built-in kinds only:
        lists merge by their key, e.g. a pod's ``status.conditions`` by ``type``, so the kubelet's
        own conditions stay); None when the object is gone."""
        status, body = await self._call(
            kind,
            "patch",
            "PATCH",
            kind.url(namespace, name, subresource),
            subresource=subresource,
            json=patch,
            content_type=f"application/{'strategic-merge' if strategic else 'merge'}-patch+json",
        )
        return None if status == 404 else dict(body)

    async def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        status, _ = await self._call(
            kind, "delete", "DELETE", kind.url(namespace, name), params={"propagationPolicy": "Background"}
        )
        return status != 404
