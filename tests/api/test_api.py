"""parse_kvcache and the models: defaults, aliases, field-named errors, CEL and Python agreeing."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_operator import api
from tests.api import helpers as h


def test_defaults_of_a_minimal_kvcache() -> None:
    kvc = api.parse_kvcache(h.load_sample("minimal.yaml"))
    assert kvc.name == "minimal" and kvc.namespace == "default"
    assert kvc.spec.replicas == 1
    assert kvc.spec.autoscaling.mode is api.Mode.OFF
    assert kvc.spec.tuning.mode is api.Mode.OFF
    assert kvc.spec.cache == api.KVCacheConfig()


def test_camel_case_manifest_fields_reach_snake_case_attributes() -> None:
    kvc = api.parse_kvcache(h.load_sample("gpu-production.yaml"))
    assert kvc.spec.cache.max_tokens == 262144
    assert kvc.spec.autoscaling.scale_down_stabilization_seconds == 600
    assert kvc.spec.persistence.when_scaled is api.Retention.DELETE
    assert kvc.spec.autoscaling.model_dump(by_alias=True)["minReplicas"] == 2


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"autoscaling": {"minReplicas": "two"}},
            'spec.autoscaling.minReplicas: "two" is not an integer; write a whole number without quotes',
        ),
        (
            {"autoscaling": {"mode": "On"}},
            "spec.autoscaling.mode: \"On\" is not one of 'Off', 'DryRun' or 'Auto'",
        ),
        (
            {"cache": {"cacheStrategy": "MRU"}},
            'spec.cache.cacheStrategy: "MRU" is not one of LRU, LFU, ADAPTIVE',
        ),
        # the engine's loader takes "lru"; a manifest takes the CRD's enum exactly, as the API server does
        (
            {"cache": {"cacheStrategy": "lru"}},
            'spec.cache.cacheStrategy: "lru" is not one of LRU, LFU, ADAPTIVE',
        ),
        ({"cache": {"dtype": "fp16"}}, 'spec.cache.dtype: "fp16" is not one of float16, bfloat16, float32'),
        (
            {"tuning": {"compressionRatioMin": 0.9, "compressionRatioMax": 0.5}},
            "spec.tuning.compressionRatioMin must be less than",
        ),
    ],
)
def test_errors_name_the_field_path(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(api.SpecError) as info:
        api.parse_kvcache(h.make_kvcache(spec))
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", [None, "Upper", "a_b", "-x"])
def test_metadata_name_must_be_a_dns_label(name: str | None) -> None:
    with pytest.raises(api.SpecError, match=r"metadata\.name"):
        api.parse_kvcache({"kind": "KVCache", "metadata": {"name": name}, "spec": {}})


def test_status_is_ignored_on_parse_and_models_the_printer_fields() -> None:
    obj = {**h.make_kvcache(), "status": {"phase": "Nonsense"}}
    assert api.parse_kvcache(obj).status is None
    status = api.KVCacheStatus.model_validate(
        {
            "phase": "Ready",
            "hitRate": 0.7,
            "lastBackup": {"time": "2026-01-01T00:00:00Z", "succeeded": True},
            "decisions": [{"kind": "Scale", "mode": "DryRun", "action": "replicas 2 -> 3"}],
        }
    )
    assert status.phase is api.Phase.READY and status.decisions[0].applied is False


# parse_quantity: Kubernetes' grammar and the kubernetes client's values, in test_admission.py


# --- the CEL rules in the CRD and the Python rules agree ---------------------------------------------

_specs = st.fixed_dictionaries(
    {},
    optional={
        "replicas": st.integers(0, 12),
        "autoscaling": st.fixed_dictionaries(
            {
                "mode": st.sampled_from(["Off", "DryRun", "Auto"]),
                "minReplicas": st.integers(1, 8),
                "maxReplicas": st.integers(1, 8),
            }
        ),
        "tuning": st.fixed_dictionaries(
            {
                "mode": st.sampled_from(["Off", "Auto"]),
                "maxTokensMin": st.sampled_from([1024, 8192, 65536]),
                "maxTokensMax": st.sampled_from([4096, 16384, 1048576]),
                "compressionRatioMin": st.sampled_from([0.1, 0.5, 0.9]),
                "compressionRatioMax": st.sampled_from([0.3, 1.0]),
            }
        ),
        "cache": st.fixed_dictionaries(
            {
                "maxTokens": st.sampled_from([16, 2048, 8192, 100000]),
                "blockTokens": st.sampled_from([16, 64]),
                "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1"]),
            }
        ),
        "persistence": st.fixed_dictionaries({"enabled": st.booleans()}),
        "backup": st.fixed_dictionaries({"enabled": st.booleans()}),
        "resources": st.fixed_dictionaries({"gpus": st.integers(0, 2)}),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_specs)
def test_api_server_and_operator_accept_the_same_specs(spec: dict[str, Any]) -> None:
    obj = h.make_kvcache(spec)
    server = h.server_errors(obj)
    try:
        api.parse_kvcache(obj)
        operator: list[str] = []
    except api.SpecError as exc:
        operator = str(exc).splitlines()
    assert bool(server) == bool(operator), (server, operator)
