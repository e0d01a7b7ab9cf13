"""Tiny worlds for the API tests: samples, the CRD as the API server sees it, Kubernetes validation."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import yaml

from kvcache_operator import admission, crd

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "crds" / "samples"
# Every KVCache under crds/samples/ (other kinds there, like the inference Deployment, are tested apart).
KVCACHE_SAMPLES = tuple(
    sorted(p.name for p in SAMPLES.glob("*.yaml") if yaml.safe_load(p.read_text()).get("kind") == "KVCache")
)
INVALID = Path(__file__).resolve().parent / "invalid"
KUBE_VERSIONS = ("1.29", "1.35")


def load_yaml(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), path
    return doc


def load_sample(name: str) -> dict[str, Any]:
    return load_yaml(SAMPLES / name)


def make_kvcache(
    spec: dict[str, Any] | None = None, name: str = "kvc", namespace: str = "ns"
) -> dict[str, Any]:
    return {
        "apiVersion": "kvcache.dev/v1alpha1",
        "kind": "KVCache",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec or {},
    }


# The one prometheus-operator CRD we emit is not in kubernetes-validate's schemas; this is the subset of
# monitoring.coreos.com/v1 ServiceMonitor we use (field names and types as in the upstream CRD).
LABEL_NAME = "^[a-zA-Z_][a-zA-Z0-9_]*$"  # a Prometheus label name
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {
                                "type": "string",
                                "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
                            },
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "required": ["key"],
                                        "additionalProperties": False,
                                        "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                                    },
                                },
                            },
                            # prometheus-operator's RelabelConfig, the fields we emit.
                            "relabelings": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "sourceLabels": {
                                            "type": "array",
                                            "items": {"type": "string", "pattern": LABEL_NAME},
                                        },
                                        "targetLabel": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def kube_validate(manifest: dict[str, Any]) -> None:
    """Strict validation against Kubernetes 1.29 and 1.35 (kubernetes-validate's API); the
    ServiceMonitor (a CRD) against the embedded schema above."""
    if manifest["kind"] == "ServiceMonitor":
        jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).validate(manifest)
        return
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


# --- the KVCache as the API server sees it --------------------------------------------------------


@functools.cache
def open_api() -> dict[str, Any]:
    return crd.open_api_schema()


@functools.cache
def json_validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(crd.to_json_schema(open_api()))


def cel_rules() -> list[tuple[tuple[str, ...], str, str]]:
    """(path under the root, rule, message) of every x-kubernetes-validations entry in the CRD; the
    message is the ``messageExpression`` when there is one (the API server prefers it)."""
    found: list[tuple[tuple[str, ...], str, str]] = []

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        for entry in node.get("x-kubernetes-validations", []):
            found.append((path, entry["rule"], entry.get("messageExpression") or repr(entry["message"])))
        for name, sub in node.get("properties", {}).items():
            walk(sub, (*path, name))
        if isinstance(node.get("items"), dict):
            walk(node["items"], (*path, "[]"))

    walk(open_api(), ())
    return found


_CEL = celpy.Environment()
# cel-python raises the recursion limit on its first compile; do it at import, not inside a hypothesis
# test (hypothesis warns, and warnings are errors, when the limit changes during an example).
_CEL.compile("1 == 1")


@functools.cache
def _program(rule: str) -> Any:
    return _CEL.program(_CEL.compile(rule))


def _at(obj: Any, path: tuple[str, ...]) -> list[tuple[str, Any]]:
    """Every value at ``path`` (``[]`` walks each item of a list), with its field path."""
    found: list[tuple[str, Any]] = [("", obj)]
    for part in path:
        step: list[tuple[str, Any]] = []
        for where, value in found:
            if part == "[]" and isinstance(value, list):
                step += [(f"{where}[{i}]", item) for i, item in enumerate(value)]
            elif isinstance(value, dict) and value.get(part) is not None:
                step.append((f"{where}.{part}".lstrip("."), value[part]))
        found = step
    return found


def _describe(err: jsonschema.ValidationError) -> list[str]:
    """A schema error in the API server's words: ``unknown field "spec.x"`` for fields the schema does
    not know (kubectl's strict field validation), else ``<field path>: <message>``."""
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path).lstrip(".")
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = set(err.schema.get("properties", {}))
        return [f'unknown field "{path}.{name}"' for name in sorted(set(err.instance) - known)]
    return [f"{path}: {err.message}"]


def server_errors(obj: dict[str, Any]) -> list[str]:
    """What the API server would answer for ``obj``: schema errors (``<field path>: <message>``), then,
    if the schema passes, the failing CEL rules as ``<field path>: <message>`` (evaluated on the
    defaulted object; rules on the root give their message alone). A real API server also runs the
    admission webhook after these: see ``admission_errors``."""
    schema_errors = [line for err in json_validator().iter_errors(obj) for line in _describe(err)]
    if schema_errors:
        return schema_errors
    defaulted = crd.apply_defaults(obj, open_api())
    failed = []
    for path, rule, message in cel_rules():
        for where, target in _at(defaulted, path):
            scope = {"self": celpy.json_to_cel(target)}
            if not bool(_program(rule).evaluate(scope)):
                text = str(_program(message).evaluate(scope))
                failed.append(f"{where}: {text}" if where else text)
    return failed


def admission_errors(obj: dict[str, Any]) -> list[str]:
    """What the operator's validating webhook answers for ``obj`` (a CREATE): its message, one line per
    problem, or nothing when it allows the object."""
    verdict = admission.review({"operation": "CREATE", "object": obj, "oldObject": None})
    return [] if verdict.allowed else verdict.message.splitlines()
