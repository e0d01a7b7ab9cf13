"""The KVCache's status and the Events its changes produce: pure functions of what a control pass
observed (the engine pods as their kubelet reports them, the backup Jobs, the engines' last two
scrapes, the decisions with their drain outcome, the previous status). Nothing here calls an API.

Conditions (types in ``api.CONDITION_TYPES``) follow metav1.Condition: ``lastTransitionTime``
moves only when ``status`` flips, ``observedGeneration`` is the generation they describe.

* ``Ready``: every desired engine is ready on the current template.
* ``Progressing``: a rollout, a scale or a first start is under way; False with reason
  ``EnginesFailing`` when every engine that is not ready is failing (nothing is progressing), and
  ``ReconcilePaused`` while the pause annotation is set.
* ``Degraded``: True with the most severe problem as its reason and every problem in the message
  (``; ``-separated), in this order:

  1. an engine cannot start or crash-loops: the engine's own reason, read from its container's
     termination message (``<Reason>: <detail>``, written by ``kvcache-engine serve``:
     ``PoolAllocationFailed``, ``CudaUnavailable``, ``InvalidConfig``, ``ListenFailed``, ...), else
     the kubelet's (``OOMKilled``, ``CrashLoopBackOff``, ``CreateContainerConfigError``,
     ``Unschedulable``, ...); ``EngineRestarted`` for an engine back from a single failure that has
     not started yet. The restart counts are in the message and in ``status.restarts``;
  2. ``CudaUnavailable``: an engine serves from the CPU although the spec gives it a GPU;
  3. ``PersistFailed``: an engine's persists fail (``kvcache_persist_failures_total``), until one
     succeeds;
  4. ``BackupFailed``: the latest finished backup Job failed;
  5. ``DrainFailed``: the last scale-in could not hand some replicas' blocks over (held for
     ``DRAIN_FAILURE_HOLD_S`` or until the next scale decision);
  6. ``ScrapeFailed``: a ready engine did not answer its scrape.

``phase``: ``Failed`` when engines are wanted, none is ready and every engine pod is failing
(nothing can serve); ``Degraded`` when Degraded is True; else ``Ready``, ``Pending`` (no
StatefulSet yet) or ``Progressing``. ``invalid_spec_status`` is the status of a spec the operator
refuses (Degraded/InvalidSpec, nothing changed).

``events`` compares two statuses and returns the Events of what changed: a Degraded transition
(Warning with its reason; ``Recovered`` when it clears), the phase turning ``Failed``, an engine's
restart count going up (``EngineRestarted``), a new failed backup Job: once per transition, never
once per pass.

Printer-column fields come from the engines: ``readyReplicas``, ``hitRate``, ``memoryPressure``,
``codec`` and ``achievedCompressionRatio`` (from their ``/metrics``), ``restarts`` (their kubelet).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvcache_engine.contract import WARM_GATE, EngineStats
from kvcache_operator import api, policy, resources

if TYPE_CHECKING:
    from kvcache_operator.scrape import Observation, Scrape

Manifest = dict[str, Any]
MAX_DECISIONS = 20  # api.KVCacheStatus.decisions' maxItems
ENGINE_CONTAINER = "engine"
DRAIN_FAILURE_HOLD_S = 600.0
MAX_MESSAGE_CHARS = 2000  # a condition's message (the API allows 32 KiB; keep `kubectl describe` readable)
MAX_EVENT_CHARS = 1000  # an Event's message (the API caps it at 1 KiB)

# Degraded reasons of the operator's own (engines' reasons come from their termination messages).
ENGINE_RESTARTED = "EngineRestarted"
CRASH_LOOP = "CrashLoopBackOff"
CUDA_UNAVAILABLE = "CudaUnavailable"
PERSIST_FAILED = "PersistFailed"
BACKUP_FAILED = "BackupFailed"
DRAIN_FAILED = "DrainFailed"
SCRAPE_FAILED = "ScrapeFailed"
INVALID_SPEC = "InvalidSpec"

# Waiting reasons that mean the container cannot start (ContainerCreating, PodInitializing do not).
FAILED_WAITING = frozenset(
    {
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "RunContainerError",
    }
)
# "<Reason>: <detail>" on one line: what `kvcache-engine serve` writes as its termination message.
_ENGINE_REASON = re.compile(r"([A-Z][A-Za-z0-9]{2,63}): (\S.*)")


# --- pods ------------------------------------------------------------------------------------------


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """Ready condition True, an IP, and not terminating."""
    status = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def awaiting_warm_join(pod: Mapping[str, Any]) -> bool:
    """A pod whose engine is up (containers ready: loaded) but not yet let in by the operator:
    it carries the readiness gate ``WARM_GATE`` and that condition is not True."""
    status = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp") or not status.get("podIP"):
        return False
    gates = {g.get("conditionType") for g in (pod.get("spec") or {}).get("readinessGates") or []}
    if WARM_GATE not in gates:
        return False
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return conditions.get("ContainersReady") == "True" and conditions.get(WARM_GATE) != "True"


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


@dataclass(frozen=True)
class EngineHealth:
    """One engine pod as its kubelet reports it. ``reason`` is set when the engine is failing
    (cannot start, crash-loops, cannot be scheduled); ``message`` then names the pod and says why."""

    pod: str
    ready: bool
    restarts: int = 0
    reason: str | None = None
    message: str = ""

    @property
    def failing(self) -> bool:
        return self.reason is not None


def engine_health(pod: Mapping[str, Any]) -> EngineHealth:
    """Why an engine pod does not serve, if it is failing (see the module docstring, problem 1).

    A container that is running after a failure but has not passed its startup probe yet is still
    failing (the reason of its last termination): a crash loop alternates between the back-off and
    such short runs, and the KVCache must not flap between them."""
    name = str(pod["metadata"]["name"])
    status = pod.get("status") or {}
    container = _engine_container(status)
    restarts = int(container.get("restartCount") or 0)
    ready = pod_ready(pod)
    if ready or pod["metadata"].get("deletionTimestamp"):
        return EngineHealth(name, ready, restarts)
    scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    if scheduled is not None and scheduled.get("status") == "False":
        reason = str(scheduled.get("reason") or "Unschedulable")
        return EngineHealth(name, False, restarts, reason, f"{name}: {scheduled.get('message') or reason}")
    state = container.get("state") or {}
    waiting = state.get("waiting") or {}
    terminated = state.get("terminated") or {}
    last = (container.get("lastState") or {}).get("terminated") or {}
    if terminated and terminated.get("exitCode", 0) != 0:
        return _failed(name, restarts, terminated)
    if last and last.get("exitCode", 0) != 0:
        restarting = "running" in state and not container.get("started")
        if waiting.get("reason") == CRASH_LOOP or restarting:
            return _failed(name, restarts, last)
    if waiting.get("reason") in FAILED_WAITING:
        reason = str(waiting["reason"])
        return EngineHealth(name, False, restarts, reason, f"{name}: {waiting.get('message') or reason}")
    return EngineHealth(name, False, restarts)


def _engine_container(status: Mapping[str, Any]) -> Mapping[str, Any]:
    containers = status.get("containerStatuses") or []
    return next(
        (c for c in containers if c.get("name") == ENGINE_CONTAINER), containers[0] if containers else {}
    )


def _failed(pod: str, restarts: int, terminated: Mapping[str, Any]) -> EngineHealth:
    """A failed run: the engine's reason from its termination message, else the kubelet's."""
    code = terminated.get("exitCode")
    text = str(terminated.get("message") or "").strip()
    own = _ENGINE_REASON.fullmatch(text) if "\n" not in text else None
    counted = f"exit code {code}, {restarts} restart{'' if restarts == 1 else 's'}"
    if own is not None:
        return EngineHealth(
            pod, False, restarts, own.group(1), f"{pod}: {_cut(own.group(2), 600)} ({counted})"
        )
    if terminated.get("reason") == "OOMKilled":
        reason = "OOMKilled"
    else:
        reason = CRASH_LOOP if restarts >= 2 else ENGINE_RESTARTED
    signal = f" (signal {code - 128})" if isinstance(code, int) and code > 128 else ""
    last_line = text.splitlines()[-1].strip() if text else ""
    output = f"; last output: {_cut(last_line, 200)}" if last_line else ""
    return EngineHealth(pod, False, restarts, reason, f"{pod}: the engine exited{signal}{output} ({counted})")


# --- engine-reported problems ----------------------------------------------------------------------


@dataclass(frozen=True)
class Scraped:
    """The engines' stats of this pass's scrape and of the one before (pods that answered), and the
    ready pods that did not answer."""

    now: Mapping[str, EngineStats] = field(default_factory=dict)
    before: Mapping[str, EngineStats] = field(default_factory=dict)
    failed: tuple[str, ...] = ()


def scraped(previous: Scrape | None, current: Scrape) -> Scraped:
    """Scraped from two consecutive scrapes (``scrape.Scrape``)."""

    def stats(scrape: Scrape | None) -> dict[str, EngineStats]:
        pods = scrape.pods.items() if scrape is not None else ()
        return {name: pod.stats for name, pod in pods if pod.ok and pod.stats is not None}

    return Scraped(stats(current), stats(previous), tuple(current.failed))


def _restarted(before: EngineStats, now: EngineStats) -> bool:
    """A counter that went down: the engine restarted between the two scrapes."""
    return any(
        getattr(now, name) < getattr(before, name)
        for name in ("persists", "persist_failures", "requests", "hits")
    )


def persist_failures(
    now: Mapping[str, EngineStats], before: Mapping[str, EngineStats], was_failing: Collection[str]
) -> dict[str, str]:
    """Pod -> message, for the engines whose persists fail now.

    Failures without a success since the previous scrape: failing; successes without a failure:
    recovered; neither (no persist ran) or both: as before (``was_failing``, from the status), so a
    persist interval longer than the scrape interval does not make the condition flap."""
    out: dict[str, str] = {}
    for pod, stats in sorted(now.items()):
        prev = before.get(pod)
        if prev is not None and _restarted(prev, stats):
            prev = None  # its counters start from zero again
        failed = stats.persist_failures - (prev.persist_failures if prev else 0.0)
        succeeded = stats.persists - (prev.persists if prev else 0.0)
        failing = pod in was_failing if (failed > 0) == (succeeded > 0) else failed > 0
        if failing:
            reasons = ", ".join(f"{r}: {n:g}" for r, n in sorted(stats.persist_failures_by_reason.items()))
            detail = f" ({reasons})" if reasons else ""
            out[pod] = (
                f"{pod}: persists to its volume fail{detail}; {stats.persist_failures:g} since it started"
            )
    return out


def cuda_fallbacks(kvc: api.KVCache, now: Mapping[str, EngineStats]) -> dict[str, str]:
    """Pod -> message, for engines given a GPU that report serving from the CPU."""
    if not api.pool_on_gpu(kvc.spec):
        return {}
    return {
        pod: f"{pod}: serves from the CPU although it has {kvc.spec.resources.gpus} GPU(s): the engine "
        "found no usable CUDA device (its log says why)"
        for pod, stats in sorted(now.items())
        if stats.device == "cpu"
    }


def drain_failures(decisions: Sequence[Mapping[str, Any]], now: str) -> list[str]:
    """The leaving replicas the last Scale decision could not drain (``drainFailures``), while that
    decision is younger than DRAIN_FAILURE_HOLD_S."""
    last = next((d for d in reversed(decisions) if d.get("kind") == "Scale"), None)
    if last is None or not last.get("drainFailures"):
        return []
    made, at = _parse_time(last.get("time")), _parse_time(now)
    if made is not None and at is not None and at - made > DRAIN_FAILURE_HOLD_S:
        return []
    return [str(f) for f in last["drainFailures"]]


def backup_record(jobs: Sequence[Mapping[str, Any]]) -> Manifest | None:
    """The latest finished backup Job as ``status.lastBackup`` (None when none finished)."""
    finished = []
    for job in jobs:
        if ((job.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component") == "restore":
            continue  # a kubectl kvcache restore Job, not a backup
        status = job.get("status") or {}
        failed = next(
            (
                c
                for c in status.get("conditions") or []
                if c.get("type") == "Failed" and c.get("status") == "True"
            ),
            None,
        )
        if status.get("succeeded"):
            finished.append((status.get("completionTime") or "", None, job))
        elif failed is not None:
            failed_at = max((c.get("lastTransitionTime") or "" for c in status["conditions"]), default="")
            finished.append((failed_at, failed, job))
    if not finished:
        return None
    when, failed, job = max(finished, key=lambda item: item[0])
    record: Manifest = {"time": when or None, "succeeded": failed is None, "job": job["metadata"]["name"]}
    if failed is not None:  # a None would delete the key in a merge patch: leave it out instead
        why = ": ".join(str(failed[k]) for k in ("reason", "message") if failed.get(k))
        record["message"] = f"{why or 'the backup Job failed'}; see its pod logs"
    return record


# --- conditions ------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Problem:
    """One reason the KVCache is degraded."""

    reason: str
    message: str


def problems(
    *,
    kvc: api.KVCache,
    engines: Sequence[EngineHealth],
    persisting: Mapping[str, str],
    scraped: Scraped | None,
    last_backup: Mapping[str, Any] | None,
    drain: Sequence[str],
) -> list[Problem]:
    """Every current problem, most severe first (the order of the module docstring)."""
    found = [Problem(str(e.reason), e.message) for e in engines if e.failing]
    now = scraped.now if scraped is not None else {}
    found += [Problem(CUDA_UNAVAILABLE, m) for m in cuda_fallbacks(kvc, now).values()]
    found += [Problem(PERSIST_FAILED, m) for m in persisting.values()]
    if last_backup is not None and last_backup.get("succeeded") is False:
        found.append(
            Problem(BACKUP_FAILED, f"backup Job {last_backup.get('job')}: {last_backup.get('message')}")
        )
    if drain:
        found.append(
            Problem(
                DRAIN_FAILED,
                "the last scale-in could not hand blocks over (stopped, the replicas stay, unless "
                "spec.autoscaling.scaleInOnDrainFailure): " + "; ".join(drain),
            )
        )
    if scraped is not None and scraped.failed:
        found.append(Problem(SCRAPE_FAILED, f"no metrics from {', '.join(scraped.failed)}"))
    return found


# --- the whole status ------------------------------------------------------------------------------


def build_status(
    *,
    kvc: api.KVCache,
    generation: int,
    desired: int,
    statefulset: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    rolling: bool,
    paused: bool,
    effective_config: Mapping[str, Any] | None,
    observation: Observation | None,
    decisions: Sequence[Mapping[str, Any]],
    last_backup: Mapping[str, Any] | None,
    previous: Mapping[str, Any],
    now: str,
    scraped: Scraped | None = None,
) -> Manifest:
    """The whole status (camelCase) for one reconcile or control pass. ``scraped``: this pass's
    scrape and the one before; a pass that did not scrape passes the last scrape as both
    (``scraped(last, last)``: nothing changed since), and None (no scrape yet) leaves the
    engine-reported fields as they were."""
    endpoints = ready_endpoints(pods)
    ready = len(endpoints)
    prev_conditions = previous.get("conditions") or []

    def cond(ctype: str, value: bool | None, reason: str, message: str) -> Manifest:
        return condition(
            ctype, value, reason, message, generation=generation, previous=prev_conditions, now=now
        )

    live_pods = sorted(
        (p for p in pods if not p["metadata"].get("deletionTimestamp")), key=lambda p: p["metadata"]["name"]
    )
    engines = [engine_health(p) for p in live_pods]
    failing = [e for e in engines if e.failing]
    was_failing = {str(e.get("name")) for e in previous.get("engines") or [] if e.get("persistFailing")}
    persisting = (
        persist_failures(scraped.now, scraped.before, was_failing)
        if scraped is not None
        else {e.pod: f"{e.pod}: persists to its volume fail" for e in engines if e.pod in was_failing}
    )
    found = problems(
        kvc=kvc,
        engines=engines,
        persisting=persisting,
        scraped=scraped,
        last_backup=last_backup,
        drain=drain_failures(decisions, now),
    )
    stalled = bool(failing) and all(e.ready or e.failing for e in engines)
    is_ready = not rolling and ready >= desired
    if paused:
        progressing = cond(
            "Progressing",
            False,
            "ReconcilePaused",
            "annotation kvcache.dev/reconcile: paused; children are not touched",
        )
    elif stalled and ready < desired:
        progressing = cond(
            "Progressing",
            False,
            "EnginesFailing",
            f"{ready}/{desired} engines ready; {len(failing)} failing (see Degraded)",
        )
    else:
        progressing = cond(
            "Progressing",
            rolling or ready != desired,
            "RollingOut" if rolling else ("Scaling" if ready != desired else "Stable"),
            f"{ready}/{desired} engines ready",
        )
    degraded = cond(
        "Degraded",
        bool(found),
        found[0].reason if found else "AsExpected",
        _cut("; ".join(p.message for p in found), MAX_MESSAGE_CHARS),
    )
    ready_reason = ("Hibernating" if desired == 0 else "EnginesReady") if is_ready else "EnginesNotReady"
    status: Manifest = {
        "phase": _phase(
            desired=desired,
            ready=ready,
            engines=engines,
            found=found,
            statefulset=statefulset,
            is_ready=is_ready,
        ).value,
        "conditions": [
            cond("Ready", is_ready, ready_reason, f"{ready}/{desired} engines ready"),
            progressing,
            degraded,
            _backup_condition(cond, last_backup),
            _autoscaling_condition(cond, kvc),
            _restart_condition(cond, statefulset, live_pods),
        ],
        "replicas": int(((statefulset or {}).get("status") or {}).get("replicas") or len(pods)),
        "readyReplicas": ready,
        "restarts": sum(e.restarts for e in engines),
        "engines": [_engine_record(e, e.pod in persisting) for e in engines],
        "selector": resources.selector_string(kvc.name),
        "endpoints": list(endpoints.values()),
        "decisions": list(decisions)[-MAX_DECISIONS:],
        "observedGeneration": generation,
    }
    if effective_config is not None:
        status["effectiveConfig"] = dict(effective_config)
    if observation is not None:
        status["memoryPressure"] = round(observation.sample.memory_pressure, 4)
        if observation.sample.hit_rate is not None:
            status["hitRate"] = round(observation.sample.hit_rate, 4)
        status.update(_predicted(kvc, observation.sample, desired))
    if scraped is not None and scraped.now:
        status.update(_reported_storage(scraped.now))
        status["missesByReason"] = _misses_by_reason(scraped.now)
    if last_backup is not None:
        status["lastBackup"] = dict(last_backup)
    return status


def _phase(
    *,
    desired: int,
    ready: int,
    engines: Sequence[EngineHealth],
    found: Sequence[Problem],
    statefulset: Mapping[str, Any] | None,
    is_ready: bool,
) -> api.Phase:
    if desired > 0 and ready == 0 and engines and all(e.failing for e in engines):
        return api.Phase.FAILED  # nothing can serve
    if found:
        return api.Phase.DEGRADED
    if is_ready:
        return api.Phase.READY
    return api.Phase.PENDING if statefulset is None else api.Phase.PROGRESSING


def _backup_condition(cond: Any, last_backup: Mapping[str, Any] | None) -> Manifest:
    if last_backup is None:
        return dict(cond("BackupSucceeded", None, "NoBackupYet", ""))
    ok = bool(last_backup.get("succeeded"))
    return dict(cond("BackupSucceeded", ok, "Succeeded" if ok else "Failed", f"job {last_backup.get('job')}"))


REVISION_LABEL = "controller-revision-hash"


def _restart_condition(
    cond: Any, statefulset: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]
) -> Manifest:
    """RestartPending: engines still run an older pod template (a non-live field or the image
    changed; live fields never change the template). True until every pod has rolled."""
    update = ((statefulset or {}).get("status") or {}).get("updateRevision")
    stale = sorted(
        p["metadata"]["name"]
        for p in pods
        if update and (p["metadata"].get("labels") or {}).get(REVISION_LABEL) != update
    )
    if not stale:
        return dict(cond("RestartPending", False, "UpToDate", "every engine runs the current pod template"))
    message = (
        f"{len(stale)}/{len(pods)} engines run an older pod template (a field that needs a restart "
        f"changed); they restart one by one: {', '.join(stale)}"
    )
    return dict(cond("RestartPending", True, "PodTemplateChanged", _cut(message, MAX_MESSAGE_CHARS)))


def _autoscaling_condition(cond: Any, kvc: api.KVCache) -> Manifest:
    scaling = kvc.spec.autoscaling
    bounds = f"{scaling.min_replicas}..{scaling.max_replicas} replicas"
    return dict(cond("Autoscaling", scaling.mode != api.Mode.OFF, f"Mode{scaling.mode.value}", bounds))


def _engine_record(engine: EngineHealth, persist_failing: bool) -> Manifest:
    record: Manifest = {"name": engine.pod, "ready": engine.ready, "restarts": engine.restarts}
    if engine.reason is not None:
        record["reason"] = engine.reason
        record["message"] = engine.message
    if persist_failing:
        record["persistFailing"] = True
    return record


def _predicted(kvc: api.KVCache, sample: policy.Sample, replicas: int) -> Manifest:
    """What the engines' merged miss-ratio curve predicts now, and the capacity it recommends
    (once the curve has its samples); nothing when not every ready engine reports a curve."""
    plan = policy.plan_capacity(kvc.spec.autoscaling, sample, replicas)
    if plan is None:
        return {}
    out: Manifest = {
        "predictedHitRate": round(plan.predicted_hit_rate, 4),
        "predictedCeiling": round(plan.ceiling, 4),
    }
    if not plan.warming_up:
        out["recommendedCapacity"] = round(plan.recommended_capacity_blocks)
    return out


def _misses_by_reason(now: Mapping[str, EngineStats]) -> dict[str, float]:
    """Blocks missed per reason, summed over the engines (cumulative since each started)."""
    total: dict[str, float] = {}
    for stats in now.values():
        for reason, blocks in stats.misses_by_reason.items():
            total[reason] = total.get(reason, 0.0) + blocks
    return {reason: round(blocks) for reason, blocks in sorted(total.items())}


def _reported_storage(now: Mapping[str, EngineStats]) -> Manifest:
    """The codec(s) the engines report storing with and their mean achieved compression ratio."""
    codecs = sorted({s.codec for s in now.values() if s.codec})
    out: Manifest = {
        "achievedCompressionRatio": round(sum(s.compression_ratio for s in now.values()) / len(now), 4)
    }
    if codecs:
        out["codec"] = ",".join(codecs)
    return out


def invalid_spec_status(previous: Mapping[str, Any], message: str, *, generation: int, now: str) -> Manifest:
    """The status of a spec the operator refuses: Degraded/InvalidSpec naming the field, Ready False,
    the other conditions and fields as they were (nothing was changed)."""
    conditions = previous.get("conditions") or []

    def cond(ctype: str, value: bool, text: str) -> Manifest:
        return condition(
            ctype, value, INVALID_SPEC, text, generation=generation, previous=conditions, now=now
        )

    kept = [c for c in conditions if c.get("type") not in ("Degraded", "Ready")]
    return {
        "phase": api.Phase.DEGRADED.value,
        "conditions": [
            cond("Ready", False, "the spec is invalid; nothing was changed"),
            cond("Degraded", True, message),
            *kept,
        ],
    }


# --- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """An Event to post on the KVCache (``warning``: type Warning, else Normal)."""

    reason: str
    message: str
    warning: bool = True


def events(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[Event]:
    """The Events of what changed from ``previous`` to ``current`` status (one per transition; at
    most one per reason)."""
    found: list[Event] = []
    before, after = _find(previous, "Degraded"), _find(current, "Degraded")
    if after.get("status") == "True" and (before.get("status"), before.get("reason")) != (
        "True",
        after.get("reason"),
    ):
        found.append(Event(str(after.get("reason")), str(after.get("message"))))
    elif after.get("status") == "False" and before.get("status") == "True":
        found.append(Event("Recovered", f"no longer degraded (was {before.get('reason')})", warning=False))
    if current.get("phase") == api.Phase.FAILED.value and previous.get("phase") != api.Phase.FAILED.value:
        found.append(
            Event("Failed", f"no engine can serve: {after.get('message') or 'every engine is failing'}")
        )
    found += _restart_events(previous, current)
    backup, old_backup = current.get("lastBackup") or {}, previous.get("lastBackup") or {}
    if backup.get("succeeded") is False and backup.get("job") != old_backup.get("job"):
        found.append(Event(BACKUP_FAILED, f"backup Job {backup.get('job')}: {backup.get('message')}"))
    unique: dict[str, Event] = {}
    for event in found:
        unique.setdefault(
            event.reason, Event(event.reason, _cut(event.message, MAX_EVENT_CHARS), event.warning)
        )
    return list(unique.values())


def _restart_events(previous: Mapping[str, Any], current: Mapping[str, Any]) -> list[Event]:
    """An engine whose restart count went up since the previous status (not on the first status
    that lists engines: the counts before it are unknown)."""
    if "engines" not in previous:
        return []
    counts = {str(e.get("name")): int(e.get("restarts") or 0) for e in previous.get("engines") or []}
    restarted = [
        e
        for e in current.get("engines") or []
        if int(e.get("restarts") or 0) > counts.get(str(e.get("name")), 0)
    ]
    if not restarted:
        return []
    details = [
        f"{e['name']} ({e['restarts']} restart{'' if e['restarts'] == 1 else 's'}"
        + (f"; {e['reason']}" if e.get("reason") else "")
        + ")"
        for e in restarted
    ]
    return [Event(ENGINE_RESTARTED, "engine restarted: " + ", ".join(details))]


def _find(status: Mapping[str, Any], ctype: str) -> Mapping[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), {})


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_time(text: Any) -> float | None:
    try:
        when = datetime.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None
    return when.replace(tzinfo=datetime.UTC).timestamp()


# --- restores -----------------------------------------------------------------------------------------


def restore_records(
    pods: Sequence[Mapping[str, Any]], previous: Sequence[Mapping[str, Any]] | None
) -> list[Manifest]:
    """``status.restored``: per engine pod, what its restore init container reported in its
    termination message (the JSON of ``kvcache-engine restore --to-dir``). A record of a restore
    is kept when the pod is later recreated over its now non-empty volume (that run only skips)."""
    records: dict[str, Manifest] = {str(r["pod"]): dict(r) for r in previous or () if r.get("pod")}
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name")
        found = next(
            (
                s
                for s in (pod.get("status") or {}).get("initContainerStatuses") or []
                if s.get("name") == resources.RESTORE_CONTAINER
            ),
            None,
        )
        if not name or found is None:
            continue
        term = (found.get("state") or {}).get("terminated") or (found.get("lastState") or {}).get(
            "terminated"
        )
        if not term:
            continue
        record = _restore_record(str(name), term)
        if "backup" in record or str(name) not in records:
            records[str(name)] = record
    return [records[k] for k in sorted(records)]


def _restore_record(pod: str, term: Mapping[str, Any]) -> Manifest:
    text = str(term.get("message") or "")
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    if term.get("exitCode", 0) != 0:
        why = text.strip().splitlines()[-1] if text.strip() else f"exit code {term.get('exitCode')}"
        return {"pod": pod, "message": f"restore failed: {why[:500]}", "time": term.get("finishedAt")}
    if "skipped" in doc:
        return {"pod": pod, "message": str(doc["skipped"]), "time": term.get("finishedAt")}
    record: Manifest = {"pod": pod}
    for key in ("backup", "source", "time"):
        if isinstance(doc.get(key), str):
            record[key] = doc[key]
    if isinstance(doc.get("blocks_verified"), int):
        record["blocksVerified"] = doc["blocks_verified"]
    return record
