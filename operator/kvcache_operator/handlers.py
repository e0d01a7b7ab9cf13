"""Every Kopf decorator of the operator: thin, typed, delegating.

Two entry points act on a KVCache, serialised by one lock per cache:

* ``reconcile_handler`` (create/update/resume): build the children (``resources``), plan
  (``reconcile.plan``), apply through ``k8s``, push live config to ready engines, write status;
* ``control_loop`` (a daemon per KVCache, the scrape timer): every ``spec.metrics.scrapeInterval``
  (±10 % jitter) scrape the ready engines, keep the samples, ask ``policy`` for decisions, record
  each one (status + Event) and, in ``Auto``, apply it (drain, then scale; or retune live).

The annotation ``kvcache.dev/reconcile: paused`` stops every write to children and engines (status
still reports, with Progressing=False/ReconcilePaused); ``spec.replicas: 0`` hibernates (the
StatefulSet goes to zero, its PVCs stay). Clients, metrics and per-cache state live in ``memo``
(created at startup, never at import).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import os
import random
import re
import time
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import kopf

from kvcache_engine.contract import LiveConfig
from kvcache_operator import api, k8s, policy, reconcile, resources, scrape
from kvcache_operator import status as status_mod
from kvcache_operator.metrics import OperatorMetrics

GROUP, PLURAL = api.GROUP, api.PLURAL
STATEFULSET = k8s.CHILD_KINDS["StatefulSet"]
SECRET = k8s.CHILD_KINDS["Secret"]
Logger = logging.Logger | logging.LoggerAdapter[Any]
SAMPLE_HISTORY_S = 4 * 3600  # longest stabilization window the policy may look back over


@dataclass
class CacheState:
    """What the operator remembers about one KVCache between passes (rebuilt from status on restart)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    samples: deque[policy.Sample] = field(default_factory=deque)
    last_scrape: scrape.Scrape | None = None
    observation: scrape.Observation | None = None
    last_scale_s: float | None = None
    last_tune_s: float | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    reported: dict[str, Any] | None = None  # the last status written: Events are its transitions


def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings: our own annotation names, watch timeouts (a dead stream is replaced, never
    waited on forever), bounded API request time."""
    settings.persistence.finalizer = "kvcache.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvcache.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kvcache.dev", key="last-handled-configuration"
    )
    settings.watching.server_timeout = int(os.environ.get("KVCACHE_OPERATOR_WATCH_TIMEOUT_S", "300"))
    settings.watching.client_timeout = settings.watching.server_timeout + 30
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.posting.level = logging.INFO


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()


def parse_duration(text: str) -> float:
    """'30s', '500ms', '2m', '1h' -> seconds (api.DURATION_PATTERN)."""
    match = re.fullmatch(r"([0-9]+)(ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"spec.metrics.scrapeInterval: expected e.g. '30s', got {text!r}")
    value, unit = int(match.group(1)), match.group(2)
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


# --- lifecycle -----------------------------------------------------------------------------------


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, logger: Logger, **_: Any) -> None:
    configure(settings)
    info = kopf.login_via_client(logger=logger, settings=settings)
    if info is None:
        raise kopf.PermanentError("no Kubernetes credentials (KUBECONFIG or in-cluster)")
    memo.kube = k8s.KubeClient.connect(info)
    memo.http = aiohttp.ClientSession()
    memo.caches = {}
    memo.metrics = OperatorMetrics()
    port = memo.get("metrics_port")
    memo.metrics_server = memo.metrics.serve(int(port)) if port else None


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    await memo.kube.close()
    await memo.http.close()
    if memo.get("metrics_server") is not None:
        memo.metrics_server.shutdown()


def cache_state(memo: Any, body: Mapping[str, Any]) -> CacheState:
    """The per-cache state, restoring the last change times from status.decisions after a restart."""
    uid = body["metadata"]["uid"]
    state: CacheState | None = memo.caches.get(uid)
    if state is None:
        state = CacheState(decisions=list((body.get("status") or {}).get("decisions") or []))
        for decision in state.decisions:
            when = _parse_time(decision.get("time"))
            if decision.get("kind") == "Scale":
                state.last_scale_s = when
            elif decision.get("kind") == "Tune":
                state.last_tune_s = when
        memo.caches[uid] = state
        memo.metrics.caches.set(len(memo.caches))
    return state


# --- reconcile -----------------------------------------------------------------------------------


@kopf.on.resume(GROUP, PLURAL)
@kopf.on.create(GROUP, PLURAL)
@kopf.on.update(GROUP, PLURAL)
async def reconcile_handler(body: kopf.Body, memo: Any, logger: Logger, diff: kopf.Diff, **_: Any) -> None:
    changed = {path[2] for _, path, _, _ in diff if len(path) > 2 and path[:2] == ("spec", "cache")}
    state = cache_state(memo, body)
    started = time.perf_counter()
    async with state.lock:
        try:
            await converge(dict(body), memo, state, logger, reset=changed)
        except api.SpecError as exc:
            memo.metrics.reconciles.labels("invalid").inc()
            raise kopf.PermanentError(str(exc)) from exc
        except (k8s.ApiError, aiohttp.ClientError, TimeoutError) as exc:
            memo.metrics.reconciles.labels("error").inc()
            memo.metrics.errors.labels("reconcile").inc()
            raise kopf.TemporaryError(f"API error: {exc}", delay=5) from exc
    memo.metrics.reconciles.labels("ok").inc()
    memo.metrics.reconcile_seconds.observe(time.perf_counter() - started)


@kopf.on.delete(GROUP, PLURAL, optional=True)
async def forget(body: kopf.Body, memo: Any, **_: Any) -> None:
    """Children go by garbage collection (owner references); only our memory needs clearing."""
    memo.caches.pop(body["metadata"]["uid"], None)
    memo.metrics.caches.set(len(memo.caches))


async def converge(
    body: dict[str, Any],
    memo: Any,
    state: CacheState,
    logger: Logger,
    *,
    reset: Collection[str] = (),
    observation: scrape.Observation | None = None,
    scraped: status_mod.Scraped | None = None,
) -> None:
    """One level-based pass: children, live config, status (and the Events of its transitions).
    Raises api.SpecError on an invalid spec after writing Degraded (and touching no child)."""
    kube: k8s.KubeClient = memo.kube
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    previous = body.get("status") or {}
    try:
        kvc = api.parse_kvcache(body)
    except api.SpecError as exc:
        await _write_degraded(kube, body, str(exc))
        raise
    observed = await _observe_children(kube, namespace, name)
    sts = next((o for o in observed.get("StatefulSet", []) if o["metadata"]["name"] == name), None)
    tuned = reconcile.live_overrides(kvc.spec, previous.get("effectiveConfig")).given()
    overrides = LiveConfig.model_validate({k: v for k, v in tuned.items() if k not in reset})
    replicas = reconcile.desired_replicas(kvc.spec, sts)
    config = resources.engine_config(kvc, overrides)
    paused = reconcile.is_paused(meta)
    touched_sts = False
    if not paused:
        owner = reconcile.owner_reference(body)
        desired = [
            reconcile.with_owner(child, owner)
            for child in resources.build_children(kvc, replicas=replicas, live_overrides=overrides)
        ]
        for action in reconcile.plan(desired, observed, meta["uid"]):
            logger.info(f"{action.verb} {action.kind} {action.name}: {action.reason}")
            result = await _apply(kube, namespace, action)
            memo.metrics.actions.labels(action.verb, action.kind).inc()
            if action.kind == "StatefulSet" and action.verb != "delete":
                sts, touched_sts = result or sts, True
    pods = await kube.list(k8s.PODS, namespace, resources.selector_string(name)) or []
    token = await _token(kube, kvc)
    if not paused:
        await _push_live_config(memo.http, pods, LiveConfig.of(config), token, logger)
    backup_selector = ",".join(f"{k}={v}" for k, v in resources.selector_labels(name, "backup").items())
    jobs = await kube.list(k8s.JOBS, namespace, backup_selector) if kvc.spec.backup.enabled else []
    new_status = status_mod.build_status(
        kvc=kvc,
        generation=int(meta.get("generation") or 1),
        desired=replicas,
        statefulset=sts,
        pods=pods,
        rolling=touched_sts or reconcile.rolling_out(sts),
        paused=paused,
        effective_config=config.to_file_dict(),
        observation=observation,
        scraped=scraped,
        decisions=state.decisions,
        last_backup=status_mod.backup_record(jobs or []),
        previous=previous,
        now=_now(),
    )
    await kube.patch(k8s.KVCACHES, namespace, name, {"status": new_status}, subresource="status")
    for event in status_mod.events(state.reported if state.reported is not None else previous, new_status):
        post = kopf.warn if event.warning else kopf.info
        post(cast(kopf.Body, body), reason=event.reason, message=event.message)
    state.reported = new_status


async def _write_degraded(kube: k8s.KubeClient, body: Mapping[str, Any], message: str) -> None:
    meta = body["metadata"]
    generation = int(meta.get("generation") or 1)
    status = status_mod.invalid_spec_status(
        body.get("status") or {}, message, generation=generation, now=_now()
    )
    patch = {"status": status}
    await kube.patch(k8s.KVCACHES, meta["namespace"], meta["name"], patch, subresource="status")


async def _observe_children(
    kube: k8s.KubeClient, namespace: str, name: str
) -> dict[str, list[dict[str, Any]]]:
    """Children of every kind, listed by the instance label (kinds not installed are skipped)."""
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/managed-by=kvcache-operator"
    kinds = list(k8s.CHILD_KINDS.values())
    listed = await asyncio.gather(*(kube.list(kind, namespace, selector) for kind in kinds))
    return {kind.kind: objs for kind, objs in zip(kinds, listed, strict=True) if objs}


async def _apply(kube: k8s.KubeClient, namespace: str, action: reconcile.Action) -> dict[str, Any] | None:
    """Apply one action; 409 on create (someone else created it) and 404 on patch (it vanished)
    are normal and converge by switching verb."""
    kind = k8s.CHILD_KINDS[action.kind]
    if action.verb == "delete":
        await kube.delete(kind, namespace, action.name)
        return None
    assert action.body is not None
    if action.verb == "create":
        try:
            return await kube.create(kind, action.body)
        except k8s.ConflictError:
            annotations = action.body["metadata"].get("annotations") or {}
            if annotations.get(resources.CREATE_ONLY_ANNOTATION) == "true":
                return None
    result = await kube.patch(kind, namespace, action.name, action.body)
    return result if result is not None else await kube.create(kind, action.body)


async def _token(kube: k8s.KubeClient, kvc: api.KVCache) -> str | None:
    secret = await kube.get(SECRET, kvc.namespace, resources.token_secret_name(kvc))
    value = ((secret or {}).get("data") or {}).get(kvc.spec.auth.secret_key)
    return base64.b64decode(value).decode() if value else None


async def _push_live_config(
    http: aiohttp.ClientSession,
    pods: Sequence[Mapping[str, Any]],
    desired: LiveConfig,
    token: str | None,
    logger: Logger,
) -> None:
    """Send every ready engine the live fields that differ (no restart); failures are logged."""

    async def push(pod: str, url: str) -> None:
        try:
            sent = await scrape.push_live(http, url, desired, token=token)
            if sent:
                logger.info(f"live config applied to {pod}: {sorted(sent.to_wire())}")
        except scrape.EngineError as exc:
            logger.warning(f"live config not applied to {pod}: {exc}")

    await asyncio.gather(*(push(pod, url) for pod, url in status_mod.ready_endpoints(pods).items()))


# --- the scrape timer and the control loop -------------------------------------------------------------


@kopf.daemon(GROUP, PLURAL, cancellation_timeout=10.0)
async def control_loop(
    stopped: kopf.DaemonStopped, body: kopf.Body, memo: Any, logger: Logger, **_: Any
) -> None:
    """Scrape, decide, act, report; every scrapeInterval with jitter, until the KVCache goes."""
    while not stopped:
        try:
            interval = parse_duration(str(body["spec"].get("metrics", {}).get("scrapeInterval", "30s")))
        except ValueError:
            interval = 30.0
        await stopped.wait(interval * random.uniform(0.9, 1.1))
        if stopped:
            break
        state = cache_state(memo, body)
        try:
            async with state.lock:
                await control_pass(dict(body), memo, state, logger)
        except api.SpecError:
            continue  # reported as Degraded by the reconcile handler
        except (k8s.ApiError, aiohttp.ClientError, TimeoutError) as exc:
            memo.metrics.errors.labels("control").inc()
            logger.warning(f"control pass failed, retrying next interval: {exc}")
        except Exception:  # a supervisor loop: one bad pass must not stop scraping for good
            memo.metrics.errors.labels("control").inc()
            logger.exception("control pass crashed, retrying next interval")


async def control_pass(body: dict[str, Any], memo: Any, state: CacheState, logger: Logger) -> None:
    """One scrape + decision round, then a converge pass that reports it."""
    kube: k8s.KubeClient = memo.kube
    kvc = api.parse_kvcache(body)
    pods = await kube.list(k8s.PODS, kvc.namespace, resources.selector_string(kvc.name)) or []
    token = await _token(kube, kvc)
    interval = parse_duration(kvc.spec.metrics.scrape_interval)
    started = time.perf_counter()
    current = await scrape.scrape_all(
        memo.http, status_mod.ready_endpoints(pods), timeout_s=max(0.5, min(interval, 5.0)), token=token
    )
    memo.metrics.scrape_seconds.observe(time.perf_counter() - started)
    memo.metrics.scrape_failures.inc(len(current.failed))
    observation = scrape.observe(state.last_scrape, current)
    scraped = status_mod.scraped(state.last_scrape, current)
    state.last_scrape, state.observation = current, observation
    if observation.sample.ready_replicas > 0:  # no engine answered: no figures, never a "pressure 0"
        state.samples.append(observation.sample)
    while state.samples and state.samples[0].time_s < current.time_s - SAMPLE_HISTORY_S:
        state.samples.popleft()
    if not reconcile.is_paused(body["metadata"]):
        await _decide(body, kvc, memo, state=state, pods=pods, token=token, logger=logger)
    await converge(body, memo, state, logger, observation=observation, scraped=scraped)


async def _decide(
    body: dict[str, Any],
    kvc: api.KVCache,
    memo: Any,
    *,
    state: CacheState,
    pods: Sequence[Mapping[str, Any]],
    token: str | None,
    logger: Logger,
) -> None:
    kube: k8s.KubeClient = memo.kube
    sts = await kube.get(STATEFULSET, kvc.namespace, kvc.name)
    rolling = reconcile.rolling_out(sts)
    now = time.time()
    current = int(((sts or {}).get("spec") or {}).get("replicas") or 0)
    scale = policy.decide_scale(
        kvc.spec.autoscaling,
        list(state.samples),
        current_replicas=current,
        now_s=now,
        last_change_s=state.last_scale_s,
        rolling_out=rolling,
    )
    if scale is not None:
        # DryRun starts the same cooldown an applied change would: recorded once per window, not per scrape
        state.last_scale_s = now
        _record(body, memo, state, scale)
        if scale.applied and scale.to_replicas is not None:
            failures = await _drain(memo.http, kvc, pods, scale, token=token, logger=logger)
            if failures:  # the decision carries them: status reports DrainFailed from it
                state.decisions[-1] = {**state.decisions[-1], "drainFailures": failures}
            await kube.patch(STATEFULSET, kvc.namespace, kvc.name, {"spec": {"replicas": scale.to_replicas}})
    effective = (body.get("status") or {}).get("effectiveConfig") or {}
    live = resources.engine_config(kvc, reconcile.live_overrides(kvc.spec, effective)).model_dump()
    tune = policy.decide_tuning(
        kvc.spec.tuning,
        kvc.spec.autoscaling.target_memory_pressure,
        live,
        list(state.samples),
        now_s=now,
        last_change_s=state.last_tune_s,
        rolling_out=rolling,
        fp16_bytes_per_token=_fp16_bytes_per_token(kvc),
    )
    if tune is not None:
        state.last_tune_s = now
        _record(body, memo, state, tune)
        if tune.applied:
            changes = resources.as_live(tune.changes).over(reconcile.live_overrides(kvc.spec, effective))
            updated = resources.engine_config(kvc, changes).to_file_dict()
            body.setdefault("status", {})["effectiveConfig"] = updated  # converge renders it next


def _fp16_bytes_per_token(kvc: api.KVCache) -> float:
    cache = kvc.spec.cache
    return 2.0 * cache.num_layers * cache.num_kv_heads * cache.head_dim * 2


def _record(body: Mapping[str, Any], memo: Any, state: CacheState, decision: policy.Decision) -> None:
    """Status entry + Event + metric for every decision (DryRun included)."""
    state.decisions = [*state.decisions, decision.to_status(_now())][-status_mod.MAX_DECISIONS :]
    memo.metrics.decisions.labels(decision.kind, decision.mode.value, str(decision.applied).lower()).inc()
    verb = "Applied" if decision.applied else "Recommended"
    kopf.info(
        cast(kopf.Body, body),
        reason=f"{decision.kind}{verb}",
        message=f"{decision.action}: {decision.reason}",
    )


async def _drain(
    http: aiohttp.ClientSession,
    kvc: api.KVCache,
    pods: Sequence[Mapping[str, Any]],
    decision: policy.Decision,
    *,
    token: str | None,
    logger: Logger,
) -> list[str]:
    """Before a scale-in, push each leaving replica's blocks to the replicas that stay; returns
    '<pod>: <error>' for each drain that failed (the scale-in goes on)."""
    failures: list[str] = []
    if not decision.leaving:
        return failures
    endpoints = status_mod.ready_endpoints(pods)
    staying = [url for pod, url in endpoints.items() if _ordinal(pod) < (decision.to_replicas or 0)]
    for ordinal in decision.leaving:
        url = endpoints.get(f"{kvc.name}-{ordinal}")
        if url is None or not staying:
            continue
        try:
            result = await scrape.post_drain(http, url, staying, token=token)
            logger.info(f"drained {kvc.name}-{ordinal} into {len(staying)} replicas: {result}")
        except scrape.EngineError as exc:
            logger.warning(f"drain of {kvc.name}-{ordinal} failed, scaling in anyway: {exc}")
            failures.append(f"{kvc.name}-{ordinal}: {exc}")
    return failures


def _ordinal(pod: str) -> int:
    tail = pod.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1
