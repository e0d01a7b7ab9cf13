"""reconcile.py, status.py and the API-call table: pure functions on tiny worlds."""

from __future__ import annotations

import copy
from typing import Any

from kvcache_engine.contract import LiveConfig
from kvcache_operator import api, k8s, rbac, reconcile, resources
from kvcache_operator import status as status_mod

OWNER = {"metadata": {"name": "c", "namespace": "ns", "uid": "u-1"}}


def make_desired(**spec: Any) -> list[dict[str, Any]]:
    kvc = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "c", "namespace": "ns"},
        "spec": spec,
    }
    owner = reconcile.owner_reference(OWNER)
    return [reconcile.with_owner(child, owner) for child in resources.build_children(kvc, token="t")]


def as_observed(children: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """What a server would hold after creating them (plus fields it adds itself)."""
    observed: dict[str, list[dict[str, Any]]] = {}
    for child in copy.deepcopy(children):
        child["metadata"].update({"uid": "x", "resourceVersion": "7"})
        child["status"] = {"observedGeneration": 1}
        observed.setdefault(child["kind"], []).append(child)
    return observed


def test_plan_creates_everything_then_nothing() -> None:
    desired = make_desired()
    first = reconcile.plan(desired, {}, "u-1")
    assert [a.verb for a in first] == ["create"] * len(desired)
    assert reconcile.plan(desired, as_observed(desired), "u-1") == []


def test_plan_patches_drift_and_adopts_but_never_patches_create_only() -> None:
    desired = make_desired()
    observed = as_observed(desired)
    observed["StatefulSet"][0]["spec"]["replicas"] = 5
    observed["Service"][0]["metadata"].pop("ownerReferences")
    observed["Secret"][0]["data"] = {"token": "other"}  # create-only: a rotated token stays
    actions = {(a.verb, a.kind, a.name): a.reason for a in reconcile.plan(desired, observed, "u-1")}
    assert actions == {
        ("patch", "StatefulSet", "c"): "drifted at spec.replicas",
        ("patch", "Service", "c-headless"): "adopting",
    }


def test_plan_deletes_only_owned_children_no_longer_wanted() -> None:
    desired = make_desired()
    observed = as_observed(
        make_desired(persistence={"enabled": True}, backup={"enabled": True, "onDelete": "Delete"})
    )
    foreign = {"kind": "PersistentVolumeClaim", "metadata": {"name": "data-c-0", "ownerReferences": []}}
    observed["PersistentVolumeClaim"].append(foreign)
    deletes = [(a.kind, a.name) for a in reconcile.plan(desired, observed, "u-1") if a.verb == "delete"]
    assert deletes == [("CronJob", "c-backup"), ("PersistentVolumeClaim", "c-backups")]


def test_retained_backup_claim_gets_no_owner() -> None:
    desired = make_desired(persistence={"enabled": True}, backup={"enabled": True})
    pvc = next(c for c in desired if c["kind"] == "PersistentVolumeClaim")
    assert "ownerReferences" not in pvc["metadata"]


def test_first_difference_and_replicas_and_rollout() -> None:
    assert reconcile.first_difference({"a": [{"b": 1}]}, {"a": [{"b": 1, "c": 2}], "d": 3}) is None
    assert reconcile.first_difference({"a": [{"b": 1}]}, {"a": [{"b": 2}]}) == "a[0].b"
    spec = api.parse_spec(
        {"replicas": 2, "autoscaling": {"mode": "Auto", "minReplicas": 1, "maxReplicas": 3}}
    )
    assert reconcile.desired_replicas(spec, {"spec": {"replicas": 3}}) == 3  # the operator owns it
    assert reconcile.desired_replicas(api.parse_spec({"replicas": 2}), {"spec": {"replicas": 3}}) == 2
    assert reconcile.desired_replicas(api.parse_spec({"replicas": 0}), {"spec": {"replicas": 3}}) == 0
    settled = {
        "metadata": {"generation": 2},
        "spec": {"replicas": 2},
        "status": {
            "observedGeneration": 2,
            "updatedReplicas": 2,
            "currentRevision": "a",
            "updateRevision": "a",
        },
    }
    assert not reconcile.rolling_out(settled)
    assert reconcile.rolling_out({**settled, "metadata": {"generation": 3}})
    assert reconcile.rolling_out(None)


def test_live_overrides_only_while_tuning_is_auto() -> None:
    tuned = LiveConfig.parse({"maxTokens": 4096, "useCompression": True, "compressionRatio": 0.5})
    auto = api.parse_spec({"tuning": {"mode": "Auto"}, "cache": {"maxTokens": 2048}})
    assert reconcile.live_overrides(auto, tuned).given() == {"max_tokens": 4096, "use_compression": True}
    assert not reconcile.live_overrides(api.parse_spec({"cache": {"maxTokens": 2048}}), tuned)
    # live fields the tuner does not own are ignored, not applied
    noisy = LiveConfig(prefetch_size=64, enable_prefetch=True).over(tuned)
    assert reconcile.live_overrides(auto, noisy).given() == {"max_tokens": 4096, "use_compression": True}


def test_pause_annotation() -> None:
    assert reconcile.is_paused({"annotations": {"kvcache.dev/reconcile": "paused"}})
    assert not reconcile.is_paused({"annotations": {}})


def make_pod(name: str, ready: bool, port: int = 9000) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"containers": [{"ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": str(ready)}]},
    }


def test_status_conditions_keep_transition_times_and_name_the_state() -> None:
    kvc = api.parse_kvcache({"metadata": {"name": "c", "namespace": "ns"}, "spec": {"replicas": 2}})
    sts = {
        "metadata": {"generation": 1},
        "spec": {"replicas": 2},
        "status": {"observedGeneration": 1, "replicas": 2},
    }
    common = {
        "kvc": kvc,
        "generation": 3,
        "desired": 2,
        "statefulset": sts,
        "paused": False,
        "effective_config": None,
        "observation": None,
        "decisions": [],
        "last_backup": None,
    }
    first = status_mod.build_status(
        pods=[make_pod("c-0", True), make_pod("c-1", False)], rolling=False, previous={}, now="t1", **common
    )
    ready = {c["type"]: c for c in first["conditions"]}
    assert ready["Ready"]["status"] == "False" and ready["Progressing"]["reason"] == "Scaling"
    assert first["endpoints"] == ["http://10.0.0.1:9000"] and first["observedGeneration"] == 3
    second = status_mod.build_status(
        pods=[make_pod("c-0", True), make_pod("c-1", True)], rolling=False, previous=first, now="t2", **common
    )
    cond = {c["type"]: c for c in second["conditions"]}
    assert cond["Ready"]["status"] == "True" and cond["Ready"]["lastTransitionTime"] == "t2"
    assert cond["Degraded"]["lastTransitionTime"] == "t1"  # unchanged status keeps its time
    assert second["selector"] == resources.selector_string("c")
    paused = status_mod.build_status(
        pods=[], rolling=False, previous=second, now="t3", **{**common, "paused": True}
    )
    assert {c["type"]: c for c in paused["conditions"]}["Progressing"]["reason"] == "ReconcilePaused"


def test_backup_record_takes_the_latest_finished_job() -> None:
    ok = {"metadata": {"name": "b1"}, "status": {"succeeded": 1, "completionTime": "2026-01-01T00:00:00Z"}}
    failed = {
        "metadata": {"name": "b2"},
        "status": {
            "conditions": [{"type": "Failed", "status": "True", "lastTransitionTime": "2026-01-02T00:00:00Z"}]
        },
    }
    assert status_mod.backup_record([ok])["succeeded"] is True
    assert status_mod.backup_record([ok, failed])["job"] == "b2"
    assert status_mod.backup_record([{"metadata": {"name": "running"}, "status": {}}]) is None


def test_every_api_call_the_operator_makes_is_granted_by_the_chart_rbac() -> None:
    for namespaced in (False, True):
        missing = k8s.API_CALLS - rbac.permission_set(namespaced=namespaced)
        assert missing == set(), f"namespaced={namespaced}: not granted: {sorted(missing)}"
