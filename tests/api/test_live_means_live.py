"""Live means live: live fields (a user's edit or the tuner's) never change the pod template; fields
that do nothing or that the operator sets are refused, by the operator and by the API server alike."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_engine.contract import LiveConfig
from kvcache_operator import api, resources
from tests.api import helpers as h

BOUNDS = {"mode": "Auto", "maxTokensMin": 1024, "maxTokensMax": 1 << 20}
BASE: dict[str, Any] = {
    "cache": {"numLayers": 4, "numKvHeads": 2, "headDim": 64, "maxTokens": 8192},
    "tuning": BOUNDS,
    "persistence": {"enabled": True},
}


def template(spec: dict[str, Any], tuned: LiveConfig | None = None) -> dict[str, Any]:
    built = resources.build_children(h.make_kvcache(spec), token="t", live_overrides=tuned)
    sts = next(c for c in built if c["kind"] == "StatefulSet")
    return dict(sts["spec"]["template"])


live_values = st.fixed_dictionaries(
    {},
    optional={
        "maxTokens": st.integers(BOUNDS["maxTokensMin"], BOUNDS["maxTokensMax"]),
        "cacheStrategy": st.sampled_from(["LRU", "LFU", "ADAPTIVE"]),
        "useCompression": st.booleans(),
        "compressionRatio": st.floats(0.25, 1.0),
        "compressionCodec": st.sampled_from(["auto", "none", "fp8", "int8", "int4"]),
        "enablePrefetch": st.booleans(),
        "prefetchSize": st.integers(1, 64),
        "enableGc": st.booleans(),
        "gcThreshold": st.floats(0.05, 1.0),
        "logLevel": st.sampled_from(["DEBUG", "INFO", "WARNING", "ERROR"]),
        "persistIntervalS": st.floats(0, 3600),
        "enableProfiling": st.booleans(),
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edit=live_values, tuned=live_values)
def test_specs_that_differ_only_in_live_fields_render_identical_pod_templates(
    edit: dict[str, Any], tuned: dict[str, Any]
) -> None:
    edited = {**BASE, "cache": {**BASE["cache"], **edit}}
    tuner = LiveConfig.parse({k: v for k, v in tuned.items() if k in ("maxTokens", "useCompression")})
    assert template(edited) == template(BASE)
    assert template(edited, tuner) == template(BASE)


def test_config_map_carries_the_live_change_and_the_template_does_not() -> None:
    edited = {**BASE, "cache": {**BASE["cache"], "maxTokens": 65536}}
    built = {
        c["kind"] + "/" + c["metadata"]["name"]: c for c in resources.build_children(h.make_kvcache(edited))
    }
    assert "maxTokens: 65536" in built["ConfigMap/kvc-config"]["data"]["config.yaml"]
    assert template(edited) == template(BASE)


def test_with_tuning_off_max_tokens_sizes_the_pod_and_compression_stays_live() -> None:
    off = {**BASE, "tuning": {"mode": "Off"}}
    compressed = {**off, "cache": {**off["cache"], "useCompression": True, "compressionRatio": 0.25}}
    assert template(compressed) == template(off)
    bigger = {**off, "cache": {**off["cache"], "maxTokens": 16384}}
    # a restart (the memory request grows): the operator reports RestartPending until pods roll
    assert template(bigger) != template(off)


def test_a_non_live_field_changes_the_template() -> None:
    other = {**BASE, "cache": {**BASE["cache"], "numLayers": 8}}
    assert template(other) != template(BASE)


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ({"persistencePath": "/data"}, "spec.cache.persistencePath is set by the operator"),
        ({"modelPath": "/m"}, "spec.cache.modelPath is set by the operator"),
        ({"memoryPoolSize": 1 << 30}, "spec.cache.memoryPoolSize is not used by the operator"),
    ],
)
def test_fields_the_operator_sets_are_refused_by_both(cache: dict[str, Any], message: str) -> None:
    obj = h.make_kvcache({"cache": cache})
    with pytest.raises(api.SpecError, match=message):
        api.parse_kvcache(obj)
    assert any(message in err for err in h.server_errors(obj))


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ({"enableDistributed": True}, "one engine is one process"),
        ({"enableMemoryPool": False}, "always preallocates its block pool"),
    ],
)
def test_fields_that_would_do_nothing_are_refused_by_both(cache: dict[str, Any], message: str) -> None:
    obj = h.make_kvcache({"cache": cache})
    with pytest.raises(api.SpecError, match=message):
        api.parse_kvcache(obj)
    assert h.server_errors(obj)  # the schema allows only the value that runs


def test_values_the_engines_adjust_are_warned_with_what_runs() -> None:
    spec = api.parse_spec({"cache": {"useCompression": True, "compressionRatio": 0.2}})
    [warning] = api.spec_warnings(spec)
    assert warning.startswith("spec.cache.compressionRatio 0.2 is below what int4 stores")
    assert "0.3" in warning
    assert (
        api.spec_warnings(api.parse_spec({"cache": {"useCompression": True, "compressionRatio": 0.5}})) == []
    )
