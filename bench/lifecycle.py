"""What day-2 events cost a KVCache on the local cluster, under trace load, driven through the operator.

``python -m bench.lifecycle [--json] [--window 60]`` starts the local cluster (emulated API, local
kubelet running each engine pod as a real ``kvcache-engine serve`` process on its own loopback IP,
the real ``kvcache-operator run``) and a real S3-protocol server (moto's, on loopback); applies a
KVCache (2 CPU replicas, persistence on, backups to the object store with a credentials Secret,
``scrapeInterval: 2s``, autoscaling and tuning Off so only the bench changes replicas); replays the
packaged Mooncake trace through ``KVCacheClient`` (lookup, then put of the prompt, per request, as
``e2e/localcluster/load.py`` does) in a thread, whose endpoints follow what the operator publishes
in ``<name>-connection`` (``shardMapEpoch``/``members`` through ``use_shard_map``; the ready pods'
IPs while no shard map is published); and then, as a user would:

* ``scale_out``: ``spec.replicas`` 2 -> 3;
* ``scale_in``: ``spec.replicas`` 3 -> 2;
* ``rolling_restart``: an engine upgrade (``spec.image`` to a new tag): the operator's partitioned,
  warm-gated rollout (``rollout.py``) rolls every pod;
* ``kill``: ``kill -9`` of one engine container (the kubelet restarts it on its volume);
* ``restore``: a backup to the object store (the backup CronJob run on demand), a new KVCache with
  ``spec.restore.fromBackup: latest`` of the first one, and the load switched to it once it is Ready.

Per event, from the per-request samples of the load (token hit rate = hit tokens / requested
full-block tokens; a failed or impossible lookup is a miss):

* ``dip_points``: mean hit rate in the ``--window`` s before the event minus the ``--window`` s
  after, in points (positive: a dip);
* ``recovery_s``: seconds from the event to the end of the last 1 s bucket that is more than 2
  points under the before mean (or empty); 0 if none; null if the window's last bucket still is;
* ``client_errors``: exceptions raised out of the client into the caller (must be 0; the client
  runs non-strict), and ``client_failed_calls``: the calls it counted as failed
  (``kvcache_client_errors``) in the window after;
* ``blocks_lost``: what the affected replicas held before minus what they hold after, from the
  engines' ``/v1/stats`` (restarts: ``persistence.blocks_loaded`` of the new process; scale-in: the
  leaving replica's blocks not handed off, from the operator's decision; restore: the source's
  blocks minus the restored cache's).

The load loops over the first trace requests that hold ``--working-set`` distinct blocks (default:
half of one replica's capacity, so the steady hit rate is close to 1, every block an event loses
shows, and one replica can hold its peer's share while that one restarts, which is what a cache
sized for rolling restarts provides; with one replica's capacity the survivor of a restart is
overfull and its LRU thrashes on the loop); ``--working-set 0`` replays the whole trace (hit rate
~0.3 with this capacity, far noisier). ``--json`` prints one object keyed by event; otherwise a table.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import json
import logging
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

EVENTS = ("scale_out", "scale_in", "rolling_restart", "kill", "restore")
NAME = "lc"
RESTORED = "lc-restored"
RECOVERY_POINTS = 2.0
BUCKET_S = 1.0
BUCKET = "lifecycle-backups"
S3_SECRET = "lifecycle-s3"
ACCESS_KEY = "lifecycle-access"
SECRET_KEY = "lifecycle/secret"
MAX_TOKENS = 65536  # 4096 blocks of 16 tokens per replica (16 MiB at this geometry)
UPGRADE_IMAGE = "ghcr.io/kvcache-operator/kvcache-engine:0.1.1"
EVENT_TIMEOUT_S = 300.0

log = logging.getLogger("bench.lifecycle")


# ------------------------------------------------------------------------------ the arithmetic (pure)


@dataclass(frozen=True)
class Sample:
    """One request as the caller saw it: when it finished, full-block tokens asked, tokens hit."""

    t: float
    requested: int
    hit: int


@dataclass
class Samples:
    """Requests in the order they finished (``t`` non-decreasing); safe to add from one thread
    while others read."""

    items: list[Sample] = field(default_factory=list)
    _times: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, sample: Sample) -> None:
        with self._lock:
            self.items.append(sample)
            self._times.append(sample.t)

    def between(self, start: float, end: float) -> list[Sample]:
        """Samples with ``start <= t < end``."""
        with self._lock:
            lo = bisect.bisect_left(self._times, start)
            hi = bisect.bisect_left(self._times, end)
            return self.items[lo:hi]


def hit_rate(samples: Sequence[Sample]) -> float | None:
    """Token hit rate of ``samples`` (None when they asked for nothing)."""
    requested = sum(s.requested for s in samples)
    return sum(s.hit for s in samples) / requested if requested else None


def dip_points(before: float | None, after: float | None) -> float | None:
    """Before minus after, in points (positive: a dip), 2 decimals; None without both."""
    if before is None or after is None:
        return None
    return round(100.0 * (before - after), 2)


def recovery_s(
    samples: Samples,
    t0: float,
    window_s: float,
    before: float | None,
    *,
    points: float = RECOVERY_POINTS,
    bucket_s: float = BUCKET_S,
) -> float | None:
    """Seconds from ``t0`` until the hit rate is back within ``points`` of ``before`` for good:
    the end of the last ``bucket_s`` bucket in the window that is lower (or has no request), 0.0
    when none is, None when the window's last bucket still is (or ``before`` is unknown)."""
    if before is None:
        return None
    threshold = before - points / 100.0
    buckets = int(window_s // bucket_s)
    last_low: int | None = None
    for k in range(buckets):
        rate = hit_rate(samples.between(t0 + k * bucket_s, t0 + (k + 1) * bucket_s))
        if rate is None or rate < threshold:
            last_low = k
    if last_low is None:
        return 0.0
    if last_low == buckets - 1:
        return None
    return round((last_low + 1) * bucket_s, 3)


def event_record(
    samples: Samples,
    t0: float,
    window_s: float,
    *,
    client_errors: int,
    client_failed_calls: int,
    blocks_lost: int | None,
    **extra: Any,
) -> dict[str, Any]:
    """One event's figures from the samples around ``t0``; ``extra`` is kept as is."""
    before = hit_rate(samples.between(t0 - window_s, t0))
    after = hit_rate(samples.between(t0, t0 + window_s))
    return {
        "dip_points": dip_points(before, after),
        "recovery_s": recovery_s(samples, t0, window_s, before),
        "client_errors": client_errors,
        "client_failed_calls": client_failed_calls,
        "blocks_lost": blocks_lost,
        "hit_rate_before": None if before is None else round(before, 4),
        "hit_rate_after": None if after is None else round(after, 4),
        "requests_after": len(samples.between(t0, t0 + window_s)),
        "hit_rate_1s_after": [
            None if (r := hit_rate(samples.between(t0 + k, t0 + k + 1))) is None else round(r, 2)
            for k in range(int(window_s))
        ],
        **extra,
    }


def report(results: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--json`` object: every event of EVENTS (None when it did not run), then ``meta``."""
    out: dict[str, Any] = {name: results.get(name) for name in EVENTS}
    out["meta"] = dict(meta)
    return out


def handed_off(reasons: Sequence[str], pod: str) -> int | None:
    """Blocks the operator's scale-in decision says ``pod`` handed off (``<pod>: handed off N/M
    blocks``), None when no decision says so."""
    pattern = re.compile(rf"(?<![\w-]){re.escape(pod)}: handed off (\d+)/(\d+) blocks")
    found = [int(m.group(1)) for reason in reasons for m in pattern.finditer(reason)]
    return found[-1] if found else None


HANDOFF_LINE = re.compile(r"hand-off on shutdown to (\d+) peer\(s\): (\d+) of (\d+) blocks")


def shutdown_handoff(log_text: str) -> tuple[int, int] | None:
    """``(handed_off, held)`` from an engine's last ``hand-off on shutdown`` log line (what it copied
    to its peers on SIGTERM), None when it logged none."""
    found = HANDOFF_LINE.findall(log_text)
    return (int(found[-1][1]), int(found[-1][2])) if found else None


def shard_map(connection: Mapping[str, Any] | None) -> tuple[int, list[str]] | None:
    """``(shardMapEpoch, members)`` of a ``<name>-connection`` ConfigMap's data, read by the
    contract's ``ShardMap`` (``connection.json`` first, else the per-key entries); None while it
    publishes none (or a half-written one)."""
    from kvcache_engine.contract import ShardMap

    data = (connection or {}).get("data") or {}
    try:
        info = json.loads(data.get("connection.json") or "{}")
        found = ShardMap.from_connection(info) or ShardMap.from_connection(data)
    except ValueError:
        return None
    if found is None or not found.members:
        return None
    return found.epoch, list(found.members)


# ------------------------------------------------------------------------------ the load


def failed_calls() -> int:
    """Calls the client counted as failed in this process (``kvcache_client_errors``)."""
    from kvcache_engine.client.metrics import M_ERRORS

    return int(sum(s.value for m in M_ERRORS.collect() for s in m.samples if s.name.endswith("_total")))


@dataclass
class View:
    """Where the load sends requests: a KVCache, its token, and its shard map or ready pods."""

    target: str
    token: str | None
    epoch: int | None
    endpoints: list[str]


class Load:
    """The packaged trace replayed at ``rate_rps`` through one ``KVCacheClient`` (non-strict):
    lookup, then put of the prompt's full blocks. A poller thread re-reads the target's
    ``<name>-connection`` every ``poll_s`` (through the cluster API) and the load thread follows it:
    ``use_shard_map`` for a newer epoch; without a shard map, a new client when the ready pods change."""

    def __init__(
        self,
        read_view: Callable[[str], View],
        config: Any,
        trace: Sequence[Sequence[int]],
        target: str,
        *,
        rate_rps: float = 40.0,
        poll_s: float = 0.5,
    ) -> None:
        self.read_view = read_view
        self.config = config
        self.trace = list(trace)
        self.target = target
        self.rate_rps = rate_rps
        self.poll_s = poll_s
        self.samples = Samples()
        self.client_errors = 0  # exceptions that reached this caller
        self.switches: list[tuple[float, str]] = []  # (t, what changed): endpoints followed
        self.poll_errors = 0
        self._view: View | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client: Any = None
        self._client_view: View | None = None
        self._kv: dict[int, Any] = {}

    # -- endpoints
    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                view = self.read_view(self.target)
                if view.target == self.target:  # not a read that raced switch()
                    self._view = view
            except Exception as exc:  # the API answered badly once: keep the last view
                self.poll_errors += 1
                log.debug("poll failed: %s", exc)
            self._stop.wait(self.poll_s)

    def _follow(self) -> Any:
        from kvcache_engine.client import KVCacheClient

        view, have = self._view, self._client_view
        if view is None or (have is not None and view == have):
            return self._client
        same_cache = have is not None and have.target == view.target and have.token == view.token
        if (
            same_cache
            and self._client is not None
            and view.epoch is not None
            and hasattr(self._client, "use_shard_map")
        ):
            if have is None or have.epoch is None or view.epoch > have.epoch:
                self._client.use_shard_map(view.epoch, view.endpoints)
                self.switches.append((time.monotonic(), f"epoch {view.epoch}: {','.join(view.endpoints)}"))
            self._client_view = view
            return self._client
        if self._client is not None:
            self._client.close()
        self._client = None
        if view.endpoints:
            self._client = KVCacheClient(
                view.endpoints, token=view.token, config=self.config, timeout_s=2.0, min_bandwidth_mib_s=5.0
            )
            if view.epoch is not None and hasattr(self._client, "use_shard_map"):
                self._client.use_shard_map(view.epoch, view.endpoints)
        self._client_view = view
        self.switches.append((time.monotonic(), f"{view.target}: {','.join(view.endpoints) or 'none'}"))
        return self._client

    # -- one request
    def _kv_for(self, n_tokens: int) -> Any:
        import torch

        if n_tokens not in self._kv:
            cfg = self.config
            shape = (2, cfg.num_layers, n_tokens, cfg.num_kv_heads, cfg.head_dim)
            gen = torch.Generator().manual_seed(n_tokens)
            self._kv[n_tokens] = torch.randn(shape, generator=gen).to(getattr(torch, cfg.dtype))
        return self._kv[n_tokens]

    def step(self, ids: Sequence[int]) -> None:
        from kvcache_engine.loadgen import request_tokens

        block = self.config.block_tokens
        tokens = request_tokens(list(ids), block)
        n = len(tokens) // block * block
        hit = 0
        client = self._follow()
        if client is not None:
            try:
                hit = client.lookup(tokens)
                client.put(tokens[:n], self._kv_for(n), wait=True)
            except Exception as exc:  # must never happen: the client degrades instead of raising
                self.client_errors += 1
                log.warning("the client raised into the caller: %r", exc)
        self.samples.add(Sample(time.monotonic(), n, hit))

    def _replay(self) -> None:
        interval = 1.0 / self.rate_rps if self.rate_rps > 0 else 0.0
        next_at = time.monotonic()
        i = 0
        while not self._stop.is_set():
            self.step(self.trace[i % len(self.trace)])
            i += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()  # behind: do not burst to catch up

    def start(self) -> Load:
        self._view = self.read_view(self.target)
        for fn, name in ((self._poll, "lifecycle-poll"), (self._replay, "lifecycle-load")):
            thread = threading.Thread(target=fn, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def in_use(self) -> list[str]:
        """The endpoints (or shard-map members) the client places chains over now."""
        view = self._client_view
        return [] if view is None else list(view.endpoints)

    def switch(self, target: str) -> None:
        """Send the load to another KVCache from the next request on."""
        self.target = target
        self._view = self.read_view(target)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        if self._client is not None:
            self._client.close()


# ------------------------------------------------------------------------------ the cluster side


class Bench:
    """The cluster, the object store, the KVCache and the events; ``run()`` returns the results."""

    def __init__(
        self,
        window_s: float,
        rate_rps: float,
        working_set: int | None,
        progress: Any,
        keep_state: bool = False,
    ) -> None:
        self.keep_state = keep_state
        self.window_s = window_s
        self.rate_rps = rate_rps
        self.working_set = working_set
        self.progress = progress
        self.cluster: Any = None
        self.driver: Any = None
        self.load: Load | None = None
        self.s3_endpoint = ""

    # -- small reads
    def pods(self, name: str) -> list[dict[str, Any]]:
        from e2e import scenarios

        return scenarios.engine_pods(self.driver, name)

    def token(self, name: str) -> str:
        from e2e import scenarios

        return scenarios.token(self.driver, name)

    def stats(self, pod: Mapping[str, Any], token: str) -> dict[str, Any]:
        from e2e import scenarios

        return dict(scenarios.http_json(f"{self.driver.endpoint(pod)}/v1/stats", token, timeout_s=5))

    def held(self, name: str) -> dict[str, int]:
        """``cached_blocks`` of each ready engine of ``name``, by pod."""
        from e2e import scenarios

        tok = self.token(name)
        return {
            p["metadata"]["name"]: int(self.stats(p, tok)["cached_blocks"])
            for p in self.pods(name)
            if scenarios.pod_ready(p)
        }

    def pod_log(self, pod: str, uid: str) -> str:
        """Everything one incarnation (``uid``) of ``pod`` logged, also once it is gone."""
        root = self.cluster.state_dir / "logs" / "pods"
        paths = sorted(root.glob(f"{self.cluster.namespace}_{pod}_{uid}/*/*.log"))
        return "".join(p.read_text(errors="replace") for p in paths)

    def read_view(self, name: str) -> View:
        from e2e import scenarios

        cm = self.cluster.get("ConfigMap", f"{name}-connection")
        found = shard_map(cm)
        secret = self.cluster.get("Secret", f"{name}-token")
        tok = base64.b64decode(secret["data"]["token"]).decode() if secret else None
        if found is not None:
            epoch, members = found
            return View(name, tok, epoch, sorted(m if "//" in m else f"http://{m}" for m in members))
        return View(name, tok, None, sorted(scenarios.ready_endpoints(self.driver, name)))

    def loaded(self) -> Load:
        assert self.load is not None, "the load is not running"
        return self.load

    def wait(self, what: str, predicate: Callable[[], Any], timeout_s: float = EVENT_TIMEOUT_S) -> Any:
        self.progress(f"  waiting: {what}")
        return self.driver.wait_for(predicate, timeout_s, what)

    # -- setup
    def manifest(self, name: str, **spec: Any) -> dict[str, Any]:
        from e2e import scenarios

        store = {
            "endpoint": self.s3_endpoint,
            "bucket": BUCKET,
            "prefix": "bench",
            "credentials": {"secretName": S3_SECRET},
            "partSizeMb": 5,
        }
        base: dict[str, Any] = {
            "replicas": 2,
            "cache": {"maxTokens": MAX_TOKENS, "persistIntervalS": 5},
            "persistence": {"enabled": True, "whenDeleted": "Delete", "whenScaled": "Retain"},
            "backup": {"enabled": True, "objectStore": store},
            "autoscaling": {"mode": "Off"},
            "tuning": {"mode": "Off"},
            "metrics": {"scrapeInterval": "2s"},
        }
        base.update(spec)
        return scenarios.kvcache_manifest(name, self.driver, **base)

    def apply_ready(self, manifest: Mapping[str, Any]) -> None:
        from e2e import scenarios

        self.driver.apply(manifest)
        name = manifest["metadata"]["name"]
        replicas = int(manifest["spec"]["replicas"])
        self.progress(f"  waiting: KVCache {name} Ready with {replicas} engines")
        scenarios.wait_ready(self.driver, name, replicas, timeout_s=EVENT_TIMEOUT_S)

    def trace(self, capacity_blocks: int) -> list[list[int]]:
        from e2e import scenarios

        from kvcache_engine.loadgen import load_trace

        if self.working_set == 0:
            return [list(ids) for ids in load_trace()]
        return scenarios.working_set(self.working_set or capacity_blocks // 2)

    # -- the events: each returns (t0, its extra figures incl. blocks_lost)
    def scale_out(self) -> tuple[float, dict[str, Any]]:
        before = self.held(NAME)
        t0 = time.monotonic()
        self.driver.patch("KVCache", NAME, {"spec": {"replicas": 3}})
        joined: dict[str, Any] = {}
        new_pod = f"{NAME}-2"

        def ready() -> bool:
            held = self.held(NAME)
            if new_pod in held and "at_ready" not in joined:
                joined["at_ready"], joined["ready_s"] = held[new_pod], round(time.monotonic() - t0, 1)
            view = self.read_view(NAME)
            return len(held) == 3 and len(view.endpoints) == 3 and len(self.loaded().in_use()) == 3

        self.wait("3 engines ready and the load's client placing over them", ready)
        routed_s = round(time.monotonic() - t0, 1)
        after = self.held(NAME)
        lost = sum(before.values()) - sum(after.get(p, 0) for p in before)
        return t0, {
            "blocks_lost": max(0, lost),
            "new_replica_blocks_at_ready": joined.get("at_ready"),
            "new_replica_ready_s": joined.get("ready_s"),
            "routed_s": routed_s,
            "held_before": before,
            "held_after": after,
        }

    def scale_in(self) -> tuple[float, dict[str, Any]]:
        leaving = f"{NAME}-2"
        before = self.held(NAME)
        uid = next(p["metadata"]["uid"] for p in self.pods(NAME) if p["metadata"]["name"] == leaving)
        said_before = set(self.scale_reports(NAME))
        t0 = time.monotonic()
        self.driver.patch("KVCache", NAME, {"spec": {"replicas": 2}})
        staying = {f"{NAME}-0", f"{NAME}-1"}
        self.wait(
            f"{leaving} gone (its log complete), 2 engines ready",
            lambda: {p["metadata"]["name"] for p in self.pods(NAME)} == set(self.held(NAME)) == staying,
        )
        gone_s = round(time.monotonic() - t0, 1)
        # The proof: the operator's (status.lastScale, a decision or a ScaledIn Event; Events are
        # posted in the background: give them a few seconds), else the engine's own SIGTERM hand-off.
        deadline = time.monotonic() + 10.0
        moved, source = None, "none"
        while moved is None and time.monotonic() < deadline:
            fresh = [text for text in self.scale_reports(NAME) if text not in said_before]
            moved, source = handed_off(fresh, leaving), "operator"
            if moved is None:
                time.sleep(0.5)
        if moved is None:
            on_sigterm = shutdown_handoff(self.pod_log(leaving, uid))
            moved, source = (on_sigterm[0], "engine log (SIGTERM)") if on_sigterm else (None, "none")
        held = before.get(leaving, 0)
        return t0, {
            "blocks_lost": held - min(held, moved or 0),
            "leaving_replica_blocks": held,
            "handed_off_blocks": moved,
            "handoff_reported_by": source,
            "removed_s": gone_s,
            "held_before": before,
        }

    def scale_reports(self, name: str) -> list[str]:
        """What the operator said about scaling ``name``: decision reasons, status.lastScale.reason,
        and the messages of its Events."""
        from e2e import scenarios

        status = (self.cluster.get("KVCache", name) or {}).get("status") or {}
        texts = [str(d.get("reason", "")) for d in status.get("decisions") or []]
        texts.append(str((status.get("lastScale") or {}).get("reason", "")))
        texts += [str(e.get("message", "")) for e in scenarios.kvcache_events(self.driver, name)]
        return [t for t in texts if t]

    def rolling_restart(self) -> tuple[float, dict[str, Any]]:
        from e2e import scenarios

        from kvcache_operator.rollout import current_partition

        uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in self.pods(NAME)}
        last_held = self.held(NAME)  # each old engine's blocks, the last time it answered
        before = dict(last_held)
        tok = self.token(NAME)
        partitions: list[int] = []
        order: list[str] = []  # "lc-1 down", "lc-1 ready", ...: the rollout as it went
        loaded: dict[str, dict[str, int]] = {}
        most_down = 0
        done = threading.Event()

        def watch() -> None:  # every 0.1 s: a partition step lasts seconds, a poll of the wait longer
            nonlocal most_down
            while not done.is_set():
                part = current_partition(self.cluster.get("StatefulSet", NAME))
                if not partitions or partitions[-1] != part:
                    partitions.append(part)
                pods = self.pods(NAME)
                most_down = max(most_down, len(uids) - sum(1 for p in pods if scenarios.pod_ready(p)))
                for p in pods:
                    name, uid = p["metadata"]["name"], p["metadata"]["uid"]
                    old, ready = uid == uids.get(name), scenarios.pod_ready(p)
                    if old and ready:
                        with contextlib.suppress(Exception):  # stopping: keep the last answer
                            last_held[name] = int(self.stats(p, tok)["cached_blocks"])
                    elif old and f"{name} down" not in order:
                        order.append(f"{name} down")
                    elif not old and ready and name not in loaded:
                        persisted = self.stats(p, tok)["persistence"]
                        loaded[name] = {k: int(persisted[k]) for k in ("blocks_loaded", "blocks_expected")}
                        order.append(f"{name} ready")
                done.wait(0.1)

        t0 = time.monotonic()
        self.driver.patch("KVCache", NAME, {"spec": {"image": UPGRADE_IMAGE}})
        watcher = threading.Thread(target=watch, name="lifecycle-rollout-watch", daemon=True)
        watcher.start()
        try:
            self.wait(
                "every engine rolled (partition 0, all ready)",
                lambda: len(loaded) == len(uids) and partitions[-1:] == [0],
            )
        finally:
            done.set()
            watcher.join(timeout=10)
        handoffs = {n: shutdown_handoff(self.pod_log(n, uid)) for n, uid in uids.items()}
        return t0, {
            "blocks_lost": sum(last_held[n] - loaded[n]["blocks_loaded"] for n in uids),
            "held_at_stop": last_held,
            "held_before": before,
            "blocks_loaded": {n: v["blocks_loaded"] for n, v in loaded.items()},
            "blocks_not_loaded": sum(v["blocks_expected"] - v["blocks_loaded"] for v in loaded.values()),
            "handed_off_on_sigterm": {n: (None if h is None else h[0]) for n, h in handoffs.items()},
            "partitions_seen": partitions,
            "rollout_order": order,
            "most_engines_down": most_down,
            "rolled_s": round(time.monotonic() - t0, 1),
        }

    def kill(self) -> tuple[float, dict[str, Any]]:
        from e2e import scenarios

        victim = f"{NAME}-1"
        tok = self.token(NAME)
        pod = next(p for p in self.pods(NAME) if p["metadata"]["name"] == victim)
        restarts = int(pod["status"]["containerStatuses"][0].get("restartCount") or 0)
        held = int(self.stats(pod, tok)["cached_blocks"])
        t0 = time.monotonic()
        self.driver.kill_engine(victim)

        def back() -> dict[str, Any] | None:
            p = next((p for p in self.pods(NAME) if p["metadata"]["name"] == victim), None)
            if p is None or not scenarios.pod_ready(p):
                return None
            if int(p["status"]["containerStatuses"][0].get("restartCount") or 0) <= restarts:
                return None
            return p

        pod = self.wait(f"{victim} restarted and ready", back)
        loaded = int(self.stats(pod, tok)["persistence"]["blocks_loaded"])
        return t0, {
            "blocks_lost": held - loaded,
            "held_before": held,
            "blocks_loaded": loaded,
            "ready_s": round(time.monotonic() - t0, 1),
        }

    def restore(self) -> tuple[float, dict[str, Any]]:
        from e2e import scenarios

        started = time.monotonic()
        job = self.driver.run_cronjob(f"{NAME}-backup")
        self.wait(f"backup Job {job}", lambda: scenarios.job_succeeded(self.driver, job) is not None)
        if not scenarios.job_succeeded(self.driver, job):
            raise RuntimeError(f"backup Job {job} failed:\n{self.driver.job_logs(job)[-2000:]}")
        backup_s = round(time.monotonic() - started, 1)
        manifest = self.manifest(
            RESTORED,
            restore={"fromBackup": "latest", "sourceName": NAME},
            backup={"enabled": False},
        )
        # the restore reads spec.restore.objectStore, else spec.backup.objectStore: name it here
        manifest["spec"]["restore"]["objectStore"] = self.manifest(NAME)["spec"]["backup"]["objectStore"]
        created = time.monotonic()
        self.apply_ready(manifest)
        ready_s = round(time.monotonic() - created, 1)
        restored = self.held(RESTORED)
        source = self.held(NAME)
        status = (self.cluster.get("KVCache", RESTORED) or {}).get("status") or {}
        t0 = time.monotonic()
        self.loaded().switch(RESTORED)
        return t0, {
            "blocks_lost": sum(source.values()) - sum(restored.values()),
            "source_blocks": source,
            "restored_blocks": restored,
            "blocks_verified": {r.get("pod"): r.get("blocksVerified") for r in status.get("restored") or []},
            "backup_s": backup_s,
            "restored_ready_s": ready_s,
        }

    # -- the run
    def measure(self, name: str, event: Callable[[], tuple[float, dict[str, Any]]]) -> dict[str, Any]:
        assert self.load is not None
        load = self.load
        self.progress(f"{name}: {self.window_s:.0f} s before")
        time.sleep(self.window_s)
        errors0, failed0 = load.client_errors, failed_calls()
        self.progress(f"{name}: the event")
        t0, extra = event()
        rest = t0 + self.window_s - time.monotonic()
        self.progress(
            f"{name}: done in {time.monotonic() - t0:.0f} s; the window after ends in {max(0, rest):.0f} s"
        )
        if rest > 0:
            time.sleep(rest)
        record = event_record(
            load.samples,
            t0,
            self.window_s,
            client_errors=load.client_errors - errors0,
            client_failed_calls=failed_calls() - failed0,
            **extra,
        )
        record["event_longer_than_window"] = time.monotonic() - t0 > self.window_s + 1.0
        record["client_switches"] = [
            f"+{t - t0:.1f}s {what}" for t, what in load.switches if t0 - 1.0 <= t < t0 + self.window_s
        ]
        self.progress(
            f"{name}: dip {record['dip_points']} points, recovery {record['recovery_s']} s, "
            f"errors {record['client_errors']}, failed calls {record['client_failed_calls']}, "
            f"blocks lost {record['blocks_lost']}"
        )
        return record

    def run(self, only: Sequence[str] = EVENTS) -> dict[str, Any]:
        from e2e.localcluster.cluster import LocalCluster
        from e2e.localcluster.driver import LocalDriver
        from e2e.scenarios import engine_config

        results: dict[str, Any] = {}
        meta: dict[str, Any] = {"window_s": self.window_s, "rate_rps": self.rate_rps}
        with (
            s3_server() as endpoint,
            LocalCluster(shutdown_grace_s=5.0, keep_state=self.keep_state) as cluster,
        ):
            self.s3_endpoint, self.cluster, self.driver = endpoint, cluster, LocalDriver(cluster)
            self.progress(f"local cluster up (state {cluster.state_dir}); S3 at {endpoint}")
            create_bucket(endpoint)
            cluster.apply(credentials_secret(cluster.namespace))
            manifest = self.manifest(NAME)
            self.apply_ready(manifest)
            config = engine_config(manifest)
            trace = self.trace(config.num_blocks())
            meta.update(
                requests_in_loop=len(trace),
                distinct_blocks=len({b for ids in trace for b in ids}),
                capacity_blocks_per_replica=config.num_blocks(),
            )
            self.load = Load(self.read_view, config, trace, NAME, rate_rps=self.rate_rps).start()
            try:
                warmup = max(10.0, 2.0 * len(trace) / max(self.rate_rps, 1.0))
                self.progress(f"warm-up: {warmup:.0f} s of load")
                time.sleep(warmup)
                for name in only:
                    try:
                        results[name] = self.measure(name, getattr(self, name))
                    except Exception as exc:  # one event failing must not hide the others' figures
                        self.progress(f"{name}: FAILED: {exc}")
                        results[name] = {"error": str(exc).splitlines()[0][:300]}
            finally:
                self.load.stop()
            meta.update(
                requests=len(self.load.samples.items),
                endpoint_switches=len(self.load.switches),
                shard_map_seen=any(s.startswith("epoch") for _, s in self.load.switches),
            )
        return report(results, meta)


# ------------------------------------------------------------------------------ the object store


def s3_server() -> contextlib.AbstractContextManager[str]:
    """moto's standalone S3 server (the tests' ``moto_server``) on a loopback address pods reach.

    Not 127.0.0.1: inside a pod that is the pod itself (the local kubelet maps it to the pod's IP).
    127.254.X.1 is outside the local cluster's pod ranges (127.10-250.*.*)."""
    from tests.service.s3_server import moto_server

    return moto_server(f"127.254.{random.randint(0, 255)}.1", start_timeout_s=60)


def create_bucket(endpoint: str) -> None:
    from kvcache_engine.objectstore import ObjectStore, S3Client

    with S3Client(ObjectStore(endpoint, BUCKET, access_key=ACCESS_KEY, secret_key=SECRET_KEY)) as c:
        c.create_bucket()


def credentials_secret(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": S3_SECRET, "namespace": namespace},
        "type": "Opaque",
        "stringData": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
    }


# ------------------------------------------------------------------------------ output


def table(result: Mapping[str, Any]) -> Any:
    from rich.table import Table

    meta = result.get("meta") or {}
    out = Table(title=f"day-2 events on the local cluster ({meta.get('window_s')} s windows)")
    for col in ("event", "dip (points)", "recovery (s)", "client errors", "failed calls", "blocks lost",
                "hit rate before", "after"):  # fmt: skip
        out.add_column(col, justify="left" if col == "event" else "right")
    for name in EVENTS:
        r = result.get(name)
        if r is None:
            out.add_row(name, "not run", *[""] * 6)
        elif "error" in r:
            out.add_row(name, f"failed: {r['error']}", *[""] * 6)
        else:
            out.add_row(
                name,
                *(
                    "-" if r.get(k) is None else str(r[k])
                    for k in (
                        "dip_points",
                        "recovery_s",
                        "client_errors",
                        "client_failed_calls",
                        "blocks_lost",
                        "hit_rate_before",
                        "hit_rate_after",
                    )
                ),
            )
    return out


def events_arg(text: str) -> Iterator[str]:
    """The events named in ``text``, in the bench's order (restore last: it moves the load away)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    for item in items:
        if item not in EVENTS:
            raise argparse.ArgumentTypeError(f"--events: {item!r} is not one of {', '.join(EVENTS)}")
    yield from (e for e in EVENTS if e in items)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m bench.lifecycle", description=doc.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by event")
    parser.add_argument("--window", type=float, default=60.0, help="seconds before and after each event")
    parser.add_argument("--rate", type=float, default=40.0, help="trace requests per second")
    parser.add_argument(
        "--working-set",
        type=int,
        default=None,
        help="distinct blocks of the looped trace prefix (default: half one replica's capacity; 0: all)",
    )
    parser.add_argument(
        "--events", type=lambda s: list(events_arg(s)), default=list(EVENTS), help="comma-separated subset"
    )
    parser.add_argument(
        "--keep-state", action="store_true", help="keep the cluster's state directory (logs, volumes)"
    )
    args = parser.parse_args(argv)
    if args.window < 2:
        parser.error(f"--window must be >= 2 seconds, got {args.window}")
    from rich.console import Console

    console = Console(stderr=True)
    logging.getLogger("kvcache_engine").setLevel(logging.ERROR)  # the client's warnings: counted instead
    started = time.monotonic()

    def progress(message: str) -> None:
        console.log(f"[{time.monotonic() - started:6.0f}s] {message}")

    try:
        result = Bench(args.window, args.rate, args.working_set, progress, args.keep_state).run(args.events)
    except KeyboardInterrupt:
        console.print("interrupted: the load, the operator, every engine and the S3 server were stopped")
        return 130
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=False))
    else:
        Console().print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
