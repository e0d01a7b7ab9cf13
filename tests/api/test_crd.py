"""The generated CRD: checked in without drift, structural, valid, and enforcing what the models enforce."""

from __future__ import annotations

from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kvcache_operator import api, crd
from kvcache_operator.cli import main
from tests.api import helpers as h

CRD_FILE = h.REPO / "crds" / "kvcache.dev_kvcaches.yaml"


def test_checked_in_crd_matches_the_models() -> None:
    assert CRD_FILE.read_text() == crd.render_crd(), "crds/kvcache.dev_kvcaches.yaml drifted: run `make crd`"


def test_crd_subcommand_prints_the_checked_in_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == CRD_FILE.read_text()


@pytest.mark.parametrize("version", h.KUBE_VERSIONS)
def test_crd_is_a_valid_customresourcedefinition(version: str) -> None:
    kubernetes_validate.validate(yaml.safe_load(CRD_FILE.read_text()), version, strict=True)


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out += _walk(node[key], f"{path}[{key}]")
    return out


def test_schema_is_structural() -> None:
    """The API server's structural-schema rules: every node typed (or preserve-unknown), no $ref,
    anyOf/oneOf/allOf, no additionalProperties next to properties, booleans for exclusive bounds."""
    for path, node in _walk(h.open_api()):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs", "title", "const"} & node.keys(), path
        assert not ("properties" in node and "additionalProperties" in node), path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, True), bool), path
        if node.get("type") == "object" and "properties" in node and path.count(".") > 1:
            assert node.get("description"), f"{path} has no description"


def test_schema_carries_defaults_enums_and_ranges() -> None:
    spec = h.open_api()["properties"]["spec"]["properties"]
    autoscaling = spec["autoscaling"]["properties"]
    assert autoscaling["mode"]["enum"] == ["Off", "DryRun", "Auto"]
    assert autoscaling["mode"]["default"] == "Off"
    assert spec["tuning"]["properties"]["mode"]["enum"] == ["Off", "DryRun", "Auto"]
    assert autoscaling["minReplicas"]["minimum"] == 1
    assert spec["cache"]["properties"]["maxTokens"]["default"] == 8192
    assert spec["cache"]["properties"]["cacheStrategy"]["enum"] == ["LRU", "LFU", "ADAPTIVE"]
    assert spec["backup"]["properties"]["keep"]["minimum"] == 1
    # object fields default to {} so the server materialises nested defaults before CEL runs
    assert spec["persistence"]["default"] == {}
    assert spec["model"]["nullable"] is True and "default" not in spec["model"]
    # spec.cache is the engine's own KVCacheConfig: same fields, camelCase
    assert set(spec["cache"]["properties"]) == {f.alias for f in api.KVCacheConfig.model_fields.values()}


def test_subresources_and_printer_columns() -> None:
    version = crd.build_crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert version["subresources"]["status"] == {}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names == [  # what the engines report, not what the spec asked
        "Phase",
        "Ready",
        "Replicas",
        "Restarts",
        "HitRate",
        "Pressure",
        "Codec",
        "Compression",
        "LastBackup",
        "Age",
    ]
    status = h.open_api()["properties"]["status"]
    for column in version["additionalPrinterColumns"][:-1]:  # every status column points at a schema field
        node = status
        for part in column["jsonPath"].split(".")[2:]:
            if node.get("x-kubernetes-preserve-unknown-fields"):
                break
            node = node["properties"][part]


def test_every_cel_rule_compiles() -> None:
    rules = h.cel_rules()
    field_rules = [r for _, r, _ in rules if r not in {c.cel for c in api.CROSS_FIELD_RULES}]
    assert len(rules) - len(field_rules) == len(api.CROSS_FIELD_RULES)
    assert len(field_rules) >= 15  # quantities, names, durations, schedules, paths, the metadata rule
    env = celpy.Environment()
    for _, rule, message in rules:
        env.program(env.compile(rule))
        env.program(env.compile(message))  # a messageExpression, or the message as a CEL string


def test_no_pattern_reaches_a_message_and_every_cel_string_is_bounded() -> None:
    """The API server quotes a schema ``pattern`` in its error: every pattern is a CEL rule with
    words instead. CEL's cost estimate needs a bound on every string a rule reads."""
    for path, node in _walk(h.open_api()):
        assert "pattern" not in node, path
        for entry in node.get("x-kubernetes-validations", []):
            if node.get("type") == "string":
                assert node.get("maxLength"), f"{path}: a CEL rule on a string without maxLength"
            assert "messageExpression" not in entry or "self" in entry["messageExpression"], path


def test_cel_rule_with_bad_syntax_does_not_compile() -> None:
    """The compile check above can fail: cel-python rejects malformed rules."""
    with pytest.raises(celpy.CELParseError):
        celpy.Environment().compile("self.minReplicas <=")


@pytest.mark.parametrize("sample", h.KVCACHE_SAMPLES)
def test_sample_is_accepted_by_schema_and_cel(sample: str) -> None:
    obj = h.load_sample(sample)
    assert h.server_errors(obj) == []
    api.parse_kvcache(obj)


def test_the_three_documented_samples_exist() -> None:
    assert {"minimal.yaml", "gpu-production.yaml", "cpu-only.yaml"} <= set(h.KVCACHE_SAMPLES)


# The corpus of wrong specs (tests/api/invalid) is checked through every path in test_admission.py.


def test_a_full_status_validates_against_the_status_schema() -> None:
    status = api.KVCacheStatus.model_validate(
        {
            "phase": "Ready",
            "conditions": [{"type": "Ready", "status": "True", "reason": "AllReplicasReady",
                            "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 3}],
            "observedGeneration": 3, "replicas": 2, "readyReplicas": 2, "selector": "a=b",
            "endpoints": ["http://10.0.0.1:8080"], "effectiveConfig": {"maxTokens": 65536, "codec": "int8"},
            "codec": "int8", "hitRate": 0.61, "memoryPressure": 0.4,
            "lastBackup": {"time": "2026-01-01T00:00:00Z", "succeeded": True, "job": "kvc-backup-1"},
            "lastScale": {"time": "2026-01-01T00:00:00Z", "fromReplicas": 1, "toReplicas": 2,
                          "reason": "pressure"},
            "decisions": [{"kind": "Tune", "mode": "Auto", "applied": True,
                           "action": "maxTokens 8192 -> 65536"}],
        }
    )  # fmt: skip
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    schema = crd.to_json_schema(h.open_api()["properties"]["status"])
    jsonschema.Draft202012Validator(schema).validate(dumped)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate({**dumped, "decisions": [{"kind": "Explode"}]})
