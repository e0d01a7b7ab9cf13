"""The scale-in hand-off's proof: /admin/drain reports the blocks the leaving replica held, the
distinct blocks handed off, and the blocks each target decoded and checksum-verified (its restore
answer); a target that failed proves nothing and the hand-off counts 0."""

from __future__ import annotations

from tests.service.conftest import http_json
from tests.service.test_backup_drain import _fill


def test_drain_reports_held_handed_off_and_verified(live_server) -> None:
    source = live_server()
    targets = [live_server(), live_server()]
    _fill(source.url, source.engine.config, range(20))
    status, report = http_json("POST", source.url + "/admin/drain", {"targets": [t.url for t in targets]})
    assert status == 200 and report["ok"] is True
    assert report["held_blocks"] == report["handed_off_blocks"] == report["verified_blocks"] == 80
    assert sum(r["verified"] for r in report["targets"].values()) == 80
    assert all(r["verified"] > 0 for r in report["targets"].values())  # both own some chains


def test_a_failed_target_proves_nothing(live_server) -> None:
    source = live_server()
    good = live_server()
    _fill(source.url, source.engine.config, range(20))
    body = {"targets": [good.url, "http://127.0.0.1:9"]}
    status, report = http_json("POST", source.url + "/admin/drain", body)
    assert status == 200 and report["ok"] is False and report["held_blocks"] == 80
    assert report["handed_off_blocks"] == 0
    assert 0 < report["targets"][good.url]["verified"] < 80
    assert report["targets"]["http://127.0.0.1:9"]["verified"] == 0
