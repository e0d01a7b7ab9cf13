"""The API surface the local controllers, kubelet and proxy use (:class:`ClusterAPI`), the kinds
they know, and small object helpers.

Reads return copies; writes are JSON merge patches (RFC 7386); 404 and 409 are normal outcomes
(None/False), anything else raises :class:`ApiError`. Label selection is equality-based.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the REST API."""

    kind: str
    api_version: str
    plural: str
    namespaced: bool = True


KINDS: dict[str, Kind] = {
    k.kind: k
    for k in (
        Kind("Namespace", "v1", "namespaces", namespaced=False),
        Kind("Pod", "v1", "pods"),
        Kind("Service", "v1", "services"),
        Kind("Endpoints", "v1", "endpoints"),
        Kind("ConfigMap", "v1", "configmaps"),
        Kind("Secret", "v1", "secrets"),
        Kind("PersistentVolumeClaim", "v1", "persistentvolumeclaims"),
        Kind("ServiceAccount", "v1", "serviceaccounts"),
        Kind("Event", "v1", "events"),
        Kind("StatefulSet", "apps/v1", "statefulsets"),
        Kind("ControllerRevision", "apps/v1", "controllerrevisions"),
        Kind("Deployment", "apps/v1", "deployments"),
        Kind("Job", "batch/v1", "jobs"),
        Kind("CronJob", "batch/v1", "cronjobs"),
        Kind("PodDisruptionBudget", "policy/v1", "poddisruptionbudgets"),
        Kind("NetworkPolicy", "networking.k8s.io/v1", "networkpolicies"),
        Kind("Lease", "coordination.k8s.io/v1", "leases"),
        Kind("ServiceMonitor", "monitoring.coreos.com/v1", "servicemonitors"),
        Kind("KVCache", "kvcache.dev/v1alpha1", "kvcaches"),
        Kind("CustomResourceDefinition", "apiextensions.k8s.io/v1", "customresourcedefinitions", False),
    )
}


def kind_of(name: str) -> Kind:
    """The :class:`Kind` for ``name``; ValueError listing the known kinds otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown kind {name!r}; known: {', '.join(sorted(KINDS))}") from None


class ApiError(Exception):
    """A non-2xx answer other than the 404/409 the callers treat as normal outcomes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def matches(labels: Mapping[str, str] | None, selector: Mapping[str, str] | None) -> bool:
    """Equality-based label selection (``matchLabels``)."""
    if not selector:
        return True
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def owned_by(obj: Mapping[str, Any], owner: Mapping[str, Any]) -> bool:
    """True when ``obj`` has an ownerReference to ``owner`` (by uid when both have one, else by name)."""
    meta = owner.get("metadata", {})
    for ref in obj.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") != owner.get("kind") or ref.get("name") != meta.get("name"):
            continue
        if ref.get("uid") and meta.get("uid") and ref["uid"] != meta["uid"]:
            continue
        return True
    return False


class ClusterAPI(Protocol):
    """What the controllers, kubelet and proxy need from an API server (HTTP or in-process)."""

    async def list(
        self, kind: str, namespace: str | None = None, selector: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]: ...

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None: ...

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any] | None: ...

    async def patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any] | None: ...

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool: ...
