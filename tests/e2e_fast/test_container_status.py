"""The local kubelet reports a failing container as a node does: restartCount, CrashLoopBackOff,
lastState.terminated with the termination message (or, with FallbackToLogsOnError, the log tail)."""

from __future__ import annotations

from typing import Any

from e2e.localcluster.cluster import LocalCluster

# Writes its reason where the pod says (the path is the container's, remapped by the kubelet), exits 2.
SAYS_WHY = (
    "import os, sys; open(os.environ['MESSAGE_PATH'], 'w').write('PoolAllocationFailed: 9 GiB asked'); "
    "print('not this'); sys.exit(2)"
)
# Writes no message; its last log lines are what a FallbackToLogsOnError pod reports.
ONLY_LOGS = "import sys; print('loading'); print('boom: no room', file=sys.stderr); sys.exit(1)"


def _container(name: str, program: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": "python:3.11", "command": ["python", "-c", program], **extra}


def test_a_crash_looping_container_reports_its_termination_message(bare_cluster: LocalCluster) -> None:
    c = bare_cluster
    says_why = _container(
        "says-why",
        SAYS_WHY,
        terminationMessagePath="/dev/termination-log",
        env=[{"name": "MESSAGE_PATH", "value": "/dev/termination-log"}],
    )
    only_logs = _container("only-logs", ONLY_LOGS, terminationMessagePolicy="FallbackToLogsOnError")
    silent = _container("silent", ONLY_LOGS)  # policy File (the default): no message from the logs
    c.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "doomed", "labels": {"app": "doomed"}},
            "spec": {"containers": [says_why, only_logs, silent]},
        }
    )

    def looping() -> dict[str, dict[str, Any]] | None:
        pod = c.get("Pod", "doomed") or {}
        found = {s["name"]: s for s in (pod.get("status") or {}).get("containerStatuses") or []}
        looped = len(found) == 3 and all(
            s["restartCount"] >= 2 and s["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff"
            for s in found.values()
        )
        return found if looped else None

    found = c.wait_for(looping, 30, what="three containers in CrashLoopBackOff")
    why = found["says-why"]
    assert why["lastState"]["terminated"]["exitCode"] == 2
    assert why["lastState"]["terminated"]["reason"] == "Error"
    assert why["lastState"]["terminated"]["message"] == "PoolAllocationFailed: 9 GiB asked"
    assert why["lastState"]["terminated"]["finishedAt"].endswith("Z")
    assert why["ready"] is False
    assert why["state"]["waiting"]["message"].startswith("back-off ")
    assert "container=says-why pod=doomed_default(" in why["state"]["waiting"]["message"]
    assert found["only-logs"]["lastState"]["terminated"]["message"] == "loading\nboom: no room"
    assert "message" not in found["silent"]["lastState"]["terminated"]
    c.delete("Pod", "doomed")
