"""contract.live: which fields are live, parse/diff/apply/over, camelCase <-> snake_case in one place."""

from __future__ import annotations

import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcache_engine.contract import (
    LIVE_FIELDS,
    TUNED_FIELDS,
    CacheStrategy,
    ConfigError,
    KVCacheConfig,
    LiveConfig,
)


def test_live_fields_are_config_fields_with_the_same_types() -> None:
    assert set(LiveConfig.model_fields) == LIVE_FIELDS
    assert set(TUNED_FIELDS) <= LIVE_FIELDS
    for name in LIVE_FIELDS:
        config_type = KVCacheConfig.model_fields[name].annotation
        live_type = LiveConfig.model_fields[name].annotation
        assert live_type == config_type | None, name  # type: ignore[operator]
        assert LiveConfig.model_fields[name].alias == KVCacheConfig.model_fields[name].alias


def test_parse_takes_either_case_and_names_what_is_wrong() -> None:
    live = LiveConfig.parse({"maxTokens": 4096, "cache_strategy": "lru"})
    assert live.given() == {"max_tokens": 4096, "cache_strategy": CacheStrategy.LRU}
    assert live.to_wire() == {"maxTokens": 4096, "cacheStrategy": "LRU"}
    with pytest.raises(ConfigError, match=r"body\.numLayers: cannot change live \(needs a restart\)"):
        LiveConfig.parse({"numLayers": 2}, "body")
    with pytest.raises(ConfigError, match=r"unknown config field 'maxTokenz'"):
        LiveConfig.parse({"maxTokenz": 2})
    with pytest.raises(ConfigError, match=r"body\.max_tokens"):
        LiveConfig.parse({"maxTokens": "lots"}, "body")


def test_diff_keeps_only_what_differs_and_over_overlays() -> None:
    running = LiveConfig.of(KVCacheConfig(max_tokens=8192))
    desired = LiveConfig.parse({"maxTokens": 8192, "prefetchSize": 32})
    assert desired.diff(running).given() == {"prefetch_size": 32}
    assert not LiveConfig.of(KVCacheConfig()).diff(LiveConfig.of(KVCacheConfig()))
    tuned = LiveConfig(max_tokens=1024)
    assert tuned.over(desired).given() == {"max_tokens": 1024, "prefetch_size": 32}


def test_apply_validates_ranges_and_names_the_field() -> None:
    config = KVCacheConfig(max_tokens=8192)
    assert LiveConfig(max_tokens=16384).apply(config).max_tokens == 16384
    with pytest.raises(ConfigError, match="gc_threshold"):
        LiveConfig(gc_threshold=1.5).apply(config)


_VALUES: dict[str, st.SearchStrategy[typing.Any]] = {
    "max_tokens": st.integers(16, 2**20),
    "cache_strategy": st.sampled_from(list(CacheStrategy)),
    "use_compression": st.booleans(),
    "compression_ratio": st.floats(0.1, 1.0),
    "prefetch_size": st.integers(1, 4096),
    "gc_threshold": st.floats(0.01, 1.0),
}


@given(
    st.dictionaries(st.sampled_from(sorted(_VALUES)), st.none()).flatmap(
        lambda keys: st.fixed_dictionaries({k: _VALUES[k] for k in keys})
    )
)
def test_wire_round_trip_and_apply_then_read_back(values: dict[str, typing.Any]) -> None:
    live = LiveConfig.model_validate(values)
    assert LiveConfig.parse(live.to_wire()) == live
    applied = live.apply(KVCacheConfig())
    assert not live.diff(LiveConfig.of(applied))  # what was applied is what the config now runs
