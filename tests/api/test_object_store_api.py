"""spec.backup.objectStore: the models, the CRD (schema + CEL) and the webhook refuse a bad store in
words; the backup CronJob stages one replica at a time, reads the keys from the Secret, mounts the CA,
and makes no backup PVC; every child is a valid Kubernetes object."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from kvcache_operator import api, resources
from tests.api import helpers as h

STORE = {
    "endpoint": "https://minio.storage:9000",
    "bucket": "kv-backups",
    "prefix": "prod/",
    "credentials": {"secretName": "s3-keys", "sessionTokenKey": "token"},
    "tls": {"caSecretName": "s3-ca"},
    "partSizeMb": 16,
}


def _spec(store: dict[str, Any]) -> dict[str, Any]:
    return {
        "persistence": {"enabled": True, "size": "20Gi"},
        "backup": {"enabled": True, "objectStore": store},
    }


def test_cronjob_targets_the_store_and_no_pvc_is_made() -> None:
    built = resources.build_children(h.make_kvcache(_spec(STORE)), token="t")
    by_kind = {(c["kind"], c["metadata"]["name"]): c for c in built}
    assert ("PersistentVolumeClaim", "kvc-backups") not in by_kind
    for manifest in built:
        h.kube_validate(manifest)
    pod = by_kind[("CronJob", "kvc-backup")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env == {
        "AWS_ACCESS_KEY_ID": {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "s3-keys", "key": "AWS_SECRET_ACCESS_KEY"},
        "AWS_SESSION_TOKEN": {"name": "s3-keys", "key": "token"},
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["staging"]["emptyDir"] == {"sizeLimit": "20Gi"}
    assert volumes["s3-ca"]["secret"] == {"secretName": "s3-ca"}
    assert "backups" not in volumes
    lines = [shlex.split(line.removesuffix(" || rc=1")) for line in container["command"][2].splitlines()]
    backups = [argv for argv in lines if argv[:2] == ["kvcache-engine", "backup"]]
    assert len(backups) == 1  # one replica
    argv = backups[0]
    opts = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert opts["--dest"] == resources.STAGING_DIR
    assert opts["--s3-endpoint"] == "https://minio.storage:9000" and opts["--s3-bucket"] == "kv-backups"
    assert opts["--s3-prefix"] == "prod/kvc" and opts["--replica"] == "kvc-0"
    assert opts["--s3-part-size-mb"] == "16" and opts["--s3-ca-file"] == f"{resources.S3_CA_DIR}/ca.crt"
    assert "--s3-insecure-skip-verify" not in argv


def test_pvc_target_unchanged_without_a_store() -> None:
    spec = {"persistence": {"enabled": True}, "backup": {"enabled": True}}
    built = {(c["kind"], c["metadata"]["name"]): c for c in resources.build_children(h.make_kvcache(spec))}
    assert ("PersistentVolumeClaim", "kvc-backups") in built
    pod = built[("CronJob", "kvc-backup")]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert "env" not in pod["containers"][0] and "--s3-bucket" not in pod["containers"][0]["command"][2]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"endpoint": "minio:9000"}, "endpoint", "is not an object store endpoint"),
        ({"bucket": "Backups"}, "bucket", "is not a bucket name"),
        ({"prefix": "a b"}, "prefix", "is not a key prefix"),
        ({"partSizeMb": 1}, "partSizeMb", "5"),
        ({"credentials": {}}, "credentials", "secretName"),
    ],
)
def test_bad_store_refused_in_words_everywhere(change: dict[str, Any], field: str, words: str) -> None:
    obj = h.make_kvcache(_spec({**STORE, **change}))
    with pytest.raises(api.SpecError, match=field):
        api.parse_kvcache(obj)
    server = h.server_errors(obj)
    assert server and any(field in e and words in e for e in server), server
    webhook = h.admission_errors(obj)
    assert webhook and any(words in e for e in webhook), webhook


def test_good_store_accepted_everywhere() -> None:
    obj = h.make_kvcache(_spec(STORE))
    assert h.server_errors(obj) == [] and h.admission_errors(obj) == []
