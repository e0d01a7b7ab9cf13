"""What the API server says about its resources: names, short names, categories, subresources.

kubectl resolves ``kvc``, ``sts``, ``crd`` and ``all`` from discovery (``/api/v1``,
``/apis/<group>/<version>``), finds the scale subresource's kind there (``kubectl scale``) and the
pod subresources it streams from (``log``, ``exec``, ``portforward``). :class:`Catalog` holds one
:class:`Resource` per served resource: the built-in ones with the names a real API server gives
them (``BUILTIN_NAMES``), custom resources with the names of their CRD.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

OBJECT_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class Names:
    """The names a resource answers to besides its plural."""

    singular: str
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()


# group/version/plural -> names, as a v1.35 API server reports them.
BUILTIN_NAMES: dict[str, Names] = {
    "v1/namespaces": Names("namespace", ("ns",)),
    "v1/pods": Names("pod", ("po",), ("all",)),
    "v1/services": Names("service", ("svc",), ("all",)),
    "v1/endpoints": Names("endpoints", ("ep",)),
    "v1/configmaps": Names("configmap", ("cm",)),
    "v1/secrets": Names("secret"),
    "v1/serviceaccounts": Names("serviceaccount", ("sa",)),
    "v1/persistentvolumeclaims": Names("persistentvolumeclaim", ("pvc",)),
    "v1/events": Names("event", ("ev",)),
    "events.k8s.io/v1/events": Names("event", ("ev",)),
    "apps/v1/statefulsets": Names("statefulset", ("sts",), ("all",)),
    "apps/v1/deployments": Names("deployment", ("deploy",), ("all",)),
    "apps/v1/controllerrevisions": Names("controllerrevision"),
    "batch/v1/jobs": Names("job", (), ("all",)),
    "batch/v1/cronjobs": Names("cronjob", ("cj",), ("all",)),
    "policy/v1/poddisruptionbudgets": Names("poddisruptionbudget", ("pdb",)),
    "coordination.k8s.io/v1/leases": Names("lease"),
    "networking.k8s.io/v1/networkpolicies": Names("networkpolicy", ("netpol",)),
    "apiextensions.k8s.io/v1/customresourcedefinitions": Names(
        "customresourcedefinition", ("crd", "crds"), ("api-extensions",)
    ),
    "monitoring.coreos.com/v1/servicemonitors": Names("servicemonitor", ("smon",), ("prometheus-operator",)),
    "kopf.dev/v1/kopfpeerings": Names("kopfpeering"),
    "kopf.dev/v1/clusterkopfpeerings": Names("clusterkopfpeering"),
}

# Subresources with a kind of their own (everything else reports the parent's kind).
_SUBRESOURCE_KINDS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    # name -> (group, version, kind, verbs)
    "scale": ("autoscaling", "v1", "Scale", ("get", "patch", "update")),
    "exec": ("", "", "PodExecOptions", ("create", "get")),
    "portforward": ("", "", "PodPortForwardOptions", ("create", "get")),
    "log": ("", "", "Pod", ("get",)),
    "status": ("", "", "", ("get", "patch", "update")),
}

# Pod subresources the local kubelet serves, on top of the emulator's status.
POD_SUBRESOURCES = ("log", "exec", "portforward")


@dataclass
class Resource:
    """One served resource (group, version, plural) and how clients may address it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    names: Names
    subresources: tuple[str, ...] = ()
    list_kind: str = ""
    printer_columns: list[dict[str, Any]] = field(default_factory=list)  # CRDs only

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    def api_resources(self) -> list[dict[str, Any]]:
        """This resource's entries of an APIResourceList (itself, then each subresource)."""
        out = [
            {
                "name": self.plural,
                "singularName": self.names.singular,
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": list(OBJECT_VERBS),
                **({"shortNames": list(self.names.short_names)} if self.names.short_names else {}),
                **({"categories": list(self.names.categories)} if self.names.categories else {}),
            }
        ]
        for sub in self.subresources:
            group, version, kind, verbs = _SUBRESOURCE_KINDS.get(sub, ("", "", "", ("get",)))
            entry: dict[str, Any] = {
                "name": f"{self.plural}/{sub}",
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": kind or self.kind,
                "verbs": list(verbs),
            }
            if group:
                entry.update(group=group, version=version)
            out.append(entry)
        return out


class Catalog:
    """Every served resource; answers the discovery documents and name lookups."""

    def __init__(self) -> None:
        self._resources: dict[tuple[str, str, str], Resource] = {}

    def add(self, resource: Resource) -> None:
        self._resources[resource.key] = resource

    def add_builtin(
        self, group: str, version: str, plural: str, kind: str, namespaced: bool, subresources: Iterable[str]
    ) -> Resource:
        gvp = "/".join(p for p in (group, version, plural) if p)
        names = BUILTIN_NAMES.get(gvp, Names(kind.lower()))
        subs = tuple(subresources) + (POD_SUBRESOURCES if (group, plural) == ("", "pods") else ())
        resource = Resource(group, version, plural, kind, namespaced, names, subs, f"{kind}List")
        self.add(resource)
        return resource

    def add_crd(self, crd: Mapping[str, Any]) -> list[Resource]:
        """One resource per served version of a CustomResourceDefinition."""
        spec = crd["spec"]
        names = spec["names"]
        added = []
        for version in spec.get("versions") or []:
            if not version.get("served", True):
                continue
            subresources = tuple(sorted((version.get("subresources") or {}).keys()))
            resource = Resource(
                group=str(spec["group"]),
                version=str(version["name"]),
                plural=str(names["plural"]),
                kind=str(names["kind"]),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                names=Names(
                    str(names.get("singular") or names["kind"].lower()),
                    tuple(names.get("shortNames") or ()),
                    tuple(names.get("categories") or ()),
                ),
                subresources=subresources,
                list_kind=str(names.get("listKind") or f"{names['kind']}List"),
                printer_columns=list(version.get("additionalPrinterColumns") or []),
            )
            self.add(resource)
            added.append(resource)
        return added

    def get(self, group: str, version: str, plural: str) -> Resource | None:
        return self._resources.get((group, version, plural))

    def by_kind(self, api_version: str, kind: str) -> Resource | None:
        group, _, version = api_version.rpartition("/")
        return next(
            (r for r in self._resources.values() if (r.group, r.version, r.kind) == (group, version, kind)),
            None,
        )

    def __iter__(self) -> Any:
        return iter(sorted(self._resources.values(), key=lambda r: r.key))

    def group_versions(self) -> dict[str, list[str]]:
        """group -> its versions (the core group is "")."""
        out: dict[str, list[str]] = {}
        for r in self:
            versions = out.setdefault(r.group, [])
            if r.version not in versions:
                versions.append(r.version)
        return out

    # ------------------------------------------------------------------------------ documents
    def api_versions(self, server_address: str) -> dict[str, Any]:
        """``/api``."""
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        }

    def _group(self, group: str, versions: list[str]) -> dict[str, Any]:
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": entries, "preferredVersion": entries[0]}

    def api_groups(self) -> dict[str, Any]:
        """``/apis``."""
        groups = [self._group(g, vs) for g, vs in self.group_versions().items() if g]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def api_group(self, group: str) -> dict[str, Any] | None:
        """``/apis/<group>``."""
        versions = self.group_versions().get(group)
        if not group or not versions:
            return None
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group(group, versions)}

    def api_resource_list(self, group: str, version: str) -> dict[str, Any] | None:
        """``/api/v1`` or ``/apis/<group>/<version>``."""
        resources = [r for r in self if (r.group, r.version) == (group, version)]
        if not resources:
            return None
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [entry for r in resources for entry in r.api_resources()],
        }
