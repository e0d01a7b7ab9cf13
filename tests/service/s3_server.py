"""A real S3-protocol server on loopback for the object-store tests: moto's standalone server
(``python -m moto.server``) in a child process, one per test module."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ACCESS_KEY = "AKIDTESTKEY"
SECRET_KEY = "test/secret+key"
# moto enforces S3's 5 MiB minimum part by default; tests lower it to keep their data small
PART_MIN = 1024
LOOPBACK = "127.0.0.1"


def _free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_server(
    host: str = LOOPBACK, *, tls: tuple[Path, Path] | None = None, start_timeout_s: float = 30.0
) -> Iterator[str]:
    """moto's standalone S3 server in a child process on ``host`` (plain HTTP, or HTTPS with
    ``tls`` = (certificate, key)), S3's minimum part lowered to PART_MIN; yields its URL once it
    accepts connections, stops it after. RuntimeError (with its last output) if it does not start."""
    port = _free_port(host)
    env = dict(os.environ, S3_UPLOAD_PART_MIN_SIZE=str(PART_MIN), MOTO_ALLOW_NONEXISTENT_REGION="true")
    args = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    if tls is not None:
        args += ["-c", str(tls[0]), "-k", str(tls[1])]
    url = f"{'https' if tls else 'http'}://{host}:{port}"
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: moto logs every request
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                try:
                    with socket.create_connection((host, port), timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        err = log.read().decode("utf-8", "replace")
                        raise RuntimeError(f"moto server did not start on {url}: {err[-2000:]}") from None
                    time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signed for 127.0.0.1: (ca.crt, tls.crt, tls.key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvcache test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    paths = (directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture(scope="module")
def s3_tls_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """moto's S3 server over HTTPS with a certificate from a private CA: (https URL, ca.crt)."""
    ca, cert, key = _tls_files(tmp_path_factory.mktemp("s3-tls"))
    with moto_server(tls=(cert, key)) as url:
        yield url, ca
