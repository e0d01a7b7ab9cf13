"""The KVCache's status: conditions, observedGeneration, printer-column fields. Pure builders.

Conditions (types in ``api.CONDITION_TYPES``) follow metav1.Condition: ``lastTransitionTime``
moves only when ``status`` flips, ``observedGeneration`` is the generation they describe.
``Ready`` means every desired engine is ready on the current template; ``Progressing`` means a
rollout, a scale or a first start is under way (False with reason ``ReconcilePaused`` while the
pause annotation is set); ``Degraded`` names the invalid field or the failure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvcache_operator import api, resources
from kvcache_operator.scrape import Observation

Manifest = dict[str, Any]
MAX_DECISIONS = 10


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Ready condition True, an IP, and not terminating."""
    status = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_url(pod: Mapping[str, Any]) -> str:
    """http://<podIP>:<the engine container's 'http' port> (the port from the pod, not a constant:
    the local cluster and the tests run several engines on one host)."""
    port = api.ENGINE_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for entry in container.get("ports") or []:
            if entry.get("name") == "http":
                port = int(entry["containerPort"])
    return f"http://{pod['status']['podIP']}:{port}"


def ready_endpoints(pods: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Pod name -> engine URL for every ready pod, by name."""
    return {
        pod["metadata"]["name"]: pod_url(pod)
        for pod in sorted(pods, key=lambda p: p["metadata"]["name"])
        if pod_ready(pod)
    }


def condition(
    ctype: str,
    status: bool | None,
    reason: str,
    message: str,
    *,
    generation: int,
    previous: Sequence[Mapping[str, Any]],
    now: str,
) -> Manifest:
    """A condition; its lastTransitionTime is kept from ``previous`` while the status is unchanged."""
    value = "Unknown" if status is None else ("True" if status else "False")
    before = next((c for c in previous if c.get("type") == ctype), None)
    since = before.get("lastTransitionTime") if before and before.get("status") == value else now
    return {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or now,
        "observedGeneration": generation,
    }


def backup_record(jobs: Sequence[Mapping[str, Any]]) -> Manifest | None:
    """The latest finished backup Job as ``status.lastBackup`` (None when none finished)."""
    finished = []
    for job in jobs:
        status = job.get("status") or {}
        if status.get("succeeded"):
            finished.append((status.get("completionTime") or "", True, job))
        elif any(
            c.get("type") == "Failed" and c.get("status") == "True" for c in status.get("conditions") or []
        ):
            failed_at = max((c.get("lastTransitionTime") or "" for c in status["conditions"]), default="")
            finished.append((failed_at, False, job))
    if not finished:
        return None
    when, ok, job = max(finished, key=lambda item: item[0])
    record: Manifest = {"time": when or None, "succeeded": ok, "job": job["metadata"]["name"]}
    if not ok:  # a None would delete the key in a merge patch: leave it out instead
        record["message"] = "the backup Job failed; see its pod logs"
    return record


def build_status(
    *,
    kvc: api.KVCache,
    generation: int,
    desired: int,
    statefulset: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    rolling: bool,
    paused: bool,
    error: str | None,
    effective_config: Mapping[str, Any] | None,
    codec: str | None,
    observation: Observation | None,
    decisions: Sequence[Mapping[str, Any]],
    last_backup: Mapping[str, Any] | None,
    previous: Mapping[str, Any],
    now: str,
) -> Manifest:
    """The whole status (camelCase) for one reconcile or scrape pass."""
    endpoints = ready_endpoints(pods)
    ready = len(endpoints)
    prev_conditions = previous.get("conditions") or []

    def cond(ctype: str, value: bool | None, reason: str, message: str) -> Manifest:
        return condition(
            ctype, value, reason, message, generation=generation, previous=prev_conditions, now=now
        )

    is_ready = error is None and not rolling and ready >= desired
    ready_reason = (
        ("Hibernating" if desired == 0 else "EnginesReady")
        if is_ready
        else ("InvalidSpec" if error else "EnginesNotReady")
    )
    progressing = (
        cond(
            "Progressing",
            False,
            "ReconcilePaused",
            f"annotation {'kvcache.dev/reconcile'}: paused; children are not touched",
        )
        if paused
        else cond(
            "Progressing",
            error is None and (rolling or ready != desired),
            "RollingOut" if rolling else ("Scaling" if ready != desired else "Stable"),
            f"{ready}/{desired} engines ready",
        )
    )
    failed = observation.failed_pods if observation else ()
    degraded = cond(
        "Degraded",
        bool(error or failed),
        "InvalidSpec" if error else ("ScrapeFailed" if failed else "AsExpected"),
        error or (f"no metrics from {', '.join(failed)}" if failed else ""),
    )
    backup = cond(
        "BackupSucceeded",
        None if last_backup is None else bool(last_backup.get("succeeded")),
        "NoBackupYet" if last_backup is None else ("Succeeded" if last_backup.get("succeeded") else "Failed"),
        "" if last_backup is None else f"job {last_backup.get('job')}",
    )
    mode = kvc.spec.autoscaling.mode
    autoscaling = cond(
        "Autoscaling",
        mode != api.Mode.OFF,
        f"Mode{mode.value}",
        f"{kvc.spec.autoscaling.min_replicas}..{kvc.spec.autoscaling.max_replicas} replicas",
    )
    phase = (
        api.Phase.DEGRADED
        if error
        else api.Phase.READY
        if is_ready
        else api.Phase.PENDING
        if statefulset is None
        else api.Phase.PROGRESSING
    )
    status: Manifest = {
        "phase": phase.value,
        "conditions": [
            cond("Ready", is_ready, ready_reason, f"{ready}/{desired} engines ready"),
            progressing,
            degraded,
            backup,
            autoscaling,
        ],
        "replicas": int(((statefulset or {}).get("status") or {}).get("replicas") or len(pods)),
        "readyReplicas": ready,
        "selector": resources.selector_string(kvc.name),
        "endpoints": list(endpoints.values()),
        "decisions": list(decisions)[-MAX_DECISIONS:],
    }
    if error is None:
        status["observedGeneration"] = generation
    if effective_config is not None:
        status["effectiveConfig"] = dict(effective_config)
    if codec is not None:
        status["codec"] = codec
    if observation is not None:
        status["memoryPressure"] = round(observation.sample.memory_pressure, 4)
        if observation.sample.hit_rate is not None:
            status["hitRate"] = round(observation.sample.hit_rate, 4)
    if last_backup is not None:
        status["lastBackup"] = dict(last_backup)
    return status
