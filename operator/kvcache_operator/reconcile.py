"""Desired vs observed children → actions. Pure: no API calls, no clock.

``plan()`` is level-based and idempotent: given the manifests ``resources.build_children`` wants
and the children that exist, it returns the creates (missing), patches (drifted, or not yet
owned: adoption) and deletes (owned by this KVCache but no longer wanted) that converge them.
Running it again on the result yields no action. "Drifted" means a desired field differs from
the observed one; fields the server or other controllers add (status, defaults, extra list
items' fields) are not drift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvcache_engine.contract import TUNED_FIELDS, LiveConfig
from kvcache_operator import api, resources

Manifest = dict[str, Any]

PAUSE_ANNOTATION = "kvcache.dev/reconcile"
PAUSE_VALUE = "paused"


@dataclass(frozen=True)
class Action:
    """One API write: create or patch ``body`` (merge patch), or delete kind/name."""

    verb: Literal["create", "patch", "delete"]
    kind: str
    name: str
    body: Manifest | None
    reason: str


def owner_reference(owner: Mapping[str, Any]) -> Manifest:
    """The controller reference every owned child carries (garbage collection on delete)."""
    meta = owner["metadata"]
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def with_owner(child: Manifest, owner_ref: Manifest) -> Manifest:
    """The child with the owner reference, unless it is annotated to outlive its KVCache."""
    annotations = child["metadata"].get("annotations") or {}
    if annotations.get(resources.RETAIN_ANNOTATION) == "true":
        return child
    meta = {**child["metadata"], "ownerReferences": [owner_ref]}
    return {**child, "metadata": meta}


def first_difference(desired: Any, observed: Any, path: str = "") -> str | None:
    """The first path where ``desired`` is not contained in ``observed`` (dict keys recursively,
    lists element-wise with the same length), or None when it is contained."""
    if isinstance(desired, Mapping):
        if not isinstance(observed, Mapping):
            return path or "."
        for key, value in desired.items():
            found = first_difference(value, observed.get(key), f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(observed) != len(desired):
            return path
        for i, (want, have) in enumerate(zip(desired, observed, strict=True)):
            found = first_difference(want, have, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    return None if desired == observed else path


def _owned_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    return any(ref.get("uid") == owner_uid for ref in obj["metadata"].get("ownerReferences") or [])


def plan(
    desired: Sequence[Manifest], observed: Mapping[str, Sequence[Manifest]], owner_uid: str
) -> list[Action]:
    """Actions that turn ``observed`` (kind -> objects listed by label) into ``desired``.

    Desired children already carry their owner references (``with_owner``). Create-only
    children (the generated token Secret) are created when missing and never patched.
    Deletes concern only children this owner controls and no longer wants.
    """
    index = {(kind, obj["metadata"]["name"]): obj for kind, objs in observed.items() for obj in objs}
    actions: list[Action] = []
    wanted: set[tuple[str, str]] = set()
    for child in desired:
        kind, name = child["kind"], child["metadata"]["name"]
        wanted.add((kind, name))
        have = index.get((kind, name))
        if have is None:
            actions.append(Action("create", kind, name, child, "missing"))
            continue
        annotations = child["metadata"].get("annotations") or {}
        if annotations.get(resources.CREATE_ONLY_ANNOTATION) == "true":
            continue
        drift = first_difference(child, have)
        if drift is not None:
            reason = "adopting" if drift.startswith("metadata.ownerReferences") else f"drifted at {drift}"
            actions.append(Action("patch", kind, name, child, reason))
    for kind, objs in sorted(observed.items()):
        for obj in objs:
            name = obj["metadata"]["name"]
            if (kind, name) not in wanted and _owned_by(obj, owner_uid):
                actions.append(Action("delete", kind, name, None, "no longer wanted"))
    return actions


def is_paused(meta: Mapping[str, Any]) -> bool:
    """``kvcache.dev/reconcile: paused`` stops every write to children (status still reports)."""
    return (meta.get("annotations") or {}).get(PAUSE_ANNOTATION) == PAUSE_VALUE


def desired_replicas(spec: api.KVCacheSpec, statefulset: Mapping[str, Any] | None) -> int:
    """One writer per field: spec.replicas while autoscaling is Off (or hibernating at 0); with
    autoscaling on, the StatefulSet's current count (the operator owns it), clamped to bounds."""
    if spec.replicas == 0 or spec.autoscaling.mode != api.Mode.AUTO or statefulset is None:
        return spec.replicas
    current = int((statefulset.get("spec") or {}).get("replicas") or spec.replicas)
    return min(max(current, spec.autoscaling.min_replicas), spec.autoscaling.max_replicas)


def rolling_out(statefulset: Mapping[str, Any] | None) -> bool:
    """Whether the StatefulSet has not yet rolled its pods to the current template and count."""
    if statefulset is None:
        return True
    status = statefulset.get("status") or {}
    meta = statefulset["metadata"]
    replicas = int((statefulset.get("spec") or {}).get("replicas") or 0)
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 1):
        return True
    if status.get("updateRevision") and status.get("currentRevision") != status.get("updateRevision"):
        return True
    return int(status.get("updatedReplicas", replicas) or 0) < replicas


def live_overrides(spec: api.KVCacheSpec, tuned: LiveConfig) -> LiveConfig:
    """Tuned live values to keep applying: the tuned fields (``TUNED_FIELDS``) of ``tuned`` (the
    tuner's record) that differ from spec.cache, only while tuning is Auto (Off/DryRun: spec.cache is
    the truth). Other live fields in the record are ignored."""
    if spec.tuning.mode != api.Mode.AUTO or not tuned:
        return LiveConfig()
    values = tuned.given()
    keep = {name: values[name] for name in TUNED_FIELDS if name in values}
    return LiveConfig.model_validate(keep).diff(LiveConfig.of(spec.cache))
