"""Backups in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...), standard library only.

Why a small client and not boto3: the engine image runs the backup Job, and botocore would add
~100 MB and a dependency tree to every engine pod for eight REST calls. This module speaks the S3
REST API itself (path-style URLs, AWS Signature Version 4, ``Content-MD5`` on every upload) over
``http.client`` with an ``ssl`` context built from the TLS options, so the code path is the one a
real AWS S3 or MinIO endpoint sees; the tests run it against a real S3-protocol server (moto's
standalone server on loopback) and check its signatures against botocore's signer.

Layout under ``<prefix>/<replica>/<backup>/``: the persisted-cache segment files as they are named
in the backup directory (segments above ``part_size`` go up as multipart uploads) and, written
last, ``manifest.json``: the persisted-cache manifest plus ``objects`` (``file -> {size, sha256}``).
A backup without a manifest does not exist (``list_backups`` never shows it, ``latest`` never
picks it); a rerun after a kill skips every object already stored with the same size and sha256
(``x-amz-meta-sha256``) and aborts the killed run's unfinished multipart uploads. Restore
downloads, checks every object's sha256 against the manifest (a tampered object is refused by
name) and then every block checksum (``validate_path``) before anything reaches an engine.
Retention (``prune``) deletes, remotely, the objects of the oldest backups beyond ``keep`` and the
leftovers of runs older than the newest complete backup.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import http.client
import json
import os
import shutil
import ssl
import sys
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcache_engine.persistence import MANIFEST, fsync_dir, read_manifest, validate_path, write_atomic

__all__ = [
    "MIN_PART_SIZE",
    "ObjectStore",
    "ObjectStoreError",
    "S3Client",
    "download_backup",
    "list_backups",
    "prune",
    "upload_backup",
]

MIN_PART_SIZE = 5 * 1024 * 1024
"""S3's smallest multipart part (all but the last)."""
DEFAULT_PART_SIZE = 64 * 1024 * 1024
SHA256_META = "x-amz-meta-sha256"
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class ObjectStoreError(ValueError):
    """An object-store call or check failed; the message names the request or object and why."""


@dataclass(frozen=True)
class ObjectStore:
    """Where and how to reach the bucket (``spec.backup.objectStore`` as the backup Job sees it)."""

    endpoint: str
    bucket: str
    prefix: str = ""
    region: str = "us-east-1"
    access_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    session_token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    part_size: int = DEFAULT_PART_SIZE

    @classmethod
    def from_env(
        cls,
        endpoint: str,
        bucket: str,
        *,
        prefix: str = "",
        region: str = "us-east-1",
        ca_file: str | None = None,
        insecure_skip_verify: bool = False,
        part_size: int = DEFAULT_PART_SIZE,
        env: Mapping[str, str] | None = None,
    ) -> ObjectStore:
        """Credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``)."""
        env = os.environ if env is None else env
        key, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
        if not key or not secret:
            raise ObjectStoreError(
                "object store: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set "
                "(the backup Job reads them from spec.backup.objectStore.credentials)"
            )
        return cls(
            endpoint=endpoint,
            bucket=bucket,
            prefix=prefix.strip("/"),
            region=region,
            access_key=key,
            secret_key=secret,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            ca_file=ca_file,
            insecure_skip_verify=insecure_skip_verify,
            part_size=part_size,
        )

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))


# --- SigV4 -------------------------------------------------------------------------------------------


def _quote(value: str, safe: str = "-_.~") -> str:
    return urllib.parse.quote(value, safe=safe)


def sign_v4(
    method: str,
    host: str,
    path: str,
    *,
    query: Mapping[str, str],
    headers: dict[str, str],
    payload_sha256: str,
    access_key: str,
    secret_key: str,
    region: str,
    now: dt.datetime,
    session_token: str | None = None,
    service: str = "s3",
) -> dict[str, str]:
    """The headers of an AWS Signature Version 4 request (``path`` is already URI-encoded)."""
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    out = {k.lower(): v.strip() for k, v in headers.items()}
    out["host"] = host
    out["x-amz-date"] = amz_date
    out["x-amz-content-sha256"] = payload_sha256
    if session_token:
        out["x-amz-security-token"] = session_token
    signed = sorted(out)
    canonical_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items()))
    canonical = "\n".join(
        [
            method,
            path,
            canonical_query,
            "".join(f"{k}:{out[k]}\n" for k in signed),
            ";".join(signed),
            payload_sha256,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = hmac.new(f"AWS4{secret_key}".encode(), day.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={';'.join(signed)}, Signature={signature}"
    )
    return out


# --- the client --------------------------------------------------------------------------------------


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class S3Client:
    """The few S3 REST calls backups need, path-style, signed with SigV4."""

    def __init__(self, store: ObjectStore, timeout_s: float = 300.0) -> None:
        url = urllib.parse.urlsplit(store.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ObjectStoreError(
                f"object store endpoint {store.endpoint!r}: expected http(s)://host[:port]"
            )
        self.store = store
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port
        self._netloc = url.netloc
        self._base = url.path.rstrip("/")
        self._timeout = timeout_s
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            ctx = ssl.create_default_context(cafile=store.ca_file)
            if store.insecure_skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl = ctx
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> S3Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._ssl
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return self._conn

    def request(
        self,
        method: str,
        key: str | None,
        query: Mapping[str, str] | None = None,
        *,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> _Answer:
        """One signed request on the bucket (``key`` None) or an object; ObjectStoreError unless ``ok``."""
        query = dict(query or {})
        path = f"{self._base}/{_quote(self.store.bucket)}"
        if key is not None:
            path += "/" + _quote(key, safe="-_.~/")
        hdrs = dict(headers or {})
        if body:
            hdrs["content-md5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
        payload = hashlib.sha256(body).hexdigest() if body else _EMPTY_SHA256
        signed = sign_v4(
            method,
            self._netloc,
            path,
            query=query,
            headers=hdrs,
            payload_sha256=payload,
            access_key=self.store.access_key,
            secret_key=self.store.secret_key,
            region=self.store.region,
            now=dt.datetime.now(dt.UTC),
            session_token=self.store.session_token,
        )
        signed["content-length"] = str(len(body))
        target = path + (
            "?" + "&".join(f"{_quote(k)}={_quote(v)}" for k, v in query.items()) if query else ""
        )
        what = f"{method} {self.store.endpoint}{target}"
        for attempt in (0, 1):  # one retry on a connection the server closed while idle
            conn = self._connection()
            try:
                conn.request(method, target, body=body or None, headers=signed)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (ConnectionError, http.client.HTTPException, ssl.SSLError, OSError) as exc:
                self.close()
                if attempt == 1 or isinstance(exc, ssl.SSLCertVerificationError):
                    raise ObjectStoreError(f"{what}: {exc}") from None
        answer = _Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        if answer.status not in ok:
            raise ObjectStoreError(f"{what}: HTTP {answer.status} {_error_text(data)}")
        return answer

    def create_bucket(self) -> None:
        """Create the bucket (tests and first-time setup); an existing bucket of ours is fine."""
        self.request("PUT", None, ok=(200, 409))

    # objects

    def put_object(self, key: str, data: bytes, metadata: Mapping[str, str] | None = None) -> None:
        headers = {f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()}
        self.request("PUT", key, body=data, headers=headers)

    def get_object(self, key: str) -> bytes:
        return self.request("GET", key).body

    def head_object(self, key: str) -> dict[str, str] | None:
        answer = self.request("HEAD", key, ok=(200, 404))
        return answer.headers if answer.status == 200 else None

    def delete_object(self, key: str) -> None:
        self.request("DELETE", key, ok=(200, 204))

    def list_keys(self, prefix: str) -> Iterator[str]:
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            root = ET.fromstring(self.request("GET", None, query=query).body)
            for item in root.iter(f"{_NS}Contents"):
                yield _text(item, "Key")
            if _text(root, "IsTruncated") != "true":
                return
            token = _text(root, "NextContinuationToken")

    # multipart

    def create_multipart(self, key: str, metadata: Mapping[str, str] | None = None) -> str:
        headers = {f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()}
        root = ET.fromstring(self.request("POST", key, {"uploads": ""}, headers=headers).body)
        return _text(root, "UploadId")

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        answer = self.request("PUT", key, {"partNumber": str(number), "uploadId": upload_id}, body=data)
        return answer.headers.get("etag", "")

    def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None:
        parts = "".join(
            f"<Part><PartNumber>{i}</PartNumber><ETag>{e}</ETag></Part>" for i, e in enumerate(etags, 1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        answer = self.request("POST", key, {"uploadId": upload_id}, body=body)
        if b"<Error>" in answer.body:  # S3 may answer 200 with an error body
            raise ObjectStoreError(f"complete multipart upload of {key}: {_error_text(answer.body)}")

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.request("DELETE", key, {"uploadId": upload_id}, ok=(200, 204, 404))

    def list_multipart(self, prefix: str) -> list[tuple[str, str]]:
        root = ET.fromstring(self.request("GET", None, {"uploads": "", "prefix": prefix}).body)
        return [(_text(u, "Key"), _text(u, "UploadId")) for u in root.iter(f"{_NS}Upload")]

    def put_large(self, key: str, data: bytes | memoryview, metadata: Mapping[str, str]) -> int:
        """Upload ``data`` (one PUT up to the part size, else multipart); returns the parts sent."""
        size = self.store.part_size
        if len(data) <= size:
            self.put_object(key, bytes(data), metadata)
            return 1
        upload_id = self.create_multipart(key, metadata)
        try:
            etags = [
                self.upload_part(key, upload_id, n, bytes(data[off : off + size]))
                for n, off in enumerate(range(0, len(data), size), 1)
            ]
            self.complete_multipart(key, upload_id, etags)
        except BaseException:
            with contextlib.suppress(ObjectStoreError):
                self.abort_multipart(key, upload_id)
            raise
        return len(etags)


def _text(node: ET.Element, tag: str) -> str:
    found = node.find(f"{_NS}{tag}")
    if found is None:
        found = node.find(tag)
    return (found.text or "") if found is not None else ""


def _error_text(body: bytes) -> str:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return body[:200].decode(errors="replace")
    code, message = _text(root, "Code"), _text(root, "Message")
    return f"{code}: {message}".strip(": ") or body[:200].decode(errors="replace")


# --- backups -----------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def upload_backup(client: S3Client, directory: Path, replica: str) -> dict[str, Any]:
    """Upload a local backup directory to ``<prefix>/<replica>/<dir name>/``, the manifest last.

    Objects already stored with the same size and sha256 (a killed run) are skipped, and that run's
    unfinished multipart uploads are aborted. Returns ``{"backup", "uploaded", "skipped", "parts"}``.
    """
    doc = read_manifest(directory)
    if doc is None:
        raise ObjectStoreError(f"upload: {directory} has no {MANIFEST}; not a backup")
    base = client.store.key(replica, directory.name)
    for key, upload_id in client.list_multipart(base + "/"):
        client.abort_multipart(key, upload_id)
    objects: dict[str, dict[str, Any]] = {}
    uploaded = skipped = parts = 0
    for seg in doc["segments"]:
        file = str(seg["file"])
        path = directory / file
        digest, size = _sha256_file(path), path.stat().st_size
        objects[file] = {"size": size, "sha256": digest}
        key = f"{base}/{file}"
        head = client.head_object(key)
        if head is not None and head.get(SHA256_META) == digest and head.get("content-length") == str(size):
            skipped += 1
            continue
        parts += client.put_large(key, path.read_bytes(), {"sha256": digest})
        uploaded += 1
    manifest = dict(doc)
    manifest["objects"] = objects
    client.put_object(f"{base}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True).encode())
    return {"backup": directory.name, "uploaded": uploaded, "skipped": skipped, "parts": parts}


def _names(client: S3Client, replica: str) -> tuple[list[str], set[str]]:
    """(complete backups sorted oldest first, every backup-like name seen) under ``replica``."""
    root = client.store.key(replica) + "/"
    complete: set[str] = set()
    seen: set[str] = set()
    for key in client.list_keys(root):
        rest = key[len(root) :].split("/")
        if len(rest) < 2:
            continue
        seen.add(rest[0])
        if rest[1] == MANIFEST and len(rest) == 2:
            complete.add(rest[0])
    return sorted(complete), seen


def list_backups(client: S3Client, replica: str) -> list[str]:
    """The complete backups (manifest present) of ``replica``, oldest first."""
    return _names(client, replica)[0]


def resolve(client: S3Client, replica: str, name: str) -> str:
    """``name`` or, for ``latest``, the newest complete backup; ObjectStoreError when none."""
    backups = list_backups(client, replica)
    if name == "latest":
        if not backups:
            raise ObjectStoreError(
                f"no complete backup under s3://{client.store.bucket}/{client.store.key(replica)}/"
            )
        return backups[-1]
    if name not in backups:
        raise ObjectStoreError(
            f"backup {name!r} not found (or has no manifest) under "
            f"s3://{client.store.bucket}/{client.store.key(replica)}/; found {backups or 'none'}"
        )
    return name


def prune(client: S3Client, replica: str, keep: int) -> list[str]:
    """Delete (remotely) the backups beyond the newest ``keep`` and leftovers of runs older than the
    newest complete backup; returns the names removed."""
    if keep < 1:
        raise ObjectStoreError(f"keep must be >= 1, got {keep}")
    complete, seen = _names(client, replica)
    if not complete:
        return []
    newest = complete[-1]
    doomed = set(complete[: max(0, len(complete) - keep)])
    doomed |= {n for n in seen - set(complete) if n < newest}
    for name in sorted(doomed):
        base = client.store.key(replica, name) + "/"
        for key, upload_id in client.list_multipart(base):
            client.abort_multipart(key, upload_id)
        keys = list(client.list_keys(base))
        # the manifest first: a half-deleted backup is never listed as complete
        for key in sorted(keys, key=lambda k: not k.endswith("/" + MANIFEST)):
            client.delete_object(key)
    return sorted(doomed)


def download_backup(client: S3Client, replica: str, name: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    """Download backup ``name`` (or ``latest``) into ``dest/<name>``, every object's sha256 and every
    block checksum verified; returns the directory and the validation report."""
    name = resolve(client, replica, name)
    base = client.store.key(replica, name)
    try:
        manifest = json.loads(client.get_object(f"{base}/{MANIFEST}"))
    except ValueError as exc:
        raise ObjectStoreError(f"{base}/{MANIFEST}: not JSON ({exc})") from None
    objects = manifest.pop("objects", None)
    if not isinstance(objects, dict):
        raise ObjectStoreError(f"{base}/{MANIFEST}: no objects table; not an object-store backup")
    target = dest / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for seg in manifest.get("segments", []):
        file = str(seg["file"])
        want = objects.get(file)
        if not isinstance(want, dict):
            raise ObjectStoreError(f"{base}/{MANIFEST}: segment {file} missing from the objects table")
        data = client.get_object(f"{base}/{file}")
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != want.get("size") or digest != want.get("sha256"):
            raise ObjectStoreError(
                f"object {base}/{file}: sha256 {digest} ({len(data)} bytes) does not match the manifest's "
                f"{want.get('sha256')} ({want.get('size')} bytes); refusing a tampered or truncated backup"
            )
        write_atomic(target / file, data)
    write_atomic(target / MANIFEST, json.dumps(manifest).encode())
    fsync_dir(target)
    report = validate_path(target)
    if not report["is_valid"]:
        raise ObjectStoreError(f"backup {base}: {'; '.join(report['errors'])}")
    print(f"downloaded {base}: {len(manifest.get('segments', []))} segments verified", file=sys.stderr)
    return target, report
