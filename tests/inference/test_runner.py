"""KVCacheEngine.process_request* with a tiny random Llama saved as a local HF directory."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from kvcache_engine.engine import KVCacheEngine
from kvcache_engine.inference import load_model
from tests.inference.conftest import TINY_GEOMETRY, make_model_dir
from tests.inference.test_generator import reference_greedy

pytestmark = pytest.mark.model  # loads a transformers model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models"))


def make_engine(model_dir: Path, **overrides: Any) -> KVCacheEngine:
    fields: dict[str, Any] = {
        "max_tokens": 1024,
        "block_tokens": 4,
        "num_layers": TINY_GEOMETRY.num_layers,
        "num_kv_heads": TINY_GEOMETRY.num_kv_heads,
        "head_dim": TINY_GEOMETRY.head_dim,
        "dtype": "float32",
        "device": "cpu",
        "model_path": str(model_dir),
        **overrides,
    }
    return KVCacheEngine(**fields)


SYSTEM = "You are a careful assistant. Answer in one short sentence. "


def test_process_request_reuses_a_shared_prefix_with_identical_greedy_output(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    loaded = load_model(model_dir, "float32")
    question = SYSTEM + "What is a KV cache?"

    first = engine.process_request_sync({"text": SYSTEM + "Hello there.", "max_new_tokens": 3})
    second = engine.process_request_sync({"text": question, "max_new_tokens": 8})

    ids = loaded.tokenizer(question)["input_ids"]
    shared_blocks = (1 + len(SYSTEM.encode())) // 4  # <s> + the shared bytes, in full blocks of 4
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] == shared_blocks * 4 > 0
    assert second["cached_tokens"] + second["computed_tokens"] == second["prompt_tokens"] == len(ids)
    assert second["output_ids"] == reference_greedy(loaded.model, ids, 8)
    assert second["text"] == loaded.tokenizer.decode(second["output_ids"], skip_special_tokens=True)
    assert second["latency_ms"] >= second["ttft_ms"] > 0
    assert engine.get_stats()["hit_tokens"] >= second["cached_tokens"]


async def test_async_request_and_prefill_only_request(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    warm = await engine.process_request({"text": SYSTEM})
    again = await engine.process_request({"text": SYSTEM, "max_new_tokens": 2, "return_text": False})
    assert "text" not in warm and warm["output_ids"] == []
    assert warm["stored_blocks"] == warm["prompt_tokens"] // 4
    assert again["cached_tokens"] == again["prompt_tokens"] - 1  # all cached but the last token
    assert "text" not in again and len(again["output_ids"]) == 2


async def test_batch_answers_in_order_and_shares_prefixes(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    requests: list[dict[str, Any]] = [
        {"text": SYSTEM + f"Question {i}?", "max_new_tokens": 2} for i in range(5)
    ]
    requests.append({"text": SYSTEM + "Question 0?", "max_new_tokens": 2})  # a duplicate
    requests.append({"text": ""})  # invalid: reported, not raised

    answers = await engine.process_batch_optimized(requests, batch_size=4)

    assert len(answers) == 7
    assert answers[6] == {"error": "text: expected a non-empty string"}
    assert sum(a["cached_tokens"] > 0 for a in answers[:6]) >= 4  # all but the first of each chunk
    assert answers[5]["output_ids"] == answers[0]["output_ids"]
    alone = make_engine(model_dir).process_request_sync(requests[3])
    assert answers[3]["output_ids"] == alone["output_ids"]
    with pytest.raises(ValueError, match="batch_size"):
        await engine.process_batch_optimized(requests, batch_size=0)


def test_geometry_mismatch_names_the_field(model_dir: Path) -> None:
    engine = make_engine(model_dir, num_kv_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads: model has 2, cache has 4"):
        engine.process_request_sync({"text": "hi"})


def test_missing_model_path_is_a_clear_error(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="model_path"):
        make_engine(model_dir, model_path=None).process_request_sync({"text": "hi"})
    with pytest.raises(ValueError, match="model_path: expected a Hugging Face model directory"):
        make_engine(model_dir, model_path=str(model_dir / "nope")).process_request_sync({"text": "hi"})


def test_identity_follows_the_weights_not_the_mount_path(model_dir: Path, tmp_path: Path) -> None:
    other = make_model_dir(tmp_path, seed=3)
    moved = tmp_path / "elsewhere" / model_dir.name
    shutil.copytree(model_dir, moved)
    a, b, c = (load_model(p).identity for p in (model_dir, other, moved))
    assert a.revision != b.revision
    assert a == c  # same checkpoint mounted elsewhere: same keys
    assert a.name == "tiny-llama-0" and a.dtype == "float32"
