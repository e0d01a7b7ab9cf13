"""status.py on crafted pods, Jobs, scrapes and decisions: exact conditions, phases and Events."""

from __future__ import annotations

from typing import Any

import pytest

from kvcache_engine.contract import EngineStats
from kvcache_operator import api
from kvcache_operator import status as st
from kvcache_operator.scrape import PodScrape, Scrape

POOL_LINE = "PoolAllocationFailed: cannot allocate the block pool: max_tokens=9 asks 9 bytes"


def make_kvc(**spec: Any) -> api.KVCache:
    return api.parse_kvcache({"metadata": {"name": "c", "namespace": "ns"}, "spec": {"replicas": 2, **spec}})


def make_pod(
    name: str,
    *,
    ready: bool = False,
    restarts: int = 0,
    state: dict[str, Any] | None = None,
    last: dict[str, Any] | None = None,
    started: bool = False,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    container = {
        "name": "engine",
        "ready": ready,
        "started": started or ready,
        "restartCount": restarts,
        "state": state or {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
        "lastState": {"terminated": last} if last else {},
    }
    return {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "engine", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {
            "podIP": "10.0.0.1",
            "conditions": [*(conditions or []), {"type": "Ready", "status": str(ready)}],
            "containerStatuses": [container],
        },
    }


def crash_looping(name: str, restarts: int = 4, message: str = POOL_LINE, code: int = 2) -> dict[str, Any]:
    return make_pod(
        name,
        restarts=restarts,
        state={
            "waiting": {"reason": "CrashLoopBackOff", "message": "back-off 8s restarting failed container"}
        },
        last={"exitCode": code, "reason": "Error", "message": message, "finishedAt": "2026-01-01T00:00:01Z"},
    )


STS = {
    "metadata": {"generation": 1},
    "spec": {"replicas": 2},
    "status": {"observedGeneration": 1, "replicas": 2},
}


def build(pods: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "kvc": make_kvc(),
        "generation": 3,
        "desired": 2,
        "statefulset": STS,
        "pods": pods,
        "rolling": False,
        "paused": False,
        "effective_config": None,
        "observation": None,
        "decisions": [],
        "last_backup": None,
        "previous": {},
        "now": "2026-01-01T00:10:00Z",
        **changes,
    }
    return st.build_status(**args)


def cond(status: dict[str, Any], ctype: str) -> tuple[str, str, str]:
    found = next(c for c in status["conditions"] if c["type"] == ctype)
    return found["status"], found["reason"], found["message"]


# --- one engine pod ----------------------------------------------------------------------------------


def test_a_ready_engine_is_healthy_whatever_its_restarts() -> None:
    health = st.engine_health(make_pod("c-0", ready=True, restarts=3, last={"exitCode": 137}))
    assert health == st.EngineHealth("c-0", True, 3)


def test_a_crash_loop_carries_the_engines_own_reason_through_the_back_off_and_the_short_runs() -> None:
    expected = st.EngineHealth(
        "c-0",
        False,
        4,
        "PoolAllocationFailed",
        "c-0: cannot allocate the block pool: max_tokens=9 asks 9 bytes (exit code 2, 4 restarts)",
    )
    assert st.engine_health(crash_looping("c-0")) == expected
    # restarted, running, its startup probe not passed yet: still failing, same reason (no flapping)
    between = make_pod("c-0", restarts=4, last={"exitCode": 2, "message": POOL_LINE})
    assert st.engine_health(between) == expected


def test_an_engine_past_its_startup_probe_is_not_failing_while_it_loads() -> None:
    loading = make_pod("c-0", restarts=1, started=True, last={"exitCode": 137})
    assert st.engine_health(loading) == st.EngineHealth("c-0", False, 1)
    first_start = make_pod("c-0")
    assert st.engine_health(first_start) == st.EngineHealth("c-0", False, 0)


@pytest.mark.parametrize(
    ("restarts", "last", "reason", "message"),
    [
        (
            1,
            {
                "exitCode": 137,
                "reason": "Error",
                "message": "loading\nkvcache-engine: listening on http://x:8080",
            },
            "EngineRestarted",
            "c-0: the engine exited (signal 9); last output: kvcache-engine: listening on http://x:8080 "
            "(exit code 137, 1 restart)",
        ),
        (
            3,
            {"exitCode": 1, "reason": "Error"},
            "CrashLoopBackOff",
            "c-0: the engine exited (exit code 1, 3 restarts)",
        ),
        (
            2,
            {"exitCode": 137, "reason": "OOMKilled"},
            "OOMKilled",
            "c-0: the engine exited (signal 9) (exit code 137, 2 restarts)",
        ),
    ],
)
def test_without_an_engine_reason_the_kubelets_reason_names_the_failure(
    restarts: int, last: dict[str, Any], reason: str, message: str
) -> None:
    pod = make_pod("c-0", restarts=restarts, last=last)
    assert st.engine_health(pod) == st.EngineHealth("c-0", False, restarts, reason, message)


def test_waiting_and_unschedulable_pods_are_failing_with_the_kubelets_words() -> None:
    config = make_pod(
        "c-0", state={"waiting": {"reason": "CreateContainerConfigError", "message": "secret gone"}}
    )
    assert st.engine_health(config) == st.EngineHealth(
        "c-0", False, 0, "CreateContainerConfigError", "c-0: secret gone"
    )
    creating = make_pod("c-0", state={"waiting": {"reason": "ContainerCreating"}})
    assert not st.engine_health(creating).failing
    unscheduled = make_pod(
        "c-1",
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}
        ],
    )
    assert st.engine_health(unscheduled) == st.EngineHealth(
        "c-1", False, 0, "Unschedulable", "c-1: 0/3 nodes"
    )


# --- the KVCache ------------------------------------------------------------------------------------


def test_every_engine_crash_looping_is_failed_and_degraded_with_the_engines_reason() -> None:
    status = build([crash_looping("c-0", 4), crash_looping("c-1", 3)])
    assert status["phase"] == "Failed"
    assert cond(status, "Degraded") == (
        "True",
        "PoolAllocationFailed",
        "c-0: cannot allocate the block pool: max_tokens=9 asks 9 bytes (exit code 2, 4 restarts); "
        "c-1: cannot allocate the block pool: max_tokens=9 asks 9 bytes (exit code 2, 3 restarts)",
    )
    assert cond(status, "Progressing") == (
        "False",
        "EnginesFailing",
        "0/2 engines ready; 2 failing (see Degraded)",
    )
    assert cond(status, "Ready") == ("False", "EnginesNotReady", "0/2 engines ready")
    assert status["restarts"] == 7 and status["readyReplicas"] == 0
    assert status["engines"][1] == {
        "name": "c-1",
        "ready": False,
        "restarts": 3,
        "reason": "PoolAllocationFailed",
        "message": "c-1: cannot allocate the block pool: max_tokens=9 asks 9 bytes (exit code 2, 3 restarts)",
    }


def test_one_engine_crash_looping_beside_a_ready_one_is_degraded_not_failed() -> None:
    status = build(
        [make_pod("c-0", ready=True, restarts=1), crash_looping("c-1", 2, "InvalidConfig: config.x: bad")]
    )
    assert status["phase"] == "Degraded"
    assert cond(status, "Degraded")[:2] == ("True", "InvalidConfig")
    assert cond(status, "Progressing") == (
        "False",
        "EnginesFailing",
        "1/2 engines ready; 1 failing (see Degraded)",
    )
    assert status["engines"][0] == {"name": "c-0", "ready": True, "restarts": 1}
    assert status["restarts"] == 3


def test_healthy_engines_are_ready_and_not_degraded() -> None:
    status = build([make_pod("c-0", ready=True), make_pod("c-1", ready=True)])
    assert status["phase"] == "Ready"
    assert cond(status, "Degraded") == ("False", "AsExpected", "")
    assert cond(status, "Progressing") == ("False", "Stable", "2/2 engines ready")
    assert status["observedGeneration"] == 3 and status["restarts"] == 0


def test_a_first_start_is_progressing_not_degraded() -> None:
    status = build([make_pod("c-0"), make_pod("c-1")])
    assert status["phase"] == "Progressing"
    assert cond(status, "Progressing") == ("True", "Scaling", "0/2 engines ready")
    assert cond(status, "Degraded")[0] == "False"


def stats(**values: Any) -> EngineStats:
    return EngineStats(**values)


def test_persist_failures_hold_until_a_persist_succeeds() -> None:
    ok = stats(persists=2)
    failing = stats(persists=2, persist_failures=1, persist_failures_by_reason={"no_space": 1})
    message = "c-0: persists to its volume fail (no_space: 1); 1 since it started"
    assert st.persist_failures({"c-0": failing}, {"c-0": ok}, set()) == {"c-0": message}
    # no persist ran since: as before (failing stays failing, healthy stays healthy)
    assert st.persist_failures({"c-0": failing}, {"c-0": failing}, {"c-0"}) == {"c-0": message}
    assert st.persist_failures({"c-0": ok}, {"c-0": ok}, set()) == {}
    recovered = stats(persists=3, persist_failures=1, persist_failures_by_reason={"no_space": 1})
    assert st.persist_failures({"c-0": recovered}, {"c-0": failing}, {"c-0"}) == {}
    # the engine restarted (counters went down): its counts since the restart
    assert st.persist_failures({"c-0": stats(persist_failures=1)}, {"c-0": recovered}, set()) == {
        "c-0": "c-0: persists to its volume fail; 1 since it started"
    }


def test_persist_failures_degrade_the_cache_and_are_remembered_in_status() -> None:
    pods = [make_pod("c-0", ready=True), make_pod("c-1", ready=True)]
    failing = stats(persists=2, persist_failures=3, persist_failures_by_reason={"read_only": 3})
    scraped = st.Scraped(
        now={"c-0": failing, "c-1": stats()}, before={"c-0": stats(persists=2), "c-1": stats()}
    )
    first = build(pods, scraped=scraped)
    assert first["phase"] == "Degraded"
    assert cond(first, "Degraded") == (
        "True",
        "PersistFailed",
        "c-0: persists to its volume fail (read_only: 3); 3 since it started",
    )
    assert first["engines"][0]["persistFailing"] is True and "persistFailing" not in first["engines"][1]
    quiet = st.Scraped(now=scraped.now, before=scraped.now)  # no persist in this window
    assert cond(build(pods, scraped=quiet, previous=first), "Degraded")[1] == "PersistFailed"
    unscraped = build(pods, previous=first)  # a pass without a scrape keeps it too
    assert cond(unscraped, "Degraded")[1] == "PersistFailed"
    gone = build([make_pod("c-1", ready=True)], previous=first)  # the failing pod is gone
    assert cond(gone, "Degraded")[0] == "False"


def test_scraped_reads_two_scrapes() -> None:
    before = Scrape(1.0, {"c-0": PodScrape("c-0", "u", stats(persists=1))})
    now = Scrape(
        2.0,
        {"c-0": PodScrape("c-0", "u", stats(persists=2)), "c-1": PodScrape("c-1", "v", error="timed out")},
    )
    assert st.scraped(before, now) == st.Scraped(
        now={"c-0": stats(persists=2)}, before={"c-0": stats(persists=1)}, failed=("c-1",)
    )


def test_engines_report_codec_and_achieved_compression_and_a_cpu_fallback_under_a_gpu() -> None:
    pods = [make_pod("c-0", ready=True), make_pod("c-1", ready=True)]
    now = {
        "c-0": stats(codec="int4", compression_ratio=0.375, device="cpu"),
        "c-1": stats(codec="int4", compression_ratio=0.385, device="cuda:0"),
    }
    status = build(pods, scraped=st.Scraped(now=now))
    assert (status["codec"], status["achievedCompressionRatio"]) == ("int4", 0.38)
    assert cond(status, "Degraded")[:2] == ("False", "AsExpected")  # no GPU asked: CPU is right
    gpu = make_kvc(resources={"gpus": 1}, cache={"device": "cuda"})
    status = build(pods, scraped=st.Scraped(now=now), kvc=gpu)
    assert cond(status, "Degraded") == (
        "True",
        "CudaUnavailable",
        "c-0: serves from the CPU although it has 1 GPU(s): the engine found no usable CUDA device "
        "(its log says why)",
    )


def test_a_failed_backup_job_degrades_with_the_jobs_reason() -> None:
    failed = {
        "metadata": {"name": "c-backup-2"},
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                    "lastTransitionTime": "2026-01-02T00:00:00Z",
                }
            ]
        },
    }
    record = st.backup_record([failed])
    assert record == {
        "time": "2026-01-02T00:00:00Z",
        "succeeded": False,
        "job": "c-backup-2",
        "message": "BackoffLimitExceeded: Job has reached the specified backoff limit; see its pod logs",
    }
    status = build([make_pod("c-0", ready=True), make_pod("c-1", ready=True)], last_backup=record)
    assert cond(status, "Degraded") == (
        "True",
        "BackupFailed",
        "backup Job c-backup-2: BackoffLimitExceeded: Job has reached the specified backoff limit; "
        "see its pod logs",
    )
    assert cond(status, "BackupSucceeded") == ("False", "Failed", "job c-backup-2")


def test_a_failed_drain_degrades_until_the_hold_ends_or_the_next_scale() -> None:
    pods = [make_pod("c-0", ready=True), make_pod("c-1", ready=True)]
    scale_in = {
        "time": "2026-01-01T00:05:00Z",
        "kind": "Scale",
        "mode": "Auto",
        "applied": True,
        "action": "replicas 3 -> 2",
        "reason": "low pressure",
        "drainFailures": ["c-2: POST /admin/drain: HTTP 500"],
    }
    status = build(pods, decisions=[scale_in])
    assert cond(status, "Degraded") == (
        "True",
        "DrainFailed",
        "the last scale-in could not hand blocks over (stopped, the replicas stay, unless "
        "spec.autoscaling.scaleInOnDrainFailure): c-2: POST /admin/drain: HTTP 500",
    )
    assert cond(build(pods, decisions=[scale_in], now="2026-01-01T00:15:01Z"), "Degraded")[0] == "False"
    later = {**scale_in, "time": "2026-01-01T00:06:00Z", "action": "replicas 2 -> 3", "drainFailures": []}
    assert cond(build(pods, decisions=[scale_in, later]), "Degraded")[0] == "False"


def test_problems_are_ordered_by_severity() -> None:
    pods = [make_pod("c-0", ready=True), crash_looping("c-1")]
    scraped = st.Scraped(now={"c-0": stats()}, failed=("c-9",))
    status = build(pods, scraped=scraped, last_backup={"succeeded": False, "job": "b", "message": "x"})
    assert cond(status, "Degraded")[1] == "PoolAllocationFailed"
    assert cond(status, "Degraded")[2].endswith("; backup Job b: x; no metrics from c-9")


def test_paused_and_hibernating() -> None:
    paused = build([], paused=True)
    assert cond(paused, "Progressing")[:2] == ("False", "ReconcilePaused")
    hibernating = build([], desired=0)
    assert hibernating["phase"] == "Ready" and cond(hibernating, "Ready")[1] == "Hibernating"


def test_invalid_spec_status_keeps_the_other_conditions() -> None:
    before = build([make_pod("c-0", ready=True), make_pod("c-1", ready=True)], now="t1")
    status = st.invalid_spec_status(
        before, "spec.autoscaling.minReplicas: must be <= maxReplicas", generation=4, now="t2"
    )
    assert status["phase"] == "Degraded"
    assert cond(status, "Degraded") == (
        "True",
        "InvalidSpec",
        "spec.autoscaling.minReplicas: must be <= maxReplicas",
    )
    assert cond(status, "Ready") == ("False", "InvalidSpec", "the spec is invalid; nothing was changed")
    assert [c["type"] for c in status["conditions"]] == [
        "Ready",
        "Degraded",
        "Progressing",
        "BackupSucceeded",
        "Autoscaling",
        "RestartPending",
    ]
    assert next(c for c in status["conditions"] if c["type"] == "Progressing")["lastTransitionTime"] == "t1"


def _on_revision(pod: dict[str, Any], revision: str) -> dict[str, Any]:
    pod["metadata"].setdefault("labels", {})["controller-revision-hash"] = revision
    return pod


def test_restart_pending_until_every_pod_runs_the_current_template() -> None:
    rolling_sts = {**STS, "status": {**(STS.get("status") or {}), "updateRevision": "kvc-new"}}
    old = [
        _on_revision(make_pod("c-0", ready=True), "kvc-old"),
        _on_revision(make_pod("c-1", ready=True), "kvc-new"),
    ]
    status = build(old, statefulset=rolling_sts, rolling=True)
    state, reason, message = cond(status, "RestartPending")
    assert (state, reason) == ("True", "PodTemplateChanged")
    assert message.startswith("1/2 engines run an older pod template") and message.endswith("c-0")
    done = [_on_revision(make_pod(n, ready=True), "kvc-new") for n in ("c-0", "c-1")]
    assert cond(build(done, statefulset=rolling_sts), "RestartPending")[:2] == ("False", "UpToDate")


# --- events ----------------------------------------------------------------------------------------


def test_events_come_once_per_transition() -> None:
    healthy = build([make_pod("c-0", ready=True), make_pod("c-1", ready=True)])
    broken = build([crash_looping("c-0", 4), crash_looping("c-1", 3)], previous=healthy)
    assert st.events(healthy, broken) == [
        st.Event("PoolAllocationFailed", cond(broken, "Degraded")[2]),
        st.Event("Failed", "no engine can serve: " + cond(broken, "Degraded")[2]),
        st.Event(
            "EngineRestarted",
            "engine restarted: c-0 (4 restarts; PoolAllocationFailed), "
            "c-1 (3 restarts; PoolAllocationFailed)",
        ),
    ]
    assert st.events(broken, build([crash_looping("c-0", 4), crash_looping("c-1", 3)], previous=broken)) == []
    recovered = build([make_pod("c-0", ready=True, restarts=4), make_pod("c-1", ready=True, restarts=3)])
    assert st.events(broken, recovered) == [
        st.Event("Recovered", "no longer degraded (was PoolAllocationFailed)", warning=False)
    ]


def test_a_killed_engine_gives_one_restart_event() -> None:
    before = build([make_pod("c-0", ready=True), make_pod("c-1", ready=True)])
    back = build([make_pod("c-0", ready=True, restarts=1), make_pod("c-1", ready=True)], previous=before)
    assert st.events(before, back) == [st.Event("EngineRestarted", "engine restarted: c-0 (1 restart)")]
    starting = build(
        [make_pod("c-0", restarts=1, last={"exitCode": 137}), make_pod("c-1", ready=True)], previous=before
    )
    assert [(e.reason, e.warning) for e in st.events(before, starting)] == [("EngineRestarted", True)]
    assert st.events({"conditions": before["conditions"]}, back) == []  # no earlier counts: no event


def test_a_new_failed_backup_gives_an_event_even_while_already_degraded_by_one() -> None:
    pods = [make_pod("c-0", ready=True), make_pod("c-1", ready=True)]
    first = build(pods, last_backup={"succeeded": False, "job": "b1", "message": "x"})
    second = build(pods, last_backup={"succeeded": False, "job": "b2", "message": "y"}, previous=first)
    assert st.events(first, second) == [st.Event("BackupFailed", "backup Job b2: y")]
    assert st.events(second, second) == []
