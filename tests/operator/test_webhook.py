"""The validating admission webhook, served by the real operator (Kopf's server, HTTPS on loopback):
the ValidatingWebhookConfiguration it manages, and real AdmissionReview JSON allowed, denied and
answered with warnings, as an API server would send it."""

from __future__ import annotations

import base64
import ssl
from typing import Any

import aiohttp
import kopf
import pytest

from kvcache_operator import admission, webhook
from tests.operator.conftest import NS, Cluster, free_port, make_kvcache, running_operator, wait_for

VWC = "admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
CONFIGURATION = "kvcache-operator.kvcache.dev"


def review(
    obj: dict[str, Any], operation: str = "CREATE", old: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "b7d2a1c0-0000-4000-8000-000000000001",
            "kind": {"group": "kvcache.dev", "version": "v1alpha1", "kind": "KVCache"},
            "resource": {"group": "kvcache.dev", "version": "v1alpha1", "resource": "kvcaches"},
            "name": obj["metadata"]["name"],
            "namespace": NS,
            "operation": operation,
            "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
            "object": obj,
            "oldObject": old,
            "dryRun": False,
        },
    }


@pytest.fixture
async def served(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The operator with its webhook on 127.0.0.1 (self-signed, managing its configuration)."""
    cluster.emu.register(VWC, kind="ValidatingWebhookConfiguration", namespaced=False)
    monkeypatch.setenv("KVCACHE_WEBHOOK", "self-signed")
    monkeypatch.setenv("KVCACHE_WEBHOOK_PORT", str(free_port()))
    monkeypatch.setenv("KVCACHE_WEBHOOK_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("KVCACHE_WEBHOOK_HOST", "127.0.0.1")
    async with running_operator():
        configuration = await wait_for(
            lambda: (c := cluster.emu.get(VWC, CONFIGURATION)) and c.get("webhooks") and c,
            what="the ValidatingWebhookConfiguration with its webhook",
        )
        yield configuration


async def post(configuration: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """POST an AdmissionReview as the API server does: TLS verified with the configuration's caBundle."""
    client = configuration["webhooks"][0]["clientConfig"]
    context = ssl.create_default_context(cadata=base64.b64decode(client["caBundle"]).decode())
    async with (
        aiohttp.ClientSession() as session,
        session.post(client["url"], json=body, ssl=context) as resp,
    ):
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json()
        return answer


async def test_the_operator_registers_its_webhook_for_kvcache_writes(served: dict[str, Any]) -> None:
    (hook,) = served["webhooks"]
    assert hook["name"] == f"{admission.HANDLER_ID}.{CONFIGURATION}"
    assert hook["failurePolicy"] == "Ignore"  # the operator down: writes pass, reconcile refuses them
    assert hook["sideEffects"] == "None"
    assert hook["rules"] == [
        {
            "apiGroups": ["kvcache.dev"],
            "apiVersions": ["v1alpha1"],
            "resources": ["kvcaches"],
            "operations": ["CREATE", "UPDATE"],
            "scope": "*",
        }
    ]
    assert hook["clientConfig"]["url"].endswith(f"/{admission.HANDLER_ID}")
    assert hook["clientConfig"]["url"].startswith("https://127.0.0.1:")


async def test_admission_reviews_allowed_denied_and_warned(served: dict[str, Any]) -> None:
    good = make_kvcache("good")
    answer = await post(served, review(good))
    assert answer["response"] == {"uid": "b7d2a1c0-0000-4000-8000-000000000001", "allowed": True}

    warned = make_kvcache("warned", cache={**good["spec"]["cache"], "enablePrefetch": True})
    answer = await post(served, review(warned))
    assert answer["response"]["allowed"] is True
    assert answer["response"]["warnings"] == [
        "spec.cache.enablePrefetch does nothing on CPU engines (resources.gpus is 0)"
    ]

    bad = make_kvcache("bad", metrics={"scrapeInterval": "0s"}, resources={"memoryOverhead": "1Ei"})
    answer = await post(served, review(bad))
    assert answer["response"]["allowed"] is False
    assert answer["response"]["status"] == {
        "code": 422,
        "message": 'spec.resources.memoryOverhead: "1Ei" is too large: a memory size must be at most 64Gi\n'
        'spec.metrics.scrapeInterval: "0s" is out of range: the scrape interval must be between 1s and 1h',
    }

    # a finalizer patch on an object stored before the webhook existed is not blocked
    touched = {**bad, "metadata": {**bad["metadata"], "finalizers": ["kvcache.dev/finalizer"]}}
    answer = await post(served, review(touched, "UPDATE", old=bad))
    assert answer["response"]["allowed"] is True


def test_configure_off_by_default_and_refuses_nonsense(tmp_path: Any) -> None:
    settings = kopf.OperatorSettings()
    assert "off" in webhook.configure(settings, {})
    assert isinstance(settings.admission.server, webhook.NoWebhookServer)
    with pytest.raises(webhook.WebhookConfigError, match="KVCACHE_WEBHOOK: 'on' is not one of"):
        webhook.configure(settings, {"KVCACHE_WEBHOOK": "on"})
    with pytest.raises(webhook.WebhookConfigError, match="KVCACHE_WEBHOOK_PORT"):
        webhook.configure(settings, {"KVCACHE_WEBHOOK": "self-signed", "KVCACHE_WEBHOOK_PORT": "0"})
    with pytest.raises(webhook.WebhookConfigError, match=r"tls\.crt does not exist"):
        webhook.configure(
            settings, {"KVCACHE_WEBHOOK": "certificate", "KVCACHE_WEBHOOK_CERT_DIR": str(tmp_path)}
        )


def test_in_cluster_the_certificate_names_the_service_and_the_api_server_calls_the_service() -> None:
    settings = kopf.OperatorSettings()
    env = {"KVCACHE_WEBHOOK": "self-signed", "KVCACHE_WEBHOOK_SERVICE": "kvc-webhook", "POD_NAMESPACE": "ops"}
    webhook.configure(settings, env)
    server = settings.admission.server
    assert isinstance(server, webhook.ServiceWebhookServer)
    assert server.service == ("ops", "kvc-webhook") and server.host == "kvc-webhook.ops.svc"
    assert settings.admission.managed == CONFIGURATION
    from cryptography import x509

    cert, _ = webhook.self_signed_certificate([server.host, "0.0.0.0", *server.extra_sans])
    names = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert names.value.get_values_for_type(x509.DNSName) == [
        "kvc-webhook.ops.svc",
        "kvc-webhook",
        "kvc-webhook.ops",
        "kvc-webhook.ops.svc.cluster.local",
    ]
    assert names.value.get_values_for_type(x509.IPAddress) == []  # 0.0.0.0 is no address to call
