"""kubectl kvcache restore: a Job built from the cache's backup settings that streams a backup into
the running engines, against the API emulator."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from tests.delivery.test_kubectl_plugin import JOBS, KVCACHES, NS, cluster, kubectl_kvcache
from tests.kube_emulator import KubeEmulator

__all__ = ["cluster"]


def _kvcache(backup: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kvcache.dev/v1alpha1",
        "kind": "KVCache",
        "metadata": {"name": "llama", "namespace": NS},
        "spec": {"replicas": 3, "persistence": {"enabled": True}, "backup": backup},
    }


async def test_restore_creates_a_job_per_replica_from_the_store(cluster: tuple[KubeEmulator, Path]) -> None:
    emu, kubeconfig = cluster
    store = {"endpoint": "https://s3.amazonaws.com", "bucket": "kv-b", "credentials": {"secretName": "k"}}
    emu.create(KVCACHES, _kvcache({"enabled": True, "objectStore": store}), namespace=NS)
    code, out = await kubectl_kvcache(
        kubeconfig, "restore", "llama", "--from", "kvcache-backup-20260101T000000Z", "--source", "old"
    )
    assert code == 0, out
    (job,) = emu.list(JOBS, NS)
    name = job["metadata"]["name"]
    assert name.startswith("llama-restore-") and f"job.batch/{name} created" in out
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "restore"
    container = job["spec"]["template"]["spec"]["containers"][0]
    lines = [shlex.split(x.removesuffix(" || rc=1")) for x in container["command"][2].splitlines()]
    restores = [argv for argv in lines if argv[:2] == ["kvcache-engine", "restore"]]
    assert len(restores) == 3  # one per replica
    for i, argv in enumerate(restores):
        assert argv[argv.index("--replica") + 1] == f"old-{i}"
        assert argv[argv.index("--from") + 1] == "kvcache-backup-20260101T000000Z"
        assert argv[argv.index("--url") + 1].startswith(f"http://llama-{i}.")
    assert {e["name"] for e in container["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


async def test_restore_without_backups_says_what_to_set(cluster: tuple[KubeEmulator, Path]) -> None:
    emu, kubeconfig = cluster
    emu.create(KVCACHES, _kvcache({}), namespace=NS)
    code, out = await kubectl_kvcache(kubeconfig, "restore", "llama")
    assert code == 1 and "enable backups" in out
    assert emu.list(JOBS, NS) == []
