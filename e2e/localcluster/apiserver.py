"""The local cluster's API server: the team's emulator (``tests.kube_emulator``), admission, and
what kubectl needs from a real one (:class:`LocalAPIServer`): discovery, OpenAPI, Tables, strict
field validation, strategic merge patch, dry runs, JSON watch streams, and the pod streams
(logs, exec, port-forward) served from the local kubelet. See e2e/README.md for the list.

The emulator deliberately does no schema validation or defaulting. A real API server does both
for custom resources, from the CRD that was applied, and the e2e scenario "invalid manifest →
rejected naming the field" depends on it. :class:`Admission` adds exactly that for every CRD the
cluster is given: the structural schema (unknown fields rejected, as ``kubectl`` does with strict
field validation), defaults, then the ``x-kubernetes-validations`` CEL rules (cel-python). The
answer is a 422 ``Invalid`` in the API server's wording: ``KVCache.kvcache.dev "x" is invalid:
spec.replicas: ...``.

:class:`EmulatorAPI` gives the controllers and kubelet the emulator's Python API behind the same
async interface, :class:`~e2e.localcluster.kubeapi.ClusterAPI` (no HTTP round trips in-process).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import jsonschema  # type: ignore[import-untyped]
import kmock
import yaml
from kmock._internal import rendering
from tests.kube_emulator import KubeEmulator, ResourceSpec
from tests.kube_emulator.emulator import ResourceKey, _merge, parse_resource

from e2e.localcluster import smp, streaming, tables
from e2e.localcluster.discovery import Catalog, Resource
from e2e.localcluster.kubeapi import ApiError, kind_of, matches
from e2e.localcluster.openapi import BuiltinSchemas, OpenAPI, definition_name

_VERSION = {
    "major": "1",
    "minor": "35",
    "gitVersion": "v1.35.0-localcluster",
    "gitCommit": "",
    "gitTreeState": "clean",
    "buildDate": "",
    "goVersion": "",
    "compiler": "gc",
    "platform": "linux/amd64",
}

# Kinds the local cluster's workloads need that the emulator does not register by default.
EXTRA_RESOURCES: dict[str, ResourceSpec] = {
    "networking.k8s.io/v1/networkpolicies": ResourceSpec("NetworkPolicy"),
    "apps/v1/controllerrevisions": ResourceSpec("ControllerRevision"),
    "v1/nodes": ResourceSpec("Node", namespaced=False, subresources=("status",)),
}
NODE_NAME = "localcluster"


def _default_statefulset(sts: dict[str, Any]) -> dict[str, Any]:
    """The API server's defaults that clients read back (``kubectl rollout status`` needs the
    update strategy's type)."""
    spec = sts.setdefault("spec", {})
    spec.setdefault("replicas", 1)
    spec.setdefault("podManagementPolicy", "OrderedReady")
    spec.setdefault("revisionHistoryLimit", 10)
    strategy = spec.setdefault("updateStrategy", {})
    strategy.setdefault("type", "RollingUpdate")
    if strategy["type"] == "RollingUpdate":
        strategy.setdefault("rollingUpdate", {}).setdefault("partition", 0)
    retention = spec.setdefault("persistentVolumeClaimRetentionPolicy", {})
    retention.setdefault("whenDeleted", "Retain")
    retention.setdefault("whenScaled", "Retain")
    return sts


BUILTIN_DEFAULTS: dict[ResourceKey, Callable[[dict[str, Any]], dict[str, Any]]] = {
    ("apps", "v1", "statefulsets"): _default_statefulset,
}


def node_object() -> dict[str, Any]:
    """The one Node (``kubectl get nodes``, ``describe pod``): this machine, Ready."""
    import platform

    cpus = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "labels": {"kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux"},
        },
        "spec": {},
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "local kubelet"}
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": NODE_NAME},
            ],
            "capacity": {"cpu": str(cpus), "memory": f"{memory}Ki", "pods": "253"},
            "allocatable": {"cpu": str(cpus), "memory": f"{memory}Ki", "pods": "253"},
            "nodeInfo": {
                "kubeletVersion": _VERSION["gitVersion"],
                "operatingSystem": "linux",
                "architecture": platform.machine(),
                "osImage": platform.platform(),
                "kernelVersion": platform.release(),
                "containerRuntimeVersion": "localcluster://processes",
            },
        },
    }


class CustomResourceSchema:
    """Validation and defaulting of one CRD version, as the API server does on every write."""

    def __init__(self, crd: Mapping[str, Any], version: Mapping[str, Any]) -> None:
        import celpy

        from kvcache_operator import crd as crd_tools

        self.kind = str(crd["spec"]["names"]["kind"])
        self.group = str(crd["spec"]["group"])
        self.plural = str(crd["spec"]["names"]["plural"])
        self.version = str(version["name"])
        self.schema = version["schema"]["openAPIV3Schema"]
        # apiVersion, kind and metadata are every object's, declared in its CRD or not.
        implicit = {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
        }
        checked = {**self.schema, "properties": {**implicit, **(self.schema.get("properties") or {})}}
        self._validator = jsonschema.Draft202012Validator(crd_tools.to_json_schema(checked))
        self._defaults = crd_tools.apply_defaults
        env = celpy.Environment()
        self._json_to_cel = celpy.json_to_cel  # type: ignore[attr-defined]
        self._rules = [
            (path, env.program(env.compile(rule)), message) for path, rule, message in self._cel_rules()
        ]

    @property
    def resource(self) -> ResourceKey:
        return (self.group, self.version, self.plural)

    def _cel_rules(self) -> list[tuple[tuple[str, ...], str, str]]:
        found: list[tuple[tuple[str, ...], str, str]] = []

        def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
            for entry in node.get("x-kubernetes-validations") or []:
                found.append((path, entry["rule"], entry.get("message") or f"failed rule: {entry['rule']}"))
            for name, sub in (node.get("properties") or {}).items():
                walk(sub, (*path, name))

        walk(self.schema, ())
        return found

    def errors(self, obj: Mapping[str, Any]) -> list[str]:
        """Field errors (``spec.x: message``, ``unknown field "spec.y"``), then failing CEL rules."""
        found = []
        for err in self._validator.iter_errors(dict(obj)):
            path = ".".join(str(p) for p in err.absolute_path)
            if err.validator == "additionalProperties" and isinstance(err.instance, dict):
                known = set(err.schema.get("properties", {}))
                found += [
                    f'unknown field "{f"{path}.{n}" if path else n}"'
                    for n in sorted(set(err.instance) - known)
                ]
            else:
                found.append(f"{path}: {err.message}")
        if found:
            return found
        defaulted = self.default(obj)
        for where, program, message in self._rules:
            target: Any = defaulted
            for part in where:
                target = target.get(part) if isinstance(target, dict) else None
            if target is not None and not bool(program.evaluate({"self": self._json_to_cel(target)})):
                found.append(f"{'.'.join(where) or '<root>'}: Invalid value: {message}")
        return found

    def default(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self._defaults(copy.deepcopy(dict(obj)), self.schema))


def load_crds(paths: list[Path]) -> list[CustomResourceSchema]:
    """Every served version of every CRD in ``paths`` (multi-document YAML files)."""
    out = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                out += [
                    CustomResourceSchema(doc, v) for v in doc["spec"]["versions"] if v.get("served", True)
                ]
    return out


def _invalid(schema: CustomResourceSchema, name: str, errors: list[str]) -> kmock.KubernetesError:
    message = f'{schema.kind}.{schema.group} "{name}" is invalid: ' + "; ".join(errors)
    return kmock.KubernetesError(
        status=422,
        reason="Invalid",
        message=message,
        details={
            "name": name,
            "group": schema.group,
            "kind": schema.kind,
            "causes": [_cause(e) for e in errors],
        },
    )


def _cause(error: str) -> dict[str, str]:
    """``spec.replicas: -1 is less...`` -> field + message (kubectl prints ``<field>: <message>``)."""
    unknown = re.fullmatch(r'unknown field "(.+)"', error)
    if unknown:
        return {
            "reason": "FieldValueInvalid",
            "field": unknown.group(1),
            "message": "field not declared in schema",
        }
    field, sep, message = error.partition(": ")
    if not sep or " " in field:
        return {"reason": "FieldValueInvalid", "field": "", "message": error}
    return {"reason": "FieldValueInvalid", "field": field, "message": message}


CRD_RESOURCE = "apiextensions.k8s.io/v1/customresourcedefinitions"
_CRD_KEY = parse_resource(CRD_RESOURCE)
_POD_STREAM = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/(log|exec|portforward)/?")
_COLLECTION = re.compile(r"/(?:api/(v1)|apis/([^/]+)/([^/]+))(?:/namespaces/([^/]+))?/([^/]+)/?")
_GROUP_VERSION = re.compile(r"/apis/([^/]+)/([^/]+)/?")
_GROUP = re.compile(r"/apis/([^/]+)/?")
_OPENAPI_V3 = re.compile(r"/openapi/v3/(?:api/(v1)|apis/([^/]+)/([^/]+))/?")
_SMP = "application/strategic-merge-patch+json"


def _status_response(exc: kmock.KubernetesError) -> aiohttp.web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": exc.message,
        "reason": exc.reason,
        "details": exc.details or {},
        "code": exc.status,
    }
    return aiohttp.web.json_response(body, status=int(exc.status))


def _scale_paths(version: Mapping[str, Any]) -> tuple[str, str, str]:
    scale = (version.get("subresources") or {}).get("scale") or {}
    return (
        str(scale.get("specReplicasPath", ".spec.replicas")).lstrip("."),
        str(scale.get("statusReplicasPath", ".status.replicas")).lstrip("."),
        str(scale.get("labelSelectorPath", ".status.selector")).lstrip("."),
    )


@attrs.define(kw_only=True)
class LocalAPIServer(KubeEmulator):
    """The emulator with admission (schema, defaults, CEL) for its CRDs, plus what kubectl needs:
    discovery with short names and categories, OpenAPI v2/v3, server-side Tables, strict field
    validation, strategic merge patch, and the pod subresources ``log``, ``exec`` and
    ``portforward`` (served from :attr:`node`, the local kubelet)."""

    crd_schemas: dict[ResourceKey, CustomResourceSchema] = attrs.field(factory=dict)
    catalog: Catalog = attrs.field(factory=Catalog, init=False)
    openapi: OpenAPI | None = attrs.field(default=None, init=False)
    builtin_schemas: BuiltinSchemas = attrs.field(factory=BuiltinSchemas, init=False)
    node: Any = attrs.field(default=None, init=False)  # the Kubelet, once the cluster has one
    _crd_openapi: dict[ResourceKey, Any] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self.openapi = OpenAPI(self.catalog, self._crd_openapi)
        super().__attrs_post_init__()
        for resource, spec in EXTRA_RESOURCES.items():
            self.register(resource, spec)
        node = node_object()
        self.create("v1/nodes", node)
        self.patch("v1/nodes", NODE_NAME, {"status": node["status"]}, subresource="status")

    # ------------------------------------------------------------------ resources and CRDs
    def register(self, resource: str | ResourceKey, spec: ResourceSpec | None = None, **fields: Any) -> None:
        super().register(resource, spec, **fields)
        key = parse_resource(resource)
        registered = self._specs[key]
        if self.catalog.get(*key) is None or key not in self._crd_openapi:
            self.catalog.add_builtin(*key, registered.kind, registered.namespaced, registered.subresources)
        if self.openapi is not None:
            self.openapi.invalidate()

    def install_crd(self, crd: Mapping[str, Any]) -> None:
        """Serve a CustomResourceDefinition's resources: storage, admission, discovery, OpenAPI."""
        spec = crd["spec"]
        for version in spec.get("versions") or []:
            if not version.get("served", True):
                continue
            schema = CustomResourceSchema(crd, version)
            self.crd_schemas[schema.resource] = schema
            self._crd_openapi[schema.resource] = schema.schema
            self.register(
                schema.resource,
                ResourceSpec(
                    str(spec["names"]["kind"]),
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    subresources=tuple(sorted((version.get("subresources") or {}).keys())),
                    scale_paths=_scale_paths(version),
                ),
            )
        self.catalog.add_crd(crd)
        assert self.openapi is not None
        self.openapi.invalidate()

    def add_crd(self, schema: CustomResourceSchema, crd: Mapping[str, Any] | None = None) -> None:
        """Admission for one CRD version; with ``crd``, the CRD object is created (and served)."""
        self.crd_schemas[schema.resource] = schema
        if crd is not None:
            try:
                self.create(CRD_RESOURCE, crd)
            except kmock.KubernetesError as exc:
                if exc.status != 409:
                    raise

    def create(
        self, resource: str | ResourceKey, obj: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        key = parse_resource(resource)
        schema = self.crd_schemas.get(key)
        if schema is not None:
            errors = schema.errors(obj)
            if errors:
                raise _invalid(schema, str(obj.get("metadata", {}).get("name", "")), errors)
            obj = schema.default(obj)
        elif key in BUILTIN_DEFAULTS:
            obj = BUILTIN_DEFAULTS[key](copy.deepcopy(dict(obj)))
        result: dict[str, Any] = super().create(resource, obj, namespace)
        if key == _CRD_KEY:
            self.install_crd(result)
        return result

    def _commit(
        self, key: ResourceKey, old: dict[str, Any], new: dict[str, Any], subresource: str | None
    ) -> dict[str, Any]:
        schema = self.crd_schemas.get(key)
        if schema is not None and subresource is None and new.get("spec") != old.get("spec"):
            errors = schema.errors({k: v for k, v in new.items() if k != "status"})
            if errors:
                raise _invalid(schema, str(old["metadata"]["name"]), errors)
            new = schema.default(new)
        result: dict[str, Any] = super()._commit(key, old, new, subresource)
        if key == _CRD_KEY and subresource is None and result.get("spec") != old.get("spec"):
            self.install_crd(result)
        return result

    # ------------------------------------------------------------------ HTTP: kubectl's extras
    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        try:
            response = await self._extra(raw_request)
        except kmock.KubernetesError as exc:
            return _status_response(exc)
        if response is not None:
            return response
        result: aiohttp.web.StreamResponse = await super().__call__(raw_request)
        return result

    async def _extra(self, request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse | None:
        """Discovery, OpenAPI, /version and the pod streams; None for everything else."""
        path = request.path
        stream = _POD_STREAM.fullmatch(path)
        if stream is not None:
            namespace, name, what = stream.groups()
            self._must_exist("pods", name, namespace)
            serve = {
                "log": streaming.serve_logs,
                "exec": streaming.serve_exec,
                "portforward": streaming.serve_portforward,
            }[what]
            return await serve(request, self.node, namespace, name)
        if request.method != "GET":
            return None
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(request)
        document = self._document(path, request)
        if document is None:
            return None
        if isinstance(document, bytes):
            return aiohttp.web.Response(body=document, content_type="application/json")
        return aiohttp.web.json_response(document)

    async def _watch(self, request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse | None:
        """A watch stream as the API server sends it (``application/json``, one event a line);
        kmock's own stream says ``application/octet-stream``, which kubectl refuses to decode."""
        found = _COLLECTION.fullmatch(request.path)
        if found is None:
            return None
        core, group, version, namespace, plural = found.groups()
        key: ResourceKey = ("", "v1", plural) if core else (group, version, plural)
        if key not in self._specs:
            return None
        query = request.query
        timeout = query.get("timeoutSeconds")
        resource = self.catalog.get(*key) if tables.wants_table(request.headers.get("Accept", "")) else None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)

        def connected() -> bool:
            transport = request.transport
            return transport is not None and not transport.is_closing()

        try:
            async for event in self.watch(
                key,
                namespace,
                label_selector=query.get("labelSelector"),
                field_selector=query.get("fieldSelector"),
                since=query.get("resourceVersion"),
                timeout=float(timeout) if timeout else None,
                initial_bookmark=query.get("sendInitialEvents") == "true",
                alive=connected,
            ):
                if resource is not None and event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    row = tables.table(resource, [event["object"]])
                    await response.write(json.dumps({**event, "object": row}).encode() + b"\n")
                else:
                    await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        return response

    def _must_exist(self, plural: str, name: str, namespace: str | None) -> None:
        self.get(f"v1/{plural}", name, namespace)  # 404 NotFound in the API server's words

    def _document(self, path: str, request: aiohttp.web.BaseRequest) -> dict[str, Any] | bytes | None:
        assert self.openapi is not None
        if path in ("/api", "/api/"):
            return self.catalog.api_versions(request.host)
        if path in ("/api/v1", "/api/v1/"):
            return self.catalog.api_resource_list("", "v1")
        if path in ("/apis", "/apis/"):
            return self.catalog.api_groups()
        if path == "/version":
            return dict(_VERSION)
        if path == "/openapi/v2":
            accept = request.headers.get("Accept", "application/json")
            if "json" not in accept and "*/*" not in accept:
                raise kmock.KubernetesError(
                    status=406, reason="NotAcceptable", message="only application/json is served", details={}
                )
            return self.openapi.v2()
        if path in ("/openapi/v3", "/openapi/v3/"):
            return self.openapi.v3_index()
        found = _OPENAPI_V3.fullmatch(path)
        if found is not None:
            core, group, version = found.groups()
            doc = self.openapi.v3("", "v1") if core else self.openapi.v3(group, version)
            if doc is None:
                raise kmock.KubernetesError(
                    status=404, reason="NotFound", message=f"{path} not found", details={}
                )
            return doc
        found = _GROUP_VERSION.fullmatch(path)
        if found is not None:
            return self.catalog.api_resource_list(*found.groups())
        found = _GROUP.fullmatch(path)
        if found is not None:
            return self.catalog.api_group(found.group(1))
        return None

    # ------------------------------------------------------------------ HTTP: reads as Tables
    def _resource_of(self, request: rendering.Request) -> Resource | None:
        key = self._key(request)
        return self.catalog.get(*key)

    def _as_table(self, request: rendering.Request, objects: list[dict[str, Any]]) -> dict[str, Any] | None:
        resource = self._resource_of(request)
        if resource is None or not tables.wants_table(request.headers.get("Accept", "")):
            return None
        return tables.table(
            resource,
            objects,
            include_object=request.params.get("includeObject") or "Metadata",
            resource_version=str(self._rv),
        )

    async def _serve_list(self, request: rendering.Request) -> dict[str, Any]:
        result = await super()._serve_list(request)
        return self._as_table(request, result["items"]) or result

    async def _serve_fetch(self, request: rendering.Request) -> dict[str, Any]:
        result = await super()._serve_fetch(request)
        if request.subresource:
            return result
        return self._as_table(request, [result]) or result

    # ------------------------------------------------------------------ HTTP: writes
    def _strict(self, request: rendering.Request, obj: Mapping[str, Any]) -> None:
        """``fieldValidation=Strict`` (kubectl's default): unknown fields are a 400, like the
        API server's strict decoder says it."""
        if request.params.get("fieldValidation") != "Strict" or request.subresource:
            return
        key = self._key(request)
        schema = self.crd_schemas.get(key)
        if schema is not None:
            errors = [e for e in schema.errors(obj) if e.startswith("unknown field")]
            kind, version = schema.kind, schema.version
        else:
            resource = self.catalog.get(*key)
            full = {
                "apiVersion": "/".join(p for p in key[:2] if p),
                "kind": resource.kind if resource else "",
            }
            errors = self.builtin_schemas.errors({**obj, **full})
            kind, version = full["kind"], key[1]
        if errors:
            raise kmock.KubernetesError(
                status=400,
                reason="BadRequest",
                message=f'{kind} in version "{version}" cannot be handled as a {kind}: '
                f"strict decoding error: {', '.join(errors)}",
                details={},
            )

    @staticmethod
    def _dry(request: rendering.Request) -> bool:
        return request.params.get("dryRun") == "All"

    def _admit_dry(self, key: ResourceKey, obj: dict[str, Any]) -> dict[str, Any]:
        """What admission would make of ``obj`` (``dryRun=All``: nothing is stored)."""
        schema = self.crd_schemas.get(key)
        if schema is None:
            return obj
        errors = schema.errors({k: v for k, v in obj.items() if k != "status"})
        if errors:
            raise _invalid(schema, str(obj.get("metadata", {}).get("name", "")), errors)
        return schema.default(obj)

    async def _serve_create(self, request: rendering.Request) -> dict[str, Any]:
        body = self._body(request)
        if isinstance(body, dict):
            self._strict(request, body)
            if self._dry(request):
                key = self._key(request)
                resource = self.catalog.get(*key)
                meta = {
                    **body.get("metadata", {}),
                    **({"namespace": request.namespace} if request.namespace else {}),
                }
                kind = {
                    "apiVersion": "/".join(p for p in key[:2] if p),
                    "kind": resource.kind if resource else "",
                }
                return self._admit_dry(key, {**body, **kind, "metadata": meta})
        return await super()._serve_create(request)

    async def _serve_replace(self, request: rendering.Request) -> dict[str, Any]:
        body = self._body(request)
        if isinstance(body, dict):
            self._strict(request, body)
            if self._dry(request) and request.name:
                self.get(self._key(request), request.name, request.namespace)  # 404 as a real PUT
                return self._admit_dry(self._key(request), body)
        return await super()._serve_replace(request)

    async def _serve_delete(self, request: rendering.Request) -> dict[str, Any]:
        if self._dry(request) and request.name:
            return self.get(self._key(request), request.name, request.namespace)
        return await super()._serve_delete(request)

    async def _serve_update(self, request: rendering.Request) -> dict[str, Any]:  # PATCH
        content_type = request.headers.get("Content-Type", "").split(";")[0]
        key = self._key(request)
        assert request.name is not None
        if content_type == _SMP:
            return self._strategic_patch(request, key, request.name)
        strict = request.params.get("fieldValidation") == "Strict"
        if self._dry(request) and request.subresource == "scale":
            scale = self.get_scale(key, request.name, request.namespace)
            patch_type = "json" if content_type == "application/json-patch+json" else "merge"
            return _merge_preview(scale, self._body(request), patch_type) or scale
        if (strict or self._dry(request)) and request.subresource in (None, "status"):
            current = self.get(key, request.name, request.namespace)
            patch_type = "json" if content_type == "application/json-patch+json" else "merge"
            merged = _merge_preview(current, self._body(request), patch_type)
            if merged is not None and request.subresource is None:
                self._strict(request, merged)
            if merged is not None and self._dry(request):
                return self._admit_dry(key, merged) if request.subresource is None else merged
        return await super()._serve_update(request)

    def _strategic_patch(self, request: rendering.Request, key: ResourceKey, name: str) -> dict[str, Any]:
        if key in self.crd_schemas:
            raise kmock.KubernetesError(
                status=415,
                reason="UnsupportedMediaType",
                message="the body of the request was in an unknown format - accepted media types include: "
                "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                details={},
            )
        patch = self._body(request)
        if not isinstance(patch, dict):
            raise kmock.KubernetesError(
                status=400,
                reason="BadRequest",
                message="a strategic merge patch must be a JSON object",
                details={},
            )
        resource = self.catalog.get(*key)
        schema_name: str | None
        if request.subresource == "scale":
            current = self.get_scale(key, name, request.namespace)
            schema_name = "io.k8s.api.autoscaling.v1.Scale"
        else:
            current = self.get(key, name, request.namespace)
            schema_name = definition_name(key[0], key[1], resource.kind) if resource else None
        merged = smp.apply(current, patch, schema_name)
        if request.subresource is None:
            self._strict(request, merged)
        if self._dry(request):
            return dict(merged)
        return self.replace(key, name, merged, request.namespace, subresource=request.subresource)


def _merge_preview(current: dict[str, Any], patch: Any, patch_type: str) -> dict[str, Any] | None:
    """What a merge or JSON patch would make of ``current`` (None when it does not apply)."""
    try:
        if patch_type == "json":
            result: dict[str, Any] = jsonpatch.apply_patch(current, patch, in_place=False)
            return result
        merged: dict[str, Any] = _merge(copy.deepcopy(current), patch) if isinstance(patch, dict) else None  # type: ignore[assignment]
        return merged
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException):
        return None


class EmulatorAPI:
    """The :class:`ClusterAPI` interface over the emulator's Python API (same semantics as HTTP)."""

    def __init__(self, emulator: KubeEmulator) -> None:
        self.emu = emulator

    @staticmethod
    def _resource(kind: str) -> str:
        k = kind_of(kind)
        return f"{k.api_version}/{k.plural}"

    @staticmethod
    def _status(exc: kmock.KubernetesError) -> int:
        return int(exc.status)

    async def list(
        self, kind: str, namespace: str | None = None, selector: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        try:
            items = self.emu.list(self._resource(kind), namespace)
        except kmock.KubernetesError as exc:
            if self._status(exc) == 404:
                return []
            raise ApiError(self._status(exc), str(exc.message)) from exc
        return [i for i in items if matches(i.get("metadata", {}).get("labels"), selector)]

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self._call(lambda: self.emu.get(self._resource(kind), name, namespace))

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        ns = obj.get("metadata", {}).get("namespace")
        return self._call(lambda: self.emu.create(self._resource(str(obj["kind"])), obj, ns))

    async def patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any] | None:
        return self._call(
            lambda: self.emu.patch(
                self._resource(kind), name, dict(patch), namespace, subresource=subresource
            )
        )

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        return self._call(lambda: self.emu.delete(self._resource(kind), name, namespace)) is not None

    def _call(self, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        try:
            return fn()
        except kmock.KubernetesError as exc:
            if self._status(exc) in (404, 409):
                return None
            raise ApiError(self._status(exc), str(exc.message)) from exc
