"""OpenAPI v2 and v3 documents for the local API server, and strict decoding of built-in kinds.

kubectl (1.27+) validates ``kubectl apply``/``create`` through the server: it reads
``/openapi/v3``, finds the PATCH operation of the object's group/version/kind, and when that
operation takes the ``fieldValidation`` query parameter it sends ``?fieldValidation=Strict`` and
lets the server refuse unknown fields. Without these documents it falls back to client-side
validation with ``/openapi/v2`` in protobuf, and fails with "failed to download openapi".

The schemas are the official ones: ``kubernetes-validate`` ships the OpenAPI definitions of
Kubernetes 1.25-1.37 as JSON Schema; :data:`SCHEMA_VERSION` matches the kubectl that
``scripts/get_tools.py`` installs. Custom resources get their CRD's ``openAPIV3Schema``. Kinds
without an official schema (ServiceMonitor, KopfPeering: CRDs on a real cluster) get an open
object schema, so kubectl still finds their operations.

``/openapi/v2`` is served as JSON only: kubectl asks for protobuf, gets 406 Not Acceptable, and
only uses it as a fallback (the v3 path above answers first).

:class:`BuiltinSchemas` also does what a real API server's strict decoder does for built-in
kinds when a client asks for ``fieldValidation=Strict``: unknown fields and wrong JSON types are
refused (400, ``strict decoding error: unknown field "spec.foo"``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]

from e2e.localcluster.discovery import Catalog, Resource

SCHEMA_VERSION = "v1.35.0"
_META = "io.k8s.apimachinery.pkg.apis.meta.v1"
_COMMON = (f"{_META}.DeleteOptions", f"{_META}.Status", f"{_META}.Patch", "io.k8s.api.autoscaling.v1.Scale")


def _schema_dir(strict: bool) -> Path:
    import kubernetes_validate  # type: ignore[import-untyped]

    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return root / f"{SCHEMA_VERSION}-local{'-strict' if strict else ''}"


@functools.cache
def definitions(strict: bool = False) -> dict[str, Any]:
    """The official definitions (JSON Schema), by OpenAPI name (``io.k8s.api.apps.v1.StatefulSet``)."""
    doc = json.loads((_schema_dir(strict) / "_definitions.json").read_text())
    defs: dict[str, Any] = doc["$defs"]
    return defs


@functools.cache
def _gvk_index() -> dict[tuple[str, str, str], str]:
    out = {}
    for name, schema in definitions().items():
        for gvk in schema.get("x-kubernetes-group-version-kind") or []:
            out[(gvk.get("group", ""), gvk["version"], gvk["kind"])] = name
    return out


def definition_name(group: str, version: str, kind: str) -> str | None:
    return _gvk_index().get((group, version, kind))


# ------------------------------------------------------------------------------ JSON Schema -> OpenAPI


def _base_type(value: Any) -> Any:
    if isinstance(value, list):
        kept = [t for t in value if t != "null"]
        return kept[0] if len(kept) == 1 else kept
    return value


def to_openapi(node: Any, ref_prefix: str, *, v2: bool = False) -> Any:
    """One schema from the JSON Schema dialect of kubernetes-validate to OpenAPI (v3.0 or v2).

    Walks the schema structure (not every dict: ``properties`` names are data), rewrites
    ``#/$defs/`` references, drops the ``null`` alternative of ``type`` and turns the two
    ``oneOf`` unions back into what the API server publishes (int-or-string, quantity)."""
    if not isinstance(node, dict):
        return node
    one_of = node.get("oneOf")
    if one_of and all(set(o) == {"type"} for o in one_of):
        types = {_base_type(o["type"]) for o in one_of}
        extra = {k: v for k, v in node.items() if k == "description"}
        if types == {"string", "integer"}:
            shape: dict[str, Any] = (
                {"type": "string", "format": "int-or-string"}
                if v2
                else {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
            )
            return {**extra, **shape}
        return {**extra, **({"type": "string"} if v2 else {"oneOf": [{"type": t} for t in sorted(types)]})}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("$schema", "$id"):
            continue
        if key == "$ref":
            out[key] = str(value).replace("#/$defs/", ref_prefix)
        elif key == "type":
            out[key] = _base_type(value)
        elif key == "properties":
            out[key] = {name: to_openapi(sub, ref_prefix, v2=v2) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_openapi(value, ref_prefix, v2=v2)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_openapi(sub, ref_prefix, v2=v2) for sub in value]
        else:
            out[key] = value
    return out


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref.rsplit("/", 1)[-1]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def closure(names: Iterable[str], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The named definitions and everything they reference (``extra`` schemas included)."""
    defs = {**definitions(), **(extra or {})}
    out: dict[str, Any] = {}
    todo = [n for n in names if n in defs]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out[name] = defs[name]
        todo += [r for r in _refs(defs[name]) if r in defs and r not in out]
    return out


# ------------------------------------------------------------------------------ per-resource schemas


def crd_schema_name(resource: Resource) -> str:
    """``dev.kvcache.v1alpha1.KVCache``: the name a real API server gives a CRD's schema."""
    return ".".join([*reversed(resource.group.split(".")), resource.version, resource.kind])


def _gvk(resource: Resource, kind: str | None = None) -> dict[str, str]:
    return {"group": resource.group, "version": resource.version, "kind": kind or resource.kind}


def resource_schemas(resource: Resource, crd_schemas: Mapping[tuple[str, str, str], Any]) -> dict[str, Any]:
    """Schemas (JSON Schema dialect, ``#/$defs/`` refs) of a resource and its list, by name."""
    name = definition_name(resource.group, resource.version, resource.kind)
    if name is not None:
        list_name = definition_name(resource.group, resource.version, resource.list_kind)
        return {name: definitions()[name], **({list_name: definitions()[list_name]} if list_name else {})}
    schema = copy.deepcopy(crd_schemas.get(resource.key)) or {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    props["metadata"] = {"$ref": f"#/$defs/{_META}.ObjectMeta"}
    schema["x-kubernetes-group-version-kind"] = [_gvk(resource)]
    own = crd_schema_name(resource)
    return {
        own: schema,
        f"{own}List": {
            "type": "object",
            "required": ["items"],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "items": {"type": "array", "items": {"$ref": f"#/$defs/{own}"}},
                "metadata": {"$ref": f"#/$defs/{_META}.ListMeta"},
            },
            "x-kubernetes-group-version-kind": [_gvk(resource, resource.list_kind)],
        },
    }


# ------------------------------------------------------------------------------ paths

_WRITE_PARAMS = ("dryRun", "fieldManager", "fieldValidation")
_PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml")


def _param(name: str, *, v2: bool, where: str = "query") -> dict[str, Any]:
    base = {"name": name, "in": where, "uniqueItems": True}
    return {**base, "type": "string"} if v2 else {**base, "schema": {"type": "string"}}


def _operation(
    resource: Resource, action: str, verb: str, ref: str, gvk: Mapping[str, str], *, v2: bool
) -> dict[str, Any]:
    """One operation; writes take ``fieldValidation`` (what kubectl looks for)."""
    params = [_param(p, v2=v2) for p in (_WRITE_PARAMS if verb in ("post", "put", "patch") else ())]
    op: dict[str, Any] = {
        "operationId": f"{action}{resource.kind}",
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": dict(gvk),
        "parameters": params,
    }
    if v2:
        op["responses"] = {"200": {"description": "OK", "schema": {"$ref": ref}}}
        if verb in ("post", "put", "patch"):
            params.append({"name": "body", "in": "body", "required": True, "schema": {"type": "object"}})
            op["consumes"] = list(_PATCH_TYPES) if verb == "patch" else ["application/json"]
        return op
    op["responses"] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": ref}}}}
    }
    if verb in ("post", "put", "patch"):
        types = _PATCH_TYPES if verb == "patch" else ("*/*",)
        body_ref = f"{ref.rsplit('/', 1)[0]}/{_META}.Patch" if verb == "patch" else ref
        op["requestBody"] = {"content": {t: {"schema": {"$ref": body_ref}} for t in types}}
    return op


def resource_paths(resource: Resource, schema_name: str, list_name: str, *, v2: bool) -> dict[str, Any]:
    prefix = "#/definitions/" if v2 else "#/components/schemas/"
    ref, list_ref = prefix + schema_name, prefix + list_name
    root = f"/apis/{resource.group}/{resource.version}" if resource.group else "/api/v1"
    base = (
        f"{root}/namespaces/{{namespace}}/{resource.plural}"
        if resource.namespaced
        else f"{root}/{resource.plural}"
    )
    gvk = _gvk(resource)

    def op(action: str, verb: str, target: str = ref, kind: Mapping[str, str] = gvk) -> dict[str, Any]:
        return _operation(resource, action, verb, target, kind, v2=v2)

    paths: dict[str, Any] = {
        base: {
            "get": op("list", "get", list_ref),
            "post": op("post", "post"),
            "delete": op("deletecollection", "delete"),
        },
        f"{base}/{{name}}": {
            "get": op("get", "get"),
            "put": op("put", "put"),
            "patch": op("patch", "patch"),
            "delete": op("delete", "delete"),
        },
    }
    if resource.namespaced:
        paths[f"{root}/{resource.plural}"] = {"get": op("list", "get", list_ref)}
    if "status" in resource.subresources:
        paths[f"{base}/{{name}}/status"] = {
            v: op(a, v) for a, v in (("get", "get"), ("put", "put"), ("patch", "patch"))
        }
    if "scale" in resource.subresources:
        scale = {"group": "autoscaling", "version": "v1", "kind": "Scale"}
        target = prefix + "io.k8s.api.autoscaling.v1.Scale"
        paths[f"{base}/{{name}}/scale"] = {
            v: op(a, v, target, scale) for a, v in (("get", "get"), ("put", "put"), ("patch", "patch"))
        }
    return paths


# ------------------------------------------------------------------------------ documents


class OpenAPI:
    """The documents for a :class:`Catalog`; rebuilt when the catalog changes (``invalidate``)."""

    def __init__(self, catalog: Catalog, crd_schemas: Mapping[tuple[str, str, str], Any]) -> None:
        self.catalog = catalog
        self.crd_schemas = crd_schemas
        self._cache: dict[str, bytes] = {}

    def invalidate(self) -> None:
        self._cache.clear()

    @staticmethod
    def gv_path(group: str, version: str) -> str:
        return f"apis/{group}/{version}" if group else f"api/{version}"

    def _gv_parts(self, group: str, version: str, *, v2: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        paths: dict[str, Any] = {}
        schemas: dict[str, Any] = {}
        for resource in self.catalog:
            if (resource.group, resource.version) != (group, version):
                continue
            own = resource_schemas(resource, self.crd_schemas)
            name, list_name = list(own)[:2]
            schemas.update(own)
            paths.update(resource_paths(resource, name, list_name, v2=v2))
        return paths, schemas

    def v3(self, group: str, version: str) -> bytes | None:
        """``/openapi/v3/api/v1``, ``/openapi/v3/apis/<group>/<version>`` (JSON bytes)."""
        key = f"v3:{group}/{version}"
        if key not in self._cache:
            if version not in self.catalog.group_versions().get(group, []):
                return None
            paths, own = self._gv_parts(group, version, v2=False)
            schemas = closure([*own, *_COMMON], own)
            doc = {
                "openapi": "3.0.0",
                "info": {"title": "Kubernetes", "version": SCHEMA_VERSION},
                "paths": paths,
                "components": {
                    "schemas": {n: to_openapi(s, "#/components/schemas/") for n, s in sorted(schemas.items())}
                },
            }
            self._cache[key] = json.dumps(doc).encode()
        return self._cache[key]

    def v3_index(self) -> bytes:
        """``/openapi/v3``: every group/version with a content-hashed URL (clients cache by it)."""
        entries = {}
        for group, versions in sorted(self.catalog.group_versions().items()):
            for version in versions:
                body = self.v3(group, version) or b""
                digest = hashlib.sha512(body).hexdigest()[:64].upper()
                path = self.gv_path(group, version)
                entries[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
        return json.dumps({"paths": entries}).encode()

    def v2(self) -> bytes:
        """``/openapi/v2`` (JSON): every path and definition in one swagger document."""
        if "v2" not in self._cache:
            paths: dict[str, Any] = {}
            own: dict[str, Any] = {}
            for group, versions in self.catalog.group_versions().items():
                for version in versions:
                    p, s = self._gv_parts(group, version, v2=True)
                    paths.update(p)
                    own.update(s)
            defs = closure([*own, *_COMMON], own)
            doc = {
                "swagger": "2.0",
                "info": {"title": "Kubernetes", "version": SCHEMA_VERSION},
                "paths": paths,
                "definitions": {n: to_openapi(s, "#/definitions/", v2=True) for n, s in sorted(defs.items())},
            }
            self._cache["v2"] = json.dumps(doc).encode()
        return self._cache["v2"]


# ------------------------------------------------------------------------------ strict decoding


class BuiltinSchemas:
    """``fieldValidation=Strict`` for built-in kinds: unknown fields and wrong types, as the
    API server's strict decoder reports them (validation proper, 422 Invalid, is not emulated)."""

    def __init__(self) -> None:
        self._validators: dict[str, Any] = {}

    def _validator(self, name: str) -> Any:
        if name not in self._validators:
            schema = {"$defs": definitions(strict=True), "$ref": f"#/$defs/{name}"}
            self._validators[name] = jsonschema.Draft202012Validator(schema)
        return self._validators[name]

    def errors(self, obj: Mapping[str, Any]) -> list[str]:
        """``unknown field "spec.foo"`` / ``spec.replicas: expected integer`` messages; [] when fine."""
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        name = definition_name(group, version, str(obj.get("kind", "")))
        if name is None:
            return []
        body = {k: v for k, v in obj.items() if k != "status"}
        found = []
        for err in self._validator(name).iter_errors(body):
            path = ".".join(str(p) for p in err.absolute_path)
            if err.validator == "additionalProperties" and isinstance(err.instance, dict):
                known = set(err.schema.get("properties", {}))
                found += [
                    f'unknown field "{f"{path}.{n}" if path else n}"'
                    for n in sorted(set(err.instance) - known)
                ]
            elif err.validator == "type":
                found.append(
                    f"{path}: expected {_base_type(err.validator_value)}, got {type(err.instance).__name__}"
                )
        return sorted(set(found))
