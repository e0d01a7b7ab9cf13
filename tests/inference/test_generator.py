"""PrefixCachedGenerator against an in-memory store: exact greedy equality, prefix accounting,
identity in the key, geometry refusal, layout round trips."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvcache_engine.inference import (
    KVGeometry,
    ModelIdentity,
    PrefixCachedGenerator,
    dynamic_cache_to_kv,
    kv_to_dynamic_cache,
    model_identity,
    parse_request,
)
from tests.inference.conftest import EOS, TINY_GEOMETRY, DictKVStore, make_tiny_llama

pytestmark = pytest.mark.model  # loads a transformers model


@torch.inference_mode()
def reference_greedy(model: Any, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation at every step: no cache object at all."""
    seq, out = list(ids), []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        seq.append(token)
        if token == EOS:
            break
    return out


def make_generator(model: Any, blocks: dict[int, torch.Tensor] | None = None) -> PrefixCachedGenerator:
    return PrefixCachedGenerator(model, DictKVStore(model_identity(model), blocks=blocks))


def prompt(n: int, seed: int = 1) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (n,), generator=gen).tolist()


def test_greedy_output_equals_uncached_reference(tiny_model: Any) -> None:
    gen = make_generator(tiny_model)
    ids = prompt(37)
    expected = reference_greedy(tiny_model, ids, 12)

    cold = gen.generate(ids, 12, EOS)
    warm = gen.generate(ids, 12, EOS)

    assert cold.output_ids == expected
    assert warm.output_ids == expected
    assert (cold.cached_tokens, cold.computed_tokens) == (0, 37)
    assert warm.cached_tokens == 36  # 9 full blocks of 4 hold 36 tokens
    assert warm.computed_tokens == 1


def test_shared_prefix_is_reused_and_output_unchanged(tiny_model: Any) -> None:
    gen = make_generator(tiny_model)
    shared = prompt(30, seed=2)
    first = shared + prompt(9, seed=3)
    second = shared + prompt(11, seed=4)

    gen.generate(first, 4, EOS)
    result = gen.generate(second, 10, EOS)

    assert result.cached_tokens == 28  # the 7 full blocks inside the 30 shared tokens
    assert result.computed_tokens == len(second) - 28
    assert result.output_ids == reference_greedy(tiny_model, second, 10)


def test_fully_cached_prompt_recomputes_only_its_last_token(tiny_model: Any) -> None:
    gen = make_generator(tiny_model)
    ids = prompt(32, seed=5)  # exactly 8 blocks: every prompt token is cached after one run
    gen.generate(ids, 0)

    result = gen.generate(ids, 6, EOS)

    assert (result.cached_tokens, result.computed_tokens) == (31, 1)
    assert result.output_ids == reference_greedy(tiny_model, ids, 6)


def test_new_full_blocks_are_stored_including_generated_tokens(tiny_model: Any) -> None:
    blocks: dict[int, torch.Tensor] = {}
    gen = make_generator(tiny_model, blocks)
    ids = prompt(10, seed=6)

    result = gen.generate(ids, 7, EOS)

    # KV exists for the prompt and all generated tokens but the last: 10 + 6 = 16 tokens = 4 blocks.
    assert result.stored_blocks == 4
    assert len(blocks) == 4
    follow_up = ids + result.output_ids[:-1] + prompt(3, seed=7)
    assert gen.generate(follow_up, 1).cached_tokens == 16


def test_stored_kv_equals_the_models_own_kv(tiny_model: Any) -> None:
    gen = make_generator(tiny_model)
    ids = prompt(8, seed=8)
    gen.generate(ids, 0)

    with torch.inference_mode():
        cache = tiny_model(input_ids=torch.tensor([ids]), use_cache=True).cache
    expected = dynamic_cache_to_kv(cache, 0, 8)
    stored = gen.store.fetch_prefix(ids)
    assert stored is not None and torch.equal(stored, expected)


def test_two_models_never_share_entries(tiny_model: Any) -> None:
    blocks: dict[int, torch.Tensor] = {}
    other = make_tiny_llama(seed=1)
    ids = prompt(20, seed=9)
    make_generator(tiny_model, blocks).generate(ids, 0)
    assert len(blocks) == 5

    result = make_generator(other, blocks).generate(ids, 3, EOS)

    assert result.cached_tokens == 0
    assert len(blocks) == 10
    assert result.output_ids == reference_greedy(other, ids, 3)


def test_identity_names_revision_and_dtype_in_the_namespace(tiny_model: Any) -> None:
    ident = model_identity(tiny_model, name="tiny", revision="r1")
    assert ident == ModelIdentity("tiny", "r1", "float32")
    assert ident.namespace("prod") == "prod|model=tiny|revision=r1|dtype=float32"
    assert model_identity(tiny_model).revision != model_identity(make_tiny_llama(seed=1)).revision
    assert model_identity(tiny_model.to(torch.float32)).revision == model_identity(make_tiny_llama()).revision
    long = ModelIdentity("m" * 300, "r", "float16").namespace("prod")
    assert len(long) <= 253 and long.startswith("prod|model-id=")


def test_geometry_mismatch_is_refused_naming_the_field(tiny_model: Any) -> None:
    ident = model_identity(tiny_model)
    store = DictKVStore(ident, geometry=KVGeometry(num_layers=2, num_kv_heads=4, head_dim=16))
    with pytest.raises(ValueError, match=r"num_kv_heads: model has 2, cache has 4"):
        PrefixCachedGenerator(tiny_model, store)
    store = DictKVStore(ident, geometry=KVGeometry(num_layers=3, num_kv_heads=2, head_dim=8))
    with pytest.raises(ValueError, match=r"num_layers: model has 2, cache has 3; head_dim: model has 16"):
        PrefixCachedGenerator(tiny_model, store)


def test_layout_round_trip_through_dynamic_cache(tiny_model: Any) -> None:
    g = TINY_GEOMETRY
    kv = torch.randn(2, g.num_layers, 9, g.num_kv_heads, g.head_dim)
    cache = kv_to_dynamic_cache(kv, tiny_model.config)
    assert cache.get_seq_length() == 9
    assert cache.layers[1].keys.shape == (1, g.num_kv_heads, 9, g.head_dim)
    assert torch.equal(cache.layers[1].values[0, :, 4], kv[1, 1, 4])
    assert torch.equal(dynamic_cache_to_kv(cache, 2, 7), kv[:, :, 2:7])


def test_wrong_kv_shape_and_sliding_window_models_are_refused(tiny_model: Any) -> None:
    with pytest.raises(ValueError, match=r"kv: expected \[2, 2, n_tokens"):
        kv_to_dynamic_cache(torch.zeros(2, 3, 4, 2, 16), tiny_model.config)
    from transformers import MistralConfig

    sliding = MistralConfig(num_hidden_layers=2, sliding_window=8)
    with pytest.raises(ValueError, match="only full-attention layers"):
        kv_to_dynamic_cache(torch.zeros(2, 2, 4, 8, 128), sliding)


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ("text", "request: expected a dict"),
        ({}, "exactly one of 'text'"),
        ({"text": "a", "input_ids": [1]}, "exactly one of 'text'"),
        ({"text": ""}, "text: expected a non-empty string"),
        ({"input_ids": [1, -2]}, "input_ids: expected"),
        ({"text": "a", "max_new_tokens": -1}, "max_new_tokens: expected an int in 0..4096"),
        ({"text": "a", "max_new_tokens": True}, "max_new_tokens"),
        ({"text": "a", "return_text": "yes"}, "return_text: expected a bool"),
        ({"text": "a", "temperature": 0.7}, r"unknown fields \['temperature'\]"),
    ],
)
def test_bad_requests_name_the_field(request_body: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_request(request_body)
