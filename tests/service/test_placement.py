"""Placement by the block at ``route_depth`` (wire.route_key): balance on the packaged trace,
rendezvous stability, and the client and the server's drain agreeing on it with shared roots."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from kvcache_engine.client import KVCacheClient
from kvcache_engine.contract import rendezvous_owner, route_key
from kvcache_engine.core.hashing import chain_hashes
from kvcache_engine.replay import load_trace
from tests.service.conftest import TOKEN, http_json, make_config, make_kv, make_tokens

NODES = [f"http://10.0.0.{i}:8080" for i in range(1, 5)]
BLOCK_TOKENS = 16


def trace_chains(route_depth: int) -> list[list[int]]:
    """The leading ``route_depth`` block hashes of every packaged-trace request (all the key needs);
    a trace block id stands for ``BLOCK_TOKENS`` distinct token ids."""
    out = []
    for ids in load_trace():
        tokens = [b * BLOCK_TOKENS + i for b in ids[:route_depth] for i in range(BLOCK_TOKENS)]
        out.append([int(h) for h in chain_hashes("default", tokens, BLOCK_TOKENS)])
    return out


def test_route_key_picks_the_block_at_depth_or_the_last() -> None:
    chain = [11, 22, 33, 44]
    assert route_key(chain, 2) == 22
    assert route_key(chain, 1) == 11
    assert route_key(chain[:1], 2) == 11  # shorter than route_depth: its last block
    assert route_key(chain, 9) == 44
    # Every continuation of a prefix of >= route_depth blocks meets on one key (lookup vs put).
    assert route_key(chain[:2], 2) == route_key(chain, 2)
    with pytest.raises(ValueError, match="route_depth"):
        route_key(chain, 0)
    with pytest.raises(ValueError, match="empty chain"):
        route_key([], 2)


def test_trace_chains_balance_over_four_replicas_only_past_the_shared_root() -> None:
    chains = trace_chains(2)
    assert len({c[0] for c in chains}) == 1  # the trace's universal system-prompt block
    by_root = Counter(rendezvous_owner(route_key(c, 1), NODES) for c in chains)
    assert len(by_root) == 1  # placement by the first block: one replica takes everything
    load = Counter(rendezvous_owner(route_key(c, 2), NODES) for c in chains)
    mean = len(chains) / len(NODES)
    assert set(load) == set(NODES)
    assert max(load.values()) <= 1.5 * mean, load


def test_adding_a_replica_moves_about_one_nth_of_the_chains() -> None:
    keys = sorted({route_key(c, 2) for c in trace_chains(2)})
    before = {k: rendezvous_owner(k, NODES) for k in keys}
    grown = [*NODES, "http://10.0.0.5:8080"]
    after = {k: rendezvous_owner(k, grown) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == grown[-1] for k in moved)  # only to the new replica, none reshuffled
    assert abs(len(moved) / len(keys) - 1 / len(grown)) < 0.03, len(moved) / len(keys)


def shared_root_chains(n: int, blocks: int = 4) -> dict[int, list[int]]:
    """``n`` prompts of ``blocks`` blocks (block_tokens 4) sharing their first block."""
    root = make_tokens(4, seed=999)
    return {s: root + make_tokens(4 * (blocks - 1), seed=s) for s in range(n)}


def kv_of(cfg, root_kv: torch.Tensor, seed: int, n_tokens: int) -> torch.Tensor:
    """The KV of a chain: the shared root's block, then the chain's own."""
    return torch.cat([root_kv, make_kv(cfg, n_tokens - 4, seed=seed)], dim=2)


def test_client_spreads_shared_root_chains_and_counts_match_the_engines(live_server) -> None:
    servers = [live_server(), live_server()]
    urls = [s.url for s in servers]
    cfg = servers[0].engine.config
    chains = shared_root_chains(16)
    root_kv = make_kv(cfg, 4, seed=999)
    looked = requested = 0
    with KVCacheClient(urls, token=TOKEN, strict=True, timeout_s=5.0) as c:
        for s, tokens in chains.items():
            looked += c.lookup(tokens)
            requested += len(tokens)
            c.put(tokens, kv_of(cfg, root_kv, s, 16), wait=True)
        hits = sum(c.lookup(tokens) for tokens in chains.values())
        assert hits == 16 * 16  # every chain whole on the replica its key names
        got = c.get(chains[3])
        assert got is not None and torch.equal(got, kv_of(cfg, root_kv, 3, 16))
    owners = Counter(
        rendezvous_owner(route_key(servers[0].engine.block_hashes(t), cfg.route_depth), urls)
        for t in chains.values()
    )
    assert set(owners) == set(urls)  # chains spread although all share their first block
    engines_hit = sum(s.engine.get_stats()["hit_tokens"] for s in servers)
    engines_requested = sum(s.engine.get_stats()["requested_tokens"] for s in servers)
    assert engines_hit == looked + hits
    assert engines_requested == requested + 16 * 16
    assert looked > 0  # the shared root hit on a replica that already held it
    used = [s.engine.get_stats()["used_blocks"] for s in servers]
    assert sum(used) == 16 * 3 + len(servers)  # the root once per replica, the rest once


def test_drain_carries_shared_ancestors_to_every_owner(live_server) -> None:
    source = live_server()
    cfg = source.engine.config
    chains = shared_root_chains(12)
    root_kv = make_kv(cfg, 4, seed=999)
    with KVCacheClient([source.url], token=TOKEN, strict=True, timeout_s=5.0) as c:
        for s, tokens in chains.items():
            c.put(tokens, kv_of(cfg, root_kv, s, 16), wait=True)
        lone = make_tokens(4, seed=777)  # a one-block prompt sharing nothing: keyed by itself
        c.put(lone, make_kv(cfg, 4, seed=777), wait=True)
    assert source.engine.get_stats()["used_blocks"] == 1 + 12 * 3 + 1
    targets = [live_server(), live_server(), live_server()]
    urls = [t.url for t in targets]
    status, report = http_json("POST", source.url + "/admin/drain", {"targets": urls})
    assert status == 200 and report["ok"] is True, report
    hashes = {s: source.engine.block_hashes(t) for s, t in chains.items()}
    owners = {s: rendezvous_owner(route_key(h, cfg.route_depth), urls) for s, h in hashes.items()}
    root = hashes[0][0]
    lone_hash = source.engine.block_hashes(lone)
    for t in targets:
        owned = [s for s in chains if owners[s] == t.url]
        has_root = bool(owned)  # the shared root went where a chain through it lives, nowhere else
        assert t.engine.lookup_hashes(lone_hash) == int(t.url == rendezvous_owner(lone_hash[0], urls))
        assert t.engine.lookup_hashes([root]) == int(has_root)
        for s in chains:  # whole chains on their owner, nothing of them elsewhere past the root
            assert t.engine.lookup_hashes(hashes[s]) == (4 if s in owned else int(has_root))
    assert report["drained_blocks"] == 12 * 3 + len(set(owners.values())) + 1
    with KVCacheClient(urls, token=TOKEN, strict=True, timeout_s=5.0) as c:  # the client agrees
        for s, tokens in chains.items():
            got = c.get(tokens)
            assert got is not None and torch.equal(got, kv_of(cfg, root_kv, s, 16))
        assert c.lookup(lone) == 4


def test_route_depth_one_keeps_first_block_placement(live_server) -> None:
    servers = [live_server(make_config(route_depth=1)), live_server(make_config(route_depth=1))]
    urls = [s.url for s in servers]
    chains = shared_root_chains(6)
    cfg = servers[0].engine.config
    root_kv = make_kv(cfg, 4, seed=999)
    with KVCacheClient(urls, token=TOKEN, strict=True, timeout_s=5.0, config=cfg) as c:
        for s, tokens in chains.items():
            c.put(tokens, kv_of(cfg, root_kv, s, 16), wait=True)
    used = sorted(s.engine.get_stats()["used_blocks"] for s in servers)
    assert used == [0, 1 + 6 * 3]  # every chain on the root's owner
