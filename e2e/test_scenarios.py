"""Every end-to-end scenario of issue 7, on the target E2E_TARGET names (local cluster by default)."""

from __future__ import annotations

import pytest

from e2e import scenarios
from e2e.scenarios import Driver

pytestmark = pytest.mark.timeout(600)


def test_apply_ready_load_hit_rate_and_delete(driver: Driver) -> None:
    manifest = scenarios.create_ready(
        driver, "basic", replicas=2, autoscaling={"mode": "Off"}, tuning={"mode": "Off"}
    )
    scenarios.hit_rate_matches_engine_counters(driver, "basic", manifest)
    scenarios.delete_cleans_up(driver, "basic", data_pvcs_kept=False, backup_pvc_kept=True, replicas=2)
    driver.delete("PersistentVolumeClaim", "basic-backups")


def test_sustained_pressure_scales_out_and_reshards(driver: Driver) -> None:
    scenarios.scale_out_on_pressure(driver, "pressure")
    driver.delete("PersistentVolumeClaim", "pressure-backups")


def test_tuning_enables_compression_live_without_restart(driver: Driver) -> None:
    scenarios.tuning_enables_compression_live(driver, "tuned")
    driver.delete("PersistentVolumeClaim", "tuned-backups")


def test_kill_9_engine_restarts_and_reloads_its_cache(driver: Driver) -> None:
    scenarios.kill_9_reloads_from_pvc(driver, "crashy")
    driver.delete("PersistentVolumeClaim", "crashy-backups")


def test_backup_cronjob_then_restore_into_a_fresh_kvcache(driver: Driver) -> None:
    scenarios.backup_and_restore(driver, "safe")


def test_invalid_manifest_is_rejected_naming_the_field(driver: Driver) -> None:
    scenarios.invalid_manifest_rejected(driver, "broken")
