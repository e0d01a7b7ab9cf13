"""Issue 9: two inference processes, one engine server, a tiny random-weight Llama. The second
process reuses the first one's prefix and produces the same greedy tokens as without the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.inference.conftest import TINY_GEOMETRY, make_model_dir

pytestmark = pytest.mark.model  # loads a transformers model

REPO = Path(__file__).resolve().parents[2]
SYSTEM = "System: you are the helpful assistant of the kvcache project; answer briefly. " * 2


def run_worker(server: Any, model_dir: Path, prompt: str) -> dict[str, Any]:
    args = [
        sys.executable, "-m", "tests.inference.reuse_worker", "--model", str(model_dir), "--url", server.url,
        "--token-file", str(server.token_file), "--prompt", prompt,
    ]  # fmt: skip
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_second_process_reuses_the_first_ones_prefix(engine_server: Any, tmp_path: Path) -> None:
    server = engine_server(
        block_tokens=8,
        num_layers=TINY_GEOMETRY.num_layers,
        num_kv_heads=TINY_GEOMETRY.num_kv_heads,
        head_dim=TINY_GEOMETRY.head_dim,
        dtype="float32",
        device="cpu",
        max_tokens=4096,
        persist_interval_s=0,
        namespace="tiny",
    )
    model_dir = make_model_dir(tmp_path)

    first = run_worker(server, model_dir, SYSTEM + "How do I size max_tokens?")
    second = run_worker(server, model_dir, SYSTEM + "What does the operator scale on?")

    shared = 1 + len(SYSTEM.encode())  # <s> and the system prompt's bytes; the questions differ at once
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] == (shared // 8) * 8 > 0
    assert second["cached_tokens"] + second["computed_tokens"] == second["prompt_tokens"]
    assert second["output_ids"] == second["reference_ids"]
    assert first["output_ids"] == first["reference_ids"]
    assert second["namespace"].startswith("tiny|model=tiny-llama-0|revision=")
    stats = server.get_json("/v1/stats")
    assert stats["hit_tokens"] >= second["cached_tokens"]
