"""The warm join and the shutdown hand-off on real engine servers (issue 18): a peer copies a
joining replica exactly its share and keeps everything; a stopping replica copies its chains to
the peers that take them while it is away; clients switch shard maps by epoch."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kvcache_engine.client import KVCacheClient
from kvcache_engine.contract import ShardMap, node_id, rendezvous_owner, route_key
from tests.service.conftest import TOKEN, http_json, make_config
from tests.service.test_backup_drain import _fill


def _owner(source, tokens: list[int], members: list[str]) -> str:
    key = route_key(source.engine.block_hashes(tokens), source.engine.config.route_depth)
    return node_id(rendezvous_owner(key, members))


def test_a_join_copies_the_joiner_exactly_its_share_and_the_peer_keeps_everything(live_server) -> None:
    peer, other, joiner = live_server(), live_server(), live_server()
    chains = _fill(peer.url, peer.engine.config, range(24))
    members = [peer.url, other.url, joiner.url]
    status, report = http_json("POST", peer.url + "/admin/drain", {"targets": members, "only": [joiner.url]})
    assert status == 200 and report["ok"] is True and report["complete"] is True
    assert list(report["targets"]) == [joiner.url]  # nothing was sent to the other member
    share = [s for s, t in chains.items() if _owner(peer, t, members) == node_id(joiner.url)]
    assert 0 < len(share) < len(chains)
    for s, tokens in chains.items():
        assert joiner.engine.lookup(tokens) == (16 if s in share else 0), s
        assert peer.engine.lookup(tokens) == 16  # copied, not moved: clients on the old map still hit
        assert other.engine.lookup(tokens) == 0
    assert report["handed_off_blocks"] == report["verified_blocks"] == 4 * len(share)


def test_a_join_names_a_bad_only(live_server) -> None:
    peer, joiner = live_server(), live_server()
    status, doc = http_json("POST", peer.url + "/admin/drain", {"targets": [peer.url], "only": [joiner.url]})
    assert status == 400 and "only" in doc["error"] and "among targets" in doc["error"]
    status, doc = http_json("POST", peer.url + "/admin/drain", {"targets": [peer.url], "only": "x"})
    assert status == 400 and "only" in doc["error"]


def test_shutdown_hands_every_chain_to_the_peer_that_takes_it_while_away(live_server) -> None:
    leaving, staying_a, staying_b = live_server(), live_server(), live_server()
    chains = _fill(leaving.url, leaving.engine.config, range(20))
    members = [leaving.url, staying_a.url, staying_b.url]
    for srv in (leaving, staying_a, staying_b):
        status, _ = http_json("POST", srv.url + "/admin/placement", {"endpoints": members, "self": srv.url})
        assert status == 200
    report = leaving._call(leaving.server.hand_off())
    assert report is not None and report["ok"] and report["complete"]
    assert report["handed_off_blocks"] == report["held_blocks"] == 80
    peers = [staying_a.url, staying_b.url]
    with KVCacheClient(members, token=TOKEN, strict=True, timeout_s=5.0, failure_threshold=1) as client:
        for tokens in chains.values():  # where a client's fallback (rendezvous order minus the leaver) looks
            fallback = {s.url: s for s in (staying_a, staying_b)}[f"http://{_owner(leaving, tokens, peers)}"]
            assert fallback.engine.lookup(tokens) == 16
        leaving.stop()
        assert all(client.lookup(tokens) == 16 for tokens in chains.values())  # breaker, then the fallback


def test_no_hand_off_without_placement_after_a_full_drain_or_with_a_zero_budget(live_server) -> None:
    alone = live_server()
    _fill(alone.url, alone.engine.config, range(2))
    assert alone._call(alone.server.hand_off()) is None  # no placement: no peer known
    off = live_server(shutdown_handoff_s=0.0)
    peer = live_server()
    http_json("POST", off.url + "/admin/placement", {"endpoints": [off.url, peer.url], "self": off.url})
    assert off._call(off.server.hand_off()) is None
    drained = live_server()
    _fill(drained.url, drained.engine.config, range(2))
    http_json(
        "POST", drained.url + "/admin/placement", {"endpoints": [drained.url, peer.url], "self": drained.url}
    )
    status, report = http_json("POST", drained.url + "/admin/drain", {"targets": [peer.url]})
    assert status == 200 and report["ok"]
    assert drained._call(drained.server.hand_off()) is None  # the scale-in drain already moved them


# --- the shard map in the connection contract, and clients switching by epoch -----------------------


def test_shard_map_reads_both_connection_forms_and_names_bad_keys() -> None:
    as_json = ShardMap.from_connection({"shardMapEpoch": 3, "members": ["10.0.0.2:8080", "10.0.0.1:8080"]})
    as_files = ShardMap.from_connection({"shardMapEpoch": "3", "members": "10.0.0.1:8080, 10.0.0.2:8080"})
    assert as_json == as_files == ShardMap(3, ("10.0.0.1:8080", "10.0.0.2:8080"))
    assert ShardMap.from_connection({"formatVersion": 1}) is None
    assert as_json.to_connection() == {"shardMapEpoch": 3, "members": ["10.0.0.1:8080", "10.0.0.2:8080"]}
    with pytest.raises(ValueError, match="shardMapEpoch must be an integer"):
        ShardMap.from_connection({"shardMapEpoch": "x", "members": []})
    with pytest.raises(ValueError, match="members must be a list"):
        ShardMap.from_connection({"shardMapEpoch": 1, "members": 5})
    with pytest.raises(ValueError, match="members"):
        ShardMap.from_connection({"shardMapEpoch": 1, "members": ["http://"]})


def test_a_client_switches_only_to_newer_epochs() -> None:
    with KVCacheClient(["10.0.0.1:8080"], token=TOKEN) as client:
        assert client.use_shard_map(2, ["10.0.0.1:8080", "10.0.0.2:8080"])
        assert not client.use_shard_map(1, ["10.0.0.9:8080"])  # out of order: ignored
        assert not client.use_shard_map(2, ["10.0.0.9:8080"])
        assert client._core.endpoints() == ["http://10.0.0.1:8080", "http://10.0.0.2:8080"]
        assert client._core.shard_map_epoch == 2
        with pytest.raises(ValueError, match="members"):
            client.use_shard_map(3, [])


def test_a_client_from_a_mounted_contract_follows_its_shard_map(tmp_path: Path) -> None:
    mount = tmp_path / "connection"
    mount.mkdir()
    info = {
        "formatVersion": 1, "headlessService": "kvc-headless.ns.svc", "port": 8080, "tokenSecretKey": "token",
        "numLayers": 2, "numKvHeads": 2, "headDim": 8, "blockTokens": 4, "dtype": "float16",
        "cacheNamespace": "default", "shardMapEpoch": 1, "members": ["127.0.0.1:1"],
    }  # fmt: skip
    (mount / "connection.json").write_text(json.dumps(info))
    client = KVCacheClient.from_connection(mount, token=TOKEN, dns_refresh_s=0.05)
    with client:
        assert client._core.endpoints() == ["http://127.0.0.1:1"]
        (mount / "connection.json").write_text(
            json.dumps({**info, "shardMapEpoch": 2, "members": ["127.0.0.1:2"]})
        )
        time.sleep(0.1)
        assert client._core.endpoints() == ["http://127.0.0.1:2"]
        (mount / "connection.json").write_text("{half written")  # kept: the map in use stays
        time.sleep(0.1)
        assert client._core.endpoints() == ["http://127.0.0.1:2"]


def test_the_hand_off_bandwidth_is_bounded(live_server) -> None:
    """A drain of ~256 KiB at 0.2 MiB/s takes over a second; unbounded it takes a fraction."""
    slow, fast = live_server(handoff_mib_s=0.2), live_server(handoff_mib_s=0.0)
    target = live_server()
    for source in (slow, fast):
        _fill(source.url, source.engine.config, range(40, 56), n_tokens=64)
    timings, moved = {}, {}
    for label, source in (("slow", slow), ("fast", fast)):
        started = time.monotonic()
        status, report = http_json("POST", source.url + "/admin/drain", {"targets": [target.url]})
        timings[label] = time.monotonic() - started
        assert status == 200 and report["ok"]
        moved[label] = report["drained_blocks"] * slow.engine.config.block_bytes_stored()
    at_the_cap = moved["slow"] / (0.2 * 1024 * 1024)  # payload only: the floor of the capped time
    assert at_the_cap > 0.5 and timings["slow"] >= at_the_cap > timings["fast"], (timings, at_the_cap)


def test_a_shutdown_hand_off_sends_a_peer_only_what_its_free_slots_hold(live_server) -> None:
    """A full peer must not evict its own chains for a visitor's: the hand-off stops at its room."""
    leaving = live_server()
    peer = live_server(make_config(max_tokens=64))  # 16 slots of 4 tokens
    own = _fill(peer.url, peer.engine.config, range(100, 102))  # 2 chains x 4 blocks: 8 slots used
    _fill(leaving.url, leaving.engine.config, range(20))  # 80 blocks
    members = [leaving.url, peer.url]
    http_json("POST", leaving.url + "/admin/placement", {"endpoints": members, "self": leaving.url})
    report = leaving._call(leaving.server.hand_off())
    assert report is not None and report["ok"]
    assert report["handed_off_blocks"] == 8 and report["left_for_room"] == 80 - 8, report
    assert all(peer.engine.lookup(tokens) == 16 for tokens in own.values())  # nothing of its own evicted
