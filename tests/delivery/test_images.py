"""The Dockerfile's promises that can be checked without a Docker daemon."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib

from .conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def stages() -> dict[str, str]:
    """Stage name -> its instructions (the text up to the next FROM)."""
    parts = re.split(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)[1:]
    return {
        m.group(1): "FROM " + part for part in parts if (m := re.search(r" AS (\S+)", part.splitlines()[0]))
    }


def test_final_targets_run_as_non_root_without_build_tools() -> None:
    found = stages()
    for target in ("operator", "engine"):
        body = found[target]
        assert re.search(r"^USER 10001:10001$", body, flags=re.MULTILINE), target
        assert not re.search(r"\b(gcc|g\+\+|build-essential|make|git)\b", body), target
        assert "COPY --from=" in body and "/opt/venv" in body


def test_dependencies_install_before_the_source_is_copied() -> None:
    for build in ("operator-build", "engine-build"):
        body = stages()[build]
        assert body.index("-r /tmp/") < body.index("COPY operator "), build


def test_engine_pins_torch_and_base_is_selectable() -> None:
    assert "ARG ENGINE_BASE=python:3.11-slim-bookworm" in DOCKERFILE
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE
    assert "ARG TORCH_VERSION=2.13.0" in DOCKERFILE and '"torch==${TORCH_VERSION}"' in DOCKERFILE
    assert "FROM ${ENGINE_BASE} AS engine-base" in DOCKERFILE


def test_operator_runs_without_the_engine_extra() -> None:
    """The operator image installs base + operator extra only: its modules must import without torch,
    but for the offline simulator (the import contracts' declared exception), whose command says in
    one line that it needs the engine extra."""
    engine_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "engine"
    ]
    blocked = sorted({re.split(r"[<>=!~ \[]", dep)[0] for dep in engine_extra})
    code = textwrap.dedent(f"""
        import importlib, importlib.abc, pkgutil, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("not in the operator image: " + name)
        sys.meta_path.insert(0, Block())
        import kvcache_operator
        for info in pkgutil.iter_modules(kvcache_operator.__path__):
            if info.name != "simulate":
                importlib.import_module("kvcache_operator." + info.name)
        assert not set(BLOCKED) & set(sys.modules), set(BLOCKED) & set(sys.modules)
        from kvcache_operator.cli import main
        assert main(["simulate", "-f", "x.yaml", "--trace", "t.jsonl"]) == 2
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_engine_image_builds_the_checksum_kernel_and_the_operator_skips_it() -> None:
    """The engine build stage has a compiler for setup.py's C kernel and fails when the kernel
    did not build (an engine without it checksums ~3x slower); the operator never checksums."""
    found = stages()
    engine = found["engine-build"]
    assert re.search(r"apt-get install [^\n]*\bgcc\b", engine)
    assert "COPY setup.py" in engine
    assert engine.index("pip install --no-deps /src") < engine.index("NATIVE_SUMS")
    assert "KVCACHE_BUILD_NATIVE=0" in found["operator-build"] and "setup.py" in found["operator-build"]
