"""``KubeEmulator``: kmock's ``KubernetesEmulator`` taught the server-side semantics Kopf relies on.

kmock 0.8 stores objects as plain JSON and merges patches blindly. Against it Kopf misbehaves:
no resourceVersion means no optimistic concurrency, a failed JSON-patch ``test`` answers 500
(Kopf expects 422 and retries), the status subresource is not separate (so status patches bump
``generation`` and re-trigger update handlers), watches replay every object on reconnect, and
``/api/v1/namespaces`` is unknown. This subclass keeps kmock's HTTP plumbing, discovery and
DSL (user reactions such as ``emu['get', resource('v1/pods')] << 500`` still take priority) and
replaces the object store with one that behaves like an API server:

* server-side metadata: namespace from the URL (a different one in the body is 400), ``uid``,
  ``creationTimestamp``, a global monotonically increasing ``resourceVersion`` bumped only on
  real changes (a no-op patch emits no watch event), ``generation`` bumped only when something
  outside ``metadata``/``status`` changes, ``generateName``;
* patches: JSON merge patch (strategic merge is treated as merge: lists are replaced), RFC 6902
  JSON patch whose failed ``test`` answers 422, PUT replace; a stale ``metadata.resourceVersion``
  in a patch or PUT answers 409;
* subresources: ``status`` is separate (main-object writes keep the stored status, status writes
  change only status); ``scale`` maps onto the paths given in ``ResourceSpec.scale_paths``;
* deletion: finalizers hold an object with ``deletionTimestamp`` until they are emptied (no new
  finalizer may be added meanwhile); removal garbage-collects dependents through
  ``ownerReferences`` (background or ``Orphan``; foreground is treated as background);
* list/watch: ``labelSelector`` (equality, set-based, existence) and simple ``fieldSelector``;
  watches resume from a ``resourceVersion`` (410 Gone once it fell out of the bounded history),
  honour ``timeoutSeconds``, ``sendInitialEvents`` (+ the closing BOOKMARK);
* namespaces: ``v1/namespaces`` is served; a namespace is created on first use (lenient: a real
  server answers 404 for objects in a missing namespace);
* fault injection: ``inject_fault("patch", "kvcaches", status=409, count=2)`` fails the next
  matching requests with a Kubernetes ``Status`` body.

While no kmock reaction has been added, plain requests skip kmock's reaction matching (which costs
about 15 ms per request) and go straight to the store; watches always go through kmock's streaming.

Not emulated: admission webhooks, schema validation/defaulting, server-side apply, RBAC,
foreground deletion, namespace deletion cascades, asynchronous GC. Every mutation is synchronous
inside the event loop, so it is atomic with respect to other requests.

The Python API (``create/get/list/patch/replace/delete/watch/subscribe``) is what the local
cluster's controllers and kubelet use; it has the same semantics as the HTTP API.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import json
import re
import secrets
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import parsing, rendering

ResourceKey = tuple[str, str, str]  # (group, version, plural); group "" is the core API
Hook = Callable[[str, str, dict[str, Any]], None]  # (event type, "group/version/plural", object)

_OBJECT_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
_REASONS = {
    400: "BadRequest",
    404: "NotFound",
    409: "Conflict",
    410: "Gone",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}
_NAMESPACE_PATH = re.compile(r"/api/v1/namespaces(?:/(?P<name>[^/]+)(?:/(?P<sub>status|finalize))?)?/?")
_SERVER_META = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "name",
    "namespace",
    "generation",
    "resourceVersion",
)


@dataclasses.dataclass(frozen=True)
class ResourceSpec:
    """What the emulator needs to know about a resource: kind, scope, subresources, scale mapping."""

    kind: str
    namespaced: bool = True
    subresources: tuple[str, ...] = ()
    # dotted paths of (spec replicas, status replicas, selector) for the scale subresource;
    # a selector path that holds a LabelSelector dict is rendered as a selector string.
    scale_paths: tuple[str, str, str] = ("spec.replicas", "status.replicas", "status.selector")


DEFAULT_RESOURCES: dict[str, ResourceSpec] = {
    "v1/namespaces": ResourceSpec("Namespace", namespaced=False, subresources=("status",)),
    "v1/pods": ResourceSpec("Pod", subresources=("status",)),
    "v1/services": ResourceSpec("Service", subresources=("status",)),
    "v1/endpoints": ResourceSpec("Endpoints"),
    "v1/configmaps": ResourceSpec("ConfigMap"),
    "v1/secrets": ResourceSpec("Secret"),
    "v1/serviceaccounts": ResourceSpec("ServiceAccount"),
    "v1/persistentvolumeclaims": ResourceSpec("PersistentVolumeClaim", subresources=("status",)),
    "v1/events": ResourceSpec("Event"),
    "events.k8s.io/v1/events": ResourceSpec("Event"),
    "apps/v1/statefulsets": ResourceSpec(
        "StatefulSet",
        subresources=("status", "scale"),
        scale_paths=("spec.replicas", "status.replicas", "spec.selector"),
    ),
    "apps/v1/deployments": ResourceSpec(
        "Deployment",
        subresources=("status", "scale"),
        scale_paths=("spec.replicas", "status.replicas", "spec.selector"),
    ),
    "batch/v1/cronjobs": ResourceSpec("CronJob", subresources=("status",)),
    "batch/v1/jobs": ResourceSpec("Job", subresources=("status",)),
    "policy/v1/poddisruptionbudgets": ResourceSpec("PodDisruptionBudget", subresources=("status",)),
    "coordination.k8s.io/v1/leases": ResourceSpec("Lease"),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ResourceSpec(
        "CustomResourceDefinition", namespaced=False, subresources=("status",)
    ),
    "monitoring.coreos.com/v1/servicemonitors": ResourceSpec("ServiceMonitor"),
    "kopf.dev/v1/kopfpeerings": ResourceSpec("KopfPeering"),
    "kopf.dev/v1/clusterkopfpeerings": ResourceSpec("ClusterKopfPeering", namespaced=False),
    "networking.k8s.io/v1/networkpolicies": ResourceSpec("NetworkPolicy"),
    "kvcache.dev/v1alpha1/kvcaches": ResourceSpec("KVCache", subresources=("status", "scale")),
}


def _error(status: int, message: str, *, reason: str | None = None) -> kmock.KubernetesError:
    return kmock.KubernetesError(
        status=status, reason=reason or _REASONS.get(status, "Error"), message=message, details={}
    )


def parse_resource(resource: str | ResourceKey) -> ResourceKey:
    """'v1/pods' -> ('', 'v1', 'pods'); 'apps/v1/statefulsets' -> ('apps', 'v1', 'statefulsets')."""
    if isinstance(resource, tuple):
        return resource
    parts = resource.strip("/").split("/")
    if len(parts) == 2:
        return ("", parts[0], parts[1])
    if len(parts) == 3:
        return (parts[0], parts[1], parts[2])
    raise ValueError(f"resource: expected 'version/plural' or 'group/version/plural', got {resource!r}")


def _resource_str(key: ResourceKey) -> str:
    return "/".join(part for part in key if part)


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_path(obj: Mapping[str, Any], dotted: str) -> Any:
    """Value at a dotted path ('spec.replicas'), None when any step is missing."""
    value: Any = obj
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _set_path(obj: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[leaf] = value


def _split_requirements(selector: str) -> list[str]:
    """Split a selector on commas that are not inside 'in (a,b)' parentheses."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


def match_labels(selector: str | None, labels: Mapping[str, str] | None) -> bool:
    """Whether labels satisfy a label selector string (=, ==, !=, in, notin, key, !key)."""
    labels = labels or {}
    for requirement in _split_requirements(selector or ""):
        set_based = re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\((.*)\)", requirement)
        if set_based:
            key, op, raw = set_based.groups()
            values = {value.strip() for value in raw.split(",")}
            ok = (labels.get(key) in values) if op == "in" else (labels.get(key) not in values)
        elif requirement.startswith("!"):
            ok = requirement[1:].strip() not in labels
        elif "!=" in requirement:
            key, value = (part.strip() for part in requirement.split("!=", 1))
            ok = labels.get(key) != value
        elif "=" in requirement:
            key, value = (part.strip() for part in requirement.replace("==", "=").split("=", 1))
            ok = labels.get(key) == value
        else:
            ok = requirement in labels
        if not ok:
            return False
    return True


def selector_string(selector: Mapping[str, Any] | None) -> str:
    """A LabelSelector dict (matchLabels + matchExpressions) as a selector string."""
    selector = selector or {}
    parts = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        op, key, values = expr["operator"], expr["key"], ",".join(expr.get("values") or [])
        parts.append(
            {
                "In": f"{key} in ({values})",
                "NotIn": f"{key} notin ({values})",
                "Exists": key,
                "DoesNotExist": f"!{key}",
            }[op]
        )
    return ",".join(parts)


def match_fields(selector: str | None, obj: Mapping[str, Any]) -> bool:
    """Whether an object satisfies a field selector ('metadata.name=x,status.phase!=Failed')."""
    for requirement in _split_requirements(selector or ""):
        negate = "!=" in requirement
        path, value = (
            part.strip() for part in requirement.replace("!=", "=").replace("==", "=").split("=", 1)
        )
        actual = get_path(obj, path)
        if (str(actual) == value if actual is not None else value == "") == negate:
            return False
    return True


@dataclasses.dataclass
class Fault:
    """Fail the next ``remaining`` requests matching verb/resource (and optionally name/namespace)."""

    verb: str  # get, list, watch, create, patch, update, delete, or "*"
    resource: str  # plural ("kvcaches"), or "*"
    status: int
    remaining: int
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = "*"  # "*" = any, None = the main object only
    hits: int = 0

    def matches(
        self, verb: str, plural: str, namespace: str | None, name: str | None, subresource: str | None
    ) -> bool:
        return (
            self.remaining > 0
            and self.verb in ("*", verb)
            and self.resource in ("*", plural)
            and self.namespace in (None, namespace)
            and self.name in (None, name)
            and (self.subresource == "*" or self.subresource == subresource)
        )


def _request_verb(request: rendering.Request) -> str:
    method = str(request.method.value if request.method is not None else "").upper()
    if method == "GET":
        return (
            "watch" if request.params.get("watch") in ("true", "1") else ("get" if request.name else "list")
        )
    if method == "DELETE":
        return "delete" if request.name else "deletecollection"
    return {"POST": "create", "PATCH": "patch", "PUT": "update"}.get(method, method.lower())


def _without(obj: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in obj.items() if key not in keys}


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """An in-memory Kubernetes API server with real server-side semantics (see the module doc)."""

    history_size: int = 20_000  # watch events kept for resumption; older resourceVersions get 410

    _specs: dict[ResourceKey, ResourceSpec] = attrs.field(factory=dict, init=False)
    _store: dict[ResourceKey, dict[tuple[str | None, str], dict[str, Any]]] = attrs.field(
        factory=dict, init=False
    )
    _rv: int = attrs.field(default=0, init=False)
    _history: deque[tuple[int, ResourceKey, dict[str, Any]]] = attrs.field(factory=deque, init=False)
    _history_floor: int = attrs.field(default=0, init=False)  # events with rv <= floor are forgotten
    # each open watch's queue -> the resource it watches (events go only to that resource's watches)
    _watchers: dict[asyncio.Queue[tuple[int, ResourceKey, dict[str, Any]]], ResourceKey] = attrs.field(
        factory=dict, init=False
    )
    _hooks: list[Hook] = attrs.field(factory=list, init=False)
    _builtin_reactions: int = attrs.field(default=0, init=False)
    faults: list[Fault] = attrs.field(factory=list, init=False)
    # every Kubernetes request seen: (verb, plural, namespace, name, subresource)
    calls: list[tuple[str, str, str | None, str | None, str | None]] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # kmock's discovery + its LIST/WATCH/... fallbacks (ours below)
        self.fallback[kmock.method.PUT] << self._serve_replace
        for resource, spec in DEFAULT_RESOURCES.items():
            self.register(resource, spec)
        self._builtin_reactions = len(self._payloads)

    # ------------------------------------------------------------------ registry
    def register(self, resource: str | ResourceKey, spec: ResourceSpec | None = None, **fields: Any) -> None:
        """Declare a resource (``ResourceSpec`` or its fields as keywords); served by discovery."""
        key = parse_resource(resource)
        spec = spec or ResourceSpec(**fields)
        self._specs[key] = spec
        self._store.setdefault(key, {})
        self.resources[kmock.resource(group=key[0], version=key[1], plural=key[2])] = kmock.ResourceInfo(
            kind=spec.kind,
            singular=spec.kind.lower(),
            namespaced=spec.namespaced,
            verbs=set(_OBJECT_VERBS),
            subresources=set(spec.subresources),
        )

    def _spec(self, key: ResourceKey) -> ResourceSpec:
        if key not in self._specs:
            raise kmock.KubernetesResourceNotFoundError()
        return self._specs[key]

    # ------------------------------------------------------------------ faults & hooks
    def inject_fault(
        self,
        verb: str,
        resource: str = "*",
        *,
        status: int = 500,
        count: int = 1,
        namespace: str | None = None,
        name: str | None = None,
        subresource: str | None = "*",
    ) -> Fault:
        """Make the next ``count`` matching HTTP requests fail with ``status`` (before any state change)."""
        fault = Fault(verb, resource, status, count, namespace, name, subresource)
        self.faults.append(fault)
        return fault

    def subscribe(self, hook: Hook) -> Callable[[], None]:
        """Call ``hook(type, resource, object)`` synchronously after every change; returns an unsubscriber."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    def count(self, verb: str, plural: str, *, subresource: str | None = "*") -> int:
        """How many HTTP requests with this verb hit this resource (for 'exactly once' assertions)."""
        return sum(
            1
            for v, p, _, _, sub in self.calls
            if v == verb and p == plural and (subresource == "*" or sub == subresource)
        )

    # ------------------------------------------------------------------ HTTP layer
    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """kmock 0.8 reads /api/v1/namespaces[/NAME] as a namespace prefix; parse those paths here."""
        found = _NAMESPACE_PATH.fullmatch(raw_request.path)
        if found is None:
            return await super().__call__(raw_request)
        request = await rendering.Request._parse(
            raw_request.clone(rel_url="/api/v1/namespaces/-/x"), id=len(self._requests)
        )
        method = kmock.method(raw_request.method)
        name, subresource = found.group("name"), found.group("sub")
        request = attrs.evolve(
            request,
            url=raw_request.url,
            params=dict(raw_request.query),
            namespace=None,
            name=name,
            subresource=subresource,
            resource=kmock.resource(group="", version="v1", plural="namespaces"),
            action=parsing.guess_k8s(
                parsing.ParsedPath("", "v1", "namespaces", None, name, subresource),
                method,
                dict(raw_request.query),
            ),
        )
        self._requests.append(request)
        try:
            response: aiohttp.web.StreamResponse = await self._handle(request)
            return response
        except Exception as exc:
            if not self._errors:
                raise
            self._errors[-1].append(exc)
            return await self._render_error(exc)

    async def _handle(self, request: rendering.Request) -> Any:
        resource = request.resource
        if resource is not None and resource.plural:
            verb = _request_verb(request)
            self.calls.append((verb, resource.plural, request.namespace, request.name, request.subresource))
            for fault in self.faults:
                if fault.matches(verb, resource.plural, request.namespace, request.name, request.subresource):
                    fault.remaining -= 1
                    fault.hits += 1
                    raise _error(fault.status, f"injected fault: {verb} {resource.plural}")
            serve = self._direct.get(verb) if len(self._payloads) == self._builtin_reactions else None
            if serve is not None and self._key(request) in self._specs:
                # No user reaction to honour: skip kmock's DSL matching (~15 ms per request).
                return aiohttp.web.json_response(await getattr(self, serve)(request))
        # Skip KubernetesEmulator._handle (kmock's naive store); the DSL then reaches our fallbacks.
        return await kmock.KubernetesScaffold._handle(self, request)

    @staticmethod
    def _key(request: rendering.Request) -> ResourceKey:
        assert request.resource is not None
        return (request.resource.group or "", request.resource.version or "", request.resource.plural or "")

    @staticmethod
    def _body(request: rendering.Request) -> Any:
        if request.data is None and request.text:
            try:
                return json.loads(request.text)
            except ValueError as exc:
                raise _error(400, f"request body is not JSON: {exc}") from exc
        return request.data

    async def _serve_version(self, request: rendering.Request) -> Any:
        """kmock 0.8 reports the core group's groupVersion as "/v1"; kubectl then finds no core
        resource ("the server doesn't have a resource type pods"). The API server says "v1"."""
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and str(payload.get("groupVersion", "")).startswith("/"):
            payload["groupVersion"] = payload["groupVersion"].lstrip("/")
        return payload

    async def _serve_list(self, request: rendering.Request) -> dict[str, Any]:
        key = self._key(request)
        spec = self._spec(key)
        items = self.list(
            key,
            request.namespace,
            label_selector=request.params.get("labelSelector"),
            field_selector=request.params.get("fieldSelector"),
        )
        return {
            "apiVersion": "/".join(p for p in key[:2] if p),
            "kind": f"{spec.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    async def _serve_fetch(self, request: rendering.Request) -> dict[str, Any]:
        key = self._key(request)
        assert request.name is not None
        if request.subresource == "scale":
            return self.get_scale(key, request.name, request.namespace)
        return self.get(key, request.name, request.namespace)

    async def _serve_create(self, request: rendering.Request) -> dict[str, Any]:
        body = self._body(request)
        if not isinstance(body, dict):
            raise _error(400, "the body of a create must be a JSON object")
        return self.create(self._key(request), body, request.namespace)

    async def _serve_update(self, request: rendering.Request) -> dict[str, Any]:  # PATCH
        content_type = request.headers.get("Content-Type", "application/merge-patch+json").split(";")[0]
        patch_type = {
            "application/json-patch+json": "json",
            "application/merge-patch+json": "merge",
            "application/strategic-merge-patch+json": "merge",
        }.get(content_type)
        if patch_type is None:
            raise _error(415, f"unsupported patch type {content_type!r}")
        assert request.name is not None
        return self.patch(
            self._key(request),
            request.name,
            self._body(request),
            request.namespace,
            patch_type=patch_type,
            subresource=request.subresource,
        )

    async def _serve_replace(self, request: rendering.Request) -> dict[str, Any]:  # PUT
        if request.resource is None or not request.name:
            raise kmock.KubernetesEndpointNotFoundError()
        body = self._body(request)
        if not isinstance(body, dict):
            raise _error(400, "the body of an update must be a JSON object")
        return self.replace(
            self._key(request), request.name, body, request.namespace, subresource=request.subresource
        )

    async def _serve_delete(self, request: rendering.Request) -> dict[str, Any]:
        body = self._body(request) if request.text else None
        policy = (
            request.params.get("propagationPolicy") or (body or {}).get("propagationPolicy") or "Background"
        )
        assert request.name is not None
        return self.delete(self._key(request), request.name, request.namespace, propagation=policy)

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        key = self._key(request)
        self._spec(key)
        timeout = request.params.get("timeoutSeconds")
        raw = request._raw_request

        def connected() -> bool:  # aiohttp does not cancel handlers when the client goes away
            transport = raw.transport if raw is not None else None
            return transport is not None and not transport.is_closing()

        yield b""  # send the headers now: the stream may stay silent for a long time
        async for event in self.watch(
            key,
            request.namespace,
            label_selector=request.params.get("labelSelector"),
            field_selector=request.params.get("fieldSelector"),
            since=request.params.get("resourceVersion"),
            timeout=float(timeout) if timeout else None,
            initial_bookmark=request.params.get("sendInitialEvents") == "true",
            alive=connected,
        ):
            yield event

    _direct: ClassVar[dict[str, str]] = {
        "list": "_serve_list",
        "get": "_serve_fetch",
        "create": "_serve_create",
        "patch": "_serve_update",
        "update": "_serve_replace",
        "delete": "_serve_delete",
    }

    # ------------------------------------------------------------------ Python API: reads
    def _raw(self, key: ResourceKey, name: str, namespace: str | None) -> dict[str, Any]:
        spec = self._spec(key)
        obj = self._store[key].get((namespace if spec.namespaced else None, name))
        if obj is None:
            raise _error(404, f'{key[2]} "{name}" not found', reason="NotFound")
        return obj

    def get(self, resource: str | ResourceKey, name: str, namespace: str | None = None) -> dict[str, Any]:
        """A copy of the stored object; 404 ``KubernetesError`` when absent."""
        return copy.deepcopy(self._raw(parse_resource(resource), name, namespace))

    def list(
        self,
        resource: str | ResourceKey,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        """Copies of matching objects ordered by (namespace, name); namespace None = all namespaces."""
        key = parse_resource(resource)
        self._spec(key)
        return [
            copy.deepcopy(obj)
            for (ns, _), obj in sorted(self._store[key].items(), key=lambda kv: (kv[0][0] or "", kv[0][1]))
            if self._matches(obj, namespace, label_selector, field_selector)
        ]

    @staticmethod
    def _matches(
        obj: Mapping[str, Any], namespace: str | None, label_selector: str | None, field_selector: str | None
    ) -> bool:
        meta = obj.get("metadata", {})
        return (
            (namespace is None or meta.get("namespace") == namespace)
            and match_labels(label_selector, meta.get("labels"))
            and match_fields(field_selector, obj)
        )

    def get_scale(
        self, resource: str | ResourceKey, name: str, namespace: str | None = None
    ) -> dict[str, Any]:
        """The autoscaling/v1 Scale view of an object whose resource has a scale subresource."""
        key = parse_resource(resource)
        spec = self._spec(key)
        if "scale" not in spec.subresources:
            raise _error(404, f"{key[2]} has no scale subresource")
        obj = self._raw(key, name, namespace)
        spec_path, status_path, selector_path = spec.scale_paths
        selector = get_path(obj, selector_path)
        meta = obj["metadata"]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": get_path(obj, spec_path) or 0},
            "status": {
                "replicas": get_path(obj, status_path) or 0,
                "selector": selector_string(selector) if isinstance(selector, dict) else (selector or ""),
            },
        }

    # ------------------------------------------------------------------ Python API: writes
    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, event_type: str, key: ResourceKey, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        event = {"type": event_type, "object": copy.deepcopy(obj)}
        self._history.append((rv, key, event))
        while len(self._history) > self.history_size:
            self._history_floor = self._history.popleft()[0]
        for queue, watched in self._watchers.items():
            if watched == key:
                queue.put_nowait((rv, key, event))
        for hook in list(self._hooks):
            hook(event_type, _resource_str(key), copy.deepcopy(obj))

    def _namespace_of(
        self, spec: ResourceSpec, url_namespace: str | None, body_namespace: str | None
    ) -> str | None:
        if not spec.namespaced:
            return None
        if url_namespace and body_namespace and url_namespace != body_namespace:
            raise _error(
                400,
                f"the namespace of the object ({body_namespace}) does not match "
                f"the namespace of the request ({url_namespace})",
                reason="BadRequest",
            )
        namespace = url_namespace or body_namespace
        if not namespace:
            raise _error(422, "metadata.namespace: Required value")
        if namespace not in {name for _, name in self._store[("", "v1", "namespaces")]}:
            self.create("v1/namespaces", {"metadata": {"name": namespace}})
        return namespace

    def create(
        self, resource: str | ResourceKey, obj: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        """Store a new object with server-side metadata; 409 if the name is taken."""
        key = parse_resource(resource)
        spec = self._spec(key)
        body = copy.deepcopy(dict(obj))
        meta = body.setdefault("metadata", {})
        ns = self._namespace_of(spec, namespace, meta.get("namespace"))
        name = meta.get("name") or (
            meta["generateName"] + secrets.token_hex(3) if meta.get("generateName") else None
        )
        if not name:
            raise _error(422, "metadata.name: Required value")
        if (ns, name) in self._store[key]:
            raise _error(409, f'{key[2]} "{name}" already exists', reason="AlreadyExists")
        for field in _SERVER_META:
            meta.pop(field, None)
        meta.update(
            {
                "name": name,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _now(),
                "generation": 1,
                "resourceVersion": str(self._next_rv()),
            }
        )
        if ns is not None:
            meta["namespace"] = ns
        body["apiVersion"] = "/".join(p for p in key[:2] if p)
        body["kind"] = spec.kind
        if "status" in spec.subresources:
            body.pop("status", None)  # status is written through the subresource only
        self._store[key][(ns, name)] = body
        self._emit("ADDED", key, body)
        return copy.deepcopy(body)

    def patch(
        self,
        resource: str | ResourceKey,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        patch_type: str = "merge",
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """Apply a merge ('merge') or RFC 6902 ('json') patch to the object or its status/scale."""
        key = parse_resource(resource)
        current = self._raw(key, name, namespace)
        if patch_type == "merge":
            if not isinstance(patch, dict):
                raise _error(400, "a merge patch must be a JSON object")
            self._check_rv(current, (patch.get("metadata") or {}).get("resourceVersion"))
        if subresource == "scale":
            scale = _apply(self.get_scale(key, name, namespace), patch, patch_type)
            updated = copy.deepcopy(current)
            _set_path(updated, self._spec(key).scale_paths[0], int(get_path(scale, "spec.replicas") or 0))
            self._commit(key, current, updated, None)
            return self.get_scale(key, name, namespace)
        return self._commit(key, current, _apply(current, patch, patch_type), subresource)

    def replace(
        self,
        resource: str | ResourceKey,
        name: str,
        obj: Mapping[str, Any],
        namespace: str | None = None,
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """PUT semantics: the whole object (or its status) replaced; stale resourceVersion -> 409."""
        key = parse_resource(resource)
        current = self._raw(key, name, namespace)
        self._check_rv(current, (obj.get("metadata") or {}).get("resourceVersion"))
        if subresource == "scale":
            return self.patch(
                key,
                name,
                {"spec": {"replicas": get_path(obj, "spec.replicas")}},
                namespace,
                subresource="scale",
            )
        return self._commit(key, current, copy.deepcopy(dict(obj)), subresource)

    @staticmethod
    def _check_rv(current: Mapping[str, Any], wanted: str | None) -> None:
        if wanted is not None and str(wanted) != current["metadata"]["resourceVersion"]:
            raise _error(
                409,
                "Operation cannot be fulfilled: the object has been modified; "
                "please apply your changes to the latest version and try again",
            )

    def _commit(
        self, key: ResourceKey, old: dict[str, Any], new: dict[str, Any], subresource: str | None
    ) -> dict[str, Any]:
        spec = self._spec(key)
        if subresource == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
        elif subresource is not None:
            raise _error(404, f"{key[2]} has no {subresource!r} subresource")
        else:
            merged = new
            if "status" in spec.subresources:  # main-object writes never touch status
                merged.pop("status", None)
                if "status" in old:
                    merged["status"] = copy.deepcopy(old["status"])
        meta, old_meta = merged.setdefault("metadata", {}), old["metadata"]
        for field in _SERVER_META:
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        merged["apiVersion"], merged["kind"] = old["apiVersion"], old["kind"]
        if old_meta.get("deletionTimestamp") and set(meta.get("finalizers") or []) - set(
            old_meta.get("finalizers") or []
        ):
            raise _error(
                422,
                "metadata.finalizers: Forbidden: no new finalizers can be added "
                "if the object is being deleted",
            )
        if merged == old:
            return copy.deepcopy(old)  # a no-op write: no new resourceVersion, no watch event
        if _without(merged, "metadata", "status") != _without(old, "metadata", "status"):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        meta["resourceVersion"] = str(self._next_rv())
        ns, name = meta.get("namespace"), meta["name"]
        self._store[key][(ns, name)] = merged
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(key, merged, "Background")
        else:
            self._emit("MODIFIED", key, merged)
        return copy.deepcopy(merged)

    def delete(
        self,
        resource: str | ResourceKey,
        name: str,
        namespace: str | None = None,
        *,
        propagation: str = "Background",
    ) -> dict[str, Any]:
        """Mark for deletion (finalizers present) or remove now and garbage-collect dependents."""
        key = parse_resource(resource)
        obj = self._raw(key, name, namespace)
        meta = obj["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta.update(
                    {
                        "deletionTimestamp": _now(),
                        "deletionGracePeriodSeconds": _grace_period(key, obj),
                        "resourceVersion": str(self._next_rv()),
                    }
                )
                self._emit("MODIFIED", key, obj)
            return copy.deepcopy(obj)
        self._remove(key, obj, propagation)
        return copy.deepcopy(obj)

    def _remove(self, key: ResourceKey, obj: dict[str, Any], propagation: str) -> None:
        meta = obj["metadata"]
        del self._store[key][(meta.get("namespace"), meta["name"])]
        meta["resourceVersion"] = str(self._next_rv())
        self._emit("DELETED", key, obj)
        self._collect_dependents(meta["uid"], propagation)

    def _live_uids(self) -> set[str]:
        return {obj["metadata"]["uid"] for objects in self._store.values() for obj in objects.values()}

    def _collect_dependents(self, owner_uid: str, propagation: str) -> None:
        """ownerReferences GC: orphan or delete every object that pointed at a removed owner."""
        for key, objects in list(self._store.items()):
            for (ns, name), obj in list(objects.items()):
                refs = obj["metadata"].get("ownerReferences") or []
                if (ns, name) not in objects or not any(ref.get("uid") == owner_uid for ref in refs):
                    continue
                remaining = [ref for ref in refs if ref.get("uid") != owner_uid]
                live = self._live_uids()
                if propagation == "Orphan" or any(ref.get("uid") in live for ref in remaining):
                    self.patch(key, name, {"metadata": {"ownerReferences": remaining or None}}, ns)
                else:
                    self.delete(key, name, ns, propagation=propagation)

    # ------------------------------------------------------------------ watch
    async def watch(
        self,
        resource: str | ResourceKey,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        since: str | None = None,
        timeout: float | None = None,
        initial_bookmark: bool = False,
        alive: Callable[[], bool] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events; without ``since`` (or with '0') every current object comes first as ADDED.

        With ``since`` it replays only later events, or yields one ERROR 410 when that version
        is older than the kept history. Ends after ``timeout`` seconds (server-side timeout).
        """
        key = parse_resource(resource)
        spec = self._spec(key)
        queue: asyncio.Queue[tuple[int, ResourceKey, dict[str, Any]]] = asyncio.Queue()
        self._watchers[queue] = key
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            last = self._rv  # snapshot and registration happen with no await in between
            backlog: Iterable[dict[str, Any]]
            if not since or since == "0":
                backlog = [
                    {"type": "ADDED", "object": obj}
                    for obj in self.list(
                        key, namespace, label_selector=label_selector, field_selector=field_selector
                    )
                ]
            elif int(since) < self._history_floor:
                yield {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "code": 410,
                        "status": "Failure",
                        "reason": "Expired",
                        "message": f"too old resource version: {since}",
                    },
                }
                return
            else:
                backlog = [
                    copy.deepcopy(event)
                    for rv, k, event in self._history
                    if k == key
                    and rv > int(since)
                    and self._matches(event["object"], namespace, label_selector, field_selector)
                ]
            for event in backlog:
                yield event
            if initial_bookmark:
                yield {
                    "type": "BOOKMARK",
                    "object": {
                        "apiVersion": "/".join(p for p in key[:2] if p),
                        "kind": spec.kind,
                        "metadata": {
                            "resourceVersion": str(last),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    },
                }
            while True:
                remaining = None if deadline is None else deadline - loop.time()
                if (remaining is not None and remaining <= 0) or (alive is not None and not alive()):
                    return
                try:  # wake up at least every second to notice a client that went away
                    rv, event_key, event = await asyncio.wait_for(queue.get(), min(remaining or 1.0, 1.0))
                except TimeoutError:
                    continue
                if (
                    event_key == key
                    and rv > last
                    and self._matches(event["object"], namespace, label_selector, field_selector)
                ):
                    yield copy.deepcopy(event)
        finally:
            self._watchers.pop(queue, None)


def _apply(obj: dict[str, Any], patch: Any, patch_type: str) -> dict[str, Any]:
    if patch_type == "merge":
        return _merge(copy.deepcopy(obj), patch)
    if patch_type != "json" or not isinstance(patch, list):
        raise _error(400, f"a {patch_type!r} patch must be a JSON list of operations")
    try:
        result: dict[str, Any] = jsonpatch.apply_patch(obj, patch, in_place=False)
    except jsonpatch.JsonPatchTestFailed as exc:
        raise _error(422, f"the server rejected our request due to an error in our request: {exc}") from exc
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise _error(422, f"invalid JSON patch: {exc}") from exc
    return result


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, None deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = _merge(target.get(key), value)
    return target


def write_kubeconfig(directory: Path, server_url: str, *, namespace: str = "default") -> Path:
    """A kubeconfig pointing at the emulator (plain HTTP, a dummy token); returns its path."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": str(server_url).rstrip("/")}}],
        "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
            }
        ],
    }
    path = directory / "kubeconfig"
    path.write_text(json.dumps(config))  # JSON is YAML: every kubeconfig reader accepts it
    return path


def _grace_period(key: ResourceKey, obj: dict[str, Any]) -> int:
    """What the API server records: a pod's own terminationGracePeriodSeconds (30 by default),
    zero for every other kind."""
    if key[2] != "pods":
        return 0
    return int((obj.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
