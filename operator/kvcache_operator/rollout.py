"""The cache-aware rolling update: one replica at a time, the next only when the previous one is back
ready and warm.

A change of the engines' pod template (the image, or a field that needs a restart) would let the
StatefulSet controller restart every replica, one by one, as soon as each is Ready. The operator
holds it with the StatefulSet's partitioned rolling update instead: when the template changes it sets
``partition = replicas - 1`` (only the highest ordinal restarts), and lowers the partition by one
each time every replica at or above it runs the new template, is ready, and reports (``/readyz``,
``contract.WARM_RATIO_KEY``) at least ``MIN_WARM_RATIO`` of its persisted cache loaded. Template
changes are detected by a hash of the desired template kept on the StatefulSet (``TEMPLATE_HASH``),
never by comparing with the server's defaulted copy. Pure functions; the controller fetches the
warm ratios and applies the result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MIN_WARM_RATIO",
    "TEMPLATE_HASH",
    "current_partition",
    "gated",
    "pods_to_check",
    "template_hash",
]

MIN_WARM_RATIO = 0.9
"""Least warm ratio (blocks loaded / blocks persisted) a restarted replica reports before the next
replica may restart."""
TEMPLATE_HASH = "kvcache.dev/template-hash"
REVISION_LABEL = "controller-revision-hash"

Manifest = dict[str, Any]


def template_hash(statefulset: Mapping[str, Any]) -> str:
    """A hash of the pod template as the operator built it."""
    text = json.dumps(statefulset["spec"]["template"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def current_partition(statefulset: Mapping[str, Any] | None) -> int:
    strategy = ((statefulset or {}).get("spec") or {}).get("updateStrategy") or {}
    value = (strategy.get("rollingUpdate") or {}).get("partition") or 0
    return int(value) if isinstance(value, int) else 0


def _ordinal(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pods_to_check(observed: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """The pods whose warm ratio the gate needs (those at or above the partition), during a rollout."""
    partition = current_partition(observed)
    if partition <= 0:
        return []
    return sorted(p["metadata"]["name"] for p in pods if _ordinal(p["metadata"]["name"]) >= partition)


def gated(
    desired: Manifest,
    observed: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    warm: Mapping[str, float | None],
    *,
    min_warm: float = MIN_WARM_RATIO,
) -> tuple[Manifest, str | None]:
    """``desired`` (the StatefulSet as built) with its template hash and the partition this pass sets,
    and why the partition holds (None when no rollout is held). A pod whose engine does not report a
    warm ratio (``warm[pod]`` None) passes once it is ready: readiness already means "loaded"."""
    out = json.loads(json.dumps(desired))
    spec = out["spec"]
    replicas = int(spec.get("replicas") or 0)
    digest = template_hash(out)
    out["metadata"].setdefault("annotations", {})[TEMPLATE_HASH] = digest
    before = ((observed or {}).get("metadata") or {}).get("annotations") or {}
    partition, why = 0, None
    if observed is not None and replicas > 1:
        if before.get(TEMPLATE_HASH) not in (None, digest):
            partition = replicas - 1
            why = f"pod template changed: {out['metadata']['name']}-{partition} restarts first"
        else:
            partition, why = _advance(
                observed, pods, warm, min(current_partition(observed), replicas - 1), min_warm
            )
    spec["updateStrategy"] = {"type": "RollingUpdate", "rollingUpdate": {"partition": partition}}
    return out, why


def _advance(
    observed: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    warm: Mapping[str, float | None],
    partition: int,
    min_warm: float,
) -> tuple[int, str | None]:
    if partition <= 0:
        return 0, None
    update = (observed.get("status") or {}).get("updateRevision")
    by_name = {p["metadata"]["name"]: p for p in pods}
    replicas = int((observed.get("spec") or {}).get("replicas") or 0)
    for ordinal in range(partition, max(replicas, partition + 1)):
        name = f"{observed['metadata']['name']}-{ordinal}"
        pod = by_name.get(name)
        if pod is None:
            return partition, f"waiting for {name} to exist"
        revision = (pod["metadata"].get("labels") or {}).get(REVISION_LABEL)
        if not update or revision != update:
            return partition, f"waiting for {name} to restart on the new template"
        if not _ready(pod):
            return partition, f"waiting for {name} to load its cache and become ready"
        ratio = warm.get(name)
        if ratio is not None and ratio < min_warm:
            return partition, f"waiting for {name}: warm {ratio:.0%} < {min_warm:.0%}"
    return partition - 1, None
