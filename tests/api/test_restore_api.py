"""spec.restore: the restore init container (object store or backup PVC, the pod's own ordinal, the
report in its termination message), refused without persistence, and status.restored read back
from the pods' init container statuses."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from kvcache_operator import api, resources, status
from tests.api import helpers as h

STORE = {"endpoint": "http://minio.storage:9000", "bucket": "kv-backups", "credentials": {"secretName": "s3"}}


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    built = resources.build_children(h.make_kvcache(spec), token="t")
    for manifest in built:
        h.kube_validate(manifest)
    sts = next(c for c in built if c["kind"] == "StatefulSet")
    pod: dict[str, Any] = sts["spec"]["template"]["spec"]
    return pod


def _argv(container: dict[str, Any]) -> list[str]:
    script = container["command"][2]
    line = next(x for x in script.splitlines() if x.startswith("exec "))
    return shlex.split(line.removeprefix("exec ").replace('"$i"', "7"))


def test_restore_from_the_backups_object_store_of_another_cache() -> None:
    spec = {
        "persistence": {"enabled": True},
        "backup": {"enabled": True, "objectStore": {**STORE, "prefix": "prod"}},
        "restore": {"fromBackup": "latest", "sourceName": "old"},
    }
    pod = _pod(spec)
    (init,) = pod["initContainers"]
    assert init["name"] == resources.RESTORE_CONTAINER
    assert init["terminationMessagePath"] == resources.TERMINATION_MESSAGE_PATH
    argv = _argv(init)
    opts = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}
    assert argv[:2] == ["kvcache-engine", "restore"] and "--if-empty" in argv
    assert opts["--to-dir"] == resources.PERSIST_DIR == f"{resources.DATA_DIR}/cache"
    assert opts["--s3-prefix"] == "prod/old" and argv[-2:] == ["--replica", "old-7"]
    assert opts["--report-file"] == resources.TERMINATION_MESSAGE_PATH
    assert 'i="${POD_NAME##*-}"' in init["command"][2]
    env = {e["name"] for e in init["env"]}
    assert {"POD_NAME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env
    assert {"name": "data", "mountPath": resources.DATA_DIR} in init["volumeMounts"]


def test_restore_from_a_backup_pvc_by_name() -> None:
    spec = {
        "persistence": {"enabled": True},
        "restore": {"fromBackup": "kvcache-backup-20260101T000000Z"},
    }
    pod = _pod(spec)
    argv = _argv(pod["initContainers"][0])
    assert argv[argv.index("--from") + 1] == "kvcache-backup-20260101T000000Z"
    assert argv[-2:] == ["--backup-root", f"{resources.RESTORE_BACKUPS_DIR}/kvc-7"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["restore-backups"]["persistentVolumeClaim"] == {
        "claimName": "kvc-backups",
        "readOnly": True,
    }


def test_no_init_container_without_restore() -> None:
    assert "initContainers" not in _pod({"persistence": {"enabled": True}})


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"restore": {}}, "spec.restore requires spec.persistence.enabled"),
        ({"persistence": {"enabled": True}, "restore": {"fromBackup": "yesterday"}}, "is not a backup"),
    ],
)
def test_bad_restore_refused_everywhere(spec: dict[str, Any], words: str) -> None:
    obj = h.make_kvcache(spec)
    with pytest.raises(api.SpecError, match=words):
        api.parse_kvcache(obj)
    assert any(words in e for e in h.server_errors(obj)), h.server_errors(obj)
    assert any(words in e for e in h.admission_errors(obj))


def _engine_pod(name: str, terminated: dict[str, Any] | None, last: bool = False) -> dict[str, Any]:
    state = {"terminated": terminated} if terminated else {"running": {}}
    entry = {"name": "restore", "lastState" if last else "state": state}
    return {"metadata": {"name": name}, "status": {"initContainerStatuses": [entry]}}


def test_status_restored_from_termination_messages() -> None:
    done = {
        "backup": "kvcache-backup-20260101T000000Z",
        "source": "s3://kv-backups/prod/old/old-0/",
        "blocks_verified": 1200,
        "segments": 3,
        "time": "2026-12-07T12:00:00Z",
    }
    pods = [
        _engine_pod("kvc-0", {"exitCode": 0, "message": json.dumps(done)}),
        _engine_pod(
            "kvc-1", {"exitCode": 2, "message": "kvcache-engine restore: error: object x: sha256 ..."}
        ),
        _engine_pod("kvc-2", None),
    ]
    records = status.restore_records(pods, None)
    assert records == [
        {
            "pod": "kvc-0",
            "backup": done["backup"],
            "source": done["source"],
            "time": done["time"],
            "blocksVerified": 1200,
        },
        {"pod": "kvc-1", "message": "restore failed: kvcache-engine restore: error: object x: sha256 ...",
         "time": None},
    ]  # fmt: skip
    api.KVCacheStatus.model_validate({"restored": records})  # the CRD's shape
    # kvc-0 is recreated over its (now full) volume: the init container skips; the record stays
    again = [_engine_pod("kvc-0", {"exitCode": 0, "message": json.dumps({"skipped": "holds a cache"})})]
    assert status.restore_records(again, records)[0] == records[0]
