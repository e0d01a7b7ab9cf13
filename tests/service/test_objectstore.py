"""Backups in an S3-compatible object store: the real S3 REST calls (SigV4, multipart, Content-MD5)
against moto's standalone S3 server on loopback; round trip bit-exact, resumable after kill -9,
tampered objects refused, retention applied remotely."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcache_engine import objectstore
from kvcache_engine.backup import pull_backup
from kvcache_engine.cli import main
from kvcache_engine.objectstore import ObjectStore, ObjectStoreError, S3Client, sign_v4
from kvcache_engine.persistence import MANIFEST
from kvcache_engine.server import admin as admin_routes
from tests.service.conftest import TOKEN, make_kv, make_tokens
from tests.service.s3_server import ACCESS_KEY, SECRET_KEY, s3_endpoint, s3_tls_endpoint
from tests.service.test_backup_drain import _fill

__all__ = ["s3_endpoint", "s3_tls_endpoint"]

PART = 2048  # bytes: segments of a few KiB go up in several parts


@pytest.fixture
def store(s3_endpoint: str, request: pytest.FixtureRequest) -> ObjectStore:
    bucket = "kvc-" + request.node.name.replace("_", "-")[:40].lower().strip("-")
    st = ObjectStore(
        s3_endpoint, bucket, prefix="team/a", access_key=ACCESS_KEY, secret_key=SECRET_KEY, part_size=PART
    )
    with S3Client(st) as c:
        c.create_bucket()
    return st


@pytest.fixture
def small_segments(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshots cut into segments of ~4 KiB so a backup has several objects, each multipart."""
    monkeypatch.setattr(admin_routes, "SNAPSHOT_SEGMENT_BYTES", 4096)


def _s3_args(st: ObjectStore, replica: str = "cache-0") -> list[str]:
    return [
        "--s3-endpoint", st.endpoint, "--s3-bucket", st.bucket, "--s3-prefix", st.prefix,
        "--s3-part-size-mb", str(PART / (1024 * 1024)), "--replica", replica,
    ]  # fmt: skip


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


def test_signature_matches_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our SigV4 is byte-identical to botocore's (the signer AWS's own SDK uses) for an S3 request
    with a key that needs escaping, a query and a session token."""
    import botocore.auth
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    now = dt.datetime(2026, 12, 7, 12, 0, 0, tzinfo=dt.UTC)
    body = b"segment bytes"
    payload = hashlib.sha256(body).hexdigest()
    url = "https://s3.eu-west-1.amazonaws.com/my-bucket/team/a/cache-0/seg%200.safetensors"
    query = {"partNumber": "2", "uploadId": "a/b+c=="}
    ours = sign_v4(
        "PUT", "s3.eu-west-1.amazonaws.com", "/my-bucket/team/a/cache-0/seg%200.safetensors",
        query=query, headers={"x-amz-meta-sha256": "abc"}, payload_sha256=payload,
        access_key="AKID", secret_key="SECRET", region="eu-west-1", now=now, session_token="TOKEN",
    )  # fmt: skip
    req = AWSRequest(
        method="PUT",
        url=url + "?partNumber=2&uploadId=a%2Fb%2Bc%3D%3D",
        data=body,
        headers={"x-amz-meta-sha256": "abc", "X-Amz-Content-SHA256": payload},
    )
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: now.replace(tzinfo=None))
    auth = S3SigV4Auth(Credentials("AKID", "SECRET", "TOKEN"), "s3", "eu-west-1")
    auth.add_auth(req)
    assert ours["authorization"] == req.headers["Authorization"]
    # and a changed secret changes it (the test can fail)
    other = sign_v4(
        "PUT", "s3.eu-west-1.amazonaws.com", "/my-bucket/team/a/cache-0/seg%200.safetensors",
        query=query, headers={"x-amz-meta-sha256": "abc"}, payload_sha256=payload,
        access_key="AKID", secret_key="SECRET2", region="eu-west-1", now=now, session_token="TOKEN",
    )  # fmt: skip
    assert other["authorization"] != ours["authorization"]


def test_round_trip_bit_exact_multipart_manifest_last(
    live_server, store: ObjectStore, small_segments: None, creds: None, tmp_path: Path, capsys
) -> None:
    src = live_server()
    chains = _fill(src.url, src.engine.config, range(6))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    staging = tmp_path / "staging"
    args = [
        "backup",
        "--url",
        src.url,
        "--token-file",
        str(token_file),
        "--dest",
        str(staging),
        "--keep",
        "3",
    ]
    assert main(args + _s3_args(store)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["uploaded"] >= 3 and result["parts"] > result["uploaded"], result  # multipart used
    assert not [p for p in staging.iterdir() if p.name.startswith("kvcache-backup-")]  # staging emptied
    with S3Client(store) as c:
        (name,) = objectstore.list_backups(c, "cache-0")
        keys = list(c.list_keys(store.key("cache-0", name) + "/"))
        assert len(keys) == result["uploaded"] + 1 and any(k.endswith("/" + MANIFEST) for k in keys)
        manifest = json.loads(c.get_object(store.key("cache-0", name, MANIFEST)))
        assert set(manifest["objects"]) == {s["file"] for s in manifest["segments"]}
    fresh = live_server()
    restore = ["restore", "--from", "latest", "--url", fresh.url, "--token-file", str(token_file)]
    assert main(restore + _s3_args(store)) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["backup"] == name and done["blocks_verified"] == 24 and done["imported_blocks"] == 24
    for s, tokens in chains.items():
        assert torch.equal(fresh.engine.get(tokens), src.engine.get(tokens)), s


def test_tampered_object_is_refused_by_name(
    live_server, store: ObjectStore, small_segments: None, creds: None, tmp_path: Path, capsys
) -> None:
    src = live_server()
    _fill(src.url, src.engine.config, range(3))
    local = pull_backup(src.url, TOKEN, tmp_path / "b", keep=1)
    with S3Client(store) as c:
        objectstore.upload_backup(c, local, "cache-0")
        seg = sorted(p.name for p in local.glob("seg-*"))[1]
        key = store.key("cache-0", local.name, seg)
        data = bytearray(c.get_object(key))
        data[-1] ^= 0x01
        c.put_object(key, bytes(data))
        with pytest.raises(ObjectStoreError, match=f"{seg}: sha256 .* does not match .* tampered"):
            objectstore.download_backup(c, "cache-0", local.name, tmp_path / "dl")
        # a missing backup name is refused in words, naming what exists
        with pytest.raises(ObjectStoreError, match=r"not found .* found \['kvcache-backup-"):
            objectstore.download_backup(c, "cache-0", "kvcache-backup-19990101T000000Z", tmp_path / "dl")
    fresh = live_server()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    restore = ["restore", "--from", local.name, "--url", fresh.url, "--token-file", str(token_file)]
    assert main(restore + _s3_args(store)) == 2
    assert "tampered" in capsys.readouterr().err
    assert fresh.engine.get(make_tokens(16, seed=0)).shape[2] == 0  # nothing reached the engine


_DYING_UPLOAD = """
import os, signal, sys
from kvcache_engine import objectstore
real = objectstore.S3Client.upload_part
sent = [0]
def upload_part(self, *args, **kwargs):
    sent[0] += 1
    if sent[0] == int(os.environ["DIE_AT_PART"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
objectstore.S3Client.upload_part = upload_part
from kvcache_engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resumes_after_kill9_mid_upload(
    live_server, store: ObjectStore, small_segments: None, creds: None, tmp_path: Path, capsys
) -> None:
    src = live_server()
    chains = _fill(src.url, src.engine.config, range(6))
    local = pull_backup(src.url, TOKEN, tmp_path / "b", keep=1)
    n_segments = len(list(local.glob("seg-*")))
    assert n_segments >= 3
    env = dict(os.environ, DIE_AT_PART="6", AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    proc = subprocess.run(
        [sys.executable, "-c", _DYING_UPLOAD, "upload", "--from", str(local), *_s3_args(store)],
        env=env,
        check=False,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    with S3Client(store) as c:
        assert objectstore.list_backups(c, "cache-0") == []  # no manifest: not a backup
        with pytest.raises(ObjectStoreError, match="no complete backup"):
            objectstore.resolve(c, "cache-0", "latest")
        stored = [k for k in c.list_keys(store.key("cache-0") + "/") if "/seg-" in k]
        assert 1 <= len(stored) < n_segments
        assert c.list_multipart(store.key("cache-0") + "/")  # the killed multipart upload is pending
    assert main(["upload", "--from", str(local), *_s3_args(store)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipped"] == len(stored) and result["uploaded"] == n_segments - len(stored), result
    with S3Client(store) as c:
        assert c.list_multipart(store.key("cache-0") + "/") == []  # aborted, not left to bill
        assert objectstore.list_backups(c, "cache-0") == [local.name]
        path, report = objectstore.download_backup(c, "cache-0", "latest", tmp_path / "dl")
    assert report["blocks"] == 24
    for seg in local.glob("seg-*"):
        assert (path / seg.name).read_bytes() == seg.read_bytes()
    fresh = live_server()
    fresh.engine.restore_from_backup(path)
    for s, tokens in chains.items():
        assert torch.equal(fresh.engine.get(tokens), src.engine.get(tokens)), s


def test_retention_applied_remotely(live_server, store: ObjectStore, tmp_path: Path) -> None:
    src = live_server()
    cfg = src.engine.config
    src.engine.put(make_tokens(8), make_kv(cfg, 8))
    local = pull_backup(src.url, TOKEN, tmp_path / "b", keep=1)
    with S3Client(store) as c:
        names = [f"kvcache-backup-2026010{i}T000000Z" for i in range(1, 5)]
        for name in names:
            objectstore.upload_backup(c, local.rename(local.with_name(name)), "cache-0")
            local = local.with_name(name)
        # a killed run older than the newest complete one (objects, no manifest) and one pending multipart
        c.put_object(store.key("cache-0", "kvcache-backup-20260103T120000Z", "seg-x.safetensors"), b"x")
        upload = c.create_multipart(store.key("cache-0", "kvcache-backup-20260103T120000Z", "seg-y"))
        # another replica's backups are not touched
        objectstore.upload_backup(c, local, "cache-1")
        removed = objectstore.prune(c, "cache-0", keep=2)
        assert removed == [names[0], names[1], "kvcache-backup-20260103T120000Z"]
        assert objectstore.list_backups(c, "cache-0") == names[2:]
        left = {k.split("/")[3] for k in c.list_keys(store.key("cache-0") + "/")}
        assert left == set(names[2:])
        assert (
            store.key("cache-0", "kvcache-backup-20260103T120000Z", "seg-y"),
            upload,
        ) not in c.list_multipart(store.key("cache-0") + "/")
        assert objectstore.list_backups(c, "cache-1") == [names[-1]]
        with pytest.raises(ObjectStoreError, match="keep must be >= 1"):
            objectstore.prune(c, "cache-0", keep=0)


def test_errors_name_the_request(store: ObjectStore, tmp_path: Path) -> None:
    bad = ObjectStore(store.endpoint, "no-such-bucket-here", access_key="a", secret_key="b")
    with (
        S3Client(bad) as c,
        pytest.raises(ObjectStoreError, match=r"GET .*no-such-bucket-here.*404 NoSuchBucket"),
    ):
        objectstore.list_backups(c, "cache-0")
    with pytest.raises(ObjectStoreError, match="expected http"):
        S3Client(ObjectStore("s3.amazonaws.com", "b"))
    with pytest.raises(ObjectStoreError, match="AWS_ACCESS_KEY_ID"):
        ObjectStore.from_env("http://x", "bkt", env={})


def test_operator_backup_script_runs_against_the_store(
    live_server, store: ObjectStore, small_segments: None, tmp_path: Path, capsys
) -> None:
    """The CronJob's script as resources.py builds it (pod URL, token file and staging dir pointed at
    this machine), run by sh with the Secret's keys in its environment, lands a complete backup where
    ``object_store_args`` (what a restore uses) finds it."""
    from kvcache_operator import api, resources

    src = live_server()
    chains = _fill(src.url, src.engine.config, range(4))
    spec = {
        "persistence": {"enabled": True},
        "backup": {
            "enabled": True,
            "objectStore": {
                "endpoint": store.endpoint,
                "bucket": store.bucket,
                "prefix": "ops",
                "credentials": {"secretName": "s3-keys"},
                "partSizeMb": 5,
            },
        },
    }
    kvc = api.parse_kvcache({"metadata": {"name": "kvc", "namespace": "ns"}, "spec": spec})
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    (tmp_path / "staging").mkdir()
    script = (
        resources.backup_script(kvc, 1)
        .replace(shlex.quote(resources.pod_url(kvc, 0)), src.url)
        .replace(resources.TOKEN_FILE, str(token_file))
        .replace(resources.STAGING_DIR, str(tmp_path / "staging"))
    )
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
    )
    done = subprocess.run(["sh", "-c", script], env=env, check=False, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert kvc.spec.backup.object_store is not None
    args = resources.object_store_args(kvc, kvc.spec.backup.object_store, 0)
    with S3Client(ObjectStore(store.endpoint, store.bucket, access_key="a", secret_key="b")) as c:
        assert {tuple(k.split("/")[:3]) for k in c.list_keys("ops/")} == {("ops", "kvc", "kvc-0")}
    fresh = live_server()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        restore = ["restore", "--from", "latest", "--url", fresh.url, "--token-file", str(token_file)]
        assert main(restore + args) == 0
    assert json.loads(capsys.readouterr().out)["blocks_verified"] == 16
    for s, tokens in chains.items():
        assert torch.equal(fresh.engine.get(tokens), src.engine.get(tokens)), s


def test_restore_into_a_data_directory_before_the_engine_starts(
    live_server, store: ObjectStore, small_segments: None, creds: None, tmp_path: Path, capsys
) -> None:
    """``restore --to-dir`` (what a KVCache's restore init container runs) from the store and from a
    PVC backup root: the engine started on that directory holds the blocks before serving; with
    --if-empty a directory that already holds a cache is left alone; the report file gets the record."""
    from kvcache_engine.engine import KVCacheEngine

    src = live_server()
    chains = _fill(src.url, src.engine.config, range(5))
    root = tmp_path / "pvc" / "cache-0"
    local = pull_backup(src.url, TOKEN, root, keep=3)
    with S3Client(store) as c:
        objectstore.upload_backup(c, local, "cache-0")
    for how, extra in (("s3", _s3_args(store)), ("pvc", ["--backup-root", str(root)])):
        data = tmp_path / how / "cache"
        report = tmp_path / how / "termination-log"
        argv = [
            "restore",
            "--from",
            "latest",
            "--to-dir",
            str(data),
            "--if-empty",
            "--report-file",
            str(report),
        ]
        assert main(argv + extra) == 0
        record = json.loads(report.read_text())
        assert record["backup"] == local.name and record["blocks_verified"] == 20, record
        assert json.loads(capsys.readouterr().out) == record
        engine = KVCacheEngine(src.engine.config.model_copy(update={"persistence_path": str(data)}))
        for s, tokens in chains.items():
            assert torch.equal(engine.get(tokens), src.engine.get(tokens)), (how, s)
        assert main(argv + extra) == 0  # the pod restarts: its own cache stays
        assert "already holds a cache" in json.loads(capsys.readouterr().out)["skipped"]
    assert (
        main(
            [
                "restore",
                "--from",
                "kvcache-backup-x",
                "--to-dir",
                str(tmp_path / "x"),
                "--backup-root",
                str(root),
            ]
        )
        == 2
    )
    assert "not found under" in capsys.readouterr().err


def test_kubectl_restore_job_script_streams_into_running_engines(
    live_server, store: ObjectStore, small_segments: None, tmp_path: Path
) -> None:
    """The script of ``kubectl kvcache restore``'s Job, as resources.py builds it, run by sh: every
    replica's backup from the store reaches the running engine, bit-exact."""
    from kvcache_operator import api, resources

    src = live_server()
    chains = _fill(src.url, src.engine.config, range(3))
    local = pull_backup(src.url, TOKEN, tmp_path / "b", keep=1)
    # the layout backups of a KVCache named "old" have: <prefix>/old/old-<i>/
    with S3Client(dataclasses.replace(store, prefix=f"{store.prefix}/old")) as c:
        objectstore.upload_backup(c, local, "old-0")
    st = {
        "endpoint": store.endpoint,
        "bucket": store.bucket,
        "prefix": store.prefix,
        "credentials": {"secretName": "k"},
    }
    spec = {"persistence": {"enabled": True}, "backup": {"enabled": True, "objectStore": st}}
    kvc = api.parse_kvcache({"metadata": {"name": "kvc", "namespace": "ns"}, "spec": spec})
    fresh = live_server()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    (tmp_path / "staging").mkdir()
    script = (
        resources.restore_job_script(kvc, 1, "latest", "old")
        .replace(shlex.quote(resources.pod_url(kvc, 0)), fresh.url)
        .replace(resources.TOKEN_FILE, str(token_file))
        .replace(resources.STAGING_DIR, str(tmp_path / "staging"))
    )
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
    )
    done = subprocess.run(["sh", "-c", script], env=env, check=False, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert result["backup"] == local.name and result["blocks_verified"] == 12
    for s, tokens in chains.items():
        assert torch.equal(fresh.engine.get(tokens), src.engine.get(tokens)), s


def test_tls_private_ca_verified_and_skip_verify(s3_tls_endpoint: tuple[str, Path]) -> None:
    """https endpoints: a certificate from a private CA is refused without the CA (the error says so),
    accepted with ``ca_file`` (spec.backup.objectStore.tls.caSecretName), and with
    ``insecure_skip_verify``."""
    url, ca = s3_tls_endpoint
    base = ObjectStore(url, "kvc-tls", access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    with S3Client(base) as c, pytest.raises(ObjectStoreError, match="CERTIFICATE_VERIFY_FAILED"):
        c.create_bucket()
    with S3Client(dataclasses.replace(base, ca_file=str(ca))) as c:
        c.create_bucket()
        c.put_object("a/b", b"over tls")
        assert c.get_object("a/b") == b"over tls"
    with S3Client(dataclasses.replace(base, insecure_skip_verify=True)) as c:
        assert list(c.list_keys("a/")) == ["a/b"]
