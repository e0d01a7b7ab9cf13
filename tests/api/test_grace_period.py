"""terminationGracePeriodSeconds is sized from the data: with persistence on, at least what a final
persist of a full cache needs at contract.PERSIST_BYTES_PER_S (plus a margin); never below the spec."""

from __future__ import annotations

from typing import Any

from kvcache_engine.contract import persist_grace_seconds, pool_bytes, tier_bytes
from kvcache_operator import api, resources
from tests.api import helpers as h


def _grace_and_bytes(spec: dict[str, Any]) -> tuple[int, int]:
    kvc = api.parse_kvcache(h.make_kvcache(spec))
    config = resources.engine_config(kvc, None)
    sts = next(c for c in resources.build_children(kvc, token="t") if c["kind"] == "StatefulSet")
    h.kube_validate(sts)
    return int(sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]), pool_bytes(
        config
    ) + tier_bytes(config)


def test_a_large_persisted_cache_gets_the_time_to_persist() -> None:
    grace, size = _grace_and_bytes({"persistence": {"enabled": True}, "cache": {"maxTokens": 4_000_000}})
    assert size > 20 * 2**30  # tens of GiB: more than 120 s at 100 MiB/s
    assert grace == persist_grace_seconds(size) > 120
    assert persist_grace_seconds(size) == 30 + 10 + -(-size // (100 * 2**20))  # margin, hand-off, write


def test_small_or_unpersisted_caches_keep_the_spec() -> None:
    assert _grace_and_bytes({"persistence": {"enabled": True}})[0] == 120
    big_no_persist = {"persistence": {"enabled": False}, "cache": {"maxTokens": 4_000_000}}
    assert _grace_and_bytes(big_no_persist)[0] == 120
    assert (
        _grace_and_bytes({"terminationGracePeriodSeconds": 900, "persistence": {"enabled": True}})[0] == 900
    )
