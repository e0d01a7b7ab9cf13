"""Serving the validating admission webhook with Kopf (``settings.admission``), configured from the
environment the Helm chart sets:

* ``KVCACHE_WEBHOOK=off`` (default): no endpoint; the operator still refuses invalid specs on
  reconcile (InvalidSpec, the same words).
* ``KVCACHE_WEBHOOK=self-signed``: the operator makes a certificate at start (its own CA, the
  Service's DNS names) and manages the ValidatingWebhookConfiguration ``KVCACHE_WEBHOOK_CONFIGURATION``
  itself, its ``caBundle`` included (Kopf's ``settings.admission.managed``; ``failurePolicy: Ignore``:
  while the operator is down, writes go through and reconcile refuses them).
* ``KVCACHE_WEBHOOK=certificate``: ``tls.crt``/``tls.key`` from ``KVCACHE_WEBHOOK_CERT_DIR`` (a Secret
  cert-manager fills, re-read when it renews); the chart renders the ValidatingWebhookConfiguration
  and cert-manager injects its CA.

The endpoint listens on ``KVCACHE_WEBHOOK_PORT`` (9443); the API server reaches it through the
Service ``KVCACHE_WEBHOOK_SERVICE`` in ``POD_NAMESPACE`` (port 443), or, without a Service (a
local run), at ``https://KVCACHE_WEBHOOK_HOST:<port>``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import AsyncIterator, Collection, Mapping
from pathlib import Path
from typing import Any

import kopf

MODES = ("off", "self-signed", "certificate")
DEFAULT_PORT = 9443
DEFAULT_CONFIGURATION = "kvcache-operator.kvcache.dev"


class WebhookConfigError(ValueError):
    """A webhook setting that cannot work, naming the variable."""


class NoWebhookServer:
    """Admission off: no endpoint. Kopf needs a server once a validating handler is registered; this
    one never yields a client config, so nothing is listened on and nothing is registered."""

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield  # pragma: no cover - unreachable: makes this an async generator


class ServiceWebhookServer(kopf.WebhookServer):
    """Kopf's HTTPS server with two changes: self-signed certificates made with ``cryptography`` (Kopf's
    own needs ``certbuilder``), and the client config pointing at a Service rather than a URL (the API
    server resolves Services, not cluster DNS names)."""

    def __init__(self, *, service: tuple[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service  # (namespace, name), port 443

    @staticmethod
    def build_certificate(hostnames: Collection[str], password: str | None = None) -> tuple[bytes, bytes]:
        return self_signed_certificate(hostnames)

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async for config in super().__call__(fn):
            if self.service is None:
                yield config
                continue
            namespace, name = self.service
            yield {
                "service": {"namespace": namespace, "name": name, "port": 443},
                **({"caBundle": config["caBundle"]} if "caBundle" in config else {}),
            }


def self_signed_certificate(hostnames: Collection[str], days: int = 3650) -> tuple[bytes, bytes]:
    """(certificate, key) PEM: an EC P-256 self-signed CA certificate for ``hostnames`` (names and IPs;
    unspecified addresses such as 0.0.0.0 dropped). The first name is the common name."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hostnames):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            names.append(x509.DNSName(host))
            continue
        if not ip.is_unspecified:
            names.append(x509.IPAddress(ip))
    if not names:
        raise WebhookConfigError("no host name or address to put in the webhook's certificate")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def configure(settings: kopf.OperatorSettings, environ: Mapping[str, str]) -> str:
    """Set ``settings.admission`` from the environment; returns a line for the log."""
    mode = environ.get("KVCACHE_WEBHOOK", "off")
    if mode not in MODES:
        raise WebhookConfigError(f"KVCACHE_WEBHOOK: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "off":
        settings.admission.server = NoWebhookServer()
        settings.admission.managed = None
        return "admission webhook off (KVCACHE_WEBHOOK=off): specs are checked on reconcile"
    port_text = environ.get("KVCACHE_WEBHOOK_PORT", str(DEFAULT_PORT))
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise WebhookConfigError(f"KVCACHE_WEBHOOK_PORT: {port_text!r} is not a port number")
    name, namespace = environ.get("KVCACHE_WEBHOOK_SERVICE"), environ.get("POD_NAMESPACE")
    service = (namespace, name) if name and namespace else None
    host = f"{name}.{namespace}.svc" if service else environ.get("KVCACHE_WEBHOOK_HOST", "localhost")
    sans = [f"{name}", f"{name}.{namespace}", f"{host}.cluster.local"] if service else []
    common: dict[str, Any] = {
        "addr": environ.get("KVCACHE_WEBHOOK_ADDRESS", "0.0.0.0"),
        "port": int(port_text),
        "host": host,
        "service": service,
    }
    if mode == "self-signed":
        settings.admission.server = ServiceWebhookServer(extra_sans=sans, **common)
        settings.admission.managed = environ.get("KVCACHE_WEBHOOK_CONFIGURATION", DEFAULT_CONFIGURATION)
        return f"admission webhook on port {port_text}, self-signed, managing {settings.admission.managed}"
    directory = Path(environ.get("KVCACHE_WEBHOOK_CERT_DIR", "/etc/kvcache-operator/webhook"))
    certfile, keyfile = directory / "tls.crt", directory / "tls.key"
    for path in (certfile, keyfile):
        if not path.is_file():
            raise WebhookConfigError(
                f"KVCACHE_WEBHOOK_CERT_DIR: {path} does not exist (is the Secret mounted?)"
            )
    settings.admission.server = ServiceWebhookServer(certfile=str(certfile), pkeyfile=str(keyfile), **common)
    settings.admission.managed = None
    return f"admission webhook on port {port_text}, certificate from {directory}"
