"""The controllers kube-controller-manager would run: StatefulSet, Job, CronJob.

(ownerReference garbage collection is the emulator's: it collects dependents synchronously.)

Each is level-based: ``sync_once()`` lists what it owns, compares with the spec and makes at most the
changes a real controller would make in one pass (OrderedReady: one pod at a time; rolling update:
one pod at a time, highest ordinal first, only when every pod is Ready). ``run()`` repeats it.
They talk to the API only through :class:`ClusterAPI`, like any other client.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import hashlib
import json
import logging
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from e2e.localcluster.kubeapi import ApiError, ClusterAPI, owned_by
from e2e.localcluster.kubelet import now_iso

log = logging.getLogger("localcluster.controllers")

MANUAL_RUN_ANNOTATION = "localcluster.kvcache.dev/run-now"
_HANDLED_RUN_ANNOTATION = "localcluster.kvcache.dev/run-now-handled"


def owner_ref(owner: Mapping[str, Any], *, controller: bool = True) -> dict[str, Any]:
    meta = owner["metadata"]
    ref = {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "controller": controller,
        "blockOwnerDeletion": True,
    }
    if meta.get("uid"):
        ref["uid"] = meta["uid"]
    return ref


def is_ready(pod: Mapping[str, Any] | None) -> bool:
    if pod is None or pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def is_terminating(obj: Mapping[str, Any]) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


def template_hash(template: Mapping[str, Any]) -> str:
    """Stable short hash of a pod template (the controller-revision-hash suffix)."""
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


class Controller:
    period_s = 0.5

    def __init__(self, api: ClusterAPI) -> None:
        self.api = api

    async def sync_once(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except (TimeoutError, ApiError, OSError) as exc:
                log.warning("%s: %s", type(self).__name__, exc)
            except Exception:
                log.exception("%s failed", type(self).__name__)
            await asyncio.sleep(self.period_s)


# ------------------------------------------------------------------------------------- StatefulSet


class StatefulSetController(Controller):
    """Ordinal pods from the template, a PVC per claim template, OrderedReady/Parallel, rolling
    updates (one pod at a time, highest ordinal first, each waiting for all to be Ready), scale up
    and down, ``persistentVolumeClaimRetentionPolicy`` (whenDeleted/whenScaled: Retain|Delete)."""

    async def sync_once(self) -> None:
        for sts in await self.api.list("StatefulSet"):
            if not is_terminating(sts):
                await self.reconcile(sts)

    async def reconcile(self, sts: dict[str, Any]) -> None:
        meta, spec = sts["metadata"], sts.get("spec", {})
        ns, name = meta.get("namespace") or "default", meta["name"]
        replicas = spec.get("replicas")
        replicas = 1 if replicas is None else int(replicas)
        revision = f"{name}-{template_hash(spec.get('template', {}))}"
        pods = {self._ordinal(name, p): p for p in await self.api.list("Pod", ns) if owned_by(p, sts)}
        pods.pop(-1, None)
        parallel = spec.get("podManagementPolicy") == "Parallel"
        await self._ensure_claims(sts, range(replicas))
        await self._scale_up(sts, pods, replicas, revision, parallel)
        leaving = await self._scale_down(sts, pods, replicas, parallel)
        if not leaving:
            await self._roll(sts, pods, replicas, revision)
        await self._status(sts, pods, replicas, revision)

    @staticmethod
    def _ordinal(name: str, pod: Mapping[str, Any]) -> int:
        m = re.fullmatch(rf"{re.escape(name)}-(\d+)", pod["metadata"]["name"])
        return int(m.group(1)) if m else -1

    # -- claims
    def _claim_name(self, sts: Mapping[str, Any], template: Mapping[str, Any], ordinal: int) -> str:
        return f"{template['metadata']['name']}-{sts['metadata']['name']}-{ordinal}"

    async def _ensure_claims(self, sts: Mapping[str, Any], ordinals: range) -> None:
        meta, spec = sts["metadata"], sts.get("spec", {})
        policy = spec.get("persistentVolumeClaimRetentionPolicy") or {}
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        for ordinal in ordinals:
            for template in spec.get("volumeClaimTemplates") or []:
                claim = self._claim_name(sts, template, ordinal)
                if await self.api.get("PersistentVolumeClaim", meta.get("namespace"), claim) is not None:
                    continue
                pvc = {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {
                        "name": claim,
                        "namespace": meta.get("namespace"),
                        "labels": {**(template["metadata"].get("labels") or {}), **selector},
                    },
                    "spec": copy.deepcopy(template.get("spec", {})),
                }
                if policy.get("whenDeleted") == "Delete":
                    pvc["metadata"]["ownerReferences"] = [owner_ref(sts, controller=False)]
                await self.api.create(pvc)

    # -- pods
    def _pod(self, sts: Mapping[str, Any], ordinal: int, revision: str) -> dict[str, Any]:
        meta, spec = sts["metadata"], sts.get("spec", {})
        template = copy.deepcopy(spec.get("template", {}))
        pod_name = f"{meta['name']}-{ordinal}"
        tmeta = template.get("metadata") or {}
        labels = {
            **(tmeta.get("labels") or {}),
            "statefulset.kubernetes.io/pod-name": pod_name,
            "apps.kubernetes.io/pod-index": str(ordinal),
            "controller-revision-hash": revision,
        }
        pod_spec = template.get("spec", {})
        pod_spec["hostname"] = pod_name
        if spec.get("serviceName"):
            pod_spec["subdomain"] = spec["serviceName"]
        volumes = [v for v in pod_spec.get("volumes") or []]
        for claim_template in spec.get("volumeClaimTemplates") or []:
            vol_name = claim_template["metadata"]["name"]
            volumes = [v for v in volumes if v.get("name") != vol_name]
            volumes.append(
                {
                    "name": vol_name,
                    "persistentVolumeClaim": {"claimName": self._claim_name(sts, claim_template, ordinal)},
                }
            )
        pod_spec["volumes"] = volumes
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": meta.get("namespace"),
                "labels": labels,
                "annotations": dict(tmeta.get("annotations") or {}),
                "ownerReferences": [owner_ref(sts)],
            },
            "spec": pod_spec,
        }

    async def _scale_up(
        self,
        sts: dict[str, Any],
        pods: dict[int, dict[str, Any]],
        replicas: int,
        revision: str,
        parallel: bool,
    ) -> None:
        for ordinal in range(replicas):
            pod = pods.get(ordinal)
            if pod is None:
                created = await self.api.create(self._pod(sts, ordinal, revision))
                if created is not None:
                    pods[ordinal] = created
                if not parallel:
                    return  # OrderedReady: one at a time, the next once this one is Ready
            elif not parallel and not is_ready(pod):
                return

    async def _scale_down(
        self, sts: dict[str, Any], pods: dict[int, dict[str, Any]], replicas: int, parallel: bool
    ) -> bool:
        """Delete pods above ``replicas`` (highest first; one at a time unless Parallel).

        Returns True while any pod is still leaving (no rolling update meanwhile)."""
        ns = sts["metadata"].get("namespace")
        leaving = sorted((o for o in pods if o >= replicas), reverse=True)
        for ordinal in leaving:
            pod = pods[ordinal]
            if is_terminating(pod):
                if not parallel:
                    break
                continue
            await self.api.delete("Pod", ns, pod["metadata"]["name"])
            if not parallel:
                break
        await self._retire_claims(sts, pods, replicas)
        return bool(leaving)

    async def _retire_claims(self, sts: dict[str, Any], pods: Mapping[int, Any], replicas: int) -> None:
        """whenScaled=Delete: a claim above ``replicas`` goes once its pod is gone."""
        spec = sts.get("spec", {})
        if (spec.get("persistentVolumeClaimRetentionPolicy") or {}).get("whenScaled") != "Delete":
            return
        ns = sts["metadata"].get("namespace")
        for template in spec.get("volumeClaimTemplates") or []:
            prefix = f"{template['metadata']['name']}-{sts['metadata']['name']}-"
            for pvc in await self.api.list("PersistentVolumeClaim", ns):
                suffix = pvc["metadata"]["name"].removeprefix(prefix)
                if pvc["metadata"]["name"].startswith(prefix) and suffix.isdigit():
                    ordinal = int(suffix)
                    if ordinal >= replicas and ordinal not in pods and not is_terminating(pvc):
                        await self.api.delete("PersistentVolumeClaim", ns, pvc["metadata"]["name"])

    async def _roll(
        self, sts: dict[str, Any], pods: dict[int, dict[str, Any]], replicas: int, revision: str
    ) -> None:
        strategy = sts.get("spec", {}).get("updateStrategy") or {}
        if strategy.get("type", "RollingUpdate") != "RollingUpdate":
            return  # OnDelete: pods take the new template when someone deletes them
        if len(pods) < replicas or not all(is_ready(pods.get(o)) for o in range(replicas)):
            return
        partition = int((strategy.get("rollingUpdate") or {}).get("partition") or 0)
        stale = [
            o
            for o in range(partition, replicas)
            if pods[o]["metadata"].get("labels", {}).get("controller-revision-hash") != revision
        ]
        if stale:
            victim = pods[max(stale)]
            log.info("rolling %s to %s", victim["metadata"]["name"], revision)
            await self.api.delete("Pod", sts["metadata"].get("namespace"), victim["metadata"]["name"])

    async def _status(
        self, sts: dict[str, Any], pods: Mapping[int, dict[str, Any]], replicas: int, revision: str
    ) -> None:
        live = [p for o, p in pods.items() if o < replicas or not is_terminating(p)]
        revisions = [p["metadata"].get("labels", {}).get("controller-revision-hash") for p in live]
        ready = sum(1 for p in live if is_ready(p))
        updated = revisions.count(revision)
        previous = (sts.get("status") or {}).get("currentRevision") or revision
        current = revision if updated == replicas and ready == replicas else previous
        status = {
            "observedGeneration": sts["metadata"].get("generation", 1),
            "replicas": len(live),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "currentReplicas": revisions.count(current),
            "updatedReplicas": updated,
            "currentRevision": current,
            "updateRevision": revision,
            "collisionCount": 0,
        }
        if {k: (sts.get("status") or {}).get(k) for k in status} != status:
            await self.api.patch(
                "StatefulSet",
                sts["metadata"].get("namespace"),
                sts["metadata"]["name"],
                {"status": status},
                subresource="status",
            )


# --------------------------------------------------------------------------------------------- Jobs


def _condition(obj: Mapping[str, Any], kind: str) -> bool:
    return any(
        c.get("type") == kind and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def job_finished(job: Mapping[str, Any]) -> bool:
    return _condition(job, "Complete") or _condition(job, "Failed")


def job_from_cronjob(cronjob: Mapping[str, Any], name: str, *, manual: bool = True) -> dict[str, Any]:
    """A Job from a CronJob's template (what ``kubectl create job NAME --from=cronjob/CJ`` builds)."""
    template = copy.deepcopy(cronjob["spec"]["jobTemplate"])
    tmeta = template.get("metadata") or {}
    annotations = dict(tmeta.get("annotations") or {})
    if manual:
        annotations["cronjob.kubernetes.io/instantiate"] = "manual"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": cronjob["metadata"].get("namespace"),
            "labels": dict(tmeta.get("labels") or {}),
            "annotations": annotations,
            "ownerReferences": [owner_ref(cronjob)],
        },
        "spec": template.get("spec", {}),
    }


class JobController(Controller):
    """Job → Pod (``completions`` pods in turn, ``backoffLimit`` retries), status and conditions."""

    async def sync_once(self) -> None:
        for job in await self.api.list("Job"):
            if not is_terminating(job) and not job_finished(job):
                await self.reconcile(job)

    async def reconcile(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job.get("spec", {})
        ns = meta.get("namespace")
        pods = [p for p in await self.api.list("Pod", ns) if owned_by(p, job)]
        phases = [p.get("status", {}).get("phase", "Pending") for p in pods]
        succeeded, failed = phases.count("Succeeded"), phases.count("Failed")
        active = sum(
            1
            for p, ph in zip(pods, phases, strict=True)
            if ph not in ("Succeeded", "Failed") and not is_terminating(p)
        )
        completions = int(spec.get("completions") or 1)
        backoff_limit = int(spec.get("backoffLimit", 6))
        status: dict[str, Any] = {
            "active": active,
            "succeeded": succeeded,
            "failed": failed,
            "startTime": (job.get("status") or {}).get("startTime") or now_iso(),
        }
        if succeeded >= completions:
            status.update(
                completionTime=now_iso(),
                active=0,
                conditions=[{"type": "Complete", "status": "True", "lastTransitionTime": now_iso()}],
            )
        elif failed > backoff_limit:
            status.update(
                active=0,
                conditions=[
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "lastTransitionTime": now_iso(),
                    }
                ],
            )
        elif active == 0:
            await self.api.create(self._pod(job))
            status["active"] = 1
        await self.api.patch("Job", ns, meta["name"], {"status": status}, subresource="status")

    @staticmethod
    def _pod(job: Mapping[str, Any]) -> dict[str, Any]:
        meta = job["metadata"]
        template = copy.deepcopy(job.get("spec", {}).get("template", {}))
        tmeta = template.get("metadata") or {}
        labels = {
            **(tmeta.get("labels") or {}),
            "job-name": meta["name"],
            "batch.kubernetes.io/job-name": meta["name"],
        }
        if meta.get("uid"):
            labels["controller-uid"] = meta["uid"]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{secrets.token_hex(3)[:5]}",
                "namespace": meta.get("namespace"),
                "labels": labels,
                "annotations": dict(tmeta.get("annotations") or {}),
                "ownerReferences": [owner_ref(job)],
            },
            "spec": template.get("spec", {}),
        }


class CronJobController(Controller):
    """Jobs on schedule (croniter), or on demand: set the annotation ``localcluster.kvcache.dev/run-now``
    to a new value (or create a Job from the template, as ``kubectl create job --from`` does).
    Status: ``active``, ``lastScheduleTime``, ``lastSuccessfulTime``; history limits honoured."""

    def __init__(self, api: ClusterAPI) -> None:
        super().__init__(api)
        self._first_seen: dict[str, datetime.datetime] = {}

    async def sync_once(self) -> None:
        for cj in await self.api.list("CronJob"):
            if not is_terminating(cj):
                await self.reconcile(cj)

    async def reconcile(self, cj: dict[str, Any]) -> None:
        from croniter import croniter

        meta, spec = cj["metadata"], cj.get("spec", {})
        ns, name = meta.get("namespace"), meta["name"]
        now = datetime.datetime.now(tz=datetime.UTC)
        jobs = [j for j in await self.api.list("Job", ns) if owned_by(j, cj)]
        active = [j for j in jobs if not job_finished(j)]
        status: dict[str, Any] = {}
        annotations = meta.get("annotations") or {}
        token = annotations.get(MANUAL_RUN_ANNOTATION)
        if token and annotations.get(_HANDLED_RUN_ANNOTATION) != token:
            await self.api.create(job_from_cronjob(cj, f"{name}-manual-{secrets.token_hex(3)[:5]}"))
            await self.api.patch(
                "CronJob", ns, name, {"metadata": {"annotations": {_HANDLED_RUN_ANNOTATION: token}}}
            )
        last = (
            self._parse((cj.get("status") or {}).get("lastScheduleTime"))
            or self._parse(meta.get("creationTimestamp"))
            or self._first_seen.setdefault(f"{ns}/{name}", now)
        )
        # Like the real controller, only the most recent missed schedule time runs (no catch-up burst).
        schedule = croniter(spec["schedule"], last)
        due = schedule.get_next(datetime.datetime)
        while (following := schedule.get_next(datetime.datetime)) <= now:
            due = following
        if due <= now and not spec.get("suspend"):
            if not (active and spec.get("concurrencyPolicy") == "Forbid"):
                if active and spec.get("concurrencyPolicy") == "Replace":
                    for job in active:
                        await self.api.delete("Job", ns, job["metadata"]["name"])
                job = job_from_cronjob(cj, f"{name}-{int(due.timestamp()) // 60}", manual=False)
                await self.api.create(job)
            status["lastScheduleTime"] = due.strftime("%Y-%m-%dT%H:%M:%SZ")
        done = [j for j in jobs if _condition(j, "Complete")]
        if done:
            status["lastSuccessfulTime"] = max(str(j["status"].get("completionTime", "")) for j in done)
        status["active"] = [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": j["metadata"]["name"],
                "namespace": ns,
                **({"uid": j["metadata"]["uid"]} if j["metadata"].get("uid") else {}),
            }
            for j in active
        ]
        current = cj.get("status") or {}
        if any(current.get(k) != v for k, v in status.items()):
            await self.api.patch("CronJob", ns, name, {"status": status}, subresource="status")
        await self._prune(cj, jobs)

    @staticmethod
    def _parse(value: str | None) -> datetime.datetime | None:
        if not value:
            return None
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))

    async def _prune(self, cj: Mapping[str, Any], jobs: list[dict[str, Any]]) -> None:
        spec = cj.get("spec", {})
        for kind, limit in (
            ("Complete", spec.get("successfulJobsHistoryLimit", 3)),
            ("Failed", spec.get("failedJobsHistoryLimit", 1)),
        ):
            finished = sorted(
                (j for j in jobs if _condition(j, kind)),
                key=lambda j: str((j.get("status") or {}).get("completionTime") or ""),
            )
            for job in finished[: max(0, len(finished) - int(limit))]:
                await self.api.delete("Job", cj["metadata"].get("namespace"), job["metadata"]["name"])


# ------------------------------------------------------------------------------------------ volumes


class VolumeController(Controller):
    """The local storage provisioner: every PVC is bound to a directory ``<volumes>/<ns>/<claim>``
    (created by the kubelet on first mount), and a deleted PVC's directory is deleted with it
    (``reclaimPolicy: Delete``, what dynamic provisioners default to)."""

    def __init__(self, api: ClusterAPI, volumes_dir: Path) -> None:
        super().__init__(api)
        self.volumes_dir = volumes_dir

    async def sync_once(self) -> None:
        claims = await self.api.list("PersistentVolumeClaim")
        live = {(c["metadata"].get("namespace") or "default", c["metadata"]["name"]) for c in claims}
        for claim in claims:
            if (claim.get("status") or {}).get("phase") != "Bound" and not is_terminating(claim):
                spec = claim.get("spec") or {}
                await self.api.patch(
                    "PersistentVolumeClaim",
                    claim["metadata"].get("namespace"),
                    claim["metadata"]["name"],
                    {
                        "status": {
                            "phase": "Bound",
                            "accessModes": spec.get("accessModes", []),
                            "capacity": (spec.get("resources") or {}).get("requests", {}),
                        }
                    },
                    subresource="status",
                )
        if not self.volumes_dir.exists():
            return
        for ns_dir in self.volumes_dir.iterdir():
            for claim_dir in ns_dir.iterdir():
                if (ns_dir.name, claim_dir.name) not in live:
                    log.info("reclaiming volume %s/%s", ns_dir.name, claim_dir.name)
                    shutil.rmtree(claim_dir, ignore_errors=True)
