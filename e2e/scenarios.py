"""The end-to-end scenarios, written once against :class:`Driver` and run on two targets:

* the local cluster (``e2e.localcluster.driver.LocalDriver``): ``make test`` (fast subset) and ``make e2e``;
* a real cluster through kubectl and helm (``e2e.kind.driver.KindDriver``): the kind workflow.

Each scenario applies its own KVCache (a variant of ``crds/samples/local-demo.yaml`` under its own
name), drives it, checks the outcome and deletes it. Everything the scenarios observe comes from
the Kubernetes API, the engines' HTTP API or (for backups) a Job's logs, so nothing here knows
which target runs it. Only the driver knows how to reach a pod's IP, kill a container, read logs
and count leftover processes.
"""

from __future__ import annotations

import base64
import builtins
import json
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

from e2e.localcluster.load import TraceLoad, load_trace
from kvcache_engine.contract import KVCacheConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "crds" / "samples" / "local-demo.yaml"
T = TypeVar("T")

# Children every KVCache of the sample has (kind, name suffix); the data PVCs are per replica.
CHILDREN = (
    ("StatefulSet", ""),
    ("Service", ""),
    ("Service", "-headless"),
    ("ConfigMap", "-config"),
    ("ConfigMap", "-connection"),
    ("Secret", "-token"),
    ("Secret", "-admin-token"),
    ("PodDisruptionBudget", ""),
    ("CronJob", "-backup"),
)


class Driver(Protocol):
    """What a scenario needs from a cluster. ``apply`` raises ValueError with the server's message."""

    namespace: str
    engine_image: str | None

    def apply(self, manifest: Mapping[str, Any]) -> None: ...

    def get(self, kind: str, name: str) -> dict[str, Any] | None: ...

    def list(self, kind: str, selector: Mapping[str, str] | None = None) -> builtins.list[dict[str, Any]]: ...

    def patch(self, kind: str, name: str, patch: Mapping[str, Any]) -> None: ...

    def delete(self, kind: str, name: str) -> None: ...

    def wait_for(self, predicate: Callable[[], T | None], timeout_s: float, what: str) -> T: ...

    def endpoint(self, pod: Mapping[str, Any]) -> str:
        """``http://host:port`` reaching this pod's engine from the test process."""
        ...

    def kill_engine(self, pod: str) -> None:
        """``kill -9`` of the engine process of ``pod`` (the container, not the pod)."""
        ...

    def job_logs(self, job: str) -> str: ...

    def run_cronjob(self, cronjob: str) -> str:
        """``kubectl create job --from=cronjob/<cronjob>``; the Job's name."""
        ...

    def engine_processes(self, name: str) -> builtins.list[int]:
        """PIDs of KVCache ``name``'s engine processes still running (where the driver sees them, else [])."""
        ...


# --------------------------------------------------------------------------------------- manifests


def kvcache_manifest(name: str, driver: Driver, **spec_changes: Any) -> dict[str, Any]:
    """The sample under ``name`` with top-level spec sections replaced/merged by ``spec_changes``."""
    doc: dict[str, Any] = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"] = {"name": name, "namespace": driver.namespace}
    for key, value in spec_changes.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key] = {**doc["spec"][key], **value}
        else:
            doc["spec"][key] = value
    if driver.engine_image:
        doc["spec"]["image"] = driver.engine_image
        doc["spec"]["imagePullPolicy"] = "Never"
    return doc


def engine_config(manifest: Mapping[str, Any]) -> KVCacheConfig:
    return KVCacheConfig.model_validate(manifest["spec"]["cache"])


# ------------------------------------------------------------------------------------------ reading


def condition(obj: Mapping[str, Any] | None, ctype: str) -> str | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return str(cond.get("status"))
    return None


def engine_pods(driver: Driver, name: str) -> list[dict[str, Any]]:
    selector = {"app.kubernetes.io/instance": name, "app.kubernetes.io/component": "engine"}
    return sorted(driver.list("Pod", selector), key=lambda p: p["metadata"]["name"])


def pod_ready(pod: Mapping[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def ready_endpoints(driver: Driver, name: str) -> list[str]:
    return [driver.endpoint(p) for p in engine_pods(driver, name) if pod_ready(p)]


def token(driver: Driver, name: str) -> str:
    secret = driver.get("Secret", f"{name}-token")
    assert secret is not None, f"secret {name}-token missing"
    return base64.b64decode(secret["data"]["token"]).decode()


def http_json(url: str, tok: str, method: str = "GET", body: Any = None, timeout_s: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def engine_counters(driver: Driver, name: str) -> dict[str, int]:
    """Sum over the ready engines of their own lookup counters (GET /v1/stats)."""
    tok = token(driver, name)
    total = {"hit_tokens": 0, "requested_tokens": 0, "requests": 0}
    for url in ready_endpoints(driver, name):
        stats = http_json(f"{url}/v1/stats", tok)
        for key in total:
            total[key] += int(stats[key])
    return total


def wait_ready(driver: Driver, name: str, replicas: int, timeout_s: float = 120.0) -> dict[str, Any]:
    """KVCache Ready=True with ``replicas`` ready engines, each answering /readyz."""

    def ready() -> dict[str, Any] | None:
        kvc = driver.get("KVCache", name)
        status = (kvc or {}).get("status") or {}
        if condition(kvc, "Ready") != "True" or status.get("readyReplicas") != replicas:
            return None
        urls = ready_endpoints(driver, name)
        if len(urls) != replicas:
            return None
        for url in urls:
            try:
                urllib.request.urlopen(f"{url}/readyz", timeout=2).close()
            except OSError:
                return None
        return kvc

    return driver.wait_for(ready, timeout_s, f"KVCache {name} Ready with {replicas} engines")


def trace_load(driver: Driver, name: str, manifest: Mapping[str, Any], **kwargs: Any) -> TraceLoad:
    """A trace replay against KVCache ``name``'s ready engines (endpoints and token re-read as
    pods come and go); ``kwargs`` are TraceLoad's (rate_rps, limit, loop, puts)."""
    return TraceLoad(
        lambda: ready_endpoints(driver, name), lambda: token(driver, name), engine_config(manifest), **kwargs
    )


def replay_once(
    driver: Driver, name: str, manifest: Mapping[str, Any], limit: int, **kwargs: Any
) -> dict[str, float]:
    """The first ``limit`` trace requests, as fast as they go, once; what TraceLoad.run saw."""
    return trace_load(driver, name, manifest, rate_rps=0, limit=limit, loop=False, **kwargs).run()


@contextmanager
def running_load(
    driver: Driver, name: str, manifest: Mapping[str, Any], **kwargs: Any
) -> Iterator[TraceLoad]:
    load = trace_load(driver, name, manifest, **kwargs)
    load.start()
    try:
        yield load
    finally:
        load.stop()


def decisions(driver: Driver, name: str, kind: str) -> list[dict[str, Any]]:
    kvc = driver.get("KVCache", name)
    return [d for d in ((kvc or {}).get("status") or {}).get("decisions") or [] if d.get("kind") == kind]


# ----------------------------------------------------------------------------------------- scenarios


def create_ready(driver: Driver, name: str, replicas: int = 2, **spec: Any) -> dict[str, Any]:
    """Apply a sample variant and wait until it is Ready with ``replicas`` engines serving."""
    manifest = kvcache_manifest(name, driver, replicas=replicas, **spec)
    driver.apply(manifest)
    wait_ready(driver, name, replicas)
    backups = manifest["spec"].get("backup", {}).get("enabled", False)
    for kind, suffix in CHILDREN:
        if kind != "CronJob" or backups:
            assert driver.get(kind, name + suffix) is not None, f"{kind} {name}{suffix} missing"
    return manifest


def hit_rate_matches_engine_counters(driver: Driver, name: str, manifest: Mapping[str, Any]) -> None:
    """Replayed trace → what the client saw equals the engines' counters; status.hitRate agrees.

    Phase 1 replays the trace with puts: the lookups the client made are exactly what the
    engines counted. Phase 2 cycles lookups over a fixed slice of the trace (no puts: the cache
    does not change), so every scrape window has the same hit rate, which the status must show.
    """
    before = engine_counters(driver, name)
    seen = replay_once(
        driver, name, manifest, 700
    )  # the trace reuses a prefix ~400 requests later (median): 700 give some hits
    after = engine_counters(driver, name)
    assert seen["requests"] == 700
    assert after["requested_tokens"] - before["requested_tokens"] == seen["requested_tokens"]
    assert after["hit_tokens"] - before["hit_tokens"] == seen["hit_tokens"]
    assert 0 < seen["hit_tokens"] < seen["requested_tokens"]

    # Two requests in turn: the last one stored (every block cached) and one whose chain was never
    # stored. The pair's hit rate is fixed, so every scrape window of the operator sees the same.
    trace = load_trace()
    known = {block for ids in trace[:700] for block in ids}
    # Every chain shares block 0 (cached on each replica by now): "fresh" past it.
    fresh = next(ids for ids in trace[700:] if len(ids) > 1 and ids[1] not in known)
    steady = trace_load(driver, name, manifest, rate_rps=40, puts=False)
    steady.trace = [trace[699], fresh]
    start = engine_counters(driver, name)
    with_status: list[float] = []
    steady.start()
    try:
        time.sleep(8)  # > 3 scrape intervals (2 s in the sample): the operator's window is all steady load
        for _ in range(2):
            rate = ((driver.get("KVCache", name) or {}).get("status") or {}).get("hitRate")
            with_status.append(-1.0 if rate is None else float(rate))
            time.sleep(2.5)
    finally:
        steady.stop()
    end = engine_counters(driver, name)
    engines_rate = (end["hit_tokens"] - start["hit_tokens"]) / (
        end["requested_tokens"] - start["requested_tokens"]
    )
    assert 0.0 < engines_rate < 1.0, engines_rate  # a real mix of hits and misses
    assert all(abs(r - engines_rate) <= 0.05 for r in with_status), (with_status, engines_rate)


def delete_cleans_up(
    driver: Driver, name: str, *, data_pvcs_kept: bool, backup_pvc_kept: bool, replicas: int
) -> None:
    """Delete → every child and engine process gone; PVCs per the retention policy."""
    driver.delete("KVCache", name)

    def gone() -> bool:
        if driver.get("KVCache", name) is not None or engine_pods(driver, name):
            return False
        return all(driver.get(kind, name + suffix) is None for kind, suffix in CHILDREN)

    driver.wait_for(gone, 60, f"every child of {name} gone")
    driver.wait_for(lambda: not driver.engine_processes(name), 30, "engine processes gone")
    claims = {p["metadata"]["name"] for p in driver.list("PersistentVolumeClaim")}
    data = {f"data-{name}-{i}" for i in range(replicas)}
    assert (data <= claims) == data_pvcs_kept and (not data & claims) == (not data_pvcs_kept), claims
    assert (f"{name}-backups" in claims) == backup_pvc_kept, claims


def working_set(blocks: int) -> list[list[int]]:
    """The first trace requests holding about ``blocks`` distinct blocks (a loop over them is a
    working set: with less capacity LRU evicts exactly what comes next, with enough it all hits)."""
    out: list[list[int]] = []
    seen: set[int] = set()
    for ids in load_trace():
        if len(seen | set(ids)) > blocks:
            break
        out.append(ids)
        seen |= set(ids)
    return out


def window_hit_rate(before: Mapping[str, float], after: Mapping[str, float]) -> float:
    requested = after["requested_tokens"] - before["requested_tokens"]
    return (after["hit_tokens"] - before["hit_tokens"]) / requested if requested else 0.0


def scale_out_on_pressure(driver: Driver, name: str) -> None:
    """Sustained pressure → a Scale decision applied, chains re-sharded, hit rate recovers.

    The load loops over a working set of ~1.3x one replica's capacity: on one replica LRU thrashes
    (hit rate ~0, pressure ~1), which is exactly the operator's scale-out signal. With two replicas
    the client re-shards the chains by rendezvous and the set fits: the hit rate recovers.
    """
    manifest = create_ready(
        driver, name, replicas=1, autoscaling={"mode": "Auto", "maxReplicas": 2}, tuning={"mode": "Off"}
    )
    capacity = engine_config(manifest).num_blocks()
    load = trace_load(driver, name, manifest, rate_rps=60)
    load.trace = working_set(capacity * 13 // 10)
    load.start()
    try:
        time.sleep(4)
        thrashing_from = load.stats.snapshot()
        driver.wait_for(lambda: decisions(driver, name, "Scale"), 120, "a Scale decision")
        thrashing = window_hit_rate(thrashing_from, load.stats.snapshot())
        wait_ready(driver, name, 2, timeout_s=90)
        time.sleep(8)  # the client picked up the new endpoint; one pass re-stores the moved chains
        recovered_from = load.stats.snapshot()
        time.sleep(8)
        recovered = window_hit_rate(recovered_from, load.stats.snapshot())
    finally:
        load.stop()
    assert thrashing < 0.2, f"one replica should thrash on this working set: hit rate {thrashing:.2f}"
    assert recovered > 0.8, f"hit rate did not recover after scale-out: {thrashing:.2f} -> {recovered:.2f}"
    tok = token(driver, name)
    used = [http_json(f"{url}/v1/stats", tok)["used_blocks"] for url in ready_endpoints(driver, name)]
    assert len(used) == 2 and all(u > 0 for u in used), (
        f"chains were not re-sharded over both replicas: {used}"
    )
    decision = decisions(driver, name, "Scale")[0]
    reason = decision.get("reason", "")
    # The miss-ratio curve sizes it once it has its samples (the working set fits in 1.3x one
    # replica); before, the threshold rules do (memory pressure) and say the curve is warming up.
    assert decision.get("action") == "replicas 1 -> 2" and (
        "predicted" in reason or "memory pressure" in reason
    )
    sts = driver.get("StatefulSet", name)
    kvc = driver.get("KVCache", name)
    assert sts is not None and sts["spec"]["replicas"] == 2
    assert kvc is not None and kvc["spec"]["replicas"] == 1  # the operator never rewrites spec
    delete_cleans_up(driver, name, data_pvcs_kept=False, backup_pvc_kept=True, replicas=2)


def tuning_enables_compression_live(driver: Driver, name: str) -> None:
    """Tuning Auto under pressure → compression enabled on the running engines, no restart."""
    manifest = create_ready(
        driver, name, replicas=1, autoscaling={"mode": "Off"}, tuning={"mode": "Auto", "intervalSeconds": 30}
    )
    pod_before = engine_pods(driver, name)[0]
    with running_load(driver, name, manifest, rate_rps=40):
        driver.wait_for(lambda: decisions(driver, name, "Tune"), 150, "a Tune decision")
        url = ready_endpoints(driver, name)[0]
        driver.wait_for(
            lambda: http_json(f"{url}/v1/config", token(driver, name)).get("useCompression"),
            30,
            "compression on in the engine",
        )
    pod_after = engine_pods(driver, name)[0]
    assert pod_after["metadata"]["uid"] == pod_before["metadata"]["uid"]
    assert pod_after["status"]["containerStatuses"][0]["restartCount"] == 0
    stats = http_json(f"{driver.endpoint(pod_after)}/v1/stats", token(driver, name))
    assert stats["codec"] in ("int8", "int4")
    delete_cleans_up(driver, name, data_pvcs_kept=False, backup_pvc_kept=True, replicas=1)


def kill_9_reloads_from_pvc(driver: Driver, name: str) -> None:
    """kill -9 of an engine → restarted by the kubelet, its persisted cache reloaded (hits right after)."""
    manifest = create_ready(driver, name, replicas=1, autoscaling={"mode": "Off"}, tuning={"mode": "Off"})
    replay_once(driver, name, manifest, 60)
    time.sleep(7)  # cache.persistIntervalS is 5 in the sample: at least one persist has run
    pod = engine_pods(driver, name)[0]
    driver.kill_engine(pod["metadata"]["name"])
    driver.wait_for(
        lambda: (
            engine_pods(driver, name)[0]["status"]["containerStatuses"][0]["restartCount"] == 1
            and pod_ready(engine_pods(driver, name)[0])
        ),
        60,
        "engine restarted and ready",
    )
    seen = replay_once(driver, name, manifest, 60, puts=False)
    assert seen["hit_tokens"] > 0, "nothing was reloaded from the PVC"
    delete_cleans_up(driver, name, data_pvcs_kept=False, backup_pvc_kept=True, replicas=1)


def job_succeeded(driver: Driver, job: str) -> bool | None:
    obj = driver.get("Job", job)
    if condition(obj, "Complete") == "True":
        return True
    if condition(obj, "Failed") == "True":
        return False
    return None


def run_job(driver: Driver, manifest: Mapping[str, Any], timeout_s: float = 120) -> str:
    driver.apply(manifest)
    job = str(manifest["metadata"]["name"])
    driver.wait_for(lambda: job_succeeded(driver, job) is not None, timeout_s, f"job {job} finished")
    assert job_succeeded(driver, job), f"job {job} failed:\n{driver.job_logs(job)}"
    return driver.job_logs(job)


def tool_job(
    driver: Driver,
    name: str,
    script: str,
    *,
    claim: str,
    token_secret: str | None = None,
    image: str | None = None,
) -> dict[str, Any]:
    """A one-pod Job running ``script`` in the engine image with the backup PVC at /backups."""
    mounts: list[dict[str, Any]] = [{"name": "backups", "mountPath": "/backups"}]
    volumes: list[dict[str, Any]] = [{"name": "backups", "persistentVolumeClaim": {"claimName": claim}}]
    if token_secret:
        mounts.append({"name": "token", "mountPath": "/var/run/kvcache/token", "readOnly": True})
        volumes.append({"name": "token", "secret": {"secretName": token_secret}})
    container = {
        "name": "tool",
        "image": image or "ghcr.io/kvcache-operator/kvcache-engine:0.1.0",
        "imagePullPolicy": "Never" if image else "IfNotPresent",
        "command": ["sh", "-c", script],
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": driver.namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container], "volumes": volumes}},
        },
    }


def backup_and_restore(driver: Driver, name: str) -> None:
    """Backup CronJob run on demand → a verified backup in the backup PVC → restored into a fresh KVCache."""
    manifest = create_ready(driver, name, replicas=1, autoscaling={"mode": "Off"}, tuning={"mode": "Off"})
    replay_once(driver, name, manifest, 60)
    job = driver.run_cronjob(f"{name}-backup")
    driver.wait_for(lambda: job_succeeded(driver, job) is not None, 120, f"backup job {job}")
    assert job_succeeded(driver, job), driver.job_logs(job)
    claim = f"{name}-backups"
    listing = run_job(
        driver,
        tool_job(driver, f"{name}-ls", f"ls -1 /backups/{name}-0", claim=claim, image=driver.engine_image),
    )
    backups = sorted(line for line in listing.split() if line and not line.startswith("."))
    assert backups, f"no backup in /backups/{name}-0: {listing!r}"
    run_job(
        driver,
        tool_job(
            driver,
            f"{name}-check",
            f"kvcache-engine validate /backups/{name}-0/{backups[-1]}",
            claim=claim,
            image=driver.engine_image,
        ),
    )

    fresh = f"{name}-restored"
    fresh_manifest = create_ready(
        driver,
        fresh,
        replicas=1,
        autoscaling={"mode": "Off"},
        tuning={"mode": "Off"},
        backup={"enabled": False},
    )
    url = f"http://{fresh}-0.{fresh}-headless.{driver.namespace}.svc:8080"
    restore = (
        f"kvcache-engine restore --from /backups/{name}-0/{backups[-1]} --url {url} "
        f"--token-file /var/run/kvcache/token/token"
    )
    run_job(
        driver,
        tool_job(
            driver,
            f"{fresh}-restore",
            restore,
            claim=claim,
            token_secret=f"{fresh}-admin-token",  # a restore is an admin call
            image=driver.engine_image,
        ),
    )
    assert replay_once(driver, fresh, fresh_manifest, 60, puts=False)["hit_tokens"] > 0, (
        "the restored KVCache has none of the backed-up prefixes"
    )
    for job_name in (f"{name}-ls", f"{name}-check", f"{fresh}-restore"):
        driver.delete("Job", job_name)
    delete_cleans_up(driver, fresh, data_pvcs_kept=False, backup_pvc_kept=False, replicas=1)
    delete_cleans_up(driver, name, data_pvcs_kept=False, backup_pvc_kept=True, replicas=1)
    driver.delete("PersistentVolumeClaim", claim)


def invalid_manifest_rejected(driver: Driver, name: str) -> None:
    """The API server rejects an invalid KVCache and its message names the field."""
    bad = kvcache_manifest(name, driver, autoscaling={"mode": "Auto", "minReplicas": 3, "maxReplicas": 2})
    try:
        driver.apply(bad)
    except ValueError as exc:
        assert "spec.autoscaling.minReplicas" in str(exc), str(exc)
    else:
        raise AssertionError("an invalid KVCache was accepted")
    typo = kvcache_manifest(name, driver)
    typo["spec"]["cache"]["maxTokenz"] = 5
    try:
        driver.apply(typo)
    except ValueError as exc:
        assert "maxTokenz" in str(exc), str(exc)
    else:
        raise AssertionError("a KVCache with an unknown field was accepted")
    assert driver.get("KVCache", name) is None


def kvcache_events(driver: Driver, name: str) -> list[dict[str, Any]]:
    """The Events the operator posted about KVCache ``name``."""
    return [
        e
        for e in driver.list("Event")
        if (e.get("involvedObject") or {}).get("kind") == "KVCache"
        and (e.get("involvedObject") or {}).get("name") == name
    ]


def degraded(driver: Driver, name: str) -> dict[str, Any] | None:
    """The KVCache's Degraded condition when it is True."""
    kvc = driver.get("KVCache", name) or {}
    found = next(
        (c for c in (kvc.get("status") or {}).get("conditions") or [] if c["type"] == "Degraded"), None
    )
    return found if found and found.get("status") == "True" else None


def unallocatable_pool_degrades(driver: Driver, name: str) -> None:
    """An engine that cannot allocate its pool → within 30 s the KVCache is Degraded with the
    engine's own reason and line (its termination message), Failed (nothing serves), and an Event
    says so. The pool asks 8 TiB: admissible (a pod may request up to 16 TiB; a memory request below
    the pool is refused at admission), more than this machine can allocate. The local kubelet runs
    it without checking node capacity; on a real cluster the pod would stay Pending instead."""
    manifest = kvcache_manifest(
        name,
        driver,
        replicas=1,
        cache={"numLayers": 32, "numKvHeads": 8, "headDim": 128, "maxTokens": 2**26},
        persistence={"enabled": False},
        backup={"enabled": False},
        autoscaling={"mode": "Off"},
        tuning={"mode": "Off"},
    )
    driver.apply(manifest)
    found = driver.wait_for(
        lambda: (c := degraded(driver, name)) and c["reason"] == "PoolAllocationFailed" and c,
        30,
        f"KVCache {name} Degraded with the engine's reason",
    )
    assert f"{name}-0: cannot allocate the block pool: max_tokens=67108864" in found["message"], found
    status = (driver.get("KVCache", name) or {})["status"]
    assert status["phase"] == "Failed" and status["readyReplicas"] == 0, status
    assert status["engines"][0]["reason"] == "PoolAllocationFailed", status
    driver.wait_for(
        lambda: any(e.get("reason") == "PoolAllocationFailed" for e in kvcache_events(driver, name)),
        15,
        "a PoolAllocationFailed Event",
    )
    delete_cleans_up(driver, name, data_pvcs_kept=False, backup_pvc_kept=False, replicas=1)


def killed_engine_shows_in_status(driver: Driver, name: str) -> None:
    """kill -9 of an engine → its restart shows in status (restarts, per engine) and as an Event."""
    create_ready(
        driver,
        name,
        replicas=1,
        persistence={"enabled": False},
        backup={"enabled": False},
        autoscaling={"mode": "Off"},
        tuning={"mode": "Off"},
    )
    pod = engine_pods(driver, name)[0]["metadata"]["name"]
    driver.kill_engine(pod)

    def restart_counted() -> dict[str, Any] | None:
        status = (driver.get("KVCache", name) or {}).get("status") or {}
        engines = status.get("engines") or [{}]
        return status if status.get("restarts") == 1 and engines[0].get("restarts") == 1 else None

    driver.wait_for(restart_counted, 30, f"KVCache {name} status counting the restart")
    # The operator may also see the engine between its exit and its restart (a Degraded transition
    # "exited ... 0 restarts", posted with the same reason): wait for the one counting the restart.
    event = driver.wait_for(
        lambda: next(
            (
                e
                for e in kvcache_events(driver, name)
                if e.get("reason") == "EngineRestarted" and "1 restart" in str(e.get("message"))
            ),
            None,
        ),
        15,
        "an EngineRestarted Event counting 1 restart",
    )
    assert event["type"] == "Warning" and pod in event["message"], event
    wait_ready(driver, name, 1, timeout_s=60)
    assert degraded(driver, name) is None
    delete_cleans_up(driver, name, data_pvcs_kept=False, backup_pvc_kept=False, replicas=1)


def max_tokens_patch_is_live(driver: Driver, name: str) -> None:
    """A ``spec.cache.maxTokens`` patch inside the tuning bounds reaches every engine's running
    config without a new pod (same uids, same StatefulSet template) and raises no RestartPending."""
    tuning = {"mode": "DryRun", "maxTokensMin": 1024, "maxTokensMax": 65536}
    create_ready(driver, name, replicas=1, persistence={"enabled": False}, backup={"enabled": False},
                 autoscaling={"mode": "Off"}, tuning=tuning)  # fmt: skip
    uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in engine_pods(driver, name)}
    sts = driver.get("StatefulSet", name)
    assert sts is not None
    template = sts["spec"]["template"]
    driver.patch("KVCache", name, {"spec": {"cache": {"maxTokens": 16384}}})
    tok = token(driver, name)

    def applied() -> bool | None:
        urls = ready_endpoints(driver, name)
        configs = [http_json(f"{url}/v1/config", tok) for url in urls]
        return (bool(urls) and all(c.get("config", c).get("maxTokens") == 16384 for c in configs)) or None

    driver.wait_for(applied, 30, "the engines running maxTokens 16384")
    after = driver.get("StatefulSet", name)
    assert after is not None and after["spec"]["template"] == template
    assert {p["metadata"]["name"]: p["metadata"]["uid"] for p in engine_pods(driver, name)} == uids
    assert condition(driver.get("KVCache", name), "RestartPending") in (None, "False")
    delete_cleans_up(driver, name, data_pvcs_kept=False, backup_pvc_kept=False, replicas=1)


def rolling_update_waits_for_each_replica(driver: Driver, name: str) -> None:
    """A restart-requiring change rolls the engines one at a time through the StatefulSet's partition
    (rollout.py): the highest ordinal first, the next only once the previous one runs the new
    template and is ready (its cache loaded, warm); never two engines down at once."""
    create_ready(driver, name, replicas=2, persistence={"enabled": True}, backup={"enabled": False},
                 autoscaling={"mode": "Off"}, tuning={"mode": "Off"})  # fmt: skip
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in engine_pods(driver, name)}
    driver.patch("KVCache", name, {"spec": {"terminationGracePeriodSeconds": 150}})
    partitions: list[int] = []
    most_down = 0
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        sts = driver.get("StatefulSet", name) or {}
        strategy = (sts.get("spec") or {}).get("updateStrategy") or {}
        part = int((strategy.get("rollingUpdate") or {}).get("partition") or 0)
        if not partitions or partitions[-1] != part:
            partitions.append(part)
        pods = engine_pods(driver, name)
        ready = sum(
            1
            for p in pods
            if any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in (p.get("status") or {}).get("conditions") or [])
        )  # fmt: skip
        most_down = max(most_down, 2 - ready)
        uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}
        rolled = len(uids) == 2 and all(uids.get(n) != u for n, u in before.items())
        if rolled and ready == 2 and part == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"rollout of {name} not done: partitions seen {partitions}, pods {uids}")
    assert 1 in partitions, f"the rollout never held at partition 1: {partitions}"
    assert most_down <= 1, f"{most_down} engines were down at once"
    wait_ready(driver, name, 2)
    delete_cleans_up(driver, name, data_pvcs_kept=False, backup_pvc_kept=False, replicas=2)
