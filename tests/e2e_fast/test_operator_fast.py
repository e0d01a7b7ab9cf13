"""The fast end-to-end subset (``make test``): the real operator and real engine processes on the
local cluster. The same scenario code runs in ``make e2e`` (e2e/test_scenarios.py) and on kind."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from e2e import scenarios
from e2e.localcluster.cluster import LocalCluster
from e2e.localcluster.driver import LocalDriver

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
