"""Server-side printing: ``meta.k8s.io/v1`` Table responses for ``kubectl get``.

kubectl asks for ``Accept: application/json;as=Table;v=v1;g=meta.k8s.io`` and prints the columns
the server returns; a server that answers with a plain list gets NAME and AGE only. Columns
follow the API server's printers for the kinds the local cluster runs (pods, StatefulSets,
Services, PVCs, ConfigMaps, Secrets, Jobs, CronJobs, Events, Namespaces, CRDs); a custom
resource gets its CRD's ``additionalPrinterColumns`` (``type: date`` printed as an age, like the
apiextensions server does). Priority-1 columns appear with ``-o wide``.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping
from typing import Any

from e2e.localcluster.discovery import Resource

Row = list[Any]
Column = tuple[str, str, int]  # name, type, priority

_NAME: Column = ("Name", "string", 0)
_AGE: Column = ("Age", "string", 0)


def human_duration(seconds: float) -> str:
    """``kubectl``'s ages: 45s, 3m20s, 12m, 5h30m, 20h, 3d4h, 30d, 2y10d."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def _parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(value: Any, now: datetime.datetime | None = None) -> str:
    when = _parse_time(value)
    if when is None:
        return "<unknown>"
    now = now or datetime.datetime.now(tz=datetime.UTC)
    return human_duration((now - when).total_seconds())


def _created(obj: Mapping[str, Any]) -> str:
    return age(obj.get("metadata", {}).get("creationTimestamp"))


# ------------------------------------------------------------------------------ JSONPath (CRD columns)

_STEP = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]|\['([^']+)'\]")


def json_path(obj: Any, path: str) -> Any:
    """The simple JSONPath of printer columns (``.status.replicas``, ``.a[0].b``); None when absent."""
    value = obj
    text = path.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    for match in _STEP.finditer(text):
        key, index, quoted = match.groups()
        if index is not None:
            value = value[int(index)] if isinstance(value, list) and int(index) < len(value) else None
        else:
            value = value.get(key or quoted) if isinstance(value, Mapping) else None
        if value is None:
            return None
    return value


# ------------------------------------------------------------------------------ built-in printers


def _pod_status(pod: Mapping[str, Any]) -> tuple[str, int, str, int]:
    """(STATUS, ready containers, RESTARTS cell suffix source, total restarts) like the pod printer."""
    status = pod.get("status") or {}
    reason = status.get("reason") or status.get("phase") or "Pending"
    restarts = 0
    ready = 0
    last_restart: str | None = None
    for i, c in enumerate(status.get("initContainerStatuses") or []):
        restarts += int(c.get("restartCount") or 0)
        state = c.get("state") or {}
        if (state.get("terminated") or {}).get("exitCode") == 0:
            continue
        if state.get("terminated"):
            reason = f"Init:{state['terminated'].get('reason') or 'Error'}"
        elif (state.get("waiting") or {}).get("reason") not in (None, "PodInitializing"):
            reason = f"Init:{state['waiting']['reason']}"
        else:
            reason = f"Init:{i}/{len(pod.get('spec', {}).get('initContainers') or [])}"
        break
    else:
        running = False
        for c in reversed(status.get("containerStatuses") or []):
            restarts += int(c.get("restartCount") or 0)
            state = c.get("state") or {}
            finished = ((c.get("lastState") or {}).get("terminated") or {}).get("finishedAt")
            if finished and (last_restart is None or finished > last_restart):
                last_restart = finished
            if (state.get("waiting") or {}).get("reason"):
                reason = state["waiting"]["reason"]
            elif state.get("terminated"):
                term = state["terminated"]
                reason = term.get("reason") or (
                    f"Signal:{term['signal']}" if term.get("signal") else f"ExitCode:{term.get('exitCode')}"
                )
            elif "running" in state and c.get("ready"):
                running = True
                ready += 1
        if reason == "Completed" and running:
            reason = "Running"
    if pod.get("metadata", {}).get("deletionTimestamp"):
        reason = "Terminating"
    return reason, ready, last_restart or "", restarts


def _pod(pod: Mapping[str, Any]) -> Row:
    reason, ready, last_restart, restarts = _pod_status(pod)
    total = len(pod.get("spec", {}).get("containers") or [])
    restarts_cell: Any = restarts
    if restarts and last_restart:
        restarts_cell = f"{restarts} ({age(last_restart)} ago)"
    status = pod.get("status") or {}
    return [
        pod["metadata"]["name"],
        f"{ready}/{total}",
        reason,
        restarts_cell,
        _created(pod),
        status.get("podIP") or "<none>",
        pod.get("spec", {}).get("nodeName") or "localcluster",
        "<none>",
        "<none>",
    ]


def _containers(template_spec: Mapping[str, Any]) -> tuple[str, str]:
    containers = template_spec.get("containers") or []
    return ",".join(c.get("name", "") for c in containers), ",".join(c.get("image", "") for c in containers)


def _statefulset(sts: Mapping[str, Any]) -> Row:
    spec, status = sts.get("spec") or {}, sts.get("status") or {}
    names, images = _containers((spec.get("template") or {}).get("spec") or {})
    replicas = spec.get("replicas", 1)
    return [
        sts["metadata"]["name"],
        f"{status.get('readyReplicas', 0)}/{replicas}",
        _created(sts),
        names,
        images,
    ]


def _deployment(dep: Mapping[str, Any]) -> Row:
    spec, status = dep.get("spec") or {}, dep.get("status") or {}
    replicas = spec.get("replicas", 1)
    return [
        dep["metadata"]["name"],
        f"{status.get('readyReplicas', 0)}/{replicas}",
        status.get("updatedReplicas", 0),
        status.get("availableReplicas", 0),
        _created(dep),
    ]


def _ports(svc: Mapping[str, Any]) -> str:
    ports = (svc.get("spec") or {}).get("ports") or []
    return ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in ports) or "<none>"


def _service(svc: Mapping[str, Any]) -> Row:
    spec = svc.get("spec") or {}
    selector = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items()))
    return [
        svc["metadata"]["name"],
        spec.get("type", "ClusterIP"),
        spec.get("clusterIP") or "<none>",
        "<none>",
        _ports(svc),
        _created(svc),
        selector or "<none>",
    ]


def _pvc(pvc: Mapping[str, Any]) -> Row:
    spec, status = pvc.get("spec") or {}, pvc.get("status") or {}
    capacity = (status.get("capacity") or {}).get("storage") or ""
    modes = {
        "ReadWriteOnce": "RWO",
        "ReadOnlyMany": "ROX",
        "ReadWriteMany": "RWX",
        "ReadWriteOncePod": "RWOP",
    }
    return [
        pvc["metadata"]["name"],
        status.get("phase", "Pending"),
        spec.get("volumeName", ""),
        capacity,
        ",".join(modes.get(m, m) for m in status.get("accessModes") or spec.get("accessModes") or []),
        spec.get("storageClassName") or "<unset>",
        "<unset>",
        _created(pvc),
    ]


def _job(job: Mapping[str, Any]) -> Row:
    spec, status = job.get("spec") or {}, job.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    state = (
        "Complete"
        if conditions.get("Complete") == "True"
        else "Failed"
        if conditions.get("Failed") == "True"
        else "Running"
    )
    start, end = _parse_time(status.get("startTime")), _parse_time(status.get("completionTime"))
    duration = (
        human_duration(((end or datetime.datetime.now(tz=datetime.UTC)) - start).total_seconds())
        if start
        else ""
    )
    return [
        job["metadata"]["name"],
        state,
        f"{status.get('succeeded', 0)}/{spec.get('completions', 1)}",
        duration,
        _created(job),
    ]


def _cronjob(cj: Mapping[str, Any]) -> Row:
    spec, status = cj.get("spec") or {}, cj.get("status") or {}
    last = status.get("lastScheduleTime")
    return [
        cj["metadata"]["name"],
        spec.get("schedule", ""),
        spec.get("timeZone") or "<none>",
        str(bool(spec.get("suspend"))),
        len(status.get("active") or []),
        age(last) if last else "<none>",
        _created(cj),
    ]


def _event(ev: Mapping[str, Any]) -> Row:
    involved = ev.get("involvedObject") or ev.get("regarding") or {}
    last = ev.get("lastTimestamp") or ev.get("eventTime") or ev.get("metadata", {}).get("creationTimestamp")
    return [
        age(last),
        ev.get("type", ""),
        ev.get("reason", ""),
        f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}",
        ev.get("message") or ev.get("note") or "",
    ]


def _count(key: str) -> Callable[[Mapping[str, Any]], Row]:
    def row(obj: Mapping[str, Any]) -> Row:
        data = len(obj.get("data") or {}) + len(obj.get("binaryData") or obj.get("stringData") or {})
        extra = [obj.get("type", "Opaque")] if key == "secrets" else []
        return [obj["metadata"]["name"], *extra, data, _created(obj)]

    return row


def _namespace(ns: Mapping[str, Any]) -> Row:
    return [ns["metadata"]["name"], (ns.get("status") or {}).get("phase", "Active"), _created(ns)]


def _node(node: Mapping[str, Any]) -> Row:
    status = node.get("status") or {}
    ready: Mapping[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {}
    )
    info = status.get("nodeInfo") or {}
    address = next(
        (a.get("address") for a in status.get("addresses") or [] if a.get("type") == "InternalIP"), None
    )
    return [
        node["metadata"]["name"],
        "Ready" if ready.get("status") == "True" else "NotReady",
        "<none>",
        _created(node),
        info.get("kubeletVersion", ""),
        address or "<none>",
        "<none>",
        info.get("osImage", ""),
        info.get("kernelVersion", ""),
        info.get("containerRuntimeVersion", ""),
    ]


def _crd(crd: Mapping[str, Any]) -> Row:
    return [crd["metadata"]["name"], crd["metadata"].get("creationTimestamp", "")]


def _pdb(pdb: Mapping[str, Any]) -> Row:
    spec, status = pdb.get("spec") or {}, pdb.get("status") or {}
    return [
        pdb["metadata"]["name"],
        str(spec.get("minAvailable", "N/A")),
        str(spec.get("maxUnavailable", "N/A")),
        status.get("disruptionsAllowed", 0),
        _created(pdb),
    ]


# plural -> (columns, row builder)
PRINTERS: dict[str, tuple[list[Column], Callable[[Mapping[str, Any]], Row]]] = {
    "pods": (
        [
            _NAME,
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            _AGE,
            ("IP", "string", 1),
            ("Node", "string", 1),
            ("Nominated Node", "string", 1),
            ("Readiness Gates", "string", 1),
        ],
        _pod,
    ),
    "statefulsets": (
        [_NAME, ("Ready", "string", 0), _AGE, ("Containers", "string", 1), ("Images", "string", 1)],
        _statefulset,
    ),
    "deployments": (
        [_NAME, ("Ready", "string", 0), ("Up-to-date", "integer", 0), ("Available", "integer", 0), _AGE],
        _deployment,
    ),
    "services": (
        [
            _NAME,
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            _AGE,
            ("Selector", "string", 1),
        ],
        _service,
    ),
    "persistentvolumeclaims": (
        [
            _NAME,
            ("Status", "string", 0),
            ("Volume", "string", 0),
            ("Capacity", "string", 0),
            ("Access Modes", "string", 0),
            ("StorageClass", "string", 0),
            ("VolumeAttributesClass", "string", 0),
            _AGE,
        ],
        _pvc,
    ),
    "jobs": (
        [_NAME, ("Status", "string", 0), ("Completions", "string", 0), ("Duration", "string", 0), _AGE],
        _job,
    ),
    "cronjobs": (
        [
            _NAME,
            ("Schedule", "string", 0),
            ("Timezone", "string", 0),
            ("Suspend", "boolean", 0),
            ("Active", "integer", 0),
            ("Last Schedule", "string", 0),
            _AGE,
        ],
        _cronjob,
    ),
    "events": (
        [
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ],
        _event,
    ),
    "configmaps": ([_NAME, ("Data", "integer", 0), _AGE], _count("configmaps")),
    "secrets": ([_NAME, ("Type", "string", 0), ("Data", "integer", 0), _AGE], _count("secrets")),
    "namespaces": ([_NAME, ("Status", "string", 0), _AGE], _namespace),
    "nodes": (
        [
            _NAME,
            ("Status", "string", 0),
            ("Roles", "string", 0),
            _AGE,
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("External-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ],
        _node,
    ),
    "customresourcedefinitions": ([_NAME, ("Created At", "date", 0)], _crd),
    "poddisruptionbudgets": (
        [
            _NAME,
            ("Min Available", "string", 0),
            ("Max Unavailable", "string", 0),
            ("Allowed Disruptions", "integer", 0),
            _AGE,
        ],
        _pdb,
    ),
}


def _custom(resource: Resource) -> tuple[list[Column], Callable[[Mapping[str, Any]], Row]]:
    """A CRD's additionalPrinterColumns (Age alone when it declares none), as apiextensions prints."""
    declared = resource.printer_columns or [
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    ]
    columns: list[Column] = [_NAME] + [
        (str(c["name"]), str(c.get("type", "string")), int(c.get("priority", 0))) for c in declared
    ]

    def row(obj: Mapping[str, Any]) -> Row:
        cells: Row = [obj["metadata"]["name"]]
        for c in declared:
            value = json_path(obj, str(c["jsonPath"]))
            cells.append(age(value) if c.get("type") == "date" and value is not None else value)
        return cells

    return columns, row


_BUILTIN_GROUPS = ("", "apps", "batch", "policy", "apiextensions.k8s.io", "events.k8s.io")


def _default(_: Resource) -> tuple[list[Column], Callable[[Mapping[str, Any]], Row]]:
    return [_NAME, _AGE], lambda obj: [obj["metadata"]["name"], _created(obj)]


def table(
    resource: Resource,
    objects: list[dict[str, Any]],
    *,
    include_object: str = "Metadata",
    resource_version: str = "",
) -> dict[str, Any]:
    """A ``meta.k8s.io/v1`` Table of ``objects``; rows carry the object (or its metadata)."""
    if resource.printer_columns:
        columns, build = _custom(resource)
    elif resource.group in _BUILTIN_GROUPS and resource.plural in PRINTERS:
        columns, build = PRINTERS[resource.plural]
    else:
        columns, build = _default(resource)
    definitions = [
        {
            "name": name,
            "type": kind if kind != "date" else "string",
            "format": "name" if (name, i) == ("Name", 0) else ("date" if kind == "date" else ""),
            "description": "",
            "priority": priority,
        }
        for i, (name, kind, priority) in enumerate(columns)
    ]
    rows = []
    for obj in objects:
        if include_object == "Object":
            carried: dict[str, Any] = obj
        elif include_object == "None":
            carried = {}
        else:
            carried = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj.get("metadata", {}),
            }
        rows.append({"cells": build(obj)[: len(columns)], "object": carried})
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions,
        "rows": rows,
    }


def wants_table(accept: str) -> bool:
    """Whether an Accept header asks for a Table (kubectl get does; kubectl get -o json does not)."""
    return any("as=Table" in part and "g=meta.k8s.io" in part for part in accept.split(","))
