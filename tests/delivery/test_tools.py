"""scripts/get_tools.py: the binaries it provides are the ones whose digests it records."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

from .conftest import ROOT


def load_get_tools() -> ModuleType:
    spec = importlib.util.spec_from_file_location("get_tools", ROOT / "scripts" / "get_tools.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tools_resolve_to_verified_or_supported_binaries(tools: dict[str, str]) -> None:
    get_tools = load_get_tools()
    for name, (_, digest) in get_tools.BINARIES.items():
        path = Path(tools[name])
        if path.parent == get_tools.TOOLS_BIN:
            assert get_tools.sha256_of(path) == digest, f"{name}: digest differs from the recorded one"
        else:
            assert get_tools.usable_on_path(name) == str(path)
    for name in get_tools.VENV_TOOLS:
        assert Path(tools[name]).is_file()


def test_helm_is_v3_or_v4(tools: dict[str, str]) -> None:
    out = subprocess.run([tools["helm"], "version", "--short"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(("v3.", "v4."))


def test_second_run_is_a_no_op(tools: dict[str, str]) -> None:
    """Idempotent: the same paths, nothing rewritten."""
    get_tools = load_get_tools()
    before = {name: Path(path).stat().st_mtime_ns for name, path in tools.items()}
    assert get_tools.ensure_tools() == tools
    assert {name: Path(path).stat().st_mtime_ns for name, path in tools.items()} == before
