"""The local cluster's API server: the team's emulator (``tests.kube_emulator``) plus admission.

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import jsonschema  # type: ignore[import-untyped]
import kmock
import yaml
from tests.kube_emulator import KubeEmulator, ResourceSpec
from tests.kube_emulator.emulator import ResourceKey, parse_resource

from e2e.localcluster.kubeapi import ApiError, kind_of, matches

# Kinds the local cluster's workloads need that the emulator does not register by default.
EXTRA_RESOURCES: dict[str, ResourceSpec] = {
    "networking.k8s.io/v1/networkpolicies": ResourceSpec("NetworkPolicy"),
    "apps/v1/controllerrevisions": ResourceSpec("ControllerRevision"),
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
        self._validator = jsonschema.Draft202012Validator(crd_tools.to_json_schema(self.schema))
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
                    f'unknown field "{path}.{n}"'.lstrip(".") for n in sorted(set(err.instance) - known)
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
        details={"name": name, "kind": schema.kind, "causes": [{"message": e} for e in errors]},
    )


@attrs.define(kw_only=True)
class LocalAPIServer(KubeEmulator):
    """The emulator with admission (schema, defaults, CEL) for the CRDs it was given."""

    crd_schemas: dict[ResourceKey, CustomResourceSchema] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for resource, spec in EXTRA_RESOURCES.items():
            self.register(resource, spec)

    def add_crd(self, schema: CustomResourceSchema, crd: Mapping[str, Any] | None = None) -> None:
        self.crd_schemas[schema.resource] = schema
        if crd is not None:
            try:
                self.create("apiextensions.k8s.io/v1/customresourcedefinitions", crd)
            except kmock.KubernetesError as exc:
                if exc.status != 409:
                    raise

    def create(
        self, resource: str | ResourceKey, obj: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        schema = self.crd_schemas.get(parse_resource(resource))
        if schema is not None:
            errors = schema.errors(obj)
            if errors:
                raise _invalid(schema, str(obj.get("metadata", {}).get("name", "")), errors)
            obj = schema.default(obj)
        result: dict[str, Any] = super().create(resource, obj, namespace)
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
        return result


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
