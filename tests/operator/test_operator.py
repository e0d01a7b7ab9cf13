"""The real operator (Kopf + our handlers) against the API emulator, real engines as the pods."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import kopf
import pytest

from kvcache_operator.controller import TUNED_ANNOTATION, configure
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
    running_operator,
    settle_statefulset,
    wait_for,
)

EXPECTED = {"ConfigMap": 2, "Secret": 2, "Service": 2, "StatefulSet": 1, "PodDisruptionBudget": 1}


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
        emu.inject_fault("create", "configmaps", status=500, count=1),
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
    last_scale = emu.get(KVCACHES, "busy", NS)["status"]["lastScale"]
    assert (last_scale["fromReplicas"], last_scale["toReplicas"]) == (2, 3)
    assert last_scale["time"] == decisions[-1]["time"] and last_scale["reason"] == decisions[-1]["reason"]
    events = [e for e in emu.list("v1/events", NS) if e.get("reason") == "ScaleApplied"]
    assert len(events) == 1 and "replicas 2 -> 3" in events[0]["message"]
    assert emu.get(KVCACHES, "busy", NS)["spec"]["replicas"] == 2  # spec is never rewritten (GitOps)


def _used_blocks(port: int, token: str) -> int:
    """Blocking read of one engine's used blocks (called from an emulator hook, so no await)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/stats", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return int(json.loads(response.read())["used_blocks"])


def _fill(url: str, token: str, sequences: int) -> None:
    import torch

    from kvcache_engine.client import KVCacheClient

    client = KVCacheClient([url], token=token, strict=True, timeout_s=5.0)
    try:
        for i in range(sequences):
            client.put(
                [i * 1000 + t for t in range(32)],
                torch.zeros((2, 2, 32, 2, 16), dtype=torch.float16),
                wait=True,
            )
    finally:
        client.close()


async def test_scale_in_drains_the_leaving_replica_before_lowering_replicas(
    cluster: Cluster, operator: kopf.Memo, engines: Engines
) -> None:
    emu = cluster.emu
    autoscaling = {
        "mode": "Auto",
        "minReplicas": 1,
        "maxReplicas": 2,
        "targetMemoryPressure": 0.8,
        "scaleDownStabilizationSeconds": 1,
    }
    emu.create(KVCACHES, make_kvcache("quiet", autoscaling=autoscaling))
    await wait_for(lambda: emu.get("v1/configmaps", "quiet-config", NS), what="ConfigMap")
    ports = await engines.start(emu, "quiet", 2)
    await asyncio.to_thread(_fill, f"http://127.0.0.1:{ports[1]}", engines.token, 2)  # 4 blocks on ordinal 1
    assert _used_blocks(ports[0], engines.token) == 0
    seen_at_scale_in: list[int] = []

    def on_scale(event: str, resource: str, obj: dict[str, Any]) -> None:
        if resource == "apps/v1/statefulsets" and obj["spec"].get("replicas") == 1 and not seen_at_scale_in:
            seen_at_scale_in.append(_used_blocks(ports[0], engines.token))

    emu.subscribe(on_scale)
    run_pods(emu, "quiet", ports)
    await wait_for(lambda: seen_at_scale_in, timeout=30, what="scale-in to 1")
    assert seen_at_scale_in == [4]  # ordinal 1's blocks were already on ordinal 0 when replicas dropped
    decisions = await wait_for(
        lambda: (emu.get(KVCACHES, "quiet", NS).get("status") or {}).get("decisions"),
        what="decision in status",
    )
    assert decisions[-1]["action"] == "replicas 2 -> 1" and "draining ordinals 1" in decisions[-1]["reason"]
    # the hand-off's proof in the reason: all 4 blocks moved, decoded and checksum-verified by ordinal 0
    assert "quiet-1: handed off 4/4 blocks (100%), 4 verified by 1 replicas" in decisions[-1]["reason"]


async def test_pause_annotation_freezes_children_and_hibernation_keeps_the_claims(
    cluster: Cluster, operator: kopf.Memo
) -> None:
    emu = cluster.emu
    emu.create(KVCACHES, make_kvcache("sleepy", persistence={"enabled": True}))
    await wait_for(lambda: _counts(children(emu, "sleepy")) == EXPECTED, what="children")
    emu.patch(
        KVCACHES,
        "sleepy",
        {
            "metadata": {"annotations": {"kvcache.dev/reconcile": "paused"}},
            "spec": {"image": "registry.example/kvcache-engine:2"},
        },
        NS,
    )
    progressing = await wait_for(
        lambda: (
            (c := condition(emu.get(KVCACHES, "sleepy", NS), "Progressing"))
            and c["reason"] == "ReconcilePaused"
            and c
        ),
        what="paused condition",
    )
    assert "paused" in progressing["message"]
    image = emu.get("apps/v1/statefulsets", "sleepy", NS)["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]
    assert image != "registry.example/kvcache-engine:2"

    # a PVC the StatefulSet made for ordinal 0 (owned by the StatefulSet, not by the KVCache)
    emu.create(
        "v1/persistentvolumeclaims",
        {
            "metadata": {
                "name": "data-sleepy-0",
                "namespace": NS,
                "labels": {"app.kubernetes.io/instance": "sleepy"},
            }
        },
    )
    emu.patch(
        KVCACHES,
        "sleepy",
        {"metadata": {"annotations": {"kvcache.dev/reconcile": None}}, "spec": {"replicas": 0}},
        NS,
    )
    sts = await wait_for(
        lambda: (s := emu.get("apps/v1/statefulsets", "sleepy", NS))["spec"]["replicas"] == 0 and s,
        what="hibernation",
    )
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/kvcache-engine:2"
    settle_statefulset(emu, "sleepy", 0)  # what the StatefulSet controller reports once it is done
    ready = await wait_for(
        lambda: (
            (c := condition(emu.get(KVCACHES, "sleepy", NS), "Ready")) and c["reason"] == "Hibernating" and c
        ),
        what="Ready=Hibernating",
        timeout=30,
    )
    assert ready["status"] == "True"
    assert emu.get("v1/persistentvolumeclaims", "data-sleepy-0", NS)


def _peering_state(log: Path) -> str:
    text = log.read_text()
    return "active" if text.rfind("Resuming operations") > text.rfind("Pausing operations") else "paused"


async def test_two_replicas_peer_and_only_the_higher_priority_one_acts(
    cluster: Cluster, tmp_path: Path
) -> None:
    emu = cluster.emu
    emu.create("kopf.dev/v1/kopfpeerings", {"metadata": {"name": "kvcache-operator", "namespace": NS}})
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PYTHONWARNINGS": "ignore"}
    command = [
        sys.executable,
        "-m",
        "kvcache_operator.cli",
        "run",
        "--namespace",
        NS,
        "--liveness",
        "",
        "--metrics-port",
        "0",
    ]
    logs = {name: tmp_path / f"{name}.log" for name in ("high", "low")}
    procs = []
    for name, priority in (("high", 10), ("low", 5)):
        with logs[name].open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [*command, "--priority", str(priority)], stdout=log, stderr=subprocess.STDOUT, env=env
                )
            )
    try:
        # a peer starts paused, resumes when it sees no higher peer, and pauses on seeing one
        await wait_for(
            lambda: _peering_state(logs["high"]) == "active" and _peering_state(logs["low"]) == "paused",
            timeout=30,
            what="only the high-priority replica active",
        )
        emu.create(KVCACHES, make_kvcache("peered"))
        await wait_for(lambda: _counts(children(emu, "peered")) == EXPECTED, timeout=30, what="children")
        await wait_for(
            lambda: "create StatefulSet peered" in logs["high"].read_text(),
            timeout=10,
            what="the high-priority replica's log",
        )
        assert _peering_state(logs["low"]) == "paused"
        assert "create StatefulSet peered" not in logs["low"].read_text()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await asyncio.to_thread(proc.wait, 20)


async def test_watch_streams_time_out_and_reconnect(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server-side watch timeouts are set, so a dead stream is replaced rather than waited on."""
    monkeypatch.setenv("KVCACHE_OPERATOR_WATCH_TIMEOUT_S", "1")
    emu = cluster.emu
    async with running_operator():
        await wait_for(lambda: emu.count("watch", "kvcaches") >= 3, timeout=15, what="watch reconnects")
        emu.create(KVCACHES, make_kvcache("late"))
        await wait_for(lambda: _counts(children(emu, "late")) == EXPECTED, what="children after reconnects")


def test_operator_settings() -> None:
    settings = kopf.OperatorSettings()
    configure(settings)
    assert settings.watching.server_timeout == 300
    assert settings.watching.client_timeout is not None and settings.watching.client_timeout > 300
    assert settings.persistence.finalizer == "kvcache.dev/finalizer"


async def test_kubectl_scale_goes_through_the_scale_subresource(
    cluster: Cluster, operator: kopf.Memo
) -> None:
    emu = cluster.emu
    emu.create(KVCACHES, make_kvcache("scaled"))
    status = await wait_for(lambda: emu.get(KVCACHES, "scaled", NS).get("status"), what="status")
    url = f"/apis/kvcache.dev/v1alpha1/namespaces/{NS}/kvcaches/scaled/scale"
    async with aiohttp.ClientSession(cluster.url) as http:
        async with http.get(url) as response:
            scale = await response.json()
        assert scale["status"]["selector"] == status["selector"] and scale["spec"]["replicas"] == 2
        async with http.patch(
            url, json={"spec": {"replicas": 3}}, headers={"Content-Type": "application/merge-patch+json"}
        ) as response:
            assert response.status == 200
    await wait_for(
        lambda: emu.get("apps/v1/statefulsets", "scaled", NS)["spec"]["replicas"] == 3,
        what="StatefulSet follows spec.replicas",
    )


def test_run_needs_a_namespace_choice(capsys: pytest.CaptureFixture[str]) -> None:
    from kvcache_operator.cli import main

    assert main(["run"]) == 2
    assert "--namespace" in capsys.readouterr().err


async def test_last_backup_comes_from_the_cronjobs_last_finished_job(
    cluster: Cluster, operator: kopf.Memo
) -> None:
    emu = cluster.emu
    emu.create(KVCACHES, make_kvcache("saved", persistence={"enabled": True}, backup={"enabled": True}))
    cronjob = await wait_for(lambda: emu.get("batch/v1/cronjobs", "saved-backup", NS), what="CronJob")
    assert emu.get("v1/persistentvolumeclaims", "saved-backups", NS)  # retained claim, created once
    labels = cronjob["spec"]["jobTemplate"]["metadata"]["labels"]
    emu.create("batch/v1/jobs", {"metadata": {"name": "saved-backup-1", "namespace": NS, "labels": labels}})
    emu.patch(
        "batch/v1/jobs",
        "saved-backup-1",
        {"status": {"succeeded": 1, "completionTime": "2026-11-27T03:00:00Z"}},
        NS,
        subresource="status",
    )
    last = await wait_for(
        lambda: (emu.get(KVCACHES, "saved", NS).get("status") or {}).get("lastBackup"),
        timeout=20,
        what="lastBackup",
    )
    assert last == {"time": "2026-11-27T03:00:00Z", "succeeded": True, "job": "saved-backup-1"}
    assert condition(emu.get(KVCACHES, "saved", NS), "BackupSucceeded")["status"] == "True"


async def test_dry_run_records_the_decision_and_an_event_but_changes_nothing(
    cluster: Cluster, operator: kopf.Memo, engines: Engines
) -> None:
    emu = cluster.emu
    autoscaling = {
        "mode": "DryRun",
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetMemoryPressure": 0.5,
        "targetHitRate": 0.5,
        "scaleUpStabilizationSeconds": 2,
    }
    emu.create(KVCACHES, make_kvcache("shadow", autoscaling=autoscaling))
    await wait_for(lambda: emu.get("v1/configmaps", "shadow-config", NS), what="ConfigMap")
    ports = await engines.start(emu, "shadow", 2)
    run_pods(emu, "shadow", ports)
    stop = threading.Event()
    load = asyncio.create_task(
        asyncio.to_thread(_drive_load, [f"http://127.0.0.1:{p}" for p in ports], engines.token, stop)
    )
    try:
        events = await wait_for(
            lambda: [e for e in emu.list("v1/events", NS) if e.get("reason") == "ScaleRecommended"],
            timeout=40,
            what="a recommendation Event",
        )
    finally:
        stop.set()
        await load
    assert "replicas 2 -> 3" in events[0]["message"]
    decisions = await wait_for(
        lambda: (emu.get(KVCACHES, "shadow", NS).get("status") or {}).get("decisions"),
        what="decision in status",
    )
    assert decisions[-1]["mode"] == "DryRun" and decisions[-1]["applied"] is False
    sts = emu.get("apps/v1/statefulsets", "shadow", NS)
    assert sts["spec"]["replicas"] == 2 and sts["metadata"]["generation"] == 1


WRITE_VERBS = ("create", "patch", "update", "delete")


def _scrape_passes(memo: kopf.Memo) -> float:
    value = memo.runtime.metrics.registry.get_sample_value("kvcache_operator_scrape_duration_seconds_count")
    return float(value or 0.0)


async def test_an_idle_cache_costs_no_api_write_and_no_list(cluster: Cluster, operator: kopf.Memo) -> None:
    """Once settled, control passes (1 s scrapes) find nothing changed: no status PATCH, no child
    write, no Event, and no LIST (children and pods come from the watches)."""
    emu = cluster.emu
    emu.create(KVCACHES, make_kvcache("idle"))
    await wait_for(
        lambda: "memoryPressure" in (emu.get(KVCACHES, "idle", NS).get("status") or {}),
        what="a status from a control pass",
    )
    await asyncio.sleep(1.5)  # whatever was in flight lands
    mark, passes = len(emu.calls), _scrape_passes(operator)
    await asyncio.sleep(4.0)
    window = emu.calls[mark:]
    assert _scrape_passes(operator) - passes >= 3  # the control loop ran meanwhile
    assert [c for c in window if c[0] in WRITE_VERBS] == []
    assert [c for c in window if c[0] == "list"] == []


async def test_tuned_values_on_the_configmap_survive_an_operator_restart(cluster: Cluster) -> None:
    emu = cluster.emu
    tuning = {"mode": "Auto", "maxTokensMin": 256, "maxTokensMax": 4096, "intervalSeconds": 30}
    tuned = {"metadata": {"annotations": {TUNED_ANNOTATION: json.dumps({"maxTokens": 1024})}}}

    def rendered() -> bool:
        return "maxTokens: 1024" in emu.get("v1/configmaps", "kept-config", NS)["data"]["config.yaml"]

    def reported() -> bool:
        return (emu.get(KVCACHES, "kept", NS).get("status") or {}).get("effectiveConfig", {}).get(
            "maxTokens"
        ) == 1024

    async with running_operator():
        emu.create(KVCACHES, make_kvcache("kept", tuning=tuning))
        await wait_for(lambda: emu.get("v1/configmaps", "kept-config", NS), what="ConfigMap")
        emu.patch("v1/configmaps", "kept-config", tuned, NS)  # what the tuner stored on an earlier pass
        await wait_for(lambda: rendered() and reported(), what="tuned maxTokens rendered and reported")
    writes = [c for c in emu.calls if c[0] in WRITE_VERBS]
    async with running_operator() as memo:  # a new operator: no memory of the old one
        await wait_for(lambda: _scrape_passes(memo) >= 2, what="two control passes after the restart")
        assert rendered() and reported()
        annotations = emu.get("v1/configmaps", "kept-config", NS)["metadata"]["annotations"]
        assert json.loads(annotations[TUNED_ANNOTATION]) == {"maxTokens": 1024}
        assert [c for c in emu.calls if c[0] in WRITE_VERBS] == writes  # resumed without a write


async def test_run_without_standalone_or_a_peering_object_says_why_it_waits(
    cluster: Cluster, tmp_path: Path
) -> None:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "kvcache_operator.cli", "run", "--namespace", NS]
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, "--liveness", "", "--metrics-port", "0"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        line = await wait_for(
            lambda: next((ln for ln in log_path.read_text().splitlines() if "peering:" in ln), None),
            timeout=30,
            what="the peering warning",
        )
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 20)
    assert " WARNING " in line and "KopfPeering 'kvcache-operator'" in line
    assert "--standalone" in line and "ha.enabled" in line and "paused" in line


async def test_a_failed_drain_stops_the_scale_in_with_an_event_until_overridden(
    cluster: Cluster, operator: kopf.Memo, engines: Engines
) -> None:
    """Issue 16 finding 11: a failed drain was logged and the scale-in went on (with whenScaled:
    Delete the leaving replica's volume and blocks were deleted). Here every engine refuses to
    drain to its peers (``--drain-peer`` names another network): the replicas stay, the decision
    says why, a ScaleInBlocked Warning Event is written; the spec override lets it through."""
    emu = cluster.emu
    autoscaling = {
        "mode": "Auto",
        "minReplicas": 1,
        "maxReplicas": 2,
        "targetMemoryPressure": 0.8,
        "scaleDownStabilizationSeconds": 1,
    }
    emu.create(KVCACHES, make_kvcache("stuck", autoscaling=autoscaling))
    await wait_for(lambda: emu.get("v1/configmaps", "stuck-config", NS), what="ConfigMap")
    ports = await engines.start(emu, "stuck", 2, extra_args=["--drain-peer", "10.255.0.0/16"])
    await asyncio.to_thread(_fill, f"http://127.0.0.1:{ports[1]}", engines.token, 2)
    run_pods(emu, "stuck", ports)
    decision = await wait_for(
        lambda: next(
            (d for d in (emu.get(KVCACHES, "stuck", NS).get("status") or {}).get("decisions") or []
             if d.get("drainFailures")),
            None,
        ),
        timeout=30,
        what="a blocked scale-in decision",
    )  # fmt: skip
    assert decision["applied"] is False and "stopped" in decision["reason"]
    assert "not a drain peer" in decision["drainFailures"][0]
    assert emu.get("apps/v1/statefulsets", "stuck", NS)["spec"]["replicas"] == 2
    assert _used_blocks(ports[1], engines.token) == 4  # the leaving replica kept its blocks
    events = await wait_for(
        lambda: [e for e in emu.list("v1/events", NS) if e.get("reason") == "ScaleInBlocked"],
        what="ScaleInBlocked event",
    )
    assert events[0]["type"] == "Warning" and "scaleInOnDrainFailure" in events[0]["message"]
    emu.patch(KVCACHES, "stuck", {"spec": {"autoscaling": {"scaleInOnDrainFailure": True}}}, NS)
    await wait_for(
        lambda: emu.get("apps/v1/statefulsets", "stuck", NS)["spec"]["replicas"] == 1,
        timeout=30,
        what="the overridden scale-in",
    )


def _kopf_writes(emu: Any, name: str) -> list[str]:
    """Writes to the KVCache itself (not its status): Kopf's finalizer and annotations."""
    return [v for v, p, _, n, s in emu.calls if p == "kvcaches" and n == name and not s and v in WRITE_VERBS]


def _observed_generation(emu: Any, name: str) -> Any:
    return (emu.get(KVCACHES, name, NS).get("status") or {}).get("observedGeneration")


async def test_a_new_kvcache_costs_its_children_and_one_status_write(
    cluster: Cluster, operator: kopf.Memo
) -> None:
    """Kopf keeps the last-handled spec in memory (``controller.MemoryDiffBase``), writes no
    ``kopf-managed`` marker and no finalizer (``controller.without_finalizer``), so creating a
    KVCache writes 8 children and one status; an edit still reaches the update handler with its
    diff (the user's maxTokens replaces the tuned one) and costs no Kopf write; a deleted KVCache
    is gone at once, its spec forgotten and its control loop ended."""
    emu = cluster.emu
    tuning = {"mode": "Auto", "maxTokensMin": 128, "maxTokensMax": 4096, "intervalSeconds": 30}
    emu.create(KVCACHES, make_kvcache("lean", metrics={"scrapeInterval": "1h"}, tuning=tuning))
    await wait_for(lambda: _observed_generation(emu, "lean") == 1, what="the first status")
    await asyncio.sleep(1.0)  # anything Kopf would write after the handler lands
    writes = Counter((v, p, s or "") for v, p, _, _, s in emu.calls if v in WRITE_VERBS and p != "events")
    assert writes == {
        **{("create", plural, ""): 2 for plural in ("configmaps", "secrets", "services")},
        ("create", "statefulsets", ""): 1,
        ("create", "poddisruptionbudgets", ""): 1,
        ("patch", "kvcaches", "status"): 1,  # and nothing of Kopf's: no finalizer, no annotation
    }
    meta = emu.get(KVCACHES, "lean", NS)["metadata"]
    assert not meta.get("finalizers")
    assert not any(key.startswith("kvcache.dev/") for key in meta.get("annotations") or {})

    def rendered(tokens: int) -> bool:
        return f"maxTokens: {tokens}\n" in emu.get("v1/configmaps", "lean-config", NS)["data"]["config.yaml"]

    tuned = {"metadata": {"annotations": {TUNED_ANNOTATION: json.dumps({"maxTokens": 1024})}}}
    emu.patch("v1/configmaps", "lean-config", tuned, NS)  # what the tuner stores
    emu.patch(KVCACHES, "lean", {"metadata": {"labels": {"touch": "1"}}}, NS)  # an update, no spec diff
    await wait_for(lambda: rendered(1024), what="the tuned maxTokens rendered")
    kopf_writes = _kopf_writes(emu, "lean")
    emu.patch(KVCACHES, "lean", {"spec": {"cache": {"maxTokens": 512}}}, NS)
    await wait_for(lambda: _observed_generation(emu, "lean") == 2, what="the edit handled")
    await wait_for(lambda: rendered(512), what="the user's maxTokens replacing the tuned one")
    await asyncio.sleep(0.5)
    assert _kopf_writes(emu, "lean") == kopf_writes  # no annotation PATCH after the update either

    uid = meta["uid"]
    rt = operator.runtime
    assert uid in rt.diffbase.essences and uid in rt.stops and uid in rt.caches
    emu.delete(KVCACHES, "lean", NS)
    assert not emu.list(KVCACHES, NS)  # no finalizer: gone at once, with or without an operator
    await wait_for(lambda: (NS, "lean") not in rt.kicks, what="the control loop ended")
    assert uid not in rt.diffbase.essences and uid not in rt.caches


async def test_the_last_handled_annotation_of_an_older_version_is_read_once_and_removed(
    cluster: Cluster, operator: kopf.Memo
) -> None:
    """A KVCache handled by an older version carries Kopf's last-handled-configuration annotation:
    its diff is honoured (here: maxTokens changed since, an update) and the annotation dropped."""
    emu = cluster.emu
    body = make_kvcache("legacy", metrics={"scrapeInterval": "1h"})
    old_spec = json.loads(json.dumps(body["spec"]))
    old_spec["cache"]["maxTokens"] = 128
    key = "kvcache.dev/last-handled-configuration"
    body["metadata"]["annotations"] = {key: json.dumps({"spec": old_spec})}
    emu.create(KVCACHES, body)
    await wait_for(lambda: _observed_generation(emu, "legacy") == 1, what="the status")
    await wait_for(
        lambda: key not in (emu.get(KVCACHES, "legacy", NS)["metadata"].get("annotations") or {}),
        what="the old annotation removed",
    )
    assert "patch" in _kopf_writes(emu, "legacy")


async def test_the_finalizer_of_an_older_version_is_removed_and_deletion_needs_no_operator(
    cluster: Cluster, operator: kopf.Memo
) -> None:
    """Older versions put Kopf's finalizer on every KVCache (for the control loop's daemon): the
    first pass of this one removes it, so the KVCache no longer waits for an operator to go."""
    emu = cluster.emu
    body = make_kvcache("held", metrics={"scrapeInterval": "1h"})
    body["metadata"]["finalizers"] = ["kvcache.dev/finalizer"]
    emu.create(KVCACHES, body)
    await wait_for(lambda: _observed_generation(emu, "held") == 1, what="the status")
    await wait_for(
        lambda: not emu.get(KVCACHES, "held", NS)["metadata"].get("finalizers"), what="no finalizer"
    )
    emu.delete(KVCACHES, "held", NS)
    assert not emu.list(KVCACHES, NS)
    await wait_for(lambda: (NS, "held") not in operator.runtime.kicks, what="the control loop ended")
