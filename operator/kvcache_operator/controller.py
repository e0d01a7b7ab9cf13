"""The control pass of one KVCache: observe → decide → act, and converge. ``handlers.py`` only
declares the Kopf decorators and calls in here.

* **observe** reads memory, not the API: the children, backup Jobs and engine pods come from two
  Kopf indexes fed by watches (``index_entry``, keyed by ``(namespace, instance label)``), the
  engines' figures from their ``/metrics`` (``scrape``);
* **decide** is ``policy.decide`` on one typed ``PolicyInput``;
* **act** writes only what changes: ``reconcile.plan`` compares the desired children with the
  observed ones (no drift, no patch), a status equal to the stored one is not written, Events
  come from status transitions. An idle KVCache costs no API write.

Two entry points act on a KVCache, serialised by one lock per cache: ``reconcile_cache`` (create, update,
resume) converges children, engines' live config and status; ``control_loop`` (a Kopf daemon per
KVCache) scrapes every ``spec.metrics.scrapeInterval`` (±10 % jitter), asks the policy, applies
(drain, then scale; or retune live) and converges.

Tuned values (the tuner's ``maxTokens``/compression) live on the ``<name>-config`` ConfigMap as the
annotation ``kvcache.dev/tuned`` (``read_tuned``/``tuned_annotation``), so an operator restart
finds them where the engines' config is; the status only reports them.

Writes are remembered per cache (``CacheState.written``) until the watch delivers them, so a pass
that runs before its own write came back neither repeats the write nor reverts it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
import kopf

from kvcache_engine.contract import (
    WARM_GATE,
    AdminError,
    KVCacheConfig,
    LiveConfig,
    ShardMap,
    handoff_timeout_s,
    node_id,
    pool_bytes,
    tier_bytes,
    warm_ratio_of,
)
from kvcache_operator import api, k8s, policy, reconcile, resources, rollout, scrape
from kvcache_operator import status as status_mod
from kvcache_operator.metrics import OperatorMetrics
from kvcache_operator.validation import parse_duration as parse_seconds

Manifest = dict[str, Any]
Logger = logging.Logger | logging.LoggerAdapter[Any]
IndexKey = tuple[str, str]  # (namespace, app.kubernetes.io/instance)
Index = Mapping[IndexKey, Iterable[Manifest]]

INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_LABELS: dict[str, str] = {"app.kubernetes.io/managed-by": "kvcache-operator"}
"""What the indexes keep: objects the operator labelled (its children, the StatefulSet's pods and
PVCs, the CronJob's Jobs); ``index_entry`` skips those without an instance label."""
TUNED_ANNOTATION = "kvcache.dev/tuned"
CHILDREN_INDEX = "kvcache_children"  # the names of the index handlers in handlers.py
PODS_INDEX = "kvcache_pods"
SAMPLE_HISTORY_S = 4 * 3600  # longest stabilization window the policy may look back over


# --- the runtime and the per-cache state -------------------------------------------------------------


@dataclass
class Runtime:
    """Clients and metrics, created in the startup handler and kept in Kopf's memo."""

    kube: k8s.KubeClient
    http: aiohttp.ClientSession
    metrics: OperatorMetrics
    caches: dict[str, CacheState] = field(default_factory=dict)
    metrics_server: Any = None
    diffbase: MemoryDiffBase | None = None  # Kopf's, to forget deleted KVCaches
    # (namespace, name) -> set by an engine pod's watch event: the cache's loop runs a join pass
    # now (a pod waiting for its warm join, a pod whose readiness changed) instead of waiting
    kicks: dict[IndexKey, asyncio.Event] = field(default_factory=dict)
    # metadata.uid -> set when that KVCache is deleted: its control loop ends (``forget``)
    stops: dict[str, asyncio.Event] = field(default_factory=dict)


@dataclass(frozen=True)
class Written:
    """An object as this operator last wrote it (None: deleted), until the watch brings it back."""

    obj: Manifest | None
    before_rv: str | None  # the resourceVersion the index showed when we wrote
    after_rv: str | None  # the resourceVersion the write produced


@dataclass
class CacheState:
    """What the operator remembers about one KVCache between passes (rebuilt from status on restart)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    samples: deque[policy.Sample] = field(default_factory=deque)
    last_scrape: scrape.Scrape | None = None
    observation: scrape.Observation | None = None
    last_scale_s: float | None = None
    last_tune_s: float | None = None
    last_scale: Manifest | None = None
    decisions: list[Manifest] = field(default_factory=list)
    written: dict[tuple[str, str], Written] = field(default_factory=dict)  # (kind, name) -> write
    written_status: Written | None = None
    parsed: tuple[int, api.KVCache] | None = None  # (metadata.generation, the parsed spec)
    placed: tuple[str, ...] = ()  # the ready engines (URL, pod uid, restarts) last told the placement
    had_statefulset: bool = False  # the index has shown its StatefulSet (see ``_still_exists``)
    config: tuple[api.KVCache, LiveConfig, KVCacheConfig, Manifest] | None = None  # engine_config
    clean: tuple[Any, ...] | None = None  # the inputs of the last plan that found nothing to do

    def engine_config(self, kvc: api.KVCache, overrides: LiveConfig) -> tuple[KVCacheConfig, Manifest]:
        """``resources.engine_config`` and its file form, computed again only when the parsed spec
        or the overrides move: every pass asks twice (the policy, converge), and building them was
        a tenth of an idle cache's pass."""
        if self.config is not None and self.config[0] is kvc and self.config[1] == overrides:
            return self.config[2], self.config[3]
        config = resources.engine_config(kvc, overrides)
        self.config = (kvc, overrides, config, config.to_file_dict())
        return self.config[2], self.config[3]

    def parse(self, body: Mapping[str, Any]) -> api.KVCache:
        """The parsed KVCache, parsed again only when its generation moves (spec changes bump it)."""
        generation = int((body.get("metadata") or {}).get("generation") or 0)
        if self.parsed is not None and generation and self.parsed[0] == generation:
            return self.parsed[1]
        kvc = api.parse_kvcache(body)
        self.parsed = (generation, kvc)
        return kvc


@dataclass(frozen=True)
class Indexes:
    """The two watch-fed indexes (``handlers.kvcache_children``, ``handlers.kvcache_pods``)."""

    children: Index
    pods: Index

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Indexes:
        """From a handler's keyword arguments (Kopf passes each index under its handler's name)."""
        return cls(kwargs[CHILDREN_INDEX], kwargs[PODS_INDEX])


@dataclass(frozen=True)
class Observed:
    """One KVCache's world as the watches (and this operator's own writes) show it."""

    name: str
    children: dict[str, list[Manifest]]  # kind -> objects, for ``reconcile.plan``
    pods: list[Manifest]  # the engine pods
    jobs: list[Manifest]  # the backup Jobs

    def child(self, kind: str, name: str) -> Manifest | None:
        return next((o for o in self.children.get(kind, []) if o["metadata"]["name"] == name), None)

    @property
    def statefulset(self) -> Manifest | None:
        return self.child("StatefulSet", self.name)

    @property
    def configmap(self) -> Manifest | None:
        return self.child("ConfigMap", config_map_name(self.name))


def config_map_name(name: str) -> str:
    return f"{name}-config"


# --- startup and cleanup ----------------------------------------------------------------------------------


class ProgressAnnotations(kopf.AnnotationsProgressStorage):
    """Kopf's retry/progress annotations (``kvcache.dev/<handler>``, written only while a handler
    retries), without the ``kvcache.dev/kopf-managed: yes`` marker Kopf adds beside them: on a
    handler that succeeds at once the marker was the only field of a PATCH, one write and one watch
    event per new KVCache. The marker tells other Kopf operators to leave ``kvcache.dev/`` out of
    their diffs; ours already does (``clear``)."""

    def _store_marker(self, prefix: str, patch: kopf.Patch, body: kopf.Body) -> None:
        return None

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        """Kopf's, minus its deep copy when no annotation of ours is there to strip (every event
        of every KVCache but a retrying handler's): twice per event, ~8 % of Kopf's handling of a
        KVCache event in a burst's profile. The essence is Kopf's own fresh copy
        (``MemoryDiffBase.build``) or the stored one, which nothing mutates."""
        annotations = (essence.get("metadata") or {}).get("annotations") or {}
        if not any(key.startswith(f"{self.prefix}/") for key in annotations):
            return essence
        return super().clear(essence=essence)


class MemoryDiffBase(kopf.DiffBaseStorage):
    """Kopf's last-handled spec (the base of the ``diff`` an update handler gets) kept in this
    process, not in an annotation on the KVCache: storing it there cost one PATCH and one watch
    event per created or updated KVCache (and showed GitOps tools a field they did not write).

    After a restart the memory is empty and Kopf sees every KVCache as created: the same converge
    pass as a resume (level-based, idempotent). A spec edited while no operator ran is converged
    all the same; what is lost is only that edit's ``diff``, so a tuned value of a field the user
    set meanwhile stays until the tuner or the user moves it again. The annotation that older
    versions wrote is still read (a KVCache handled before the upgrade resumes with its diff) and
    removed the first time the KVCache is handled again."""

    LEGACY_KEY = "last-handled-configuration"

    def __init__(self) -> None:
        super().__init__()
        self.legacy = kopf.AnnotationsDiffBaseStorage(prefix="kvcache.dev", key=self.LEGACY_KEY)
        self.essences: dict[str, kopf.BodyEssence] = {}  # metadata.uid -> last-handled essence

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        """Kopf's essence (spec, labels, annotations but Kopf's own and kubectl's last-applied),
        without the old annotation, for a KVCache; empty for the kinds only the indexes watch.

        Kopf builds an essence for every watch event of every kind before it looks for a handler
        (and deep-copies the whole body for it, status and managed fields included): for a child
        or a pod, which have index handlers only, no handler ever reads it (each StatefulSet's pod
        template copied for nothing). Kopf's cause detection fell from ~11 % to ~5 % of the
        operator's samples in a py-spy profile of a burst of new caches."""
        if body.get("kind") != api.KIND:
            return cast(kopf.BodyEssence, {})
        extra = list(extra_fields or ())
        if not extra:  # an extra field may be anywhere (a status field): then the whole body
            meta = body.get("metadata") or {}
            kept = {k: v for k, v in body.items() if k not in ("metadata", "status")}
            kept["metadata"] = {k: meta[k] for k in ("labels", "annotations", "ownerReferences") if k in meta}
            body = kopf.Body(cast(kopf.RawBody, kept))  # Kopf's key convention reads kind, owners
        return self.legacy.build(body=body, extra_fields=extra)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        if body.get("kind") != api.KIND:
            return None  # see build
        essence = self.essences.get(str(body.metadata.uid))
        return essence if essence is not None else self.legacy.fetch(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self.essences[str(body.metadata.uid)] = essence
        for key in self.legacy.make_keys(self.LEGACY_KEY, body=body):
            if key in body.metadata.annotations:
                patch.metadata.annotations[key] = None  # written by an older version: drop it once

    def forget(self, uid: str) -> None:
        self.essences.pop(uid, None)


def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings: our own annotation names, watch timeouts (a dead stream is replaced, never
    waited on forever), bounded API request time. Only warnings reach Events from logs: Kopf's
    "handler succeeded" lines would cost two Event writes per cache per restart; decisions and
    status transitions post their own Events (``post_event``)."""
    settings.persistence.finalizer = "kvcache.dev/finalizer"
    settings.persistence.progress_storage = ProgressAnnotations(prefix="kvcache.dev")
    settings.persistence.diffbase_storage = MemoryDiffBase()
    settings.watching.server_timeout = int(os.environ.get("KVCACHE_OPERATOR_WATCH_TIMEOUT_S", "300"))
    settings.watching.client_timeout = settings.watching.server_timeout + 30
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.posting.level = logging.WARNING


async def start(settings: kopf.OperatorSettings, memo: Any, logger: Logger) -> None:
    """Configure Kopf, log in, create the clients; warn when peering would keep the operator paused."""
    configure(settings)
    info = kopf.login_via_client(logger=logger, settings=settings)
    if info is None:
        raise kopf.PermanentError("no Kubernetes credentials (KUBECONFIG or in-cluster)")
    metrics = OperatorMetrics()
    port = memo.get("metrics_port")
    memo.runtime = Runtime(
        kube=k8s.KubeClient.connect(info),
        http=aiohttp.ClientSession(),
        metrics=metrics,
        metrics_server=metrics.serve(int(port)) if port else None,
        diffbase=settings.persistence.diffbase_storage
        if isinstance(settings.persistence.diffbase_storage, MemoryDiffBase)
        else None,
    )
    peering = memo.get("peering")
    if peering is not None:
        await check_peering(memo.runtime.kube, peering, logger)


async def stop(memo: Any) -> None:
    rt: Runtime | None = memo.get("runtime")
    if rt is None:
        return
    await rt.kube.close()
    await rt.http.close()
    if rt.metrics_server is not None:
        rt.metrics_server.shutdown()


@dataclass(frozen=True)
class Peering:
    """The peering ``kvcache-operator run`` asked for (absent with ``--standalone``)."""

    name: str
    namespaces: tuple[str, ...]
    clusterwide: bool


async def check_peering(kube: k8s.KubeClient, peering: Peering, logger: Logger) -> None:
    """Kopf pauses every peer until it sees the peering object, and says so only in debug logs:
    look for it once at startup and say what to do when it is missing."""
    if peering.clusterwide:
        places: list[tuple[k8s.Kind, str | None]] = [(k8s.CLUSTERKOPFPEERINGS, None)]
    else:
        places = [(k8s.KOPFPEERINGS, ns) for ns in peering.namespaces if not any(c in ns for c in "*?[!")]
    fix = (
        "run with --standalone (one replica), or install the chart's peering object "
        "(helm --set ha.enabled=true creates it)"
    )
    for kind, namespace in places:
        where = f" in namespace {namespace}" if namespace else ""
        try:
            found = await kube.get(kind, namespace, peering.name)
        except (k8s.ApiError, aiohttp.ClientError, TimeoutError) as exc:
            logger.warning(
                f"peering: cannot read {kind.kind} {peering.name!r}{where} ({exc}); if it is missing, {fix}"
            )
            continue
        if found is None:
            logger.warning(
                f"peering: no {kind.kind} {peering.name!r}{where}: the operator stays paused and handles "
                f"nothing until it exists; {fix}"
            )
        else:
            logger.info(
                f"peering: {kind.kind} {peering.name!r}{where} found; the highest priority replica acts"
            )


# --- indexes ------------------------------------------------------------------------------------------


WATCHED_RESOURCES = frozenset((k.group, k.version, k.plural) for k in k8s.WATCHED if k is not k8s.PODS)


def is_child_resource(resource: kopf.Resource) -> bool:
    """The resources ``handlers.kvcache_children`` indexes: every child kind and backup Jobs."""
    return (resource.group, resource.version, resource.plural) in WATCHED_RESOURCES


def index_entry(body: Mapping[str, Any], kind: str | None) -> dict[IndexKey, Manifest] | None:
    """One object's index entry: ``(namespace, instance) -> the object`` (its kind filled in, its
    ``managedFields`` left out)."""
    meta = body.get("metadata") or {}
    instance = (meta.get("labels") or {}).get(INSTANCE_LABEL)
    if not instance or not meta.get("namespace"):
        return None
    obj = dict(body)
    if kind and not obj.get("kind"):
        obj["kind"] = kind
    if "managedFields" in meta:  # server-side apply bookkeeping: often half an object, never read here
        obj["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    return {(str(meta["namespace"]), str(instance)): obj}


def _rv(obj: Mapping[str, Any] | None) -> str | None:
    return None if obj is None else (obj.get("metadata") or {}).get("resourceVersion")


def _is_stale(seen_rv: str | None, written: Written) -> bool:
    """Whether what the watch shows predates our write. resourceVersions are compared as numbers
    where they are numbers (etcd's are), else only for equality with the one we overwrote."""
    if seen_rv is None:
        return written.obj is not None  # a create not yet seen (a delete seen through: not stale)
    if seen_rv.isdigit() and written.after_rv is not None and written.after_rv.isdigit():
        return int(seen_rv) < int(written.after_rv)
    return seen_rv == written.before_rv


def observe(indexes: Indexes, state: CacheState, namespace: str, name: str) -> Observed:
    """Children, pods and Jobs of one KVCache from the indexes, with this operator's own writes
    laid over what the watch has not brought back yet."""
    key = (namespace, name)
    by_name: dict[tuple[str, str], Manifest] = {}
    for obj in indexes.children.get(key, ()):
        by_name[(str(obj.get("kind")), obj["metadata"]["name"])] = obj
    for ref, written in list(state.written.items()):
        seen = by_name.get(ref)
        if not _is_stale(_rv(seen), written):
            del state.written[ref]  # the watch caught up
        elif written.obj is None:
            by_name.pop(ref, None)
        else:
            by_name[ref] = written.obj
    children: dict[str, list[Manifest]] = {}
    jobs: list[Manifest] = []
    for (kind, _), obj in sorted(by_name.items()):
        if kind in k8s.CHILD_KINDS:
            children.setdefault(kind, []).append(obj)
        elif kind == k8s.JOBS.kind:
            jobs.append(obj)
    pods = [
        pod
        for pod in indexes.pods.get(key, ())
        if (pod["metadata"].get("labels") or {}).get(COMPONENT_LABEL) == "engine"
    ]
    return Observed(name, children, sorted(pods, key=lambda p: p["metadata"]["name"]), jobs)


# --- tuned values: one read/write pair (the ConfigMap's annotation) ---------------------------------------


def read_tuned(configmap: Mapping[str, Any] | None, logger: Logger | None = None) -> LiveConfig:
    """The tuned live values stored on the engine ConfigMap (empty when none or unreadable)."""
    annotations = ((configmap or {}).get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(TUNED_ANNOTATION)
    if not raw:
        return LiveConfig()
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("expected a JSON object")
        return LiveConfig.parse(doc, f"annotation {TUNED_ANNOTATION}")
    except ValueError as exc:
        if logger is not None:
            logger.warning(f"ignoring tuned values: {exc}")
        return LiveConfig()


def tuned_annotation(tuned: LiveConfig) -> dict[str, str | None]:
    """The ConfigMap annotation that stores ``tuned`` (None removes it in a merge patch)."""
    return {TUNED_ANNOTATION: json.dumps(tuned.to_wire(), sort_keys=True) if tuned else None}


def _with_tuned(child: Manifest, tuned: LiveConfig, observed: Manifest | None) -> Manifest:
    """The engine ConfigMap carrying the tuned values (the annotation is only removed where it is)."""
    annotation = tuned_annotation(tuned)
    if annotation[TUNED_ANNOTATION] is None and TUNED_ANNOTATION not in (
        ((observed or {}).get("metadata") or {}).get("annotations") or {}
    ):
        return child
    meta = child["metadata"]
    return {**child, "metadata": {**meta, "annotations": {**(meta.get("annotations") or {}), **annotation}}}


def without_finalizer(fn: Any) -> None:
    """Kopf puts a finalizer on every object a daemon runs for, so that the object waits for the
    daemon to stop before it goes. Ours has nothing to clean up (children go by owner references,
    the loop ends on the DELETED event: ``controller.forget``; a deletion lost in a watch gap:
    ``controller._still_exists``), and the finalizer cost every new KVCache a PATCH, a watch event
    and a round trip before its first converge, and left KVCaches stuck in Terminating whenever
    no operator ran (uninstalled first, scaled to 0, crash-looping). Kopf has no public switch
    (its maintainers keep the finalizer as the default on purpose): the registered handler is
    replaced by a copy that does not require one. Kopf removes the finalizer older versions
    added the next time it handles each KVCache."""
    spawning = kopf.get_default_registry()._spawning
    spawning._handlers = [
        dataclasses.replace(h, requires_finalizer=False) if h.fn is fn else h for h in spawning._handlers
    ]
    if any(h.fn is fn and h.requires_finalizer for h in spawning._handlers):
        raise RuntimeError("the control loop's daemon still requires a finalizer")


# --- entry points ---------------------------------------------------------------------------------------


def cache_state(rt: Runtime, body: Mapping[str, Any]) -> CacheState:
    """The per-cache state, restoring the last change times from status after a restart."""
    uid = body["metadata"]["uid"]
    state = rt.caches.get(uid)
    if state is None:
        stored = body.get("status") or {}
        state = CacheState(decisions=list(stored.get("decisions") or []), last_scale=stored.get("lastScale"))
        for decision in state.decisions:
            when = _parse_time(decision.get("time"))
            if decision.get("kind") == "Scale":
                state.last_scale_s = when
            elif decision.get("kind") == "Tune":
                state.last_tune_s = when
        rt.caches[uid] = state
        rt.metrics.caches.set(len(rt.caches))
    return state


def forget(rt: Runtime, body: Mapping[str, Any]) -> None:
    """A KVCache is gone (its DELETED watch event): end its control loop and clear our memory of
    it. Children go by garbage collection (owner references): nothing to clean up in the cluster,
    so the KVCache carries no finalizer (``handlers``) and never waits on this operator to go."""
    uid = body["metadata"]["uid"]
    stop = rt.stops.pop(uid, None)
    if stop is not None:
        stop.set()
        meta = body["metadata"]
        kick = rt.kicks.get((str(meta["namespace"]), str(meta["name"])))
        if kick is not None:
            kick.set()  # wake the loop now
    rt.caches.pop(uid, None)
    rt.metrics.caches.set(len(rt.caches))
    if rt.diffbase is not None:
        rt.diffbase.forget(uid)


_LIVE_FIELD = {f.alias or name: name for name, f in LiveConfig.model_fields.items()}


async def reconcile_cache(
    rt: Runtime, body: Mapping[str, Any], indexes: Indexes, logger: Logger, *, diff: Any, reason: str
) -> None:
    """The create/update/resume handler's work: one converge pass, errors mapped to Kopf's."""
    changed = {
        _LIVE_FIELD.get(path[2], path[2])  # the spec's camelCase -> LiveConfig's field names (``reset``)
        for _, path, _, _ in diff or ()
        if len(path) > 2 and path[:2] == ("spec", "cache")
    }
    state = cache_state(rt, body)
    started = time.perf_counter()
    async with state.lock:
        try:
            await converge(rt, dict(body), indexes, state, logger, reset=changed)
        except api.SpecError as exc:
            rt.metrics.reconciles.labels("invalid").inc()
            raise kopf.PermanentError(str(exc)) from exc
        except (k8s.ApiError, aiohttp.ClientError, TimeoutError) as exc:
            rt.metrics.reconciles.labels("error").inc()
            rt.metrics.errors.labels("reconcile").inc()
            raise kopf.TemporaryError(f"API error: {exc}", delay=5) from exc
    rt.metrics.reconciles.labels("ok").inc()
    rt.metrics.reconcile_seconds.observe(time.perf_counter() - started)
    # a restart sees every KVCache as created (MemoryDiffBase): warn once per generation, not per start
    handled = (body.get("status") or {}).get("observedGeneration") == body["metadata"].get("generation")
    if reason in ("create", "update") and not handled:
        for warning in api.spec_warnings(state.parse(body).spec):
            post_event(body, "SpecWarning", warning, warning=True)


async def control_loop(
    rt: Runtime, stopped: kopf.DaemonStopped, body: Mapping[str, Any], indexes: Indexes, logger: Logger
) -> None:
    """Scrape, decide, act, converge; every scrapeInterval with jitter, until the KVCache goes.
    Between passes, an engine pod's watch event (``pod_seen``) runs a membership pass at once."""
    meta = body["metadata"]
    key: IndexKey = (str(meta["namespace"]), str(meta["name"]))
    kick = rt.kicks.setdefault(key, asyncio.Event())
    stop = rt.stops.setdefault(str(meta["uid"]), asyncio.Event())
    try:
        await _control_loop(rt, stopped, body, indexes, logger, kick=kick, stop=stop)
    finally:
        if rt.kicks.get(key) is kick:
            del rt.kicks[key]
        if stop.is_set():  # deleted: a pass that was running when it went may have remembered it again
            rt.caches.pop(str(meta["uid"]), None)
            rt.metrics.caches.set(len(rt.caches))
        elif rt.stops.get(str(meta["uid"])) is stop:
            del rt.stops[str(meta["uid"])]


def pod_seen(rt: Runtime | None, pod: Mapping[str, Any]) -> None:
    """An engine pod changed (the pods index's watch): its cache's loop runs a membership pass."""
    meta = pod.get("metadata") or {}
    instance = (meta.get("labels") or {}).get(INSTANCE_LABEL)
    kick = rt.kicks.get((str(meta.get("namespace")), str(instance))) if rt is not None and instance else None
    if kick is not None:
        kick.set()


async def _woken(stopped: kopf.DaemonStopped, kick: asyncio.Event, timeout: float) -> bool:
    """Wait until ``timeout`` passes, the daemon stops, or ``kick`` is set; whether it was kicked."""
    waits = {asyncio.ensure_future(stopped.wait(timeout)), asyncio.ensure_future(kick.wait())}
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return kick.is_set() and not stopped


async def _control_loop(
    rt: Runtime,
    stopped: kopf.DaemonStopped,
    body: Mapping[str, Any],
    indexes: Indexes,
    logger: Logger,
    *,
    kick: asyncio.Event,
    stop: asyncio.Event,
) -> None:
    due = 0.0  # when the next full pass is due (monotonic; 0: one interval from the start)
    while not stopped and not stop.is_set():
        try:
            interval = parse_duration(
                str((body.get("spec") or {}).get("metrics", {}).get("scrapeInterval", "30s"))
            )
        except ValueError:
            interval = 30.0
        if not due:
            due = time.monotonic() + interval * random.uniform(0.9, 1.1)
        kicked = await _woken(stopped, kick, max(0.0, due - time.monotonic()))
        if stopped or stop.is_set():
            break
        kick.clear()
        full = time.monotonic() >= due
        state = cache_state(rt, body)
        try:
            if (full or not kicked) and not await _still_exists(rt, body, indexes, state):
                logger.info("the KVCache is gone (its deletion was not seen): its control loop ends")
                forget(rt, body)
                break
            async with state.lock:
                if full or not kicked:
                    due = 0.0
                    await control_pass(rt, dict(body), indexes, state, logger)
                else:
                    await membership_pass(rt, dict(body), indexes, state, logger)
        except api.SpecError:
            continue  # reported as Degraded by the reconcile handler
        except (k8s.ApiError, aiohttp.ClientError, TimeoutError) as exc:
            rt.metrics.errors.labels("control").inc()
            logger.warning(f"control pass failed, retrying next interval: {exc}")
        except Exception:  # a supervisor loop: one bad pass must not stop scraping for good
            rt.metrics.errors.labels("control").inc()
            logger.exception("control pass crashed, retrying next interval")


async def _still_exists(rt: Runtime, body: Mapping[str, Any], indexes: Indexes, state: CacheState) -> bool:
    """Whether the KVCache still exists. Its DELETED event ends the loop (``forget``); one lost in
    a watch gap (a relist after "410 Gone" reports no deletion) would leave the loop re-creating
    children that garbage collection removes, every interval. A StatefulSet the index showed and
    shows no more is the sign: only then is the API asked (one GET, not one per pass)."""
    meta = body["metadata"]
    key = (str(meta["namespace"]), str(meta["name"]))
    shown = any(
        obj.get("kind") == "StatefulSet" and obj["metadata"]["name"] == meta["name"]
        for obj in indexes.children.get(key, ())
    )
    if shown or not state.had_statefulset:
        state.had_statefulset = state.had_statefulset or shown
        return True
    found = await rt.kube.get(k8s.KVCACHES, key[0], key[1])
    return found is not None and (found.get("metadata") or {}).get("uid") == meta["uid"]


# --- the control pass -----------------------------------------------------------------------------------


async def control_pass(
    rt: Runtime, body: Manifest, indexes: Indexes, state: CacheState, logger: Logger
) -> None:
    """Observe (indexes + one scrape), decide (policy), act (scale/retune), then converge."""
    kvc = state.parse(body)
    observed = observe(indexes, state, kvc.namespace, kvc.name)
    endpoints = status_mod.ready_endpoints(observed.pods)
    token = await _token(rt, kvc, observed) if endpoints else None
    interval = parse_duration(kvc.spec.metrics.scrape_interval)
    started = time.perf_counter()
    if any(map(status_mod.awaiting_warm_join, observed.pods)):  # paused too: see membership_pass
        token = token if endpoints else await _token(rt, kvc, observed)
        await warm_join(rt, body, observed, token=token, logger=logger, timeout_s=_handoff_timeout(kvc))
    current = await scrape.scrape_all(rt.http, endpoints, timeout_s=max(0.5, min(interval, 5.0)), token=token)
    rt.metrics.scrape_seconds.observe(time.perf_counter() - started)
    rt.metrics.scrape_failures.inc(len(current.failed))
    await _announce_placement(rt, state, observed.pods, token=token, logger=logger)
    scraped = status_mod.scraped(state.last_scrape, current)
    observation = scrape.observe(state.last_scrape, current)
    state.last_scrape, state.observation = current, observation
    if observation.sample.ready_replicas > 0:  # no engine answered: no figures, never a "pressure 0"
        state.samples.append(observation.sample)
    while state.samples and state.samples[0].time_s < current.time_s - SAMPLE_HISTORY_S:
        state.samples.popleft()
    tuned = None
    if not reconcile.is_paused(body["metadata"]):
        tuned = await _decide_and_act(rt, body, kvc, observed, state, token=token, logger=logger)
    await converge(rt, body, indexes, state, logger, scraped=scraped, tuned=tuned)


async def membership_pass(
    rt: Runtime, body: Manifest, indexes: Indexes, state: CacheState, logger: Logger
) -> None:
    """What an engine pod's change needs at once, without a scrape or a policy decision: the warm
    join of a pod behind the gate, the placement the engines forget by, and the shard map and
    status (converge, which writes only what changed). A paused cache still lets pods in (its
    children stay frozen): a replaced pod must not stay out of service until the pause ends."""
    kvc = state.parse(body)
    observed = observe(indexes, state, kvc.namespace, kvc.name)
    token = await _token(rt, kvc, observed)
    if any(map(status_mod.awaiting_warm_join, observed.pods)):
        await warm_join(rt, body, observed, token=token, logger=logger, timeout_s=_handoff_timeout(kvc))
    await _announce_placement(rt, state, observed.pods, token=token, logger=logger)
    await converge(rt, body, indexes, state, logger)


async def _announce_placement(
    rt: Runtime, state: CacheState, pods: Sequence[Manifest], *, token: str | None, logger: Logger
) -> None:
    """When the ready engines changed (the set clients place chains over), tell each one: its
    miss-ratio curve forgets the chains it no longer owns, which would otherwise skew the sizing
    after every scale, and it knows the peers to hand its chains to on SIGTERM. A restarted engine
    (a new pod uid or container restart at the same URL) is told again: it forgot. Best effort:
    retried next pass until every engine took it."""
    endpoints = status_mod.ready_endpoints(pods)
    urls = tuple(sorted(endpoints.values()))
    restarts = {p["metadata"]["name"]: status_mod.engine_health(p).restarts for p in pods}
    uids = {p["metadata"]["name"]: p["metadata"].get("uid") or "" for p in pods}
    placed = tuple(sorted(f"{url}|{uids.get(pod)}|{restarts.get(pod)}" for pod, url in endpoints.items()))
    if not urls or placed == state.placed:
        return
    results = await asyncio.gather(
        *(scrape.post_placement(rt.http, url, list(urls), token=token) for url in urls),
        return_exceptions=True,
    )
    failed = [f"{url}: {r}" for url, r in zip(urls, results, strict=True) if isinstance(r, BaseException)]
    if failed:
        logger.warning("placement not taken by %d engine(s): %s", len(failed), "; ".join(failed))
        return
    state.placed = placed


async def _decide_and_act(
    rt: Runtime,
    body: Manifest,
    kvc: api.KVCache,
    observed: Observed,
    state: CacheState,
    *,
    token: str | None,
    logger: Logger,
) -> LiveConfig | None:
    """Ask the policy; record every proposal; apply the Auto ones. Returns the new tuned values
    when a tuning was applied (converge renders and pushes them)."""
    sts = observed.statefulset
    overrides = reconcile.live_overrides(kvc.spec, read_tuned(observed.configmap, logger))
    config, _ = state.engine_config(kvc, overrides)
    now = time.time()
    proposals = policy.decide(
        policy.PolicyInput(
            autoscaling=kvc.spec.autoscaling,
            tuning=kvc.spec.tuning,
            samples=tuple(state.samples),
            current_replicas=int(((sts or {}).get("spec") or {}).get("replicas") or 0),
            live=policy.TunedConfig(config.max_tokens, config.use_compression, config.compression_ratio),
            fp16_bytes_per_token=_fp16_bytes_per_token(kvc),
            now_s=now,
            last_scale_s=state.last_scale_s,
            last_tune_s=state.last_tune_s,
            rolling_out=reconcile.rolling_out(sts),
        )
    )
    if proposals.scale is not None:
        # DryRun starts the same cooldown an applied change would: recorded once per window, not per scrape
        state.last_scale_s = now
        failures: list[str] = []
        handoffs: list[str] = []
        blocked = False
        if proposals.scale.applied and proposals.scale.to_replicas is not None:
            failures = await _drain(
                rt, kvc, observed.pods, proposals.scale, token=token, logger=logger, handoffs=handoffs
            )
            # A failed drain stops the scale-in: the leaving replicas keep their blocks (and, with
            # whenScaled: Delete, their volumes) until a drain succeeds after the cooldown, unless
            # an admin accepts the loss (spec.autoscaling.scaleInOnDrainFailure).
            blocked = bool(failures) and not kvc.spec.autoscaling.scale_in_on_drain_failure
            if blocked:
                post_event(body, "ScaleInBlocked", _blocked_message(proposals.scale, failures), warning=True)
            else:
                await _scale(rt, kvc, state, sts, proposals.scale)
        _record(rt, body, state, proposals.scale, drain_failures=failures, blocked=blocked, handoffs=handoffs)
    if proposals.tune is not None:
        state.last_tune_s = now
        _record(rt, body, state, proposals.tune)
        if proposals.tune.applied:
            return resources.as_live(dict(proposals.tune.changes)).over(overrides)
    return None


async def _scale(
    rt: Runtime, kvc: api.KVCache, state: CacheState, sts: Manifest | None, decision: policy.Decision
) -> None:
    patch = {"spec": {"replicas": decision.to_replicas}}
    result = await rt.kube.patch(k8s.CHILD_KINDS["StatefulSet"], kvc.namespace, kvc.name, patch)
    if result is not None:
        state.written[("StatefulSet", kvc.name)] = Written(result, _rv(sts), _rv(result))
    state.last_scale = {
        "time": _now(),
        "fromReplicas": decision.from_replicas,
        "toReplicas": decision.to_replicas,
        "reason": decision.reason,
    }


async def _hand_off_spec_scale_in(
    rt: Runtime,
    body: Manifest,
    kvc: api.KVCache,
    observed: Observed,
    state: CacheState,
    *,
    replicas: int,
    logger: Logger,
) -> None:
    """A scale-in the user asked for (``spec.replicas`` lowered, autoscaling not Auto): drain the
    leaving replicas into the staying ones before the StatefulSet drops them (the policy's own
    scale-ins drain in ``_decide_and_act``). The proof goes to ``status.lastScale`` and a
    ``ScaledIn`` Event. A failed drain does not hold what the user asked for (each leaving engine
    still hands its chains off on SIGTERM): a ``DrainFailed`` Warning says what was not verified.
    Hibernation (to 0) has nowhere to drain to: the volumes keep the data."""
    current = int(((observed.statefulset or {}).get("spec") or {}).get("replicas") or 0)
    if kvc.spec.autoscaling.mode == api.Mode.AUTO or not 0 < replicas < current:
        return
    decision = policy.Decision(
        kind="Scale",
        mode=kvc.spec.autoscaling.mode,
        action=f"replicas {current} -> {replicas}",
        reason="spec.replicas lowered",
        numbers={},
        from_replicas=current,
        to_replicas=replicas,
    )
    token = await _token(rt, kvc, observed)
    handoffs: list[str] = []
    failures = await _drain(rt, kvc, observed.pods, decision, token=token, logger=logger, handoffs=handoffs)
    reason = "; ".join([f"spec.replicas {current} -> {replicas}", *handoffs, *failures])
    state.last_scale = {"time": _now(), "fromReplicas": current, "toReplicas": replicas, "reason": reason}
    post_event(body, "DrainFailed" if failures else "ScaledIn", reason, warning=bool(failures))


def _blocked_message(decision: policy.Decision, failures: Sequence[str]) -> str:
    return (
        f"scale-in {decision.action} stopped: {'; '.join(failures)}; the leaving replicas keep their "
        "data; retried after the cooldown (set spec.autoscaling.scaleInOnDrainFailure: true to scale "
        "in anyway and lose their blocks)"
    )


def _fp16_bytes_per_token(kvc: api.KVCache) -> float:
    cache = kvc.spec.cache
    return 2.0 * cache.num_layers * cache.num_kv_heads * cache.head_dim * 2


def _record(
    rt: Runtime,
    body: Mapping[str, Any],
    state: CacheState,
    decision: policy.Decision,
    *,
    drain_failures: Sequence[str] = (),
    blocked: bool = False,
    handoffs: Sequence[str] = (),
) -> None:
    """Status entry + Event + metric for every decision (DryRun included); a scale-in stopped by a
    failed drain is recorded as not applied, with ``blocked`` and its ``drainFailures``."""
    entry: Manifest = dict(decision.to_status(_now()))
    if drain_failures:
        entry["drainFailures"] = list(drain_failures)
    if handoffs:
        entry["reason"] = f"{entry['reason']}; {'; '.join(handoffs)}"
    if blocked:
        entry["applied"] = False
        entry["reason"] = (
            f"{entry['reason']}; stopped: the drain failed, the replicas stay until one succeeds"
        )
    state.decisions = [*state.decisions, entry][-status_mod.MAX_DECISIONS :]
    applied = decision.applied and not blocked
    rt.metrics.decisions.labels(decision.kind, decision.mode.value, str(applied).lower()).inc()
    if blocked:
        return  # its Warning Event (ScaleInBlocked) is already posted
    verb = "Applied" if decision.applied else "Recommended"
    post_event(body, f"{decision.kind}{verb}", f"{decision.action}: {decision.reason}")


def post_event(body: Mapping[str, Any], reason: str, message: str, *, warning: bool = False) -> None:
    """An Event on the KVCache (posted by Kopf in the background; posting.level does not filter it)."""
    kopf.event(cast(kopf.Body, body), type="Warning" if warning else "Normal", reason=reason, message=message)


async def _drain(
    rt: Runtime,
    kvc: api.KVCache,
    pods: Sequence[Mapping[str, Any]],
    decision: policy.Decision,
    *,
    token: str | None,
    logger: Logger,
    handoffs: list[str] | None = None,
) -> list[str]:
    """Before a scale-in, push each leaving replica's blocks to the replicas that stay; returns the
    leaving pods whose drain failed (the caller then keeps the replicas: see _decide_and_act).
    ``handoffs`` gets, per drained pod, the proof: the fraction of its blocks the staying replicas
    decoded and checksum-verified (the engine's drain report)."""
    if not decision.leaving:
        return []
    endpoints = status_mod.ready_endpoints(pods)
    staying = [url for pod, url in endpoints.items() if _ordinal(pod) < (decision.to_replicas or 0)]
    failures: list[str] = []
    for ordinal in decision.leaving:
        pod = f"{kvc.name}-{ordinal}"
        url = endpoints.get(pod)
        if url is None or not staying:
            continue
        try:
            result = await scrape.post_drain(
                rt.http, url, staying, token=token, timeout_s=_handoff_timeout(kvc)
            )
        except AdminError as exc:
            logger.warning(f"drain of {pod} failed: {exc}")
            failures.append(f"{pod}: {exc}")
            continue
        if result.get("ok") is False:  # answered, but some target did not take its blocks
            targets = result.get("targets") or {}
            errors = [
                f"{t}: {r.get('error')}"
                for t, r in targets.items()
                if isinstance(r, dict) and not r.get("ok")
            ]
            logger.warning(f"drain of {pod} failed: {'; '.join(errors) or result}")
            failures.append(f"{pod}: drain incomplete ({'; '.join(errors) or 'see the engine log'})")
        else:
            logger.info(f"drained {pod} into {len(staying)} replicas: {result}")
            if handoffs is not None:
                handoffs.append(handoff_summary(pod, result, len(staying)))
    return failures


def handoff_summary(pod: str, report: Mapping[str, Any], targets: int) -> str:
    """``kvc-2: handed off 980/1000 blocks (98%), 1010 verified by 2 replicas`` from a drain report
    (verified counts a shared ancestor once per replica it went to)."""
    held = int(report.get("held_blocks") or 0)
    moved = int(report.get("handed_off_blocks", report.get("drained_blocks")) or 0)
    verified = report.get("verified_blocks")
    share = f"{moved / held:.0%}" if held else "nothing held"
    proof = f", {verified} verified by {targets} replicas" if verified is not None else ""
    return f"{pod}: handed off {moved}/{held} blocks ({share}){proof}"


def _ordinal(pod: str) -> int:
    tail = pod.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


# --- converge ----------------------------------------------------------------------------------------------


async def converge(
    rt: Runtime,
    body: Manifest,
    indexes: Indexes,
    state: CacheState,
    logger: Logger,
    *,
    reset: Collection[str] = (),
    scraped: status_mod.Scraped | None = None,
    tuned: LiveConfig | None = None,
) -> None:
    """One level-based pass: children, live config, status. ``tuned`` replaces the stored tuned
    values (an applied tuning); ``reset`` drops tuned fields the user just set in spec.cache.
    Raises api.SpecError on an invalid spec after reporting it (and touching no child)."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    generation = int(meta.get("generation") or 1)
    previous = _stored_status(body, state)
    if scraped is None and state.last_scrape is not None:  # no scrape this pass: the last one still holds
        scraped = status_mod.scraped(state.last_scrape, state.last_scrape)
    try:
        kvc = state.parse(body)
    except api.SpecError as exc:
        invalid = status_mod.invalid_spec_status(previous, str(exc), generation=generation, now=_now())
        await _write_status(rt, body, state, previous, invalid)
        raise
    observed = observe(indexes, state, namespace, name)
    sts = observed.statefulset
    stored = read_tuned(observed.configmap, logger) if tuned is None else tuned
    kept = {k: v for k, v in reconcile.live_overrides(kvc.spec, stored).given().items() if k not in reset}
    overrides = LiveConfig.model_validate(kept)
    replicas = reconcile.desired_replicas(kvc.spec, sts)
    config, config_file = state.engine_config(kvc, overrides)
    paused = reconcile.is_paused(meta)
    touched_sts = False
    checking = rollout.pods_to_check(sts, observed.pods)  # a rollout held at a partition
    warm = await _warm_ratios(rt, observed.pods, checking) if checking else {}
    inputs = (*_plan_inputs(generation, replicas, overrides, observed), _rollout_inputs(observed, warm))
    if not paused and inputs != state.clean:
        if sts is not None:
            await _hand_off_spec_scale_in(rt, body, kvc, observed, state, replicas=replicas, logger=logger)
        actions = reconcile.plan(
            _desired(body, kvc, replicas, overrides, observed, warm=warm), observed.children, meta["uid"]
        )
        if actions:
            logger.info("; ".join(f"{a.verb} {a.kind} {a.name}: {a.reason}" for a in actions))
        for wave in _waves(actions):
            results = await asyncio.gather(*(_apply(rt, namespace, state, observed, a) for a in wave))
            for action, result in zip(wave, results, strict=True):
                rt.metrics.actions.labels(action.verb, action.kind).inc()
                if action.kind == "StatefulSet" and action.verb != "delete":
                    sts, touched_sts = result or sts, True
        state.clean = None if actions else inputs
    if not paused:
        endpoints = status_mod.ready_endpoints(observed.pods)
        if endpoints:
            token = await _token(rt, kvc, observed)
            await _push_live_config(rt, endpoints, LiveConfig.of(config), token, logger)
    new_status = status_mod.build_status(
        kvc=kvc,
        generation=generation,
        desired=replicas,
        statefulset=sts,
        pods=observed.pods,
        rolling=touched_sts or reconcile.rolling_out(sts),
        paused=paused,
        effective_config=config_file,
        observation=state.observation,
        decisions=state.decisions,
        last_backup=status_mod.backup_record(observed.jobs) if kvc.spec.backup.enabled else None,
        previous=previous,
        now=_now(),
        scraped=scraped,
    )
    if state.last_scale is not None:
        new_status["lastScale"] = state.last_scale
    if kvc.spec.restore is not None:
        restored = status_mod.restore_records(observed.pods, (previous or {}).get("restored"))
        if restored:
            new_status["restored"] = restored
    await _write_status(rt, body, state, previous, new_status)


_MOUNTED_KINDS = frozenset({"ConfigMap", "Secret", "PersistentVolumeClaim"})


def _waves(actions: Sequence[reconcile.Action]) -> list[list[reconcile.Action]]:
    """The plan's writes in waves sent concurrently: first what the pods mount (ConfigMaps,
    Secrets, claims), then the other creates and patches (the StatefulSet finds its volumes'
    sources there), then each delete on its own, in plan order. A new cache waits two round trips
    instead of one per child."""
    mounted = [a for a in actions if a.verb != "delete" and a.kind in _MOUNTED_KINDS]
    others = [a for a in actions if a.verb != "delete" and a.kind not in _MOUNTED_KINDS]
    deletes = [[a] for a in actions if a.verb == "delete"]
    return [wave for wave in (mounted, others) if wave] + deletes


def _rollout_inputs(observed: Observed, warm: Mapping[str, float | None]) -> tuple[Any, ...]:
    """What the rollout gate reads, while a rollout is held at a partition (else nothing)."""
    if not warm and not rollout.pods_to_check(observed.statefulset, observed.pods):
        return ()
    return tuple(
        sorted(
            (
                p["metadata"]["name"],
                (p["metadata"].get("labels") or {}).get(rollout.REVISION_LABEL),
                status_mod.pod_ready(p),
                warm.get(p["metadata"]["name"]),
            )
            for p in observed.pods
        )
    )


async def _warm_ratios(
    rt: Runtime, pods: Sequence[Mapping[str, Any]], names: Sequence[str]
) -> dict[str, float | None]:
    """``/readyz``'s warm ratio of each named ready pod (None: not ready, unreachable, or not said)."""
    ready = status_mod.ready_endpoints(pods)
    out: dict[str, float | None] = {}
    for name in names:
        url = ready.get(name)
        out[name] = None
        if url is None:
            continue
        try:
            async with rt.http.get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=3)) as resp:
                out[name] = warm_ratio_of(await resp.json()) if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            out[name] = None
    return out


def _plan_inputs(
    generation: int, replicas: int, overrides: LiveConfig, observed: Observed
) -> tuple[Any, ...]:
    """Everything ``reconcile.plan`` depends on: equal inputs, equal (empty) plan, so an idle pass
    skips rendering the children (the spec by its generation, the children by resourceVersion)."""
    children = tuple(
        sorted(
            (kind, o["metadata"]["name"], _rv(o) or "")
            for kind, objs in observed.children.items()
            for o in objs
        )
    )
    members = tuple(sorted(status_mod.ready_endpoints(observed.pods).values()))  # the shard map's input
    return (generation, replicas, json.dumps(overrides.to_wire(), sort_keys=True), children, members)


def _desired(
    body: Mapping[str, Any],
    kvc: api.KVCache,
    replicas: int,
    overrides: LiveConfig,
    observed: Observed,
    *,
    warm: Mapping[str, float | None] | None = None,
) -> list[Manifest]:
    owner = reconcile.owner_reference(body)
    desired = []
    shard_map = shard_map_of(observed, kvc.name)
    for built in resources.build_children(
        kvc, replicas=replicas, live_overrides=overrides, shard_map=shard_map
    ):
        child = reconcile.with_owner(built, owner)
        if child["kind"] == "StatefulSet":  # the cache-aware rollout: partition and template hash
            child, _ = rollout.gated(child, observed.statefulset, observed.pods, warm or {})
        if child["kind"] == "ConfigMap" and child["metadata"]["name"] == config_map_name(kvc.name):
            child = _with_tuned(child, overrides, observed.configmap)
        desired.append(child)
    return desired


def shard_map_of(observed: Observed, name: str) -> ShardMap | None:
    """The shard map to publish in ``<name>-connection``: the ready engines (Ready includes the
    warm gate, so only replicas holding their share), with the published epoch kept while they
    are the same and raised by one when they change. With no ready engine the last map stays
    (clients keep placing over it; their breakers skip what is down)."""
    published = observed.child("ConfigMap", f"{name}-connection")
    try:
        previous = ShardMap.from_connection((published or {}).get("data") or {})
    except ValueError:
        previous = None  # hand-edited: published again from scratch, at a higher epoch than any
    members = list(status_mod.ready_endpoints(observed.pods).values())
    if not members:
        return previous
    current = ShardMap.of(0, members)
    if previous is None:
        return ShardMap.of(1, members)
    if previous.members == current.members:
        return previous
    return ShardMap.of(previous.epoch + 1, members)


def _handoff_timeout(kvc: api.KVCache) -> float:
    """How long a drain or a warm-join copy of one replica's cache may take (contract)."""
    config = resources.engine_config(kvc)
    return handoff_timeout_s(pool_bytes(config) + tier_bytes(config))


async def warm_join(
    rt: Runtime,
    body: Manifest,
    observed: Observed,
    *,
    token: str | None,
    logger: Logger,
    timeout_s: float = 120.0,
) -> list[str]:
    """Let in every pod waiting behind the warm gate: each ready peer copies it the chains it owns
    among the ready replicas plus itself (``POST /admin/drain`` with ``only``: copied, not moved,
    so clients still on the older shard map keep hitting), then the gate's condition turns True
    (the kubelet then marks the pod Ready, the Service and the next shard map include it).
    A peer that fails is retried on the next pass; after JOIN_ATTEMPTS the pod is let in with what
    it got (a cache that serves cold beats one that never serves) and a Warning Event says so.
    Returns one line per pod let in."""
    meta = body["metadata"]
    namespace = meta["namespace"]
    ready = status_mod.ready_endpoints(observed.pods)
    joined: list[str] = []
    for pod in observed.pods:
        if not status_mod.awaiting_warm_join(pod):
            continue
        name, uid = pod["metadata"]["name"], pod["metadata"].get("uid") or ""
        url = status_mod.pod_url(pod)
        peers = [u for n, u in ready.items() if n != name and node_id(u) != node_id(url)]
        members = sorted({*peers, url})
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                scrape.post_drain(rt.http, peer, members, only=[url], token=token, timeout_s=timeout_s)
                for peer in peers
            ),
            return_exceptions=True,
        )
        pulled = verified = 0
        failed: list[str] = []
        for peer, result in zip(peers, results, strict=True):
            if isinstance(result, BaseException):
                failed.append(f"{node_id(peer)}: {result}")
            elif result.get("ok") is False:
                failed.append(f"{node_id(peer)}: copy incomplete")
            else:
                pulled += int(result.get("handed_off_blocks") or 0)
                verified += int(result.get("verified_blocks") or 0)
        attempts = _JOIN_ATTEMPTS.get(uid, 0) + 1
        if failed and attempts < JOIN_ATTEMPTS:
            _JOIN_ATTEMPTS[uid] = attempts
            logger.warning(f"warm join of {name}: attempt {attempts} failed ({'; '.join(failed)}); retrying")
            continue
        _JOIN_ATTEMPTS.pop(uid, None)
        took = time.monotonic() - started
        message = (
            f"copied {pulled} blocks ({verified} verified) from {len(peers) - len(failed)}/{len(peers)} "
            f"peers in {took:.1f} s"
            if peers
            else "no ready peer to copy from (the first replica)"
        )
        if failed:
            message += f"; let in after {attempts} attempts without: {'; '.join(failed)}"
        condition = {
            "type": WARM_GATE,
            "status": "True",
            "reason": "JoinIncomplete" if failed else "Joined",
            "message": message,
            "lastTransitionTime": _now(),
        }
        patched = await rt.kube.patch(
            k8s.PODS,
            namespace,
            name,
            {"status": {"conditions": [condition]}},
            subresource="status",
            strategic=True,
        )
        if patched is None:
            continue  # the pod went away meanwhile
        logger.info(f"warm join of {name}: {message}")
        if peers:
            post_event(body, "ReplicaJoined", f"{name}: {message}", warning=bool(failed))
        joined.append(f"{name}: {message}")
    return joined


JOIN_ATTEMPTS = 3
_JOIN_ATTEMPTS: dict[str, int] = {}  # pod uid -> failed warm-join attempts so far


async def _apply(
    rt: Runtime, namespace: str, state: CacheState, observed: Observed, action: reconcile.Action
) -> Manifest | None:
    """Apply one action and remember the result until the watch brings it. 409 on create (someone
    else created it) and 404 on patch (it vanished) are normal and converge by switching verb."""
    kind = k8s.CHILD_KINDS[action.kind]
    before = observed.child(action.kind, action.name)
    result: Manifest | None
    if action.verb == "delete":
        await rt.kube.delete(kind, namespace, action.name)
        result = None
    else:
        assert action.body is not None
        result = await _create_or_patch(rt, kind, namespace, action)
    state.written[(action.kind, action.name)] = Written(result, _rv(before), _rv(result))
    return result


async def _create_or_patch(
    rt: Runtime, kind: k8s.Kind, namespace: str, action: reconcile.Action
) -> Manifest | None:
    assert action.body is not None
    if action.verb == "create":
        try:
            return await rt.kube.create(kind, action.body)
        except k8s.ConflictError:
            annotations = action.body["metadata"].get("annotations") or {}
            if annotations.get(resources.CREATE_ONLY_ANNOTATION) == "true":
                return await rt.kube.get(kind, namespace, action.name)
    result = await rt.kube.patch(kind, namespace, action.name, action.body)
    return result if result is not None else await rt.kube.create(kind, action.body)


async def _token(rt: Runtime, kvc: api.KVCache, observed: Observed) -> str | None:
    """The token the operator calls the engines with: the admin token (``<name>-admin-token``,
    watched: the operator's own Secret); before that Secret exists (the first pass), the data
    token from the watched token Secret, or read once per pass when it is the user's own Secret
    (``spec.auth.existingSecret``, not labelled as ours)."""
    admin = observed.child("Secret", resources.admin_token_secret_name(kvc))
    value = ((admin or {}).get("data") or {}).get(resources.ADMIN_TOKEN_KEY)
    if value:
        return base64.b64decode(value).decode()
    name = resources.token_secret_name(kvc)
    secret = observed.child("Secret", name) or await rt.kube.get(k8s.SECRETS, kvc.namespace, name)
    value = ((secret or {}).get("data") or {}).get(kvc.spec.auth.secret_key)
    return base64.b64decode(value).decode() if value else None


async def _push_live_config(
    rt: Runtime, endpoints: Mapping[str, str], desired: LiveConfig, token: str | None, logger: Logger
) -> None:
    """Send every ready engine the live fields that differ (no restart); failures are logged."""

    async def push(pod: str, url: str) -> None:
        try:
            sent = await scrape.push_live(rt.http, url, desired, token=token)
            if sent:
                logger.info(f"live config applied to {pod}: {sorted(sent.to_wire())}")
        except AdminError as exc:
            logger.warning(f"live config not applied to {pod}: {exc}")

    await asyncio.gather(*(push(pod, url) for pod, url in endpoints.items()))


# --- status: written only when it changes -----------------------------------------------------------------


def _stored_status(body: Mapping[str, Any], state: CacheState) -> Manifest:
    """The status as stored: the body's, or the one this operator wrote if the body predates it."""
    written = state.written_status
    if written is not None and written.obj is not None and _is_stale(_rv(body), written):
        return written.obj
    state.written_status = None
    return dict(body.get("status") or {})


async def _write_status(
    rt: Runtime, body: Mapping[str, Any], state: CacheState, previous: Manifest, status: Manifest
) -> None:
    """PATCH the status unless every field of ``status`` already holds; post the Events of what
    changed (status transitions)."""
    if reconcile.first_difference(status, previous) is None:
        return
    meta = body["metadata"]
    result = await rt.kube.patch(
        k8s.KVCACHES, meta["namespace"], meta["name"], {"status": status}, subresource="status"
    )
    if result is not None:
        stored = result.get("status") or {}
        state.written_status = Written(stored, _rv(body), _rv(result))
    for event in status_mod.events(previous, status):
        post_event(body, event.reason, event.message, warning=event.warning)


# --- small helpers ------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()


def parse_duration(text: str) -> float:
    """'30s', '500ms', '2m', '1h' -> seconds, held within the API's bounds (1s..1h): a spec stored
    before the webhook refused it (``0s``) must not make the loop spin. ValueError if not a duration."""
    low, high = (float(parse_seconds(t)) for t in (api.MIN_SCRAPE_INTERVAL, api.MAX_SCRAPE_INTERVAL))
    return min(max(float(parse_seconds(text)), low), high)
