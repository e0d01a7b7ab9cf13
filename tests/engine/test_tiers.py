from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from kvcache_engine.contract import payload_layout
from kvcache_engine.core.block_pool import BlockPool
from kvcache_engine.core.tiers import TierCopier, resolve_device
from tests.engine.helpers import make_kv, make_tokens

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")


@no_cuda
@pytest.mark.parametrize("spec", ["auto", "cuda", "cuda:1"])
def test_missing_cuda_falls_back_to_cpu_with_a_warning(spec: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvcache_engine.tiers"):
        assert resolve_device(spec) == torch.device("cpu")
    assert any("CUDA is not available" in r.getMessage() for r in caplog.records)


def test_cpu_is_cpu_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvcache_engine.tiers"):
        assert resolve_device("cpu") == torch.device("cpu")
    assert caplog.records == []


@no_cuda
def test_cpu_only_engine_degrades_gracefully(engine_factory: Any) -> None:
    engine = engine_factory(device="auto", cpu_tier_tokens=64, enable_prefetch=True)
    assert engine.device == torch.device("cpu")
    tokens = make_tokens(1, 2)
    engine.put(tokens, make_kv(8))
    assert engine.lookup(tokens) == 8
    s = engine.get_stats()
    assert (s["cpu_tier_blocks"], s["promotions"], s["prefetches"], s["device"]) == (0, 0, 0, "cpu")


def test_cpu_copier_copies_slots() -> None:
    layout = payload_layout("none", num_layers=1, block_tokens=2, num_kv_heads=1, head_dim=4)
    a = BlockPool(layout, 2, torch.device("cpu"))
    b = BlockPool(layout, 2, torch.device("cpu"))
    a.storage[1].fill_(7)
    copier = TierCopier(torch.device("cpu"), non_blocking=True)
    copier.copy(a, 1, b, 0)
    copier.sync()
    copier.host_sync()
    assert torch.equal(b.storage[0], a.storage[1])


@needs_cuda
def test_cuda_tier_demotes_promotes_and_stays_exact(engine_factory: Any) -> None:
    engine = engine_factory(
        device="cuda",
        max_tokens=16,
        cpu_tier_tokens=64,
        enable_prefetch=True,
        prefetch_size=4,
        cache_strategy="LRU",
    )
    assert engine.device.type == "cuda" and engine.get_stats()["cpu_tier_blocks"] == 16
    chains = [make_tokens(c, 2) for c in range(6)]
    for c, tokens in enumerate(chains):
        engine.put(tokens, make_kv(8, seed=c))
    s = engine.get_stats()
    assert s["used_blocks"] == 4 and s["cpu_tier_used_blocks"] == 8 and s["demotions"] == 8
    assert engine.lookup(chains[0]) == 8  # served from the CPU tier, then promoted
    s = engine.get_stats()
    assert s["promotions"] == 2
    for c, tokens in enumerate(chains):
        assert torch.equal(engine.get(tokens), make_kv(8, seed=c))
    assert engine.validate_cache_integrity()["is_valid"]
    assert engine.get_stats()["device_memory_total"] > 0


@needs_cuda
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_cuda_codecs_match_cpu_bounds(codec: str) -> None:
    from kvcache_engine.core.compression import make_codec, relative_error

    c = make_codec(codec, num_layers=4, block_tokens=16, num_kv_heads=2, head_dim=64)
    kv = torch.randn(8, *c.block_shape, device="cuda").half()
    out = c.decode_batch(c.encode_batch(kv))
    assert out.is_cuda and relative_error(kv, out) <= (0.01 if codec == "int8" else 0.10)
