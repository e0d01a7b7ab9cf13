"""The real operator (Kopf + our handlers) against the API emulator, real engines as the pods."""

from __future__ import annotations

import aiohttp
import kopf

from tests.operator.conftest import (
    KVCACHES,
    NS,
    Cluster,
    Engines,
    children,
    condition,
    make_kvcache,
    run_pods,
    wait_for,
)

EXPECTED = {"ConfigMap": 2, "Secret": 1, "Service": 2, "StatefulSet": 1, "PodDisruptionBudget": 1}


def _counts(found: dict[str, list[dict[str, object]]]) -> dict[str, int]:
    return {kind: len(objs) for kind, objs in found.items()}


async def _engine_config(port: int, token: str) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http, http.get(f"http://127.0.0.1:{port}/v1/config") as response:
        config: dict[str, object] = await response.json()
        return config


async def test_lifecycle_with_real_engines(cluster: Cluster, operator: kopf.Memo, engines: Engines) -> None:
    emu = cluster.emu
    kvc = emu.create(KVCACHES, make_kvcache("chat"))
    uid = kvc["metadata"]["uid"]

    # create -> every child, each owned by the KVCache
    found = await wait_for(lambda: (f := children(emu, "chat")) and _counts(f) == EXPECTED and f,
                           what="all children")
    for objs in found.values():
        for obj in objs:
            refs = obj["metadata"]["ownerReferences"]
            assert [(r["uid"], r["kind"], r["controller"]) for r in refs] == [(uid, "KVCache", True)]
    status = await wait_for(lambda: emu.get(KVCACHES, "chat", NS).get("status"), what="a status")
    assert condition({"status": status}, "Ready")["status"] == "False"

    # Ready once the pods report ready (engines started from the operator's own ConfigMap + Secret)
    ports = await engines.start(emu, "chat", 2)
    run_pods(emu, "chat", ports)
    ready = await wait_for(lambda: (o := emu.get(KVCACHES, "chat", NS)) and
                           (condition(o, "Ready") or {}).get("status") == "True" and o, what="Ready")
    assert ready["status"]["readyReplicas"] == 2
    assert sorted(ready["status"]["endpoints"]) == sorted(f"http://127.0.0.1:{p}" for p in ports)
    assert ready["status"]["observedGeneration"] == ready["metadata"]["generation"]
    await wait_for(lambda: "memoryPressure" in emu.get(KVCACHES, "chat", NS)["status"], what="scraped figures")

    # a live field reaches the engines and the ConfigMap, and rolls nothing
    sts_before = emu.get("apps/v1/statefulsets", "chat", NS)
    emu.patch(KVCACHES, "chat", {"spec": {"cache": {"maxTokens": 512}}}, NS)
    await wait_for(lambda: "maxTokens: 512" in emu.get("v1/configmaps", "chat-config", NS)["data"]["config.yaml"],
                   what="ConfigMap maxTokens")
    for port in ports:
        config = await wait_for_async_config(port, 512, engines.token)
        assert config["maxTokens"] == 512
    sts_after = emu.get("apps/v1/statefulsets", "chat", NS)
    assert sts_after["metadata"]["generation"] == sts_before["metadata"]["generation"]

    # a change the engines cannot take live rolls the StatefulSet
    emu.patch(KVCACHES, "chat", {"spec": {"image": "registry.example/kvcache-engine:2"}}, NS)
    rolled = await wait_for(
        lambda: (s := emu.get("apps/v1/statefulsets", "chat", NS))["spec"]["template"]["spec"]["containers"][0][
            "image"] == "registry.example/kvcache-engine:2" and s, what="rollout")
    assert rolled["metadata"]["generation"] == sts_before["metadata"]["generation"] + 1
    await wait_for(lambda: (condition(emu.get(KVCACHES, "chat", NS), "Progressing") or {}).get("reason")
                   == "RollingOut", what="Progressing=RollingOut")

    # delete -> the KVCache goes, and garbage collection takes every child and pod
    emu.delete(KVCACHES, "chat", NS)
    await wait_for(lambda: not emu.list(KVCACHES, NS), what="KVCache deleted")
    assert children(emu, "chat") == {}
    assert emu.list("v1/pods", NS) == []


async def wait_for_async_config(port: int, max_tokens: int, token: str) -> dict[str, object]:
    """Poll one engine's effective config until maxTokens has the wanted value."""
    import asyncio
    import time

    deadline = time.monotonic() + 20
    while True:
        config = await _engine_config(port, token)
        if config.get("maxTokens") == max_tokens or time.monotonic() > deadline:
            return config
        await asyncio.sleep(0.1)


async def test_invalid_spec_is_degraded_and_touches_no_child(cluster: Cluster, operator: kopf.Memo) -> None:
    emu = cluster.emu
    emu.create(KVCACHES, make_kvcache("bad", autoscaling={"mode": "Auto", "minReplicas": 3, "maxReplicas": 2}))
    degraded = await wait_for(lambda: condition(emu.get(KVCACHES, "bad", NS), "Degraded"), what="Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert "spec.autoscaling.minReplicas" in degraded["message"]
    assert children(emu, "bad") == {}
    assert emu.count("create", "statefulsets") == 0


async def test_injected_conflicts_and_server_errors_converge(cluster: Cluster, operator: kopf.Memo) -> None:
    emu = cluster.emu
    faults = [emu.inject_fault("create", "statefulsets", status=500, count=2),
              emu.inject_fault("patch", "kvcaches", status=409, count=2, subresource="status"),
              emu.inject_fault("list", "configmaps", status=500, count=1)]
    emu.create(KVCACHES, make_kvcache("flaky"))
    await wait_for(lambda: _counts(children(emu, "flaky")) == EXPECTED, timeout=40, what="children despite faults")
    await wait_for(lambda: (emu.get(KVCACHES, "flaky", NS).get("status") or {}).get("observedGeneration") == 1,
                   timeout=40, what="status despite faults")
    assert [f.hits for f in faults] == [2, 2, 1]
    assert _counts(children(emu, "flaky")) == EXPECTED
