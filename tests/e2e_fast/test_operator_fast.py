"""The fast end-to-end subset (``make test``): the real operator and real engine processes on the
local cluster. The same scenario code runs in ``make e2e`` (e2e/test_scenarios.py) and on kind."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from e2e import scenarios
from e2e.localcluster.cluster import LocalCluster
from e2e.localcluster.driver import LocalDriver

from kvcache_engine.client import KVCacheClient
from kvcache_engine.contract import WARM_GATE, ShardMap, node_id, rendezvous_owner, route_key
from kvcache_engine.loadgen import request_tokens

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def driver() -> Iterator[LocalDriver]:
    with LocalCluster(shutdown_grace_s=5.0) as cluster:
        yield LocalDriver(cluster)


def test_apply_sample_ready_load_matches_engine_counters_then_delete(driver: LocalDriver) -> None:
    manifest = scenarios.create_ready(
        driver, "fast", replicas=2, autoscaling={"mode": "Off"}, tuning={"mode": "Off"}
    )
    scenarios.hit_rate_matches_engine_counters(driver, "fast", manifest)
    scenarios.delete_cleans_up(driver, "fast", data_pvcs_kept=False, backup_pvc_kept=True, replicas=2)


def test_invalid_manifest_is_rejected_naming_the_field(driver: LocalDriver) -> None:
    scenarios.invalid_manifest_rejected(driver, "broken")


def test_an_engine_that_cannot_allocate_its_pool_degrades_the_kvcache_with_its_reason(
    driver: LocalDriver,
) -> None:
    scenarios.unallocatable_pool_degrades(driver, "toobig")


def test_a_killed_engine_shows_in_status_and_as_an_event(driver: LocalDriver) -> None:
    scenarios.killed_engine_shows_in_status(driver, "killed")


def test_a_max_tokens_patch_is_live_without_a_new_pod(driver: LocalDriver) -> None:
    scenarios.max_tokens_patch_is_live(driver, "livepatch")


def test_a_ready_idle_cache_settles_to_no_api_writes(driver: LocalDriver) -> None:
    """Engines serving, nothing changing: the operator's passes (every 2 s) stop writing (status
    and children are written only when they change) and never list (reads come from watches)."""
    scenarios.create_ready(driver, "quiet", replicas=1, autoscaling={"mode": "Off"}, tuning={"mode": "Off"})
    server = driver.cluster.emulator
    assert server is not None
    deadline = time.monotonic() + 40
    try:
        while True:
            mark = len(server.calls)
            time.sleep(6.0)  # three scrape intervals
            window = server.calls[mark:]
            writes = [call for call in window if call[0] in ("create", "patch", "update", "delete")]
            if not writes:
                break
            assert time.monotonic() < deadline, f"the operator still writes to an idle cache: {writes}"
        assert [call for call in window if call[0] == "list"] == []
    finally:
        driver.delete("KVCache", "quiet")


def test_a_restart_requiring_change_rolls_one_engine_at_a_time(driver: LocalDriver) -> None:
    scenarios.rolling_update_waits_for_each_replica(driver, "rolling")


def _shard_map(driver: LocalDriver, name: str) -> ShardMap | None:
    connection = driver.get("ConfigMap", f"{name}-connection")
    return ShardMap.from_connection((connection or {}).get("data") or {})


def test_scale_out_joins_warm_and_scale_in_hands_off_with_proof_under_a_shard_map(
    driver: LocalDriver,
) -> None:
    """2 -> 3 replicas under a client following the shard map: the new pod is Ready only after its
    peers copied it the chains it owns; the connection contract then names it at a higher epoch;
    a client switching to that map finds every chain (those the new replica owns included), and
    a client still on the old map finds them too (a join copies, it does not move)."""
    name = "warmjoin"
    manifest = scenarios.create_ready(
        driver, name, replicas=2, autoscaling={"mode": "Off"}, tuning={"mode": "Off"}
    )
    config = scenarios.engine_config(manifest)
    token = scenarios.token(driver, name)
    before = driver.wait_for(
        lambda: (m := _shard_map(driver, name)) is not None and len(m.members) == 2 and m,
        30,
        "a 2-member shard map",
    )
    with (
        KVCacheClient(endpoints=before.urls(), token=token, config=config, strict=True) as old,
        KVCacheClient(endpoints=before.urls(), token=token, config=config, strict=True) as new,
    ):
        assert new.use_shard_map(before.epoch, before.members) and not new.use_shard_map(
            before.epoch, before.members
        )
        block = config.block_tokens
        chains = [request_tokens(ids, block) for ids in scenarios.working_set(600)]
        chains = [tokens[: len(tokens) // block * block] for tokens in chains if len(tokens) >= block]
        for tokens in chains:
            kv = torch.randn(2, config.num_layers, len(tokens), config.num_kv_heads, config.head_dim)
            assert new.put(tokens, kv.to(getattr(torch, config.dtype)), wait=True) > 0 or new.lookup(tokens)
        assert all(new.lookup(tokens) == len(tokens) for tokens in chains)

        driver.patch("KVCache", name, {"spec": {"replicas": 3}})
        after = driver.wait_for(
            lambda: (m := _shard_map(driver, name)) is not None and len(m.members) == 3 and m,
            90,
            "a 3-member shard map",
        )
        assert after.epoch > before.epoch
        joined = next(p for p in scenarios.engine_pods(driver, name) if p["metadata"]["name"] == f"{name}-2")
        gate = next(c for c in joined["status"]["conditions"] if c["type"] == WARM_GATE)
        assert gate["status"] == "True" and gate["reason"] == "Joined", gate
        assert new.use_shard_map(after.epoch, after.members)
        newcomer = next(m for m in after.members if m not in before.members)
        owned = [
            t
            for t in chains
            if node_id(
                rendezvous_owner(
                    route_key(new._core.hashes(new._core._geometry, t), config.route_depth), after.urls()
                )
            )
            == newcomer
        ]  # type: ignore[arg-type]
        assert owned, "no chain moved to the new replica: the test proves nothing"
        assert f"copied {0}" not in gate["message"], gate["message"]
        found_new = sum(new.lookup(tokens) == len(tokens) for tokens in chains)
        found_old = sum(old.lookup(tokens) == len(tokens) for tokens in chains)
        assert (found_new, found_old) == (len(chains), len(chains)), (
            f"after the join, {found_new}/{len(chains)} chains hit on the new map, {found_old} on the old; "
            f"{len(owned)} moved to {newcomer}"
        )
        stats = scenarios.http_json(f"http://{newcomer}/v1/stats", token)
        assert stats["used_blocks"] > 0

        # 3 -> 2 by the user (autoscaling Off): drained and verified before the pod goes
        driver.patch("KVCache", name, {"spec": {"replicas": 2}})
        shrunk = driver.wait_for(
            lambda: (m := _shard_map(driver, name)) is not None and len(m.members) == 2 and m,
            90,
            "a 2-member shard map",
        )
        assert shrunk.epoch > after.epoch and newcomer not in shrunk.members
        last = ((driver.get("KVCache", name) or {}).get("status") or {}).get("lastScale") or {}
        assert "spec.replicas 3 -> 2" in last.get("reason", "") and "(100%)" in last["reason"], last
        assert new.use_shard_map(shrunk.epoch, shrunk.members)
        assert all(new.lookup(tokens) == len(tokens) for tokens in chains)
    driver.delete("KVCache", name)
