"""Fixtures for the delivery tests: the real helm binary (scripts/get_tools.py) and chart renders."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kvcache-operator"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "kvc"
NAMESPACE = "kvcache-system"

Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    """Paths of helm, kubectl, hadolint, ... — fetched (once, cached) by the project's own script."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "get_tools.py"), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    paths: dict[str, str] = json.loads(out.stdout)
    return paths


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def values_args(values: Path | None, sets: dict[str, str] | None) -> list[str]:
    args = ["-f", str(values)] if values is not None else []
    for key, value in (sets or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture(scope="session")
def render(tools: dict[str, str]) -> Render:
    """``render(values_file=None, **sets)`` -> the documents of `helm template` (memoised)."""
    cache: dict[tuple[Any, ...], list[dict[str, Any]]] = {}

    def _render(values: Path | None = None, sets: dict[str, str] | None = None) -> list[dict[str, Any]]:
        key = (values, tuple(sorted((sets or {}).items())))
        if key not in cache:
            proc = run_helm(
                tools["helm"],
                "template",
                RELEASE,
                str(CHART),
                "--namespace",
                NAMESPACE,
                *values_args(values, sets),
            )
            assert proc.returncode == 0, proc.stderr
            cache[key] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        return [json.loads(json.dumps(doc)) for doc in cache[key]]

    return _render


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]
