"""The shard map the operator publishes in ``<name>-connection`` (issue 18): the ready (so warm)
engines, its epoch kept while they stay and raised by one when they change; and which pods wait
behind the warm gate."""

from __future__ import annotations

from typing import Any

from kvcache_engine.contract import WARM_GATE, ShardMap
from kvcache_operator.controller import Observed, shard_map_of
from kvcache_operator.status import awaiting_warm_join


def _pod(
    name: str, ip: str, *, ready: bool, containers: bool = True, gate: str | None = None
) -> dict[str, Any]:
    conditions = [
        {"type": "ContainersReady", "status": str(containers)},
        {"type": "Ready", "status": str(ready)},
    ]
    if gate is not None:
        conditions.append({"type": WARM_GATE, "status": gate})
    return {
        "metadata": {"name": name},
        "spec": {
            "readinessGates": [{"conditionType": WARM_GATE}],
            "containers": [{"name": "engine", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {"podIP": ip, "conditions": conditions},
    }


def _observed(pods: list[dict[str, Any]], published: ShardMap | None) -> Observed:
    data = {} if published is None else {k: str(v) if not isinstance(v, list) else ",".join(v)
                                           for k, v in published.to_connection().items()}  # fmt: skip
    connection = {"kind": "ConfigMap", "metadata": {"name": "kvc-connection"}, "data": data}
    return Observed(name="kvc", children={"ConfigMap": [connection]}, pods=pods, jobs=[])


def test_the_first_map_is_epoch_1_and_an_unchanged_set_keeps_its_epoch() -> None:
    pods = [_pod("kvc-0", "10.0.0.1", ready=True), _pod("kvc-1", "10.0.0.2", ready=True)]
    first = shard_map_of(_observed(pods, None), "kvc")
    assert first == ShardMap(1, ("10.0.0.1:8080", "10.0.0.2:8080"))
    assert shard_map_of(_observed(pods, first), "kvc") == first


def test_a_joining_pod_enters_the_map_only_once_ready_and_each_change_raises_the_epoch() -> None:
    published = ShardMap(4, ("10.0.0.1:8080", "10.0.0.2:8080"))
    waiting = _pod("kvc-2", "10.0.0.3", ready=False)
    pods = [_pod("kvc-0", "10.0.0.1", ready=True), _pod("kvc-1", "10.0.0.2", ready=True), waiting]
    assert shard_map_of(_observed(pods, published), "kvc") == published  # not warm yet: not a member
    pods[2] = _pod("kvc-2", "10.0.0.3", ready=True, gate="True")
    grown = shard_map_of(_observed(pods, published), "kvc")
    assert grown == ShardMap(5, ("10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"))
    assert shard_map_of(_observed(pods[:2], grown), "kvc") == ShardMap(6, published.members)


def test_with_no_ready_engine_the_last_map_stays() -> None:
    published = ShardMap(2, ("10.0.0.1:8080",))
    assert shard_map_of(_observed([_pod("kvc-0", "10.0.0.1", ready=False)], published), "kvc") == published
    assert shard_map_of(_observed([], None), "kvc") is None


def test_who_waits_behind_the_warm_gate() -> None:
    assert awaiting_warm_join(_pod("a", "10.0.0.1", ready=False))
    assert awaiting_warm_join(_pod("a", "10.0.0.1", ready=False, gate="False"))
    assert not awaiting_warm_join(_pod("a", "10.0.0.1", ready=False, containers=False))  # still loading
    assert not awaiting_warm_join(_pod("a", "10.0.0.1", ready=True, gate="True"))
    ungated = _pod("a", "10.0.0.1", ready=False)
    ungated["spec"]["readinessGates"] = []
    assert not awaiting_warm_join(ungated)
    terminating = _pod("a", "10.0.0.1", ready=False)
    terminating["metadata"]["deletionTimestamp"] = "2026-12-07T00:00:00Z"
    assert not awaiting_warm_join(terminating)
