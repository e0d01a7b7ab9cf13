"""The local cluster's kubelet and controllers, with tiny Python pods (no engine, no operator)."""

from __future__ import annotations

import base64
import datetime
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from e2e.localcluster.cluster import ApplyError, LocalCluster
from e2e.localcluster.controllers import is_ready

# A pod program: records its start (with two env values) and SIGTERM in <data>/events, serves HTTP.
POD_PROGRAM = r"""
import http.server, os, signal, sys
events = os.path.join(sys.argv[1], "events")
def note(line):
    with open(events, "a") as fh:
        fh.write(line + "\n")
note("start %s %s %s" % (os.environ.get("GREETING"), os.environ.get("TOKEN"), os.environ.get("FROM_ENVFROM")))
def term(*_):
    note("term")
    if not os.environ.get("IGNORE_TERM"):
        os._exit(0)
signal.signal(signal.SIGTERM, term)
http.server.HTTPServer((sys.argv[2], 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def make_statefulset(
    name: str,
    replicas: int,
    *,
    policy: str = "Parallel",
    grace: int = 2,
    when_scaled: str = "Retain",
    env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    container = {
        "name": "app",
        "image": "python:3.11",
        "command": ["python", "-c", POD_PROGRAM, "/data", "0.0.0.0"],
        "env": env or [],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 10},
        "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo prestop >> /data/events"]}}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "podManagementPolicy": policy,
            "selector": {"matchLabels": {"app": name}},
            "persistentVolumeClaimRetentionPolicy": {"whenScaled": when_scaled, "whenDeleted": "Retain"},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"terminationGracePeriodSeconds": grace, "containers": [container]},
            },
            "volumeClaimTemplates": [
                {"metadata": {"name": "data"}, "spec": {"resources": {"requests": {"storage": "1Gi"}}}}
            ],
        },
    }


def must(cluster: LocalCluster, kind: str, name: str) -> dict[str, Any]:
    found = cluster.get(kind, name)
    assert found is not None, f"{kind} {name} not found"
    return found


def sts_status(cluster: LocalCluster, name: str) -> dict[str, Any]:
    sts = cluster.get("StatefulSet", name)
    return (sts or {}).get("status") or {}


def wait_ready(cluster: LocalCluster, name: str, n: int, timeout_s: float = 30) -> None:
    cluster.wait_for(
        lambda: (
            sts_status(cluster, name).get("readyReplicas") == n
            and sts_status(cluster, name).get("replicas") == n
        ),
        timeout_s,
        what=f"{name}: {n} ready",
    )


def events(cluster: LocalCluster, claim: str) -> list[str]:
    path = cluster.pvc_dir(claim) / "events"
    return path.read_text().splitlines() if path.exists() else []


def test_statefulset_pods_get_env_volumes_ips_and_probes(bare_cluster: LocalCluster) -> None:
    c = bare_cluster
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "greet"},
            "data": {"greeting": "hello", "FROM_ENVFROM": "yes"},
        }
    )
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "tok"},
            "data": {"token": base64.b64encode(b"s3cret").decode()},
        }
    )
    env = [
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "greet", "key": "greeting"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}},
    ]
    sts = make_statefulset("web", 2, env=env)
    sts["spec"]["template"]["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": "greet"}}]
    c.apply(sts)
    wait_ready(c, "web", 2)
    pods = sorted(c.pods({"app": "web"}), key=lambda p: p["metadata"]["name"])
    assert [p["metadata"]["name"] for p in pods] == ["web-0", "web-1"]
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == 2 and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips)
    for ip in ips:  # each pod serves on its own address, same port
        assert urllib.request.urlopen(f"http://{ip}:8080/", timeout=5).status == 200
    assert sorted(p["metadata"]["name"] for p in c.list("PersistentVolumeClaim")) == [
        "data-web-0",
        "data-web-1",
    ]
    assert events(c, "data-web-0") == ["start hello s3cret yes"]
    assert pods[0]["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"] == "web-0"
    assert pods[0]["metadata"]["ownerReferences"][0]["kind"] == "StatefulSet"


def test_kill_9_restarts_the_container_and_its_pvc_survives(bare_cluster: LocalCluster) -> None:
    c = bare_cluster
    c.apply(make_statefulset("crash", 1))
    wait_ready(c, "crash", 1)
    pid = c.kill_container("crash-0")
    c.wait_for(
        lambda: (c.container_pid("crash-0") or pid) != pid and is_ready(c.get("Pod", "crash-0")),
        30,
        what="restart",
    )
    status = must(c, "Pod", "crash-0")["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 137  # 128 + SIGKILL
    assert events(c, "data-crash-0") == ["start None None None"] * 2  # same directory both times


def test_rolling_update_goes_one_pod_at_a_time_highest_ordinal_first(bare_cluster: LocalCluster) -> None:
    c = bare_cluster
    c.apply(make_statefulset("roll", 3, policy="OrderedReady"))
    wait_ready(c, "roll", 3, timeout_s=45)
    old = sts_status(c, "roll")["updateRevision"]
    c.patch("StatefulSet", "roll", {"spec": {"template": {"metadata": {"annotations": {"rev": "2"}}}}})
    order: list[str] = []
    max_unavailable = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pods = {p["metadata"]["name"]: p for p in c.pods({"app": "roll"})}
        max_unavailable = max(max_unavailable, 3 - sum(1 for p in pods.values() if is_ready(p)))
        for name, pod in sorted(pods.items()):
            if pod["metadata"]["labels"]["controller-revision-hash"] != old and name not in order:
                order.append(name)
        status = sts_status(c, "roll")
        if (
            status.get("updateRevision") != old
            and status.get("updatedReplicas") == 3
            and status.get("readyReplicas") == 3
        ):
            break
        time.sleep(0.1)
    status = sts_status(c, "roll")
    assert order == ["roll-2", "roll-1", "roll-0"]
    assert max_unavailable == 1
    assert status["currentRevision"] == status["updateRevision"] != old
    for claim in ("data-roll-0", "data-roll-2"):  # preStop ran, then SIGTERM, then the new pod started
        assert events(c, claim) == ["start None None None", "prestop", "term", "start None None None"]


def test_scale_down_honours_when_scaled_delete(bare_cluster: LocalCluster) -> None:
    c = bare_cluster
    c.apply(make_statefulset("shrink", 3, when_scaled="Delete"))
    wait_ready(c, "shrink", 3)
    c.patch("StatefulSet", "shrink", {"spec": {"replicas": 1}})
    c.wait_for(
        lambda: (
            [p["metadata"]["name"] for p in c.pods({"app": "shrink"})] == ["shrink-0"]
            and sorted(
                p["metadata"]["name"]
                for p in c.list("PersistentVolumeClaim")
                if "shrink" in p["metadata"]["name"]
            )
            == ["data-shrink-0"]
        ),
        30,
        what="scale to 1",
    )
    c.patch("StatefulSet", "shrink", {"spec": {"replicas": 2}})
    wait_ready(c, "shrink", 2)
    assert events(c, "data-shrink-1") == ["start None None None"]  # a fresh claim, not the old data


def test_deletion_runs_prestop_then_sigterm_and_sigkills_after_the_grace_period(
    bare_cluster: LocalCluster,
) -> None:
    c = bare_cluster
    sts = make_statefulset("stubborn", 1, grace=2, env=[{"name": "IGNORE_TERM", "value": "1"}])
    c.apply(sts)
    wait_ready(c, "stubborn", 1)
    pid = c.container_pid("stubborn-0")
    assert pid is not None
    started = time.monotonic()
    c.delete("StatefulSet", "stubborn")  # the emulator's GC deletes the pod; the kubelet stops it
    c.wait_for(lambda: c.get("Pod", "stubborn-0") is None, 30, what="pod gone")
    took = time.monotonic() - started
    assert 2.0 <= took < 10.0
    assert events(c, "data-stubborn-0")[1:] == ["prestop", "term"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert c.get("PersistentVolumeClaim", "data-stubborn-0") is not None  # whenDeleted: Retain


def make_cronjob(name: str, command: str, backoff_limit: int = 0) -> dict[str, Any]:
    pod = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "job",
                "image": "busybox",
                "command": ["sh", "-c", command],
                "volumeMounts": [{"name": "out", "mountPath": "/out"}],
            }
        ],
        "volumes": [{"name": "out", "persistentVolumeClaim": {"claimName": f"{name}-out"}}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": name},
        "spec": {
            "schedule": "0 3 * * *",
            "concurrencyPolicy": "Forbid",
            "jobTemplate": {"spec": {"backoffLimit": backoff_limit, "template": {"spec": pod}}},
        },
    }


def make_pvc(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }


def job_condition(cluster: LocalCluster, name: str) -> str | None:
    job = cluster.get("Job", name) or {}
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True":
            return str(cond["type"])
    return None


def test_cronjob_runs_on_demand_and_records_the_last_success(bare_cluster: LocalCluster) -> None:
    c = bare_cluster
    c.apply(make_pvc("nightly-out"))
    c.apply(make_cronjob("nightly", "echo backed-up >> /out/log"))
    c.trigger_cronjob("nightly", "run-1")  # the annotation route, through the CronJob controller
    c.wait_for(
        lambda: (must(c, "CronJob", "nightly").get("status") or {}).get("lastSuccessfulTime"),
        30,
        what="lastSuccessfulTime",
    )
    job = c.run_cronjob("nightly", "nightly-by-hand")  # the `kubectl create job --from` route
    c.wait_for(lambda: job_condition(c, job) == "Complete", 30, what="manual job")
    assert (c.pvc_dir("nightly-out") / "log").read_text() == "backed-up\nbacked-up\n"
    jobs = [j for j in c.list("Job") if j["metadata"]["name"].startswith("nightly")]
    assert len(jobs) == 2 and all(j["metadata"]["ownerReferences"][0]["kind"] == "CronJob" for j in jobs)


def test_cronjob_runs_when_its_schedule_is_due(bare_cluster: LocalCluster) -> None:
    c = bare_cluster
    c.apply(make_pvc("minutely-out"))
    cronjob = make_cronjob("minutely", "echo tick >> /out/log")
    cronjob["spec"]["schedule"] = "* * * * *"
    c.apply(cronjob)
    # As if the last run was two minutes ago: the next minute is already due.
    past = datetime.datetime.now(tz=datetime.UTC) - datetime.timedelta(minutes=2)
    last = past.replace(second=0, microsecond=0)
    c.patch(
        "CronJob",
        "minutely",
        {"status": {"lastScheduleTime": last.strftime("%Y-%m-%dT%H:%M:%SZ")}},
        subresource="status",
    )
    c.wait_for(
        lambda: (must(c, "CronJob", "minutely").get("status") or {}).get("lastSuccessfulTime"),
        30,
        what="scheduled job done",
    )
    status = must(c, "CronJob", "minutely")["status"]
    ran = datetime.datetime.fromisoformat(status["lastScheduleTime"].replace("Z", "+00:00"))
    assert last + datetime.timedelta(minutes=1) < ran <= datetime.datetime.now(tz=datetime.UTC)
    jobs = {j["metadata"]["name"] for j in c.list("Job") if j["metadata"]["name"].startswith("minutely-")}
    # Only the most recent missed time ran, not every minute since `last` (no catch-up burst).
    assert f"minutely-{int(ran.timestamp()) // 60}" in jobs
    assert f"minutely-{int((last + datetime.timedelta(minutes=1)).timestamp()) // 60}" not in jobs
    assert (c.pvc_dir("minutely-out") / "log").read_text().startswith("tick\n")
    c.patch("CronJob", "minutely", {"spec": {"suspend": True}})  # no more runs from this test


def test_job_retries_a_failing_pod_up_to_its_backoff_limit(bare_cluster: LocalCluster) -> None:
    c = bare_cluster
    c.apply(make_pvc("flaky-out"))
    c.apply(make_cronjob("flaky", "echo try >> /out/log; exit 3", backoff_limit=1))
    job = c.run_cronjob("flaky", "flaky-1")
    c.wait_for(lambda: job_condition(c, job) == "Failed", 30, what="job failed")
    pods = c.pods({"job-name": job})
    assert len(pods) == 2 and all(p["status"]["phase"] == "Failed" for p in pods)
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    assert (c.pvc_dir("flaky-out") / "log").read_text() == "try\ntry\n"


def test_invalid_kvcache_is_rejected_naming_the_field(bare_cluster: LocalCluster) -> None:
    manifest = {
        "apiVersion": "kvcache.dev/v1alpha1",
        "kind": "KVCache",
        "metadata": {"name": "bad"},
        "spec": {"autoscaling": {"mode": "Auto", "minReplicas": 3, "maxReplicas": 2}},
    }
    with pytest.raises(
        ApplyError, match=r'KVCache.kvcache.dev "bad" is invalid: .*spec\.autoscaling\.minReplicas'
    ):
        bare_cluster.apply(manifest)
    with pytest.raises(ApplyError, match=r'unknown field "spec.cache.maxTokenz"'):
        bare_cluster.apply({**manifest, "spec": {"cache": {"maxTokenz": 5}}})
    assert bare_cluster.get("KVCache", "bad") is None


def test_leaving_the_cluster_stops_every_process(tmp_path: Path) -> None:
    with LocalCluster(tmp_path / "state", operator=False, shutdown_grace_s=2.0) as c:
        c.apply(make_statefulset("bye", 2, grace=30))
        wait_ready(c, "bye", 2)
        pids = c.live_pids()
        assert len(pids) == 2
        pvc = c.pvc_dir("data-bye-0")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert (pvc / "events").read_text().splitlines()[1:] == ["prestop", "term"]  # graceful, capped at 2 s
