"""The Helm chart, exercised with the real helm binary: lint, render, schema, Kubernetes validation."""

from __future__ import annotations

import json
import re
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

import kvcache_operator
from kvcache_operator import api
from kvcache_operator.metrics import OperatorMetrics

from .conftest import CHART, CI_VALUES, NAMESPACE, ROOT, Render, by_kind, run_helm, values_args

VALUE_SETS: list[Path | None] = [None, *CI_VALUES]
VALUE_IDS = ["defaults", *(p.name.removesuffix("-values.yaml") for p in CI_VALUES)]
K8S_VERSIONS = ("1.29", "1.35")

# Kinds kubernetes-validate has no schema for, and how each one is checked instead.
PEERING_KINDS = {"KopfPeering", "ClusterKopfPeering"}  # against the CRD the chart renders for them
PROMETHEUS_KINDS = {"ServiceMonitor", "PodMonitor"}  # metadata strictly, spec against PROM_SPEC below

# prometheus-operator's monitoring.coreos.com/v1 schema, restricted to the fields this chart sets
# (types and patterns from its API reference). The upstream CRD is not vendored here, so
# fields the chart does not use are rejected rather than checked: honest, but partial.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
}
_NS_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {
            "type": "array",
            "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
        },
        "targetLabel": {"type": "string"},
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "relabelings": {"type": "array", "items": _RELABEL},
    },
}
PROM_SPEC = {
    "ServiceMonitor": {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": _NS_SELECTOR,
            "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        },
    },
    "PodMonitor": {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "podMetricsEndpoints"],
        "properties": {
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": _NS_SELECTOR,
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
        },
    },
}

# Metric names of the engine contract (CONTRACTS: "Prometheus metric names") and the operator's.
ENGINE_METRICS = {
    "kvcache_hits_total",
    "kvcache_misses_total",
    "kvcache_hit_tokens_total",
    "kvcache_requested_tokens_total",
    "kvcache_requests_total",
    "kvcache_evictions_total",
    "kvcache_bytes_in_total",
    "kvcache_bytes_out_total",
    "kvcache_persist_failures_total",
    "kvcache_capacity_blocks",
    "kvcache_used_blocks",
    "kvcache_memory_pressure",
    "kvcache_compression_ratio",
    "kvcache_max_tokens",
    "kvcache_device_memory_bytes",
    "kvcache_op_latency_ms_bucket",
    "kvcache_op_latency_ms_sum",
    "kvcache_op_latency_ms_count",
}


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_helm_lint_strict(tools: dict[str, str], values: Path | None) -> None:
    proc = run_helm(
        tools["helm"], "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *values_args(values, None)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def test_at_least_four_values_files_cover_the_modes() -> None:
    names = {p.name for p in CI_VALUES}
    assert {
        "namespaced-values.yaml",
        "ha-values.yaml",
        "monitoring-values.yaml",
        "custom-image-values.yaml",
    } <= names


def validate_custom(doc: dict[str, Any], docs: list[dict[str, Any]], version: str) -> None:
    """Custom resources: what can be checked without their upstream CRDs."""
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}, version, strict=True
    )
    if doc["kind"] in PEERING_KINDS:
        crd = next(
            c for c in by_kind(docs, "CustomResourceDefinition") if c["spec"]["names"]["kind"] == doc["kind"]
        )
        jsonschema.validate(doc, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    else:
        jsonschema.validate(doc["spec"], PROM_SPEC[doc["kind"]])


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_every_rendered_document_validates(render: Render, values: Path | None) -> None:
    docs = render(values)
    assert docs
    for version in K8S_VERSIONS:
        for doc in docs:
            where = f"{doc['kind']}/{doc['metadata']['name']} on {version}"
            if doc["kind"] in PEERING_KINDS | PROMETHEUS_KINDS:
                validate_custom(doc, docs, version)
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the message is the point
                pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_validation_rejects_a_broken_manifest() -> None:
    """The validator used above is strict: an unknown field and a wrong type are errors."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {"containers": []}}, "replicaz": 1},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.35", strict=True)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"selector": {}, "endpoints": [{"port": 8080}]}, PROM_SPEC["ServiceMonitor"])


BAD_VALUES: list[tuple[str, list[str], str]] = [
    ("log level enum", ["--set", "logLevel=verbose"], "logLevel"),
    ("pull policy enum", ["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    ("ha replicas minimum", ["--set", "ha.replicas=1"], "replicas"),
    ("port maximum", ["--set", "ports.metrics=70000"], "metrics"),
    ("port minimum", ["--set", "ports.health=0"], "health"),
    ("namespace pattern", ["--set", "watchNamespaces[0]=Bad_NS"], "watchNamespaces"),
    ("unknown key", ["--set", "replicaCount=3"], "replicaCount"),
    ("service type enum", ["--set", "metrics.service.type=LoadBalancer"], "type"),
    ("duration pattern", ["--set", "metrics.serviceMonitor.interval=soon"], "interval"),
    ("boolean type", ["--set-string", "crds.install=yes"], "install"),
    ("quantity pattern", ["--set", "resources.requests.memory=lots"], "memory"),
    ("empty api server ports", ["--set-json", "networkPolicy.apiServerPorts=[]"], "apiServerPorts"),
    ("empty repository", ["--set", "image.repository="], "repository"),
]


@pytest.mark.parametrize(("case", "args", "field"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_schema_rejects_bad_values(tools: dict[str, str], case: str, args: list[str], field: str) -> None:
    proc = run_helm(tools["helm"], "template", "kvc", str(CHART), *args)
    assert proc.returncode != 0, f"{case}: helm template accepted {args}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert field in proc.stderr, proc.stderr


def test_lint_rejects_bad_values_too(tools: dict[str, str]) -> None:
    proc = run_helm(tools["helm"], "lint", "--strict", str(CHART), "--set", "ha.replicas=0")
    assert proc.returncode != 0
    assert "replicas" in proc.stdout + proc.stderr


def test_every_value_is_typed_in_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        assert "type" in node or "oneOf" in node or "anyOf" in node, f"{path} has no type"
        if isinstance(value, dict) and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} missing from the schema"
                walk(child, node["properties"][key], f"{path}.{key}")

    walk(defaults, schema, "values")


def test_chart_versions_follow_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"] == kvcache_operator.__version__
    assert chart["version"] == project["version"]


def test_chart_crd_is_the_generated_crd(render: Render) -> None:
    source = ROOT / "crds" / "kvcache.dev_kvcaches.yaml"
    copy = CHART / "files" / "crds" / "kvcache.dev_kvcaches.yaml"
    assert source.is_file(), "crds/kvcache.dev_kvcaches.yaml is missing (make crd)"
    assert copy.read_bytes() == source.read_bytes(), "chart copy differs from crds/: run make crd"
    expected = yaml.safe_load(source.read_text())
    rendered = [
        c for c in by_kind(render(), "CustomResourceDefinition") if c["spec"]["group"] == "kvcache.dev"
    ]
    assert len(rendered) == 1
    crd = rendered[0]
    # The chart adds exactly one thing: keep the CRD (and so every KVCache) on helm uninstall.
    annotations = crd["metadata"].pop("annotations")
    assert annotations.pop("helm.sh/resource-policy") == "keep"
    assert annotations == expected["metadata"].get("annotations", {})
    expected["metadata"].pop("annotations", None)
    assert crd == expected


def test_crd_can_be_left_out(render: Render) -> None:
    docs = render(None, {"crds.install": "false"})
    assert not by_kind(docs, "CustomResourceDefinition")


def deployment_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = by_kind(docs, "Deployment")
    return deployment


def test_default_deployment_is_one_replica_recreate(render: Render) -> None:
    deployment = deployment_of(render())
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--standalone" in container["args"] and "--all-namespaces" in container["args"]
    assert container["image"] == f"ghcr.io/kvcache-operator/kvcache-operator:{kvcache_operator.__version__}"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"]
    assert security["capabilities"] == {"drop": ["ALL"]} and not security["allowPrivilegeEscalation"]


def test_ha_runs_two_peered_replicas(render: Render) -> None:
    docs = render(CHART / "ci" / "ha-values.yaml")
    deployment = deployment_of(docs)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--peering=kvcache-ha" in args and "--standalone" not in args
    assert "--verbose" in args  # logLevel: debug
    (peering,) = by_kind(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "kvcache-ha"


def test_namespaced_mode_watches_only_its_namespaces(render: Render) -> None:
    docs = render(CHART / "ci" / "ha-namespaced-values.yaml")
    args = deployment_of(docs)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=inference" in args and "--all-namespaces" not in args
    assert [p["metadata"]["namespace"] for p in by_kind(docs, "KopfPeering")] == ["inference"]


def test_custom_image_values_reach_the_pod(render: Render) -> None:
    spec = deployment_of(render(CHART / "ci" / "custom-image-values.yaml"))["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["image"] == "registry.example.com/platform/kvcache-operator:0.1.0-rc1"
    assert container["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HTTPS_PROXY"] == "http://proxy.example.com:3128"


def test_monitoring_objects_only_when_enabled(render: Render) -> None:
    assert not {d["kind"] for d in render()} & {"ServiceMonitor", "PodMonitor", "NetworkPolicy"}
    docs = render(CHART / "ci" / "monitoring-values.yaml")
    kinds = [d["kind"] for d in docs]
    assert {"ServiceMonitor", "PodMonitor", "NetworkPolicy"} <= set(kinds)
    (dashboard,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    json.loads(dashboard["data"]["kvcache-overview.json"])


def test_dashboard_uses_contract_metrics() -> None:
    dashboard = json.loads((CHART / "files" / "dashboards" / "kvcache-overview.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("hit rate", "memory pressure", "replicas", "decisions", "latency"):
        assert topic in titles
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b(kvcache_[a-z_]+)\b", e)}
    engine = {n for n in names if not n.startswith("kvcache_operator_")}
    assert engine <= ENGINE_METRICS, engine - ENGINE_METRICS
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {
        m.name + sfx for m in OperatorMetrics().registry.collect() for sfx in suffixes.get(m.type, ("",))
    }
    assert names - engine <= exported, (names - engine) - exported
    assert {"kvcache_hit_tokens_total", "kvcache_memory_pressure", "kvcache_op_latency_ms_bucket"} <= names


def test_notes_explain_the_first_kvcache(tools: dict[str, str]) -> None:
    proc = run_helm(tools["helm"], "install", "kvc", str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl apply" in notes
    # The first KVCache the notes suggest is valid for the operator and the CRD's schema.
    sample = textwrap.dedent(notes.split("<<'YAML'", 1)[1].split("\n", 1)[1].split("YAML\n", 1)[0])
    obj = yaml.safe_load(sample)
    api.parse_kvcache(obj)
    crd = yaml.safe_load((ROOT / "crds" / "kvcache.dev_kvcaches.yaml").read_text())
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    jsonschema.Draft4Validator(spec_schema).validate(obj["spec"])  # OpenAPI v3 numerics are draft 4


def test_kube_version_floor(tools: dict[str, str]) -> None:
    """The chart installs on 1.29+ (the oldest version its manifests are validated against)."""
    ok = run_helm(tools["helm"], "template", "kvc", str(CHART), "--kube-version", "1.29.0")
    assert ok.returncode == 0, ok.stderr
    old = run_helm(tools["helm"], "template", "kvc", str(CHART), "--kube-version", "1.28.9")
    assert old.returncode != 0 and "kubeVersion" in old.stderr


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_container_args_are_understood_by_the_operator_cli(render: Render, values: Path | None) -> None:
    """The Deployment's args parse with the real `kvcache-operator run` parser, as the values mean."""
    from kvcache_operator import cli

    docs = render(values)
    container = deployment_of(docs)["spec"]["template"]["spec"]["containers"][0]
    args = cli.build_parser().parse_args(container["args"])
    assert args.command == "run"
    rendered_values = yaml.safe_load(values.read_text()) if values else {}
    watched = rendered_values.get("watchNamespaces", [])
    assert args.namespace == watched and args.all_namespaces == (not watched)
    assert args.standalone == (not rendered_values.get("ha", {}).get("enabled", False))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.metrics_port == ports["metrics"]
    assert args.liveness == f"http://0.0.0.0:{ports['health']}/healthz"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
