"""kubectl-kvcache: pure formatting/manifest helpers, then every command against the API emulator."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from kvcache_operator import kubectl_plugin as plugin
from kvcache_operator.reconcile import PAUSE_ANNOTATION, PAUSE_VALUE
from tests.kube_emulator import KubeEmulator, write_kubeconfig

from .conftest import ROOT

KVCACHES = "kvcache.dev/v1alpha1/kvcaches"
CRONJOBS = "batch/v1/cronjobs"
JOBS = "batch/v1/jobs"
NS = "inference"


def make_status(**overrides: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": "Ready",
        "observedGeneration": 2,
        "replicas": 3,
        "readyReplicas": 3,
        "hitRate": 0.8125,
        "memoryPressure": 0.5,
        "codec": "int8",
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "AllReplicasReady", "message": "3/3 ready"}
        ],
        "decisions": [
            {
                "time": f"2026-01-01T00:0{i}:00Z",
                "kind": "Scale",
                "mode": "Auto",
                "applied": True,
                "action": f"replicas {i} -> {i + 1}",
                "reason": "memory pressure 0.95 > 0.85",
            }
            for i in range(7)
        ],
    }
    status.update(overrides)
    return status


def make_kvcache(name: str = "llama", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kvcache.dev/v1alpha1",
        "kind": "KVCache",
        "metadata": {"name": name, "namespace": NS, "generation": 2},
        "spec": {"replicas": 3, "cache": {"maxTokens": 8192}},
        "status": make_status(**status),
    }


def test_status_table_shows_the_numbers_and_newest_decisions() -> None:
    text = plugin.format_status(make_kvcache())
    header, row = text.splitlines()[:2]
    assert header.split()[:4] == ["NAME", "PHASE", "REPLICAS", "READY"]
    assert row.split() == ["llama", "Ready", "3/3", "3", "81.2%", "50.0%", "int8", "2/2", "no"]
    assert "AllReplicasReady" in text
    decisions = text.split("Last decisions (newest first):\n", 1)[1].splitlines()
    assert len(decisions) == 1 + plugin.DECISIONS_SHOWN
    assert "replicas 6 -> 7" in decisions[1] and "replicas 2 -> 3" in decisions[-1]


def test_status_shows_the_curves_prediction_and_why_lookups_missed() -> None:
    obj = make_kvcache(
        predictedHitRate=0.3514,
        predictedCeiling=0.3664,
        recommendedCapacity=45000,
        missesByReason={"capacity": 600.0, "never_seen": 1800.0, "retune": 0.0, "client_timeout": 100.0},
    )
    text = plugin.format_status(obj)
    lines = text.splitlines()
    i = lines.index(next(line for line in lines if line.startswith("PREDICTED HIT RATE")))
    assert lines[i + 1].split() == ["35.1%", "36.6%", "45,000", "blocks"]
    j = lines.index(next(line for line in lines if line.startswith("MISS REASON")))
    assert [line.split() for line in lines[j + 1 : j + 4]] == [
        ["never_seen", "1,800", "72.0%"],
        ["capacity", "600", "24.0%"],
        ["client_timeout", "100", "4.0%"],
    ]
    assert "retune" not in text  # reasons that never happened are left out
    warming = plugin.format_status(make_kvcache(predictedHitRate=0.1, predictedCeiling=0.2))
    assert "- (curve warming up)" in warming


def test_status_of_a_new_cache_has_dashes() -> None:
    obj = {"metadata": {"name": "new", "generation": 1}, "spec": {"replicas": 1}}
    text = plugin.format_status(obj)
    assert text.splitlines()[1].split() == ["new", "-", "-/1", "-", "-", "-", "-", "-/1", "no"]
    assert "No scaling or tuning decisions yet." in text


def test_pause_patch_sets_and_removes_the_operator_annotation() -> None:
    assert plugin.pause_patch(True) == {"metadata": {"annotations": {PAUSE_ANNOTATION: PAUSE_VALUE}}}
    assert plugin.pause_patch(False) == {"metadata": {"annotations": {PAUSE_ANNOTATION: None}}}


def make_cronjob(name: str = "llama-backup") -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": name, "namespace": NS, "uid": "u-1"},
        "spec": {
            "schedule": "0 */6 * * *",
            "jobTemplate": {
                "metadata": {"labels": {"app.kubernetes.io/instance": "llama"}},
                "spec": {
                    "backoffLimit": 2,
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [{"name": "backup", "image": "engine:1"}],
                        }
                    },
                },
            },
        },
    }


def test_manual_job_is_owned_by_the_cronjob_and_fits_a_name() -> None:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    job = plugin.manual_job(make_cronjob("x" * 70), now)
    assert len(job["metadata"]["name"]) == plugin.JOB_NAME_MAX
    assert job["metadata"]["name"].endswith(f"-manual-{int(now.timestamp())}")
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert job["metadata"]["annotations"]["cronjob.kubernetes.io/instantiate"] == "manual"
    assert job["spec"]["template"]["spec"]["containers"][0]["name"] == "backup"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[KubeEmulator, Path]]:
    async with KubeEmulator() as emu, kmock.Server(emu) as server:
        yield emu, write_kubeconfig(tmp_path, server.url, namespace=NS)


async def kubectl_kvcache(kubeconfig: Path, *argv: str) -> tuple[int, str]:
    """Run the plugin's main() in a thread (the kubernetes client blocks) and capture its stdout."""
    args = plugin.build_parser().parse_args(["--kubeconfig", str(kubeconfig), *argv])

    def call() -> tuple[int, str]:
        try:
            return 0, plugin.run(args)
        except ValueError as exc:
            return 1, str(exc)

    return await asyncio.to_thread(call)


def seed(emu: KubeEmulator, obj: dict[str, Any]) -> None:
    status = obj.pop("status", None)
    emu.create(KVCACHES, obj, namespace=NS)
    if status is not None:
        emu.patch(KVCACHES, obj["metadata"]["name"], {"status": status}, NS, subresource="status")


async def test_status_reads_the_live_object(cluster: tuple[KubeEmulator, Path]) -> None:
    emu, kubeconfig = cluster
    seed(emu, make_kvcache())
    code, out = await kubectl_kvcache(kubeconfig, "status", "llama")
    assert code == 0
    assert out.splitlines()[1].split()[:6] == ["llama", "Ready", "3/3", "3", "81.2%", "50.0%"]
    code, out = await kubectl_kvcache(kubeconfig, "status", "missing")
    assert code == 1 and "KVCache inference/missing not found" in out


async def test_pause_and_resume_toggle_the_annotation(cluster: tuple[KubeEmulator, Path]) -> None:
    emu, kubeconfig = cluster
    seed(emu, make_kvcache())
    assert (await kubectl_kvcache(kubeconfig, "pause", "llama"))[0] == 0
    annotations = emu.get(KVCACHES, "llama", NS)["metadata"]["annotations"]
    assert annotations == {PAUSE_ANNOTATION: PAUSE_VALUE}
    assert "yes" in (await kubectl_kvcache(kubeconfig, "status", "llama"))[1].splitlines()[1].split()
    assert (await kubectl_kvcache(kubeconfig, "resume", "llama"))[0] == 0
    assert PAUSE_ANNOTATION not in (emu.get(KVCACHES, "llama", NS)["metadata"].get("annotations") or {})


async def test_backup_now_creates_a_job_from_the_cronjob(cluster: tuple[KubeEmulator, Path]) -> None:
    emu, kubeconfig = cluster
    seed(emu, make_kvcache())
    code, out = await kubectl_kvcache(kubeconfig, "backup-now", "llama")
    assert code == 1 and "spec.backup.enabled" in out
    cronjob = emu.create(CRONJOBS, make_cronjob(), namespace=NS)
    code, out = await kubectl_kvcache(kubeconfig, "backup-now", "llama")
    assert code == 0, out
    (job,) = emu.list(JOBS, NS)
    assert out == f"job.batch/{job['metadata']['name']} created\n"
    assert job["metadata"]["ownerReferences"][0]["uid"] == cronjob["metadata"]["uid"]


async def test_render_live_object_matches_render_of_its_manifest(
    cluster: tuple[KubeEmulator, Path], tmp_path: Path
) -> None:
    emu, kubeconfig = cluster
    manifest = make_kvcache()
    manifest.pop("status")
    seed(emu, dict(manifest))
    code, live = await kubectl_kvcache(kubeconfig, "render", "llama")
    assert code == 0, live
    path = tmp_path / "llama.yaml"
    path.write_text(yaml.safe_dump(manifest))
    code, from_file = await kubectl_kvcache(kubeconfig, "render", "-f", str(path))
    assert code == 0, from_file
    live_children = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(live) if d]
    file_children = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(from_file) if d]
    assert ("StatefulSet", "llama") in live_children
    assert live_children == file_children


# --- errors: one line, with the fix ------------------------------------------------------------------


def run_main(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``kubectl kvcache ...`` as a process: exit status and stderr (no traceback may show)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "kvcache_operator.kubectl_plugin", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )
    return proc.returncode, proc.stderr


def test_without_a_kubeconfig_the_error_names_the_file_and_the_fix(tmp_path: Path) -> None:
    code, err = run_main("status", "llama", env={"KUBECONFIG": str(tmp_path / "nope")})
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"no kubeconfig at {tmp_path / 'nope'} ($KUBECONFIG)" in err
    assert "kvcache-operator dev up" in err


def test_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path, "http://127.0.0.1:1")
    code, err = run_main("--kubeconfig", str(kubeconfig), "status", "llama")
    assert code == 1 and err.count("\n") == 1, err
    assert "cannot reach the API server at http://127.0.0.1:1" in err and "Connection refused" in err


async def test_missing_crd_and_missing_permission_say_what_to_do(cluster: tuple[KubeEmulator, Path]) -> None:
    emu, kubeconfig = cluster
    seed(emu, make_kvcache())
    emu.inject_fault("get", "kvcaches", status=404)  # the resource itself is not served
    code, out = await kubectl_kvcache(kubeconfig, "status", "llama")
    assert code == 1 and "does not serve kvcaches.kvcache.dev" in out
    assert "kubectl apply -f crds/kvcache.dev_kvcaches.yaml" in out
    emu.inject_fault("get", "kvcaches", status=403)
    code, out = await kubectl_kvcache(kubeconfig, "status", "llama")
    assert code == 1 and f"permission denied: you may not get kvcaches in namespace {NS}" in out
    assert f"kubectl auth can-i get kvcaches -n {NS}" in out
    emu.inject_fault("patch", "kvcaches", status=403)
    code, out = await kubectl_kvcache(kubeconfig, "pause", "llama")
    assert code == 1 and "you may not patch kvcaches" in out
    code, out = await kubectl_kvcache(kubeconfig, "status", "llama")
    assert code == 0, out


def test_validate_checks_files_offline_like_the_operator(tmp_path: Path) -> None:
    """No cluster needed: the same checks and words as ``kvcache-operator validate``."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: kvcache.dev/v1alpha1\nkind: KVCache\nmetadata: {name: llama}\n"
        "spec: {metrics: {scrapeInterval: 0s}}\n"
    )
    args = plugin.build_parser().parse_args(["validate", "-f", str(bad)])
    with pytest.raises(ValueError) as info:
        plugin.run(args)
    assert str(info.value).splitlines() == [
        f'{bad}: KVCache llama: spec.metrics.scrapeInterval: "0s" is out of range: the scrape interval '
        "must be between 1s and 1h",
        "1 KVCache(s) checked: 1 invalid (1 problem(s)), 0 warning(s)",
    ]
    good = plugin.build_parser().parse_args(
        ["validate", "-f", str(ROOT / "crds" / "samples" / "minimal.yaml")]
    )
    assert plugin.run(good).endswith("1 KVCache(s) checked: 0 invalid (0 problem(s)), 0 warning(s)\n")
