"""Strategic merge patch (``application/strategic-merge-patch+json``) for built-in kinds.

kubectl sends one for ``apply`` (re-applying a built-in object), ``patch`` (its default type),
``label``, ``annotate``, ``set image``, ``rollout restart``; helm for upgrades. Lists whose schema
says ``x-kubernetes-patch-strategy: merge`` merge element by element on their
``x-kubernetes-patch-merge-key`` (containers by ``name``, ports by ``containerPort``) instead of
being replaced. Directives handled: ``$patch: replace|delete|merge``, ``$setElementOrder/<list>``,
``$deleteFromPrimitiveList/<list>``, ``$retainKeys``. The patch metadata comes from the official
schemas (:func:`e2e.localcluster.openapi.definitions`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from e2e.localcluster.openapi import definitions

_ORDER = "$setElementOrder/"
_DELETE_PRIMITIVE = "$deleteFromPrimitiveList/"


def _resolve(schema: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Follow ``$ref`` (and a single ``allOf`` wrapper) to the schema it names."""
    seen = 0
    while schema and seen < 16:
        ref = schema.get("$ref")
        if isinstance(ref, str):
            schema = definitions().get(ref.rsplit("/", 1)[-1])
        elif len(schema.get("allOf") or []) == 1 and "properties" not in schema:
            schema = schema["allOf"][0]
        else:
            break
        seen += 1
    return schema or {}


def _field(schema: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    return (schema.get("properties") or {}).get(name) or {}


def _items(field: Mapping[str, Any]) -> Mapping[str, Any]:
    return _resolve(field.get("items") if isinstance(field.get("items"), Mapping) else None)


def apply(original: Any, patch: Any, schema_name: str | None) -> Any:
    """``original`` with ``patch`` applied; ``schema_name`` is the object's OpenAPI definition."""
    schema = _resolve({"$ref": f"#/$defs/{schema_name}"}) if schema_name else {}
    return _merge_map(copy.deepcopy(original), patch, schema)


def _merge_map(original: Any, patch: Mapping[str, Any], schema: Mapping[str, Any]) -> Any:
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    body = {k: v for k, v in patch.items() if k != "$patch"}
    if directive == "replace":
        return {k: v for k, v in body.items() if not k.startswith("$")}
    result = dict(original) if isinstance(original, Mapping) else {}
    retain = body.pop("$retainKeys", None)
    orders = {k[len(_ORDER) :]: v for k, v in body.items() if k.startswith(_ORDER)}
    removals = {k[len(_DELETE_PRIMITIVE) :]: v for k, v in body.items() if k.startswith(_DELETE_PRIMITIVE)}
    for key, value in body.items():
        if key.startswith("$"):
            continue
        field = _field(schema, key)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):  # structs and map fields alike: null deletes a key
            merged = _merge_map(result.get(key), value, _resolve(field))
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, field)
        else:
            result[key] = value
    for key, values in removals.items():
        result[key] = [v for v in result.get(key) or [] if v not in values]
    for key, order in orders.items():
        result[key] = _reorder(
            result.get(key) or [], order, str(_field(schema, key).get("x-kubernetes-patch-merge-key") or "")
        )
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(original: Any, patch: list[Any], field: Mapping[str, Any]) -> list[Any]:
    strategy = str(field.get("x-kubernetes-patch-strategy") or "")
    key = field.get("x-kubernetes-patch-merge-key")
    current = list(original) if isinstance(original, list) else []
    if "merge" not in strategy.split(","):
        return [v for v in patch if not (isinstance(v, Mapping) and v.get("$patch"))]
    if not key:  # a merged list of scalars: a union
        return current + [v for v in patch if v not in current]
    out = current
    for item in patch:
        if not isinstance(item, Mapping):
            continue
        if item.get("$patch") == "replace":
            return [i for i in patch if isinstance(i, Mapping) and i.get("$patch") != "replace"]
        index = next(
            (i for i, o in enumerate(out) if isinstance(o, Mapping) and o.get(key) == item.get(key)), None
        )
        if item.get("$patch") == "delete":
            if index is not None:
                out.pop(index)
        elif index is None:
            out.append(_merge_map({}, item, _items(field)))
        else:
            out[index] = _merge_map(out[index], item, _items(field))
    return out


def _reorder(items: list[Any], order: list[Any], key: str) -> list[Any]:
    def ident(item: Any) -> Any:
        return item.get(key) if key and isinstance(item, Mapping) else item

    wanted = [ident(o) for o in order]
    ranked = [i for w in wanted for i in items if ident(i) == w]
    return ranked + [i for i in items if ident(i) not in wanted]
