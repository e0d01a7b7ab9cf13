"""The API emulator: server-side semantics over HTTP and the Python API, and Kopf's handler counts."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import aiohttp
import kmock
import kopf
import pytest

from tests.kube_emulator import KubeEmulator, match_labels
from tests.operator.conftest import KVCACHES, NS, Cluster, running_operator, wait_for

CM = "v1/configmaps"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


def make_cm(name: str, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, **meta}, "data": {"k": "v"}}


async def test_server_side_metadata_over_http(cluster: Cluster) -> None:
    async with aiohttp.ClientSession(cluster.url) as http:
        async with http.post(f"/api/v1/namespaces/{NS}/configmaps", json=make_cm("a")) as response:
            created = await response.json()
        meta = created["metadata"]
        assert (
            meta["namespace"] == NS and meta["generation"] == 1 and meta["uid"] and meta["creationTimestamp"]
        )
        assert (created["apiVersion"], created["kind"]) == ("v1", "ConfigMap")
        async with http.post(f"/api/v1/namespaces/{NS}/configmaps", json=make_cm("a")) as response:
            assert response.status == 409
        async with http.post(
            "/api/v1/namespaces/other/configmaps", json=make_cm("b", namespace=NS)
        ) as response:
            assert response.status == 400
        async with http.get("/api/v1/namespaces") as response:
            assert [n["metadata"]["name"] for n in (await response.json())["items"]] == [NS]
        async with http.get(f"/api/v1/namespaces/{NS}") as response:
            assert response.status == 200


def test_generation_moves_on_spec_only_and_status_is_a_subresource(cluster: Cluster) -> None:
    emu = cluster.emu
    kvc = emu.create(
        KVCACHES,
        {"metadata": {"name": "c", "namespace": NS}, "spec": {"replicas": 1}, "status": {"ignored": True}},
    )
    assert "status" not in kvc
    rv = kvc["metadata"]["resourceVersion"]
    labelled = emu.patch(KVCACHES, "c", {"metadata": {"labels": {"a": "b"}}}, NS)
    assert labelled["metadata"]["generation"] == 1 and labelled["metadata"]["resourceVersion"] != rv
    with_status = emu.patch(
        KVCACHES, "c", {"status": {"phase": "Ready"}, "spec": {"replicas": 5}}, NS, subresource="status"
    )
    assert with_status["status"] == {"phase": "Ready"} and with_status["spec"] == {"replicas": 1}
    assert with_status["metadata"]["generation"] == 1
    main = emu.patch(KVCACHES, "c", {"spec": {"replicas": 2}, "status": {"phase": "X"}}, NS)
    assert main["metadata"]["generation"] == 2 and main["status"] == {"phase": "Ready"}
    same = emu.patch(KVCACHES, "c", {"spec": {"replicas": 2}}, NS)
    assert same["metadata"]["resourceVersion"] == main["metadata"]["resourceVersion"]  # no-op: no new version


async def test_json_patch_test_failure_is_422_and_stale_versions_are_409(cluster: Cluster) -> None:
    emu = cluster.emu
    created = emu.create(CM, make_cm("a", namespace=NS))
    url = f"/api/v1/namespaces/{NS}/configmaps/a"
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "stale"},
        {"op": "replace", "path": "/data/k", "value": "w"},
    ]
    async with aiohttp.ClientSession(cluster.url) as http:
        async with http.patch(url, data=json.dumps(ops), headers=JSON_PATCH) as response:
            assert response.status == 422
        ops[0]["value"] = created["metadata"]["resourceVersion"]
        async with http.patch(url, data=json.dumps(ops), headers=JSON_PATCH) as response:
            assert response.status == 200 and (await response.json())["data"] == {"k": "w"}
        stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "data": {"k": "x"}}
        async with http.patch(url, json=stale, headers=MERGE) as response:
            assert response.status == 409
        async with http.put(url, json={**make_cm("a"), **stale}) as response:
            assert response.status == 409
    assert emu.get(CM, "a", NS)["data"] == {"k": "w"}


def test_label_and_field_selectors(cluster: Cluster) -> None:
    emu = cluster.emu
    emu.create(CM, make_cm("a", namespace=NS, labels={"app": "x", "tier": "db"}))
    emu.create(CM, make_cm("b", namespace=NS, labels={"app": "y"}))
    emu.create(CM, make_cm("c", namespace="elsewhere", labels={"app": "x"}))

    def names(selector: str, namespace: str | None = NS, fields: str | None = None) -> list[str]:
        return [
            o["metadata"]["name"]
            for o in emu.list(CM, namespace, label_selector=selector, field_selector=fields)
        ]

    assert names("app=x") == ["a"]
    assert names("app=x", None) == ["c", "a"] or names("app=x", None) == ["a", "c"]
    assert names("app!=x") == ["b"]
    assert names("app in (x, y),tier") == ["a"]
    assert names("app notin (x),!tier") == ["b"]
    assert names("", fields="metadata.name=b") == ["b"]
    assert match_labels("a==1", {"a": "1"}) and not match_labels("a", {})


def test_finalizers_hold_deletion_until_released(cluster: Cluster) -> None:
    emu = cluster.emu
    emu.create(CM, make_cm("f", namespace=NS, finalizers=["x/y"]))
    held = emu.delete(CM, "f", NS)
    assert held["metadata"]["deletionTimestamp"]
    with pytest.raises(kmock.KubernetesError) as failure:
        emu.patch(CM, "f", {"metadata": {"finalizers": ["x/y", "new"]}}, NS)
    assert failure.value.status == 422
    emu.patch(CM, "f", {"metadata": {"finalizers": None}}, NS)
    assert emu.list(CM, NS) == []


def test_owner_references_are_garbage_collected(cluster: Cluster) -> None:
    emu = cluster.emu
    owner = emu.create(KVCACHES, {"metadata": {"name": "o", "namespace": NS}, "spec": {}})
    other = emu.create(CM, make_cm("other", namespace=NS))

    def ref(obj: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"],
        }

    sts = emu.create(
        "apps/v1/statefulsets",
        {"metadata": {"name": "s", "namespace": NS, "ownerReferences": [ref(owner)]}, "spec": {}},
    )
    emu.create("v1/pods", {"metadata": {"name": "s-0", "namespace": NS, "ownerReferences": [ref(sts)]}})
    emu.create(CM, make_cm("shared", namespace=NS, ownerReferences=[ref(owner), ref(other)]))
    emu.delete(KVCACHES, "o", NS)
    assert emu.list("apps/v1/statefulsets", NS) == [] and emu.list("v1/pods", NS) == []
    shared = emu.get(CM, "shared", NS)
    assert [r["name"] for r in shared["metadata"]["ownerReferences"]] == ["other"]
    emu.delete(CM, "other", NS, propagation="Orphan")
    assert "ownerReferences" not in emu.get(CM, "shared", NS)["metadata"]


async def test_watch_resumes_from_a_version_and_expires_old_ones(cluster: Cluster) -> None:
    emu = cluster.emu
    first = emu.create(CM, make_cm("a", namespace=NS))
    emu.patch(CM, "a", {"data": {"k": "2"}}, NS)
    emu.create(CM, make_cm("b", namespace=NS))
    since = first["metadata"]["resourceVersion"]
    events = [e async for e in emu.watch(CM, NS, since=since, timeout=0.2)]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "a"),
        ("ADDED", "b"),
    ]
    fresh = [e async for e in emu.watch(CM, NS, timeout=0.2)]
    assert [e["type"] for e in fresh] == ["ADDED", "ADDED"]
    small = KubeEmulator(history_size=1)
    small.create(CM, make_cm("x", namespace=NS))
    small.create(CM, make_cm("y", namespace=NS))
    expired = [e async for e in small.watch(CM, NS, since="1", timeout=0.2)]
    assert expired[0]["type"] == "ERROR" and expired[0]["object"]["code"] == 410


async def test_watch_over_http_streams_changes_and_honours_timeout(cluster: Cluster) -> None:
    emu = cluster.emu
    rv = emu.create(CM, make_cm("a", namespace=NS))["metadata"]["resourceVersion"]
    url = f"/api/v1/namespaces/{NS}/configmaps?watch=true&resourceVersion={rv}&timeoutSeconds=1"
    async with aiohttp.ClientSession(cluster.url) as http, http.get(url) as response:
        emu.patch(CM, "a", {"data": {"k": "new"}}, NS)
        lines = [json.loads(line) async for line in response.content if line.strip()]
    assert [(e["type"], e["object"]["data"]) for e in lines] == [("MODIFIED", {"k": "new"})]


async def test_scale_subresource_and_fault_injection(cluster: Cluster) -> None:
    emu = cluster.emu
    emu.create(KVCACHES, {"metadata": {"name": "s", "namespace": NS}, "spec": {"replicas": 1}})
    emu.patch(KVCACHES, "s", {"status": {"replicas": 1, "selector": "app=s"}}, NS, subresource="status")
    fault = emu.inject_fault("patch", "kvcaches", status=500, count=1, subresource="scale")
    url = f"/apis/kvcache.dev/v1alpha1/namespaces/{NS}/kvcaches/s/scale"
    async with aiohttp.ClientSession(cluster.url) as http:
        async with http.patch(url, json={"spec": {"replicas": 3}}, headers=MERGE) as response:
            assert response.status == 500
        async with http.patch(url, json={"spec": {"replicas": 3}}, headers=MERGE) as response:
            scale = await response.json()
    assert (
        scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3 and scale["status"]["selector"] == "app=s"
    )
    assert emu.get(KVCACHES, "s", NS)["spec"]["replicas"] == 3
    assert (fault.hits, fault.remaining) == (1, 0)


async def test_kopf_runs_each_handler_exactly_once(cluster: Cluster) -> None:
    """The point of the emulator: as against a real API server, status writes and no-op patches
    trigger nothing, a spec change triggers one update, deletion one delete handler."""
    emu = cluster.emu
    registry = kopf.OperatorRegistry()
    calls: Counter[str] = Counter()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.create("kvcache.dev", "kvcaches", registry=registry)
    async def created(patch: kopf.Patch, **_: Any) -> None:
        calls["create"] += 1
        patch.status["seen"] = True  # a status write of the handler's own must not re-trigger it

    @kopf.on.update("kvcache.dev", "kvcaches", registry=registry)
    async def updated(**_: Any) -> None:
        calls["update"] += 1

    @kopf.on.field("kvcache.dev", "kvcaches", field="spec.replicas", registry=registry)
    async def replicas_changed(old: Any, new: Any, **_: Any) -> None:
        calls[f"replicas {old}->{new}"] += 1

    @kopf.on.delete("kvcache.dev", "kvcaches", registry=registry)
    async def deleted(**_: Any) -> None:
        calls["delete"] += 1

    async with running_operator(registry):
        emu.create(KVCACHES, {"metadata": {"name": "k", "namespace": NS}, "spec": {"replicas": 1}})
        await wait_for(
            lambda: calls["create"] == 1 and (emu.get(KVCACHES, "k", NS).get("status") or {}).get("seen"),
            what="create handler",
        )
        emu.patch(KVCACHES, "k", {"status": {"phase": "Ready"}}, NS, subresource="status")
        emu.patch(KVCACHES, "k", {"spec": {"replicas": 2}}, NS)
        await wait_for(lambda: calls["update"] == 1, what="update handler")
        emu.patch(KVCACHES, "k", {"spec": {"replicas": 2}}, NS)  # no-op
        emu.delete(KVCACHES, "k", NS)
        await wait_for(lambda: calls["delete"] == 1 and not emu.list(KVCACHES, NS), what="delete handler")
        await asyncio.sleep(0)
    # field handlers also fire on creation (None -> 1), exactly as against a real server
    assert calls == Counter(
        {"create": 1, "update": 1, "replicas None->1": 1, "replicas 1->2": 1, "delete": 1}
    )


async def test_kmock_reactions_still_take_priority(cluster: Cluster) -> None:
    emu = cluster.emu
    emu.create(CM, make_cm("a", namespace=NS))
    emu[f"get /api/v1/namespaces/{NS}/configmaps/a"] << 418
    async with aiohttp.ClientSession(cluster.url) as http:
        async with http.get(f"/api/v1/namespaces/{NS}/configmaps/a") as response:
            assert response.status == 418
        async with http.get(f"/api/v1/namespaces/{NS}/configmaps") as response:
            assert response.status == 200 and len((await response.json())["items"]) == 1


async def test_core_discovery_names_group_version_v1(cluster: Cluster) -> None:
    """kubectl resolves core kinds from /api/v1's groupVersion; it must be "v1", not "/v1"."""
    async with aiohttp.ClientSession(cluster.url) as http, http.get("/api/v1") as response:
        doc = await response.json()
    assert doc["kind"] == "APIResourceList" and doc["groupVersion"] == "v1"
    assert "configmaps" in {r["name"] for r in doc["resources"]}


def test_graceful_pod_delete_records_the_pods_grace_period(cluster: Cluster) -> None:
    emu = cluster.emu
    pod = {
        "metadata": {"name": "p", "namespace": NS, "finalizers": ["test/hold"]},
        "spec": {"terminationGracePeriodSeconds": 45, "containers": [{"name": "c", "image": "x"}]},
    }
    emu.create("v1/pods", pod)
    deleting = emu.delete("v1/pods", "p", NS)
    assert deleting["metadata"]["deletionGracePeriodSeconds"] == 45
