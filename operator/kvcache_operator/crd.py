"""The KVCache CustomResourceDefinition, generated from the pydantic models in ``api.py``.

pydantic's JSON Schema is turned into a *structural* OpenAPI v3 schema, as the API server requires:
``$ref`` inlined, ``anyOf [X, null]`` → ``X`` + ``nullable``, every node typed, free-form maps marked
``x-kubernetes-preserve-unknown-fields``, no ``additionalProperties`` next to ``properties``,
JSON-Schema-2020 ``exclusiveMinimum: n`` → OpenAPI's ``minimum: n, exclusiveMinimum: true``. Object
fields get ``default: {}`` so the server materialises their nested defaults (CEL rules rely on it).

The inverse direction (``to_json_schema``) and the server's defaulting (``apply_defaults``) exist so
tests validate manifests exactly as the API server would (unknown fields rejected, as kubectl's
strict field validation does).
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from kvcache_operator import api

JSON = dict[str, Any]

_DROP = frozenset({"title"})
_KEY_ORDER = {"type": 0, "description": 1, "default": 2}


def _resolve(node: JSON, defs: JSON) -> JSON:
    """Inline ``$ref``/single ``allOf``; sibling keys (description, default) win over the target's."""
    target: JSON | None = None
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
    elif "allOf" in node and len(node["allOf"]) == 1:
        target = _resolve(node["allOf"][0], defs)
    if target is None:
        return node
    extra = {k: v for k, v in node.items() if k not in ("$ref", "allOf")}
    return {**target, **extra}


def structural(node: JSON, defs: JSON) -> JSON:
    """One pydantic JSON Schema node → a structural OpenAPI v3 node (recursively)."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1 or len(node["anyOf"]) != 2:
            raise ValueError(f"cannot make a structural schema of anyOf {node['anyOf']!r}")
        extra = {k: v for k, v in node.items() if k != "anyOf"}
        if extra.get("default", 0) is None:
            del extra["default"]
        node = {**_resolve(branches[0], defs), **extra, "nullable": True}
    out: JSON = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = structural(value, defs)
            elif value is True and "properties" not in node:
                out["x-kubernetes-preserve-unknown-fields"] = True
            # False next to properties: structural schemas prune unknown fields instead.
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    _default_empty_objects(out)
    # type and description first: the checked-in YAML reads top-down.
    return dict(sorted(out.items(), key=lambda kv: _KEY_ORDER.get(kv[0], len(_KEY_ORDER))))


def _default_empty_objects(node: JSON) -> None:
    """Give optional, non-nullable object properties ``default: {}`` so nested defaults apply."""
    required = set(node.get("required", ()))
    for name, prop in node.get("properties", {}).items():
        is_object = prop.get("type") == "object" and "properties" in prop
        if is_object and name not in required and not prop.get("nullable") and "default" not in prop:
            prop["default"] = {}


def _model_schema(model: type[BaseModel]) -> JSON:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return structural(raw, defs)


def _at(schema: JSON, path: tuple[str, ...]) -> JSON:
    node = schema
    for part in path:
        node = node["properties"][part]
    return node


def open_api_schema() -> JSON:
    """The version's openAPIV3Schema: spec and status from the models, CEL rules attached."""
    spec = _model_schema(api.KVCacheSpec)
    spec["default"] = {}
    root: JSON = {
        "type": "object",
        "description": "A KV cache for LLM inference: engine pods, persistence, backups, autoscaling.",
        "properties": {
            "apiVersion": {"type": "string", "description": "kvcache.dev/v1alpha1"},
            "kind": {"type": "string", "description": "KVCache"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": _model_schema(api.KVCacheStatus),
        },
        "x-kubernetes-validations": [{"rule": api.METADATA_RULE_CEL, "message": api.METADATA_RULE_MESSAGE}],
    }
    for rule in api.CROSS_FIELD_RULES:
        node = _at(root, rule.path)
        node.setdefault("x-kubernetes-validations", []).append({"rule": rule.cel, "message": rule.message})
    _patterns_in_words(root)
    return root


def _patterns_in_words(node: JSON, path: str = "") -> None:
    """A ``pattern`` left by a model (the engine's own) becomes a CEL rule with the words of
    ``api.PATTERN_WORDS``: the API server would quote the pattern itself in its message."""
    for name, sub in node.get("properties", {}).items():
        _patterns_in_words(sub, f"{path}.{name}".lstrip("."))
    if "pattern" not in node:
        return
    pattern = node.pop("pattern")
    words = f"is not valid; {api.PATTERN_WORDS[path]}"  # KeyError: add the field's words to api.py
    node.setdefault("maxLength", 64)  # bounds the CEL cost of the match
    node.setdefault("x-kubernetes-validations", []).append(
        {
            "rule": f"self.matches({pattern!r})",
            "message": f"the value {words}",
            "messageExpression": f"'\"' + self + '\" {words}'",
        }
    )


# What the engines and their kubelet report (status), never what the spec asked.
PRINTER_COLUMNS: list[JSON] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "HitRate", "type": "number", "jsonPath": ".status.hitRate"},
    {"name": "Pressure", "type": "number", "jsonPath": ".status.memoryPressure"},
    {"name": "Codec", "type": "string", "jsonPath": ".status.codec"},
    {"name": "Compression", "type": "number", "jsonPath": ".status.achievedCompressionRatio"},
    {"name": "LastBackup", "type": "date", "jsonPath": ".status.lastBackup.time"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> JSON:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of KVCache."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "kvcache-operator", "app.kubernetes.io/part-of": "kvcache"},
        },
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["kvcache"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


HEADER = (
    "# Generated by `kvcache-operator crd` from operator/kvcache_operator/api.py. Do not edit:\n"
    "# change the models and run `make crd` (tests/api fail when this file drifts).\n"
)


def render_crd() -> str:
    """The CRD as the YAML text checked in at crds/kvcache.dev_kvcaches.yaml."""
    return HEADER + "---\n" + yaml.safe_dump(build_crd(), sort_keys=False, width=80)


# --- the API server's view, for validating manifests outside a cluster --------------------------


def to_json_schema(node: JSON) -> JSON:
    """Structural OpenAPI v3 → Draft 2020-12 JSON Schema. Unknown fields are rejected (as with kubectl's
    strict field validation); ``x-kubernetes-*`` extensions are dropped (CEL is evaluated separately)."""
    out: JSON = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "exclusiveMinimum", "exclusiveMaximum"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(key) is True:
            out[key] = out.pop(bound)
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def apply_defaults(obj: Any, node: JSON) -> Any:
    """A copy of ``obj`` with the schema's defaults filled in, as the API server does on write."""
    if not isinstance(obj, dict) or "properties" not in node:
        if isinstance(obj, list) and "items" in node:
            return [apply_defaults(item, node["items"]) for item in obj]
        return obj
    out = dict(obj)
    for name, prop in node["properties"].items():
        if name not in out and "default" in prop:
            out[name] = copy.deepcopy(prop["default"])
        if name in out:
            out[name] = apply_defaults(out[name], prop)
    return out
