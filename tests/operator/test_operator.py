"""The real operator (Kopf + our handlers) against the API emulator, real engines as the pods."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import kopf
from tests.operator.conftest import (
    KVCACHES,
    NS,
    Cluster,
    Engines,
    children,
    condition,
    free_port,
    make_kvcache,
    run_pods,
    wait_for,
)

EXPECTED = {"ConfigMap": 2, "Secret": 1, "Service": 2, "StatefulSet": 1, "PodDisruptionBudget": 1}


def _counts(found: dict[str, list[dict[str, object]]]) -> dict[str, int]:
    return {kind: len(objs) for kind, objs in found.items()}


async def _engine_config(port: int, token: str) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.get(f"http://127.0.0.1:{port}/v1/config") as response,
    ):
        config: dict[str, object] = await response.json()
        return config


async def test_lifecycle_with_real_engines(cluster: Cluster, operator: kopf.Memo, engines: Engines) -> None:
    emu = cluster.emu
    kvc = emu.create(KVCACHES, make_kvcache("chat"))
    uid = kvc["metadata"]["uid"]

    # create -> every child, each owned by the KVCache
    found = await wait_for(
        lambda: (f := children(emu, "chat")) and _counts(f) == EXPECTED and f, what="all children"
    )
    for objs in found.values():
        for obj in objs:
            refs = obj["metadata"]["ownerReferences"]
            assert [(r["uid"], r["kind"], r["controller"]) for r in refs] == [(uid, "KVCache", True)]
    status = await wait_for(lambda: emu.get(KVCACHES, "chat", NS).get("status"), what="a status")
    assert condition({"status": status}, "Ready")["status"] == "False"

    # Ready once the pods report ready (engines started from the operator's own ConfigMap + Secret)
    ports = await engines.start(emu, "chat", 2)
    run_pods(emu, "chat", ports)
    ready = await wait_for(
        lambda: (
            (o := emu.get(KVCACHES, "chat", NS))
            and (condition(o, "Ready") or {}).get("status") == "True"
            and o
        ),
        what="Ready",
    )
    assert ready["status"]["readyReplicas"] == 2
    assert sorted(ready["status"]["endpoints"]) == sorted(f"http://127.0.0.1:{p}" for p in ports)
    assert ready["status"]["observedGeneration"] == ready["metadata"]["generation"]
    await wait_for(
        lambda: "memoryPressure" in emu.get(KVCACHES, "chat", NS)["status"], what="scraped figures"
    )

    # a live field reaches the engines and the ConfigMap, and rolls nothing
    sts_before = emu.get("apps/v1/statefulsets", "chat", NS)
    emu.patch(KVCACHES, "chat", {"spec": {"cache": {"maxTokens": 512}}}, NS)
    await wait_for(
        lambda: "maxTokens: 512" in emu.get("v1/configmaps", "chat-config", NS)["data"]["config.yaml"],
        what="ConfigMap maxTokens",
    )
    for port in ports:
        config = await wait_for_async_config(port, 512, engines.token)
        assert config["maxTokens"] == 512
    sts_after = emu.get("apps/v1/statefulsets", "chat", NS)
    assert sts_after["metadata"]["generation"] == sts_before["metadata"]["generation"]

    # a change the engines cannot take live rolls the StatefulSet
    emu.patch(KVCACHES, "chat", {"spec": {"image": "registry.example/kvcache-engine:2"}}, NS)
    rolled = await wait_for(
        lambda: (
            (s := emu.get("apps/v1/statefulsets", "chat", NS))["spec"]["template"]["spec"]["containers"][0][
                "image"
            ]
            == "registry.example/kvcache-engine:2"
            and s
        ),
        what="rollout",
    )
    assert rolled["metadata"]["generation"] == sts_before["metadata"]["generation"] + 1
    await wait_for(
        lambda: (condition(emu.get(KVCACHES, "chat", NS), "Progressing") or {}).get("reason") == "RollingOut",
        what="Progressing=RollingOut",
    )

    # delete -> the KVCache goes, and garbage collection takes every child and pod
    emu.delete(KVCACHES, "chat", NS)
    await wait_for(lambda: not emu.list(KVCACHES, NS), what="KVCache deleted")
    assert children(emu, "chat") == {}
    assert emu.list("v1/pods", NS) == []


async def wait_for_async_config(port: int, max_tokens: int, token: str) -> dict[str, object]:
    """Poll one engine's effective config until maxTokens has the wanted value."""

    deadline = time.monotonic() + 20
    while True:
        config = await _engine_config(port, token)
        if config.get("maxTokens") == max_tokens or time.monotonic() > deadline:
            return config
        await asyncio.sleep(0.1)


async def test_invalid_spec_is_degraded_and_touches_no_child(cluster: Cluster, operator: kopf.Memo) -> None:
    emu = cluster.emu
    emu.create(
        KVCACHES, make_kvcache("bad", autoscaling={"mode": "Auto", "minReplicas": 3, "maxReplicas": 2})
    )
    degraded = await wait_for(lambda: condition(emu.get(KVCACHES, "bad", NS), "Degraded"), what="Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert "spec.autoscaling.minReplicas" in degraded["message"]
    assert children(emu, "bad") == {}
    assert emu.count("create", "statefulsets") == 0


async def test_injected_conflicts_and_server_errors_converge(cluster: Cluster, operator: kopf.Memo) -> None:
    emu = cluster.emu
    faults = [
        emu.inject_fault("create", "statefulsets", status=500, count=2),
        emu.inject_fault("patch", "kvcaches", status=409, count=2, subresource="status"),
        emu.inject_fault("list", "configmaps", status=500, count=1),
    ]
    emu.create(KVCACHES, make_kvcache("flaky"))
    await wait_for(
        lambda: _counts(children(emu, "flaky")) == EXPECTED, timeout=40, what="children despite faults"
    )
    await wait_for(
        lambda: (emu.get(KVCACHES, "flaky", NS).get("status") or {}).get("observedGeneration") == 1,
        timeout=40,
        what="status despite faults",
    )
    assert [f.hits for f in faults] == [2, 2, 1]
    assert _counts(children(emu, "flaky")) == EXPECTED


async def _get_text(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


async def test_run_command_killed_mid_reconcile_restarts_without_duplicates(
    cluster: Cluster, tmp_path: Path
) -> None:
    """``kvcache-operator run`` as a process, SIGKILLed right after its first child was stored;
    a fresh process finishes the job: every child exactly once, owned, and the status written."""
    emu = cluster.emu
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PYTHONWARNINGS": "ignore"}
    health, metrics = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "kvcache_operator.cli",
        "run",
        "--namespace",
        NS,
        "--standalone",
        "--liveness",
        f"http://127.0.0.1:{health}/healthz",
        "--metrics-port",
        str(metrics),
    ]
    log = (tmp_path / "operator.log").open("wb")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    killed: list[str] = []

    def kill_on_first_child(event: str, resource: str, obj: dict[str, object]) -> None:
        if event == "ADDED" and resource == "v1/configmaps" and not killed:
            first.kill()  # the reconcile is cut right after one create reached the server
            killed.append(resource)

    unsubscribe = emu.subscribe(kill_on_first_child)
    emu.create(KVCACHES, make_kvcache("restarted"))
    try:
        await wait_for(lambda: killed, timeout=60, what="the first child")
        await asyncio.to_thread(first.wait, 10)
        unsubscribe()
        assert _counts(children(emu, "restarted")) != EXPECTED  # really cut mid-way
        second = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            await wait_for(
                lambda: _counts(children(emu, "restarted")) == EXPECTED, timeout=60, what="children"
            )
            await wait_for(
                lambda: (emu.get(KVCACHES, "restarted", NS).get("status") or {}).get("conditions"),
                timeout=30,
                what="status",
            )
            assert (await _get_text(f"http://127.0.0.1:{health}/healthz"))[0] == 200
            status, text = await _get_text(f"http://127.0.0.1:{metrics}/metrics")
            assert status == 200 and 'kvcache_operator_reconciles_total{result="ok"}' in text
        finally:
            second.terminate()
            await asyncio.to_thread(second.wait, 20)
    finally:
        log.close()
        if first.poll() is None:
            first.kill()
    uid = emu.get(KVCACHES, "restarted", NS)["metadata"]["uid"]
    for objs in children(emu, "restarted").values():
        assert all(o["metadata"]["ownerReferences"][0]["uid"] == uid for o in objs)
    assert _counts(children(emu, "restarted")) == EXPECTED


def _drive_load(urls: list[str], token: str, stop: threading.Event) -> None:
    """Fill both engines past their capacity with distinct prefixes, then keep missing:
    memory pressure high, hit rate low (evictions cost hits)."""
    import torch

    from kvcache_engine.client import KVCacheClient

    client = KVCacheClient(urls, token=token, strict=True, timeout_s=5.0)
    try:
        shape = (2, 2, 32, 2, 16)  # [K/V, layers, tokens, kv heads, head dim] of make_kvcache()
        for i in range(48):
            client.put([i * 1000 + t for t in range(32)], torch.zeros(shape, dtype=torch.float16), wait=True)
        i = 10_000
        while not stop.is_set():
            client.lookup([i * 1000 + t for t in range(32)])
            i += 1
            stop.wait(0.01)
    finally:
        client.close()


async def test_sustained_pressure_scales_out_with_an_event(
    cluster: Cluster, operator: kopf.Memo, engines: Engines
) -> None:
    emu = cluster.emu
    autoscaling = {
        "mode": "Auto",
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetMemoryPressure": 0.5,
        "targetHitRate": 0.5,
        "scaleUpStabilizationSeconds": 2,
        "maxScaleUpStep": 1,
    }
    emu.create(KVCACHES, make_kvcache("busy", autoscaling=autoscaling))
    await wait_for(lambda: emu.get("v1/configmaps", "busy-config", NS), what="ConfigMap")
    ports = await engines.start(emu, "busy", 2)
    run_pods(emu, "busy", ports)
    stop = threading.Event()
    load = asyncio.create_task(
        asyncio.to_thread(_drive_load, [f"http://127.0.0.1:{p}" for p in ports], engines.token, stop)
    )
    try:
        sts = await wait_for(
            lambda: (s := emu.get("apps/v1/statefulsets", "busy", NS))["spec"]["replicas"] == 3 and s,
            timeout=40,
            what="scale-out to 3",
        )
    finally:
        stop.set()
        await load
    assert sts["metadata"]["generation"] == 2
    decisions = await wait_for(
        lambda: (emu.get(KVCACHES, "busy", NS).get("status") or {}).get("decisions"),
        what="decision in status",
    )
    assert decisions[-1]["kind"] == "Scale" and decisions[-1]["applied"] is True
    assert decisions[-1]["action"] == "replicas 2 -> 3" and "memory pressure" in decisions[-1]["reason"]
    events = [e for e in emu.list("v1/events", NS) if e.get("reason") == "ScaleApplied"]
    assert len(events) == 1 and "replicas 2 -> 3" in events[0]["message"]
    assert emu.get(KVCACHES, "busy", NS)["spec"]["replicas"] == 2  # spec is never rewritten (GitOps)
