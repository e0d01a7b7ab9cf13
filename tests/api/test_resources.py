"""The manifest builders: valid Kubernetes objects for every sample and generated spec, and the
behaviour each child promises (sizing, restarts, backups, auth, the connection contract)."""

from __future__ import annotations

import base64
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_engine.contract import (
    SLOT_OVERHEAD_BYTES,
    KVCacheConfig,
    memory_request_bytes,
    pool_blocks,
    pool_bytes,
    staging_bytes,
    tier_bytes,
)
from kvcache_operator import api, resources
from kvcache_operator.cli import main
from tests.api import helpers as h


def children(spec: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """build_children of a tiny KVCache, keyed by ``Kind/name``."""
    built = resources.build_children(h.make_kvcache(spec), token="t0k3n", admin_token="4dm1n", **kwargs)
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in built}


def engine(spec: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    sts = children(spec, **kwargs)["StatefulSet/kvc"]
    container: dict[str, Any] = sts["spec"]["template"]["spec"]["containers"][0]
    return container


# --- every output is a valid Kubernetes object ------------------------------------------------------


@pytest.mark.parametrize("sample", h.KVCACHE_SAMPLES)
def test_every_child_of_every_sample_validates(sample: str) -> None:
    built = resources.build_children(h.load_sample(sample))
    assert built
    for manifest in built:
        h.kube_validate(manifest)


def test_gpu_production_sample_has_every_kind_of_child() -> None:
    kinds = sorted(c["kind"] for c in resources.build_children(h.load_sample("gpu-production.yaml")))
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Secret",
            "Secret",
            "Service",
            "Service",
            "StatefulSet",
            "PodDisruptionBudget",
            "PersistentVolumeClaim",
            "CronJob",
            "ServiceMonitor",
            "NetworkPolicy",
        ]
    )


def test_inference_deployment_sample_validates_and_mounts_the_connection() -> None:
    deployment = h.load_sample("inference-deployment.yaml")
    h.kube_validate(deployment)
    built = {
        f"{c['kind']}/{c['metadata']['name']}": c
        for c in resources.build_children(h.load_sample("gpu-production.yaml"))
    }
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert f"ConfigMap/{volumes['kvcache-connection']['configMap']['name']}" in built
    secret = volumes["kvcache-token"]["secret"]
    assert f"Secret/{secret['secretName']}" in built
    assert secret["items"][0]["key"] in built[f"Secret/{secret['secretName']}"]["data"]
    assert deployment["metadata"]["namespace"] == built["Secret/llama-8b-token"]["metadata"]["namespace"]


_valid_specs = st.fixed_dictionaries(
    {},
    optional={
        "replicas": st.integers(0, 5),
        "cache": st.fixed_dictionaries(
            {
                "maxTokens": st.integers(256, 2**20),
                "blockTokens": st.sampled_from([1, 16, 256]),
                "numLayers": st.integers(1, 32),
                "numKvHeads": st.integers(1, 16),
                "headDim": st.sampled_from([64, 128]),
                "useCompression": st.booleans(),
                "compressionRatio": st.floats(0.1, 1.0),
                "dtype": st.sampled_from(["float16", "bfloat16", "float32"]),
                "cpuTierTokens": st.integers(0, 2**20),
            }
        ),
        "resources": st.fixed_dictionaries(
            {"gpus": st.integers(0, 8)},
            optional={
                # a fixed memory must hold the pool (admission refuses less): sized apart below
                "memoryOverhead": st.sampled_from(["256Mi", "1500M"]),
                "cpuLimit": st.sampled_from(["2", "1"]),
            },
        ),
        "persistence": st.fixed_dictionaries(
            {
                "enabled": st.booleans(),
                "size": st.sampled_from(["1Gi", "500G"]),
                "whenScaled": st.sampled_from(["Retain", "Delete"]),
            },
            optional={"storageClassName": st.sampled_from(["fast", "standard"])},
        ),
        "model": st.fixed_dictionaries(
            {"claimName": st.sampled_from(["models", "llm.weights"])},
            optional={"path": st.sampled_from(["llama", "m/x.gguf"])},
        ),
        "scheduling": st.fixed_dictionaries(
            {
                "nodeSelector": st.dictionaries(
                    st.sampled_from(["gpu", "zone"]), st.sampled_from(["a", "b"])
                ),
                "tolerations": st.lists(
                    st.fixed_dictionaries({"key": st.just("gpu"), "operator": st.just("Exists")}), max_size=2
                ),
            },
            optional={"priorityClassName": st.just("high")},
        ),
        "auth": st.fixed_dictionaries(
            {}, optional={"existingSecret": st.just("tok"), "secretKey": st.just("k")}
        ),
        "metrics": st.fixed_dictionaries({"serviceMonitor": st.booleans()}),
        "networkPolicy": st.fixed_dictionaries(
            {"enabled": st.booleans()},
            optional={
                "clientNamespaceSelector": st.just({"team": "ml"}),
                "metricsNamespaceSelector": st.just({"name": "monitoring"}),
            },
        ),
    },
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_valid_specs, backup=st.booleans())
def test_generated_specs_build_valid_children(spec: dict[str, Any], backup: bool) -> None:
    if backup and spec.get("persistence", {}).get("enabled"):
        spec["backup"] = {"enabled": True, "keep": 3}
    for manifest in resources.build_children(h.make_kvcache(spec)):
        h.kube_validate(manifest)


def test_service_monitor_schema_rejects_a_wrong_field() -> None:
    """The embedded ServiceMonitor schema is a real check, not a formality."""
    monitor = children({"metrics": {"serviceMonitor": True}})["ServiceMonitor/kvc"]
    h.kube_validate(monitor)
    monitor["spec"]["endpoints"][0]["bearerTokenFile"] = "/var/run/secrets/token"
    with pytest.raises(jsonschema.ValidationError):
        h.kube_validate(monitor)


# --- memory sizing: the engine's own formula ---------------------------------------------------------

LLAMA_8B = {"numLayers": 32, "numKvHeads": 8, "headDim": 128, "dtype": "float16", "blockTokens": 16}


def test_llama_8b_int8_memory_request_matches_the_engine_pool() -> None:
    cache = {**LLAMA_8B, "maxTokens": 100_000, "useCompression": True, "compressionRatio": 0.5}
    config = KVCacheConfig.model_validate(cache)
    assert config.block_bytes_fp16() // config.block_tokens == 128 * 1024  # 128 KiB per token in fp16
    assert config.codec == "int8"
    expected = pool_bytes(config)
    # int8 stores 36/64 of the fp16 bytes (scales included): the fp16 budget of 100k tokens holds more blocks
    assert expected == pytest.approx(100_000 * 128 * 1024, rel=0.01)
    request = engine({"cache": cache, "resources": {"memoryOverhead": "1Gi"}})["resources"]["requests"][
        "memory"
    ]
    request_bytes = api.parse_quantity(request)
    expected += staging_bytes(api.ENGINE_STAGING_MB)  # the server's get buffers are host memory too
    # + the live envelope: int4 (a live change away) has ~3x the slots, each with 512 B bookkeeping
    envelope = pool_blocks(config.model_copy(update={"compression_codec": "int4"})) * SLOT_OVERHEAD_BYTES
    assert expected + 2**30 <= request_bytes <= expected + 2**30 + envelope + 2**20


def test_gpu_pool_is_not_host_memory_but_the_cpu_tier_is() -> None:
    cache = {**LLAMA_8B, "maxTokens": 100_000, "cpuTierTokens": 50_000}
    limits = engine({"cache": cache, "resources": {"gpus": 1, "memoryOverhead": "1Gi"}})["resources"][
        "limits"
    ]
    tier = KVCacheConfig.model_validate({**LLAMA_8B, "maxTokens": 50_000})
    host = pool_bytes(tier) + staging_bytes(api.ENGINE_STAGING_MB) + 2**30
    envelope = pool_blocks(tier.model_copy(update={"compression_codec": "int4"})) * SLOT_OVERHEAD_BYTES
    assert host <= api.parse_quantity(limits["memory"]) <= host + envelope + 2**20
    assert limits["nvidia.com/gpu"] == "1"


def test_memory_override_wins() -> None:
    resources_ = engine({"resources": {"memory": "3Gi"}})["resources"]
    assert resources_["requests"]["memory"] == resources_["limits"]["memory"] == "3072Mi"


# --- the StatefulSet ---------------------------------------------------------------------------------


def test_engine_container_command_probes_and_security() -> None:
    c = engine({"persistence": {"enabled": True}})
    assert c["command"] == [
        "kvcache-engine",
        "serve",
        "--config",
        "/etc/kvcache/config.yaml",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--token-file",
        "/var/run/kvcache/token/token",
        "--admin-token-file",
        "/var/run/kvcache/admin-token/token",
        "--staging-mb",
        "256",
    ]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["lifecycle"]["preStop"]["exec"]["command"][:4] == [
        "kvcache-engine",
        "persist",
        "--url",
        "http://127.0.0.1:8080",
    ]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_no_prestop_persist_without_persistence() -> None:
    assert "lifecycle" not in engine()


def test_persistence_claims_and_retention() -> None:
    spec = {
        "persistence": {"enabled": True, "size": "20Gi", "storageClassName": "ssd", "whenScaled": "Delete"}
    }
    sts = children(spec)["StatefulSet/kvc"]["spec"]
    assert sts["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Delete"}
    claim = sts["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert claim["spec"]["storageClassName"] == "ssd"
    config = yaml.safe_load(children(spec)["ConfigMap/kvc-config"]["data"]["config.yaml"])
    assert config["persistencePath"].startswith(resources.DATA_DIR)


def test_replicas_override_for_autoscaling() -> None:
    assert children({"replicas": 2}, replicas=5)["StatefulSet/kvc"]["spec"]["replicas"] == 5


def test_selector_string_selects_the_statefulset_pods() -> None:
    sts = children()["StatefulSet/kvc"]
    wanted = dict(pair.split("=") for pair in resources.selector_string("kvc").split(","))
    assert wanted == sts["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def _hash(spec: dict[str, Any], **kwargs: Any) -> str:
    sts = children(spec, **kwargs)["StatefulSet/kvc"]
    value: str = sts["spec"]["template"]["metadata"]["annotations"][resources.CONFIG_HASH_ANNOTATION]
    return value


@pytest.mark.parametrize(
    "live", [{"maxTokens": 4096}, {"compressionRatio": 0.3, "useCompression": True}, {"cacheStrategy": "LRU"}]
)
def test_live_fields_do_not_change_the_config_hash(live: dict[str, Any]) -> None:
    assert _hash({"cache": live}) == _hash({})


@pytest.mark.parametrize("restart", [{"numLayers": 16}, {"blockTokens": 32}, {"dtype": "bfloat16"}])
def test_restart_fields_change_the_config_hash(restart: dict[str, Any]) -> None:
    assert _hash({"cache": restart}) != _hash({})


def test_live_overrides_reach_the_configmap_but_not_the_hash() -> None:
    built = children(live_overrides={"max_tokens": 65536})
    assert yaml.safe_load(built["ConfigMap/kvc-config"]["data"]["config.yaml"])["maxTokens"] == 65536
    assert _hash({}, live_overrides={"max_tokens": 65536}) == _hash({})
    with pytest.raises(api.SpecError, match="num_layers"):
        children(live_overrides={"num_layers": 2})


def test_every_child_is_labelled_and_not_owned() -> None:
    for child in resources.build_children(h.load_sample("gpu-production.yaml")):
        meta = child["metadata"]
        assert meta["namespace"] == "inference"
        assert "ownerReferences" not in meta
        for key in ("name", "instance", "component", "managed-by", "part-of"):
            assert f"app.kubernetes.io/{key}" in meta["labels"], (child["kind"], key)


# --- auth -------------------------------------------------------------------------------------------


def test_generated_token_secret_is_create_only() -> None:
    secret = children()["Secret/kvc-token"]
    assert base64.b64decode(secret["data"]["token"]) == b"t0k3n"
    assert secret["metadata"]["annotations"][resources.CREATE_ONLY_ANNOTATION] == "true"
    random_tokens = {
        c["data"]["token"]
        for _ in range(2)
        for c in resources.build_children(h.make_kvcache())
        if c["kind"] == "Secret" and c["metadata"]["name"] == "kvc-token"
    }
    assert len(random_tokens) == 2 and all(len(base64.b64decode(t)) >= 32 for t in random_tokens)


def test_existing_secret_is_used_not_generated() -> None:
    built = children({"auth": {"existingSecret": "mine", "secretKey": "api"}})
    assert [k for k in built if k.startswith("Secret/")] == ["Secret/kvc-admin-token"]  # always ours
    volume = next(
        v for v in built["StatefulSet/kvc"]["spec"]["template"]["spec"]["volumes"] if v["name"] == "token"
    )
    assert volume["secret"]["secretName"] == "mine"
    assert volume["secret"]["items"] == [{"key": "api", "path": "token"}]


# --- backups ------------------------------------------------------------------------------------------

BACKUP_SPEC = {
    "persistence": {"enabled": True},
    "backup": {"enabled": True, "keep": 4, "schedule": "0 3 * * *"},
}


def test_backup_cronjob_backs_up_every_replica() -> None:
    built = children(BACKUP_SPEC, replicas=3)
    cron = built["CronJob/kvc-backup"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["schedule"] == "0 3 * * *"
    assert cron["startingDeadlineSeconds"] == 300
    assert cron["successfulJobsHistoryLimit"] == 3 and cron["failedJobsHistoryLimit"] == 3
    assert cron["jobTemplate"]["spec"]["backoffLimit"] == 2
    script = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"][2]
    calls = [line for line in script.splitlines() if line.startswith("kvcache-engine backup")]
    assert len(calls) == 3
    for i, call in enumerate(calls):
        assert f"--url http://kvc-{i}.kvc-headless.ns.svc:8080" in call
        assert f"--dest /backups/kvc-{i}" in call and "--keep 4" in call
    volumes = cron["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "backups", "persistentVolumeClaim": {"claimName": "kvc-backups"}} in volumes
    pvc = built["PersistentVolumeClaim/kvc-backups"]
    assert pvc["metadata"]["annotations"] == {resources.RETAIN_ANNOTATION: "true"}


def test_backup_pvc_deleted_with_the_cache_when_asked() -> None:
    spec = {**BACKUP_SPEC, "backup": {"enabled": True, "onDelete": "Delete", "claimName": "bk"}}
    assert "annotations" not in children(spec)["PersistentVolumeClaim/bk"]["metadata"]


def test_no_backup_children_when_disabled() -> None:
    assert not [k for k in children() if k.startswith(("CronJob/", "PersistentVolumeClaim/"))]


# --- the connection contract (issue 9) -------------------------------------------------------------------


def test_connection_configmap_describes_how_to_connect() -> None:
    spec = {
        "cache": {**LLAMA_8B, "namespace": "llama-3.1-8b", "useCompression": True, "compressionRatio": 0.3}
    }
    data = children(spec)["ConfigMap/kvc-connection"]["data"]
    info = json.loads(data["connection.json"])
    assert info == {
        "formatVersion": 1,
        "name": "kvc",
        "namespace": "ns",
        "url": "http://kvc.ns.svc:8080",
        "service": "kvc.ns.svc",
        "headlessService": "kvc-headless.ns.svc",
        "port": 8080,
        "tokenSecretName": "kvc-token",
        "tokenSecretKey": "token",
        "numLayers": 32,
        "numKvHeads": 8,
        "headDim": 128,
        "blockTokens": 16,
        "dtype": "float16",
        "codec": "int4",
        "cacheNamespace": "llama-3.1-8b",
        "routeDepth": 2,
    }
    assert data["url"] == info["url"] and data["blockTokens"] == "16"


def test_connection_changes_with_the_spec() -> None:
    before = children()["ConfigMap/kvc-connection"]["data"]
    after = children({"cache": {"blockTokens": 32}})["ConfigMap/kvc-connection"]["data"]
    assert (
        json.loads(after["connection.json"])["blockTokens"]
        == 32
        != json.loads(before["connection.json"])["blockTokens"]
    )


# --- the render subcommand ------------------------------------------------------------------------------


def test_render_prints_every_child(capsys: pytest.CaptureFixture[str]) -> None:
    sample = h.SAMPLES / "gpu-production.yaml"
    assert main(["render", "-f", str(sample)]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    placeholder = "generated-by-the-operator"
    assert docs == resources.build_children(h.load_yaml(sample), token=placeholder, admin_token=placeholder)


def test_render_rejects_other_kinds_naming_the_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert main(["render", "-f", str(bad)]) == 2
    assert "document 0 is not a KVCache" in capsys.readouterr().err


def test_render_reports_invalid_spec_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text(yaml.safe_dump(h.make_kvcache({"autoscaling": {"minReplicas": 0}})))
    assert main(["render", "-f", str(bad)]) == 2
    assert "spec.autoscaling.minReplicas" in capsys.readouterr().err


def test_strict_validation_catches_a_misspelt_field() -> None:
    """kube_validate is strict: an unknown field in a builder's output would fail the tests above."""
    sts = children()["StatefulSet/kvc"]
    sts["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(jsonschema.ValidationError, match="livenesProbe"):
        h.kube_validate(sts)


def test_memory_request_covers_what_a_real_engine_allocates() -> None:
    """A small real engine (CPU, int8): its pool is exactly pool_blocks x stored block bytes, and the
    pod's memory request (minus the overhead) covers it plus slot bookkeeping."""
    from kvcache_engine import KVCacheEngine

    cache = {"numLayers": 2, "numKvHeads": 2, "headDim": 16, "maxTokens": 1024, "useCompression": True,
             "compressionRatio": 0.5, "device": "cpu"}  # fmt: skip
    config = KVCacheConfig.model_validate(cache)
    eng = KVCacheEngine(config, load_on_start=False)
    try:
        allocated = eng.get_stats()["pool_bytes"]
    finally:
        eng.close()
    assert allocated == pool_blocks(config) * config.block_bytes_stored()
    spec = api.parse_spec({"cache": cache, "resources": {"memoryOverhead": "0"}})
    request = api.memory_request_bytes(spec)
    exact = pool_bytes(config) + staging_bytes(api.ENGINE_STAGING_MB)
    # The request covers the live envelope (every codec: compression changes live), which adds
    # only the slot bookkeeping of the codec with the most slots.
    assert allocated <= exact <= request < exact + pool_blocks(config) * 4 * SLOT_OVERHEAD_BYTES


# --- the commands the pods run parse with the engine's own CLI -------------------------------------------


def _engine_parse(argv: list[str]) -> Any:
    from kvcache_engine.cli import build_parser

    assert argv[0] == "kvcache-engine"
    return build_parser().parse_args(argv[1:])


def test_pod_commands_parse_with_the_engine_cli() -> None:
    built = children(BACKUP_SPEC, replicas=2)
    pod = built["StatefulSet/kvc"]["spec"]["template"]["spec"]
    serve = _engine_parse(pod["containers"][0]["command"])
    assert (serve.command, serve.config, serve.port, serve.token_file) == (
        "serve", resources.CONFIG_FILE, 8080, resources.TOKEN_FILE)  # fmt: skip
    assert serve.staging_mb == api.ENGINE_STAGING_MB
    persist = _engine_parse(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
    assert (persist.command, persist.url) == ("persist", "http://127.0.0.1:8080")
    job = built["CronJob/kvc-backup"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = job["containers"][0]["command"][2]
    calls = [shlex.split(line.removesuffix(" || rc=1")) for line in script.splitlines() if "backup" in line]
    parsed = [_engine_parse(call) for call in calls]
    assert [(p.command, p.dest, p.keep) for p in parsed] == [
        ("backup", "/backups/kvc-0", 4),
        ("backup", "/backups/kvc-1", 4),
    ]


@pytest.mark.parametrize(
    "spec",
    [
        {"cache": {"maxTokens": 65536}, "resources": {"memoryOverhead": "64Mi"}},
        {"cache": {"maxTokens": 65536, "cpuTierTokens": 8192}, "resources": {"gpus": 1}},
    ],
    ids=["host-pool", "gpu-pool-with-cpu-tier"],
)
def test_memory_request_covers_pool_staging_and_overhead_of_the_rendered_serve_args(
    spec: dict[str, Any],
) -> None:
    """The serve args the StatefulSet runs, parsed by the engine's own CLI, and the memory request
    agree: request = host pool (or CPU tier) + staging (the parsed --staging-mb) + overhead."""
    container = engine(spec)
    serve = _engine_parse(container["command"])
    parsed = api.parse_spec(spec)
    cache = parsed.cache
    host_pool = tier_bytes(cache) if api.pool_on_gpu(parsed) else pool_bytes(cache)
    overhead = int(api.parse_quantity(parsed.resources.memory_overhead))
    runs_now = host_pool + staging_bytes(serve.staging_mb) + overhead
    envelope = memory_request_bytes(
        cache,
        pool_on_gpu=api.pool_on_gpu(parsed),
        overhead_bytes=overhead,
        staging_mb=serve.staging_mb,
        max_tokens_ceiling=api.max_tokens_ceiling(parsed),
    )
    for kind in ("requests", "limits"):
        memory = api.parse_quantity(container["resources"][kind]["memory"])
        assert runs_now <= envelope <= memory < envelope + 2**20, (kind, memory, envelope)
    assert serve.staging_mb > 0  # the server keeps buffers: the request must count them


# --- token roles (issue 16) ----------------------------------------------------------------------------


def test_admin_token_is_its_own_create_only_secret_held_by_engines_and_backups_only() -> None:
    built = children({"persistence": {"enabled": True}, "backup": {"enabled": True, "schedule": "0 * * * *"}})
    admin = built["Secret/kvc-admin-token"]
    assert base64.b64decode(admin["data"]["token"]) == b"4dm1n"
    assert admin["metadata"]["annotations"][resources.CREATE_ONLY_ANNOTATION] == "true"
    pod = built["StatefulSet/kvc"]["spec"]["template"]["spec"]
    names = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert names == {"token": "kvc-token", "admin-token": "kvc-admin-token"}
    engine_c = pod["containers"][0]
    assert engine_c["lifecycle"]["preStop"]["exec"]["command"][-1] == resources.ADMIN_TOKEN_FILE
    job = built["CronJob/kvc-backup"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    job_secrets = {v["secret"]["secretName"] for v in job["volumes"] if "secret" in v}
    assert job_secrets == {"kvc-admin-token"}  # the backup Job never holds the data token


def test_the_connection_contract_names_the_data_token_only() -> None:
    data = children()["ConfigMap/kvc-connection"]["data"]
    assert data["tokenSecretName"] == "kvc-token"
    assert "admin" not in data["connection.json"]
    assert not [v for v in data.values() if "admin" in v]


def test_metrics_auth_is_wired_from_the_spec() -> None:
    assert "--auth-metrics" not in engine()["command"]
    assert "--auth-metrics" in engine({"metrics": {"auth": True}})["command"]
