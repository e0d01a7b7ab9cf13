"""Backups and the small admin CLIs: ``kvcache-engine backup|restore|validate|stats|persist``.

A backup is a directory with the persisted-cache layout (``manifest.json`` + safetensors
segments), so ``validate`` and ``engine.restore_from_backup`` read backups and PVC caches alike.
``backup`` pulls ``GET /admin/snapshot`` (a KVS1 stream), verifies every block checksum while
writing, writes into ``.partial-<name>`` and renames it to ``kvcache-backup-<UTC time>`` only when
complete (a crashed backup never looks like a backup), then prunes to ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvcache_engine import objectstore
from kvcache_engine.contract import AdminError, P, SyncAdminClient, TokenError, resolve_token
from kvcache_engine.contract.admin import decode_answer
from kvcache_engine.contract.tokens import ADMIN
from kvcache_engine.objectstore import ObjectStore, S3Client, download_backup, upload_backup
from kvcache_engine.persistence import (
    MANIFEST,
    decode_segment,
    fsync_dir,
    new_segment,
    read_manifest,
    validate_path,
    write_atomic,
    write_manifest,
)
from kvcache_engine.wire import (
    PREFIX_BYTES,
    READABLE_WIRE_FORMATS,
    SEGMENT_LEN,
    STREAM_CONTENT_TYPE,
    STREAM_MAGIC,
    TRAILER_LEN,
    WIRE_FORMAT_VERSION,
    decode_frame_header,
    decode_frame_prefix,
    encode_stream_header,
    encode_stream_segment,
    encode_stream_trailer,
    parse_segment_metadata,
)

__all__ = ["BACKUP_PREFIX", "pull_backup", "push_backup"]

BACKUP_PREFIX = "kvcache-backup-"


class BackupError(ValueError):
    """A backup or restore failed; the message says where and why."""


# --- HTTP: the contract's admin client ------------------------------------------------------------


def admin(url: str, token_file: str | None, *, timeout: float = 300.0) -> SyncAdminClient:
    """The admin client of the engine at ``url`` with the token from ``--token-file`` (else the
    admin token from ``$KVCACHE_ADMIN_TOKEN_FILE`` / ``$KVCACHE_ADMIN_TOKEN``, else
    ``$KVCACHE_TOKEN_FILE`` / ``$KVCACHE_TOKEN``); BackupError naming a bad URL or token file."""
    try:
        token, _ = resolve_token(token_file, role=ADMIN)
        if token is None:
            token, _ = resolve_token(None)
        return SyncAdminClient(url, token, timeout_s=timeout)
    except (AdminError, TokenError) as exc:
        raise BackupError(str(exc)) from None


def call_json(client: SyncAdminClient, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """One JSON admin call; BackupError with the engine's message on failure."""
    try:
        return client.call(method, path, body)
    except AdminError as exc:
        raise BackupError(str(exc)) from None


def _read_exact(resp: http.client.HTTPResponse, n: int) -> bytes:
    data = resp.read(n)
    if len(data) != n:
        raise BackupError(f"snapshot stream truncated (wanted {n} bytes, got {len(data)})")
    return data


# --- backup ------------------------------------------------------------------------------------------


def pull_backup(
    url: str, token: str | None, dest: str | os.PathLike[str], keep: int, timeout: float = 600.0
) -> Path:
    """Pull a snapshot into ``dest/kvcache-backup-<UTC>``, verified and atomic; prune to ``keep``."""
    if keep < 1:
        raise BackupError(f"--keep must be >= 1, got {keep}")
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    with _backup_lock(root):
        return _pull_locked(url, token, root, keep, timeout)


@contextlib.contextmanager
def _backup_lock(root: Path) -> Iterator[None]:
    """One backup at a time into ``root`` (so every ``.partial-*`` there is a dead run's)."""
    fd = os.open(root, os.O_RDONLY)  # the directory itself is the lock: no file left behind
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"another backup is running into {root}") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def clean_partials(root: Path) -> list[Path]:
    """Remove the ``.partial-*`` directories of backups that died mid-run (kill -9, OOM, a node
    lost); called under the backup lock, so none of them is being written."""
    stale = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(".partial-"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _pull_locked(url: str, token: str | None, root: Path, keep: int, timeout: float) -> Path:
    stale = clean_partials(root)
    if stale:
        print(f"backup: removed {len(stale)} partial backup(s) of interrupted runs", file=sys.stderr)
    name = BACKUP_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    partial = root / f".partial-{name}"
    partial.mkdir()
    try:
        for resp in SyncAdminClient(url, token, timeout_s=timeout).stream(P.ADMIN_SNAPSHOT):
            header, segments, blocks = _write_stream(resp, partial)
        write_manifest(partial, header["geometry"], str(header.get("codec", "none")), segments, generation=0)
    except AdminError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise BackupError(str(exc)) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    final = root / name
    if final.exists():  # two backups in the same second: keep both
        final = root / f"{name}-{os.getpid()}"
    os.replace(partial, final)
    fsync_dir(root)
    prune(root, keep)
    print(f"backup {final}: {blocks} blocks in {len(segments)} segments", file=sys.stderr)
    return final


def _write_stream(resp: http.client.HTTPResponse, directory: Path) -> tuple[dict[str, Any], list[Any], int]:
    hlen = decode_frame_prefix(_read_exact(resp, PREFIX_BYTES), STREAM_MAGIC)
    header = decode_frame_header(_read_exact(resp, hlen))
    if header.get("format_version") not in READABLE_WIRE_FORMATS or not isinstance(
        header.get("geometry"), dict
    ):
        raise BackupError(f"snapshot: unsupported stream header {header!r}")
    segments: list[Any] = []
    blocks = 0
    while True:
        (length,) = SEGMENT_LEN.unpack(_read_exact(resp, SEGMENT_LEN.size))
        if length == 0:
            (tlen,) = TRAILER_LEN.unpack(_read_exact(resp, TRAILER_LEN.size))
            trailer = decode_frame_header(_read_exact(resp, tlen))
            break
        data = _read_exact(resp, length)
        verified = decode_segment(data, None, f"snapshot segment {len(segments)}")  # checksums
        file = f"seg-00000000-{len(segments):04d}.safetensors"
        write_atomic(directory / file, data)
        metas = parse_segment_metadata(_metadata(data))
        segments.append(new_segment(file, len(data), metas))
        blocks += len(verified)
    if trailer.get("blocks") != blocks or trailer.get("segments") != len(segments):
        raise BackupError(
            f"snapshot: trailer {trailer} does not match {blocks} blocks in {len(segments)} segments"
        )
    return header, segments, blocks


def _metadata(data: bytes) -> dict[str, str] | None:
    n = int.from_bytes(data[:8], "little")
    doc = json.loads(data[8 : 8 + n])
    meta = doc.get("__metadata__")
    return meta if isinstance(meta, dict) else None


def prune(root: Path, keep: int) -> list[Path]:
    """Remove the oldest backups beyond ``keep`` (names sort by time) and any partial one left
    by an interrupted run (it never counts as a backup); returns those removed."""
    backups = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(BACKUP_PREFIX))
    removed = backups[: max(0, len(backups) - keep)] + clean_partials(root)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# --- restore ---------------------------------------------------------------------------------------


def push_backup(
    path: str | os.PathLike[str], url: str, token: str | None, timeout: float = 600.0
) -> dict[str, Any]:
    """Validate a backup offline, then stream it to ``POST /admin/restore``."""
    directory = Path(path)
    report = validate_path(directory)
    if not report["is_valid"]:
        raise BackupError(f"restore: {directory} is not a valid backup: {'; '.join(report['errors'])}")
    doc = read_manifest(directory)
    assert doc is not None
    client = SyncAdminClient(url, token, timeout_s=timeout)
    try:
        body = _stream_body(directory, doc)
        status, raw = client.request(
            "POST", P.ADMIN_RESTORE, body, content_type=STREAM_CONTENT_TYPE, chunked=True
        )
        return decode_answer(f"POST {client.url}{P.ADMIN_RESTORE}", status, raw)
    except AdminError as exc:
        raise BackupError(str(exc)) from None


def _stream_body(directory: Path, doc: dict[str, Any]) -> Iterator[bytes]:
    header = {
        "format_version": WIRE_FORMAT_VERSION,
        "geometry": doc["geometry"],
        "codec": doc.get("codec", "none"),
    }
    yield encode_stream_header(header)
    blocks = 0
    for seg in doc["segments"]:
        data = (directory / seg["file"]).read_bytes()
        blocks += len(parse_segment_metadata(_metadata(data)))
        yield encode_stream_segment(data)
        yield data
    yield encode_stream_trailer({"blocks": blocks, "segments": len(doc["segments"])})


# --- CLI handlers ------------------------------------------------------------------------------------


def _s3(args: argparse.Namespace) -> tuple[S3Client, str] | None:
    """The object-store client and replica folder when ``--s3-bucket`` is given (else None)."""
    if not getattr(args, "s3_bucket", None):
        return None
    if not args.s3_endpoint or not args.replica:
        raise BackupError("--s3-bucket needs --s3-endpoint and --replica")
    store = ObjectStore.from_env(
        args.s3_endpoint,
        args.s3_bucket,
        prefix=args.s3_prefix,
        region=args.s3_region,
        ca_file=args.s3_ca_file,
        insecure_skip_verify=args.s3_insecure_skip_verify,
        part_size=int(args.s3_part_size_mb * 1024 * 1024),
    )
    return S3Client(store), args.replica


def cmd_backup(args: argparse.Namespace) -> int:
    s3 = _s3(args)
    token = admin(args.url, args.token_file).token
    if s3 is None:
        pull_backup(args.url, token, args.dest, args.keep)
        return 0
    client, replica = s3
    with client:
        staged = pull_backup(args.url, token, args.dest, 1)
        try:
            result = upload_backup(client, staged, replica)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        result["pruned"] = objectstore.prune(client, replica, args.keep)
    print(json.dumps(result))
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    s3 = _s3(args)
    if s3 is None:
        raise BackupError("upload needs --s3-bucket (and --s3-endpoint, --replica)")
    client, replica = s3
    with client:
        result = upload_backup(client, Path(getattr(args, "from")), replica)
        result["pruned"] = objectstore.prune(client, replica, args.keep)
    print(json.dumps(result))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    source = getattr(args, "from")
    if args.to_dir:
        result = restore_to_dir(args, source, Path(args.to_dir))
    elif not args.url:
        raise BackupError("restore needs --url (a running engine) or --to-dir (a data directory)")
    else:
        result = _restore_to_engine(args, source)
    text = json.dumps(result)
    if args.report_file:
        Path(args.report_file).write_text(text)
    print(text)
    return 0


def _restore_to_engine(args: argparse.Namespace, source: str) -> dict[str, Any]:
    token = admin(args.url, args.token_file).token
    s3 = _s3(args)
    if s3 is None:
        path = find_backup(Path(args.backup_root), source) if args.backup_root else Path(source)
        report = validate_path(path)
        result = push_backup(path, args.url, token)
        result.update(backup=path.name, source=str(path), blocks_verified=report["blocks"])
        return result
    client, replica = s3
    with client, tempfile.TemporaryDirectory(dir=args.staging) as tmp:
        path, report = download_backup(client, replica, source, Path(tmp))
        result = push_backup(path, args.url, token)
    result.update(backup=path.name, source=_s3_source(client, replica), blocks_verified=report["blocks"])
    return result


def _s3_source(client: S3Client, replica: str) -> str:
    return f"s3://{client.store.bucket}/{client.store.key(replica)}/"


def find_backup(root: Path, name: str) -> Path:
    """Backup ``name`` (or ``latest``: the newest complete one) under a backup root directory."""
    backups = sorted(p for p in root.glob(BACKUP_PREFIX + "*") if p.is_dir()) if root.is_dir() else []
    if name == "latest":
        if not backups:
            raise BackupError(f"no backup ({BACKUP_PREFIX}*) under {root}")
        return backups[-1]
    path = root / name
    if path not in backups:
        raise BackupError(
            f"backup {name!r} not found under {root}; found {[p.name for p in backups] or 'none'}"
        )
    return path


def restore_to_dir(args: argparse.Namespace, source: str, dest: Path) -> dict[str, Any]:
    """Write a verified backup into ``dest`` as an engine's persisted cache (segments, then the
    manifest last), so the engine loads it before it reports ready. With ``--if-empty`` a directory
    that already holds a cache is left alone (a restarted pod keeps its own, newer data)."""
    if args.if_empty and read_manifest(dest) is not None:
        return {"skipped": f"{dest} already holds a cache"}
    dest.mkdir(parents=True, exist_ok=True)
    s3 = _s3(args)
    with tempfile.TemporaryDirectory(dir=args.staging or dest.parent) as tmp:
        if s3 is not None:
            client, replica = s3
            with client:
                path, report = download_backup(client, replica, source, Path(tmp))
            where = _s3_source(client, replica)
        else:
            path = find_backup(Path(args.backup_root), source) if args.backup_root else Path(source)
            report = validate_path(path)
            if not report["is_valid"]:
                raise BackupError(f"restore: {path} is not a valid backup: {'; '.join(report['errors'])}")
            where = str(path.parent)
        doc = read_manifest(path)
        assert doc is not None
        old = read_manifest(dest)
        (dest / MANIFEST).unlink(missing_ok=True)  # a crash from here on leaves no cache, not a mix
        for seg in doc["segments"]:
            write_atomic(dest / seg["file"], (path / seg["file"]).read_bytes())
        write_atomic(dest / MANIFEST, (path / MANIFEST).read_bytes())
        fsync_dir(dest)
        keep = {seg["file"] for seg in doc["segments"]} | {MANIFEST}
        for seg in (old or {}).get("segments", []):  # the replaced cache's files
            if seg["file"] not in keep:
                (dest / seg["file"]).unlink(missing_ok=True)
    return {
        "backup": path.name,
        "source": where,
        "blocks_verified": report["blocks"],
        "segments": report["segments"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def cmd_validate(args: argparse.Namespace) -> int:
    config = None
    if args.config:
        from kvcache_engine.contract import load_config

        config = load_config(args.config, {})
    report = validate_path(args.path, config)
    print(json.dumps(report, indent=2, default=str))
    return 0 if report["is_valid"] else 1


def cmd_stats(args: argparse.Namespace) -> int:
    stats = call_json(admin(args.url, args.token_file), "GET", P.STATS)
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kvcache engine {args.url}")
    table.add_column("stat")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        if not isinstance(value, dict):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    return 0


def cmd_persist(args: argparse.Namespace) -> int:
    result = call_json(admin(args.url, args.token_file), "POST", P.ADMIN_PERSIST)
    print(json.dumps({"ok": result["ok"], "error": result.get("error")}))
    return 0 if result["ok"] else 1
