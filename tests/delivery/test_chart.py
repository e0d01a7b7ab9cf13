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
CERT_MANAGER_KINDS = {"Issuer", "Certificate"}  # metadata strictly, spec against CERT_MANAGER_SPEC below

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

# cert-manager.io/v1, restricted to the fields the chart sets (types from its API reference).
_ISSUER_REF = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "group": {"type": "string"},
    },
}
CERT_MANAGER_SPEC = {
    "Issuer": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"selfSigned": {"type": "object", "additionalProperties": False}},
    },
    "Certificate": {
        "type": "object",
        "additionalProperties": False,
        "required": ["secretName", "issuerRef"],
        "properties": {
            "secretName": {"type": "string", "minLength": 1},
            "dnsNames": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "issuerRef": _ISSUER_REF,
            "privateKey": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"},
                    "rotationPolicy": {"enum": ["Never", "Always"]},
                },
            },
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
    elif doc["kind"] in CERT_MANAGER_KINDS:
        jsonschema.validate(doc["spec"], CERT_MANAGER_SPEC[doc["kind"]])
    else:
        jsonschema.validate(doc["spec"], PROM_SPEC[doc["kind"]])


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_IDS)
def test_every_rendered_document_validates(render: Render, values: Path | None) -> None:
    docs = render(values)
    assert docs
    for version in K8S_VERSIONS:
        for doc in docs:
            where = f"{doc['kind']}/{doc['metadata']['name']} on {version}"
            if doc["kind"] in PEERING_KINDS | PROMETHEUS_KINDS | CERT_MANAGER_KINDS:
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


# --- the admission webhook -------------------------------------------------------------------------


def _env(container: dict[str, Any], namespace: str) -> dict[str, str]:
    env = {e["name"]: e.get("value") for e in container["env"]}
    env["POD_NAMESPACE"] = namespace  # the downward API's value in the pod
    return {k: v for k, v in env.items() if v is not None}


def test_default_webhook_is_self_signed_and_reachable_through_its_service(render: Render) -> None:
    """The operator manages the configuration (none rendered); the Service reaches the container port
    the operator listens on, and the operator's own settings read the rendered environment."""
    import kopf

    from kvcache_operator import webhook

    docs = render()
    assert not by_kind(docs, "ValidatingWebhookConfiguration") and not by_kind(docs, "Certificate")
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-webhook")]
    container = deployment_of(docs)["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert service["spec"]["ports"] == [
        {"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}
    ]
    env = _env(container, NAMESPACE)
    assert (
        env["KVCACHE_WEBHOOK"] == "self-signed"
        and env["KVCACHE_WEBHOOK_SERVICE"] == service["metadata"]["name"]
    )
    settings = kopf.OperatorSettings()
    webhook.configure(settings, env)
    server = settings.admission.server
    assert isinstance(server, webhook.ServiceWebhookServer)
    assert server.port == ports["webhook"] == 9443
    assert server.service == (NAMESPACE, service["metadata"]["name"])
    assert settings.admission.managed == env["KVCACHE_WEBHOOK_CONFIGURATION"]


def test_cert_manager_webhook_renders_the_configuration_kopf_would_register(render: Render) -> None:
    from kvcache_operator import admission

    docs = render(CHART / "ci" / "webhook-issuer-values.yaml")
    (configuration,) = by_kind(docs, "ValidatingWebhookConfiguration")
    (certificate,) = by_kind(docs, "Certificate")
    assert not by_kind(docs, "Issuer")  # issuerRef names the ClusterIssuer to use
    assert certificate["spec"]["issuerRef"] == {"kind": "ClusterIssuer", "name": "corporate-ca"}
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-webhook")]
    svc = service["metadata"]["name"]
    assert f"{svc}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    annotation = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert annotation == f"{NAMESPACE}/{certificate['metadata']['name']}"
    (hook,) = configuration["webhooks"]
    assert hook["name"] == f"{admission.HANDLER_ID}.{configuration['metadata']['name']}"
    assert hook["clientConfig"]["service"] == {
        "name": svc, "namespace": NAMESPACE, "path": f"/{admission.HANDLER_ID}", "port": 443
    }  # fmt: skip
    assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None"
    assert hook["rules"][0]["operations"] == list(admission.OPERATIONS)
    pod = deployment_of(docs)["spec"]["template"]["spec"]
    env = _env(pod["containers"][0], NAMESPACE)
    assert env["KVCACHE_WEBHOOK"] == "certificate"
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "webhook-tls"]
    assert mount["mountPath"] == env["KVCACHE_WEBHOOK_CERT_DIR"] and mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == "webhook-tls"]
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]


def test_cert_manager_without_an_issuer_gets_a_self_signed_one(render: Render) -> None:
    docs = render(sets={"webhook.certManager.enabled": "true"})
    (issuer,) = by_kind(docs, "Issuer")
    (certificate,) = by_kind(docs, "Certificate")
    assert issuer["spec"] == {"selfSigned": {}}
    assert certificate["spec"]["issuerRef"] == {"kind": "Issuer", "name": issuer["metadata"]["name"]}


def test_webhook_off_renders_none_of_it(render: Render) -> None:
    docs = render(sets={"webhook.enabled": "false"})
    container = deployment_of(docs)["spec"]["template"]["spec"]["containers"][0]
    assert not [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-webhook")]
    assert not any(e["name"].startswith("KVCACHE_WEBHOOK") for e in container["env"])
    assert "webhook" not in {p["name"] for p in container["ports"]}


def test_ha_with_a_self_signed_webhook_is_refused_in_words(tools: dict[str, str]) -> None:
    proc = run_helm(tools["helm"], "template", "kvc", str(CHART), "--set", "ha.enabled=true")
    assert proc.returncode != 0
    assert "ha.enabled needs webhook.certManager.enabled=true" in proc.stderr


def test_network_policy_lets_the_api_server_reach_the_webhook(render: Render) -> None:
    (policy,) = by_kind(render(CHART / "ci" / "monitoring-values.yaml"), "NetworkPolicy")
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert 9443 in ports
    (policy,) = by_kind(
        render(CHART / "ci" / "monitoring-values.yaml", {"webhook.enabled": "false"}), "NetworkPolicy"
    )
    assert 9443 not in [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
