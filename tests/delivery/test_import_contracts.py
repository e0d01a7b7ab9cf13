"""The import contracts (.importlinter, run by `make lint`) hold, and each one catches a planted
violation in a copy of the tree (so a contract that checks nothing would fail here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _copy_tree(tmp: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "data")
    shutil.copytree(
        ROOT / "operator" / "kvcache_operator", tmp / "operator" / "kvcache_operator", ignore=ignore
    )
    shutil.copytree(
        ROOT / "engine_image" / "kvcache_engine", tmp / "engine_image" / "kvcache_engine", ignore=ignore
    )
    shutil.copy(ROOT / ".importlinter", tmp / ".importlinter")
    return tmp


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{tree / 'operator'}{os.pathsep}{tree / 'engine_image'}",
        "COLUMNS": "300",
    }
    code = (
        "import sys; sys.path[:0] = sys.argv[1:3]; "
        "import kvcache_operator, kvcache_engine; "
        "assert kvcache_operator.__file__.startswith(sys.argv[1]), kvcache_operator.__file__; "
        "sys.argv = ['lint-imports']; "
        "from importlinter.cli import lint_imports_command; lint_imports_command()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(tree / "operator"), str(tree / "engine_image")],
        check=False,
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _plant(path: Path, line: str) -> None:
    text = path.read_text()
    marker = "from __future__ import annotations\n"
    assert marker in text, path
    path.write_text(text.replace(marker, marker + line + "\n", 1))


def test_the_tree_keeps_every_import_contract() -> None:
    result = subprocess.run(
        [str(LINT_IMPORTS)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        (
            "operator/kvcache_operator/reconcile.py",
            "import kvcache_engine.server",
            "imports only kvcache_engine.contract",
        ),
        ("operator/kvcache_operator/api.py", "import kopf", "Pure operator modules"),
        ("operator/kvcache_operator/status.py", "import aiohttp", "Pure operator modules"),
        ("engine_image/kvcache_engine/contract/sizing.py", "import torch", "The contract is torch-free"),
        ("operator/kvcache_operator/policy.py", "import kubernetes", "Only k8s.py talks"),
        ("operator/kvcache_operator/cli.py", "import e2e.localcluster", "never import the test worlds"),
        ("engine_image/kvcache_engine/cli.py", "import tests.conftest", "never import the test worlds"),
        ("engine_image/kvcache_engine/core/eviction.py", "import aiohttp", "imports no transport"),
        (
            "engine_image/kvcache_engine/core/tiers.py",
            "from kvcache_engine.contract import P",
            "imports no transport",
        ),
    ],
)
def test_a_planted_violation_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    tree = _copy_tree(tmp_path)
    _plant(tree / module, line)
    result = _lint(tree)
    assert result.returncode != 0, result.stdout
    broken = [row for row in result.stdout.splitlines() if " BROKEN" in row]
    assert any(contract in row for row in broken), result.stdout
