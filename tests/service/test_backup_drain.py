"""Snapshots, backups (CLI), restores into a fresh engine, and drains to the owning replicas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvcache_engine.backup import BackupError, pull_backup, push_backup
from kvcache_engine.cli import main
from kvcache_engine.client import KVCacheClient
from kvcache_engine.contract import rendezvous_owner, route_key
from tests.service.conftest import TOKEN, http_json, make_config, make_kv, make_tokens


def _fill(url: str, cfg, seeds: range, n_tokens: int = 16) -> dict[int, list[int]]:
    chains = {}
    with KVCacheClient([url], token=TOKEN, strict=True, timeout_s=5.0) as c:
        for s in seeds:
            tokens = make_tokens(n_tokens, seed=s)
            assert c.put(tokens, make_kv(cfg, n_tokens, seed=s), wait=True) == n_tokens // cfg.block_tokens
            chains[s] = tokens
    return chains


def test_backup_then_restore_into_a_fresh_engine(live_server, tmp_path: Path) -> None:
    src = live_server()
    cfg = src.engine.config
    chains = _fill(src.url, cfg, range(6))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    dest = tmp_path / "backups"
    args = ["backup", "--url", src.url, "--token-file", str(token_file), "--dest", str(dest), "--keep", "2"]
    assert main(args) == 0
    (backup,) = [p for p in dest.iterdir() if p.name.startswith("kvcache-backup-")]
    assert main(["validate", str(backup)]) == 0
    fresh = live_server()
    assert main(["restore", "--from", str(backup), "--url", fresh.url, "--token-file", str(token_file)]) == 0
    for s, tokens in chains.items():
        assert torch.equal(fresh.engine.get(tokens), src.engine.get(tokens)), s
    other = live_server()
    assert other.engine.restore_from_backup(backup) == 24


def test_backup_keeps_n_and_never_leaves_partials(live_server, tmp_path: Path) -> None:
    src = live_server()
    _fill(src.url, src.engine.config, range(2))
    dest = tmp_path / "b"
    made = []
    for i in range(3):
        path = pull_backup(src.url, TOKEN, dest, keep=2)
        made.append(path.rename(path.with_name(f"kvcache-backup-2026010{i}T000000Z")))
    pull_backup(src.url, TOKEN, dest, keep=2)
    names = sorted(p.name for p in dest.iterdir())
    assert len(names) == 2 and made[0].name not in names and made[1].name not in names
    assert not [n for n in names if n.startswith(".partial")]
    with pytest.raises(BackupError, match="401"):
        pull_backup(src.url, "wrong", tmp_path / "c", keep=1)
    assert not list((tmp_path / "c").iterdir())


def test_corrupted_backup_fails_validation_and_restore(live_server, tmp_path: Path) -> None:
    src = live_server()
    _fill(src.url, src.engine.config, range(2))
    backup = pull_backup(src.url, TOKEN, tmp_path, keep=1)
    seg = next(backup.glob("seg-*"))
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0x01
    seg.write_bytes(bytes(data))
    assert main(["validate", str(backup)]) == 1
    with pytest.raises(BackupError, match="checksum"):
        push_backup(backup, live_server().url, TOKEN)


def test_restore_refuses_other_geometry_with_409(live_server, tmp_path: Path) -> None:
    src = live_server()
    _fill(src.url, src.engine.config, range(1))
    backup = pull_backup(src.url, TOKEN, tmp_path, keep=1)
    other = live_server(make_config(head_dim=16))
    with pytest.raises(BackupError, match=r"409.*head_dim"):
        push_backup(backup, other.url, TOKEN)


def test_drain_pushes_each_chain_to_its_rendezvous_owner(live_server) -> None:
    source = live_server()
    targets = [live_server(), live_server()]
    urls = [t.url for t in targets]
    cfg = source.engine.config
    chains = _fill(source.url, cfg, range(20))
    status, report = http_json("POST", source.url + "/admin/drain", {"targets": urls})
    assert status == 200 and report["ok"] is True and report["drained_blocks"] == 80
    keys = {s: route_key(source.engine.block_hashes(t), cfg.route_depth) for s, t in chains.items()}
    owners = {s: rendezvous_owner(key, urls) for s, key in keys.items()}
    assert len(set(owners.values())) == 2  # both replicas own some of 20 chains
    for s, tokens in chains.items():
        for t in targets:
            expect = 16 if t.url == owners[s] else 0
            assert t.engine.lookup(tokens) == expect
    with KVCacheClient(urls, token=TOKEN, strict=True, timeout_s=5.0) as c:  # the client agrees
        for s, tokens in chains.items():
            got = c.get(tokens)
            assert got is not None and torch.equal(got, make_kv(cfg, 16, seed=s))


def test_drain_reports_an_unreachable_target(live_server) -> None:
    source = live_server()
    _fill(source.url, source.engine.config, range(4))
    status, report = http_json("POST", source.url + "/admin/drain", {"targets": ["http://127.0.0.1:9"]})
    assert status == 200 and report["ok"] is False
    assert report["targets"]["http://127.0.0.1:9"]["error"]
    status, doc = http_json("POST", source.url + "/admin/drain", {"targets": []})
    assert status == 400 and "targets" in doc["error"]


def test_snapshot_stream_is_consistent(live_server, tmp_path: Path) -> None:
    src = live_server()
    _fill(src.url, src.engine.config, range(3))
    backup = pull_backup(src.url, TOKEN, tmp_path, keep=1)
    manifest = json.loads((backup / "manifest.json").read_text())
    hashes = [b["hash"] for s in manifest["segments"] for b in s["blocks"]]
    assert len(hashes) == len(set(hashes)) == 12


# --- issue 16: partial backups of killed runs, one-line errors ---------------------------------------


def test_partials_of_killed_runs_are_removed_at_the_next_run(live_server, tmp_path: Path) -> None:
    src = live_server()
    _fill(src.url, src.engine.config, range(2))
    dest = tmp_path / "b"
    for i in range(3):  # what kill -9 mid-run leaves behind: a partial with segments in it
        dead = dest / f".partial-kvcache-backup-2026010{i}T000000Z"
        dead.mkdir(parents=True)
        (dead / "seg-000000.safetensors").write_bytes(b"\0" * 4096)
    made = pull_backup(src.url, TOKEN, dest, keep=1)
    assert sorted(p.name for p in dest.iterdir()) == [made.name]


def test_a_second_backup_into_the_same_root_is_refused_while_one_runs(tmp_path: Path) -> None:
    from kvcache_engine.backup import _backup_lock

    tmp_path.joinpath(".partial-kvcache-backup-x").mkdir()
    with _backup_lock(tmp_path), pytest.raises(BackupError, match="another backup is running"):
        pull_backup("http://127.0.0.1:1", TOKEN, tmp_path, keep=1)
    assert tmp_path.joinpath(".partial-kvcache-backup-x").exists()  # not touched while locked


@pytest.mark.parametrize("url", ["http://127.0.0.1:1", "http://127.0.0.1:1/x"])
def test_failed_backups_print_one_line_and_no_traceback(
    tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvcache_engine.cli import main

    rc = main(["backup", "--url", url, "--dest", str(tmp_path / "b"), "--keep", "1"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kvcache-engine backup: error:"), err
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".partial")]


def test_a_stream_cut_mid_backup_is_one_line_and_leaves_no_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket
    import threading

    from kvcache_engine.cli import main
    from kvcache_engine.wire import encode_stream_header

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        head = encode_stream_header({"format_version": 1, "geometry": {}})
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + head + b"\x10\0\0\0\0\0\0\0abc")
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    rc = main(["backup", "--url", url, "--dest", str(tmp_path / "b"), "--keep", "1"])
    srv.close()
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not list((tmp_path / "b").iterdir())


def test_a_backup_that_cannot_write_its_destination_is_one_line(
    live_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvcache_engine.cli import main

    src = live_server()
    (tmp_path / "file").write_text("not a directory")
    rc = main(["backup", "--url", src.url, "--dest", str(tmp_path / "file" / "b"), "--keep", "1"])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "NotADirectoryError" in err, err
