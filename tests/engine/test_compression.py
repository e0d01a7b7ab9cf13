from __future__ import annotations

import math

import pytest
import torch

from kvcache_engine.contract import KVCacheConfig, payload_layout, pool_blocks, pool_bytes
from kvcache_engine.core.compression import CODECS, make_codec, relative_error
from kvcache_engine.engine import KVCacheEngine

BOUNDS = {"none": 0.0, "fp8": 0.05, "int8": 0.01, "int4": 0.10}


def make_geometry_codec(name: str, layers: int = 2, tokens: int = 16, heads: int = 2, dim: int = 64):  # type: ignore[no-untyped-def]
    return make_codec(name, num_layers=layers, block_tokens=tokens, num_kv_heads=heads, head_dim=dim)


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize("tokens", [16, 512])
def test_error_bound_on_random_normal(name: str, tokens: int) -> None:
    codec = make_geometry_codec(name, tokens=tokens, layers=1)
    kv = torch.randn(3, *codec.block_shape, generator=torch.Generator().manual_seed(1)).half()
    decoded = codec.decode_batch(codec.encode_batch(kv))
    assert decoded.shape == kv.shape and decoded.dtype == torch.float16
    err = relative_error(kv, decoded)
    assert err <= BOUNDS[name]
    if name == "none":
        assert torch.equal(decoded, kv)


def test_key_outlier_channels_stay_accurate() -> None:
    # Keys per channel: a channel 50x larger than the others does not wash out the rest.
    codec = make_geometry_codec("int4")
    kv = torch.randn(*codec.block_shape, generator=torch.Generator().manual_seed(2))
    kv[0, :, :, :, 3] *= 50
    decoded = codec.decode(codec.encode(kv.half()))
    normal = [c for c in range(64) if c != 3]
    assert relative_error(kv[0][..., normal], decoded[0][..., normal].float()) <= 0.10


def make_llama_kv(block_tokens: int = 16, blocks: int = 4) -> torch.Tensor:
    """KV of a tiny random-weight Llama (2 layers, 2 KV heads, head_dim 16): [2, L, T, H, D]."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 128, (1, block_tokens * blocks)), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    keys = torch.stack([layer.keys[0] for layer in cache.layers])  # [L, H, T, D]
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return torch.stack([keys, values]).permute(0, 1, 3, 2, 4).contiguous()  # [2, L, T, H, D]


@pytest.mark.model
def test_error_bound_on_real_model_kv() -> None:
    kv = make_llama_kv().half()
    _, layers, tokens, heads, dim = kv.shape
    for name in ("int8", "int4"):
        codec = make_codec(name, num_layers=layers, block_tokens=16, num_kv_heads=heads, head_dim=dim)
        blocks = kv.reshape(2, layers, tokens // 16, 16, heads, dim).permute(2, 0, 1, 3, 4, 5)
        decoded = codec.decode_batch(codec.encode_batch(blocks))
        assert relative_error(blocks, decoded) <= BOUNDS[name], name


@pytest.mark.parametrize("name", list(CODECS))
@pytest.mark.parametrize(
    "geometry",
    [(32, 16, 8, 128), (2, 4, 2, 8), (3, 5, 3, 7), (1, 512, 1, 128)],
    ids=lambda g: "x".join(map(str, g)),
)
def test_stored_bytes_are_the_configs_bytes(name: str, geometry: tuple[int, int, int, int]) -> None:
    layers, tokens, heads, dim = geometry
    codec = make_codec(name, num_layers=layers, block_tokens=tokens, num_kv_heads=heads, head_dim=dim)
    payload = codec.encode(torch.randn(codec.block_shape).half())
    codec.check_payload(payload)
    layout = payload_layout(name, num_layers=layers, block_tokens=tokens, num_kv_heads=heads, head_dim=dim)
    assert sum(t.nbytes for t in payload.values()) == sum(f.nbytes for f in layout.fields)
    assert codec.stored_bytes() == layout.slot_bytes
    cfg = KVCacheConfig(
        num_layers=layers, block_tokens=tokens, num_kv_heads=heads, head_dim=dim,
        compression_codec=name, max_tokens=tokens * 8, device="cpu",
    )  # fmt: skip
    assert cfg.block_bytes_stored() == layout.slot_bytes


def test_nominal_ratios_for_512_token_blocks() -> None:
    ratio = {
        n: payload_layout(n, num_layers=1, block_tokens=512, num_kv_heads=1, head_dim=128).slot_bytes / 2**18
        for n in CODECS
    }
    assert ratio["int8"] == (128 + 4) / 256
    assert ratio["int4"] == (16 + 4) / 64
    assert ratio["none"] == 1.0


@pytest.mark.parametrize("name", ["none", "int8", "int4"])
def test_engine_allocates_what_the_operator_budgets(name: str) -> None:
    cfg = KVCacheConfig(
        num_layers=2,
        block_tokens=16,
        num_kv_heads=2,
        head_dim=64,
        max_tokens=1024,
        compression_codec=name,
        device="cpu",
    )
    with KVCacheEngine(cfg) as engine:
        stats = engine.get_stats()
    assert stats["num_blocks"] == pool_blocks(cfg)
    assert stats["pool_bytes"] == pool_blocks(cfg) * cfg.block_bytes_stored()
    assert pool_bytes(cfg) >= stats["pool_bytes"]
    assert math.isclose(stats["compression_ratio"], cfg.block_bytes_stored() / cfg.block_bytes_fp16())


def test_int4_packing_is_lossless_for_codes() -> None:
    codec = make_geometry_codec("int4", layers=1, tokens=16, heads=1, dim=32)
    codes = torch.randint(0, 16, (2, 1, 1, 32, 16), dtype=torch.uint8)
    packed = codec._pack(codes)
    assert packed.shape == (2, 256)
    assert torch.equal(codec._unpack(packed, tuple(codes.shape)), codes)


@pytest.mark.parametrize("shape", [(2, 1, 3, 5, 16), (2, 1, 3, 4, 5), (1, 1, 3, 5, 7)])
def test_int4_bytes_are_the_flattened_low_nibble_first_format(shape: tuple[int, ...]) -> None:
    """The stored format (what persisted segments hold): codes of the flattened field paired
    (2i, 2i + 1) into one byte, low nibble first, a zero pad nibble for an odd count. The
    shape-preserving fast path must produce exactly these bytes."""
    codec = make_geometry_codec("int4", layers=1, tokens=16, heads=1, dim=32)
    codes = torch.randint(0, 16, shape, dtype=torch.uint8)
    flat = codes.reshape(shape[0], -1).tolist()
    expected = [
        [row[i] | ((row[i + 1] if i + 1 < len(row) else 0) << 4) for i in range(0, len(row), 2)]
        for row in flat
    ]
    packed = codec._pack(codes)
    assert packed.tolist() == expected
    assert torch.equal(codec._unpack(packed, shape), codes)


def test_unknown_codec_and_bad_payload_are_named() -> None:
    with pytest.raises(ValueError, match=r"codec.*none, fp8, int8, int4"):
        make_geometry_codec("zstd")
    codec = make_geometry_codec("int8")
    payload = codec.encode(torch.randn(codec.block_shape).half())
    payload["k_q"] = payload["k_q"][..., :-1]
    with pytest.raises(ValueError, match="payload: field k_q"):
        codec.check_payload(payload)


def test_sizing_helpers_import_no_torch() -> None:
    # The operator sizes pods with payload_layout/pool_bytes and has no torch.
    import subprocess
    import sys

    code = (
        "import sys; from kvcache_engine.contract import payload_layout, pool_bytes, KVCacheConfig;"
        "pool_bytes(KVCacheConfig(compression_codec='int4'));"
        "payload_layout('int8', num_layers=1, block_tokens=16, num_kv_heads=1, head_dim=8);"
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("name", ["fp8", "int8", "int4"])
def test_cpu_chunking_gives_the_same_bytes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager CPU codecs work through cache-sized runs of blocks (_CPU_CHUNK_BYTES); the result
    is bit-identical to one pass over the whole batch, for every entry point, including a last
    run shorter than the others and a caller's ``out`` buffer."""
    from kvcache_engine.core import compression

    codec = make_geometry_codec(name, layers=2, tokens=16, heads=2, dim=64)
    kv = torch.randn(7, *codec.block_shape, generator=torch.Generator().manual_seed(5)).half()
    whole = codec.encode_batch(kv)
    decoded, sequence = codec.decode_batch(whole), codec.decode_sequence(whole)
    block_bytes = math.prod(codec.block_shape) * 2
    monkeypatch.setattr(compression, "_CPU_CHUNK_BYTES", 3 * block_bytes)  # runs of 3, 3, 1
    assert codec._chunk_blocks() == 3
    chunked = codec.encode_batch(kv)
    assert chunked.keys() == whole.keys() and all(torch.equal(chunked[k], whole[k]) for k in whole)
    assert torch.equal(codec.decode_batch(chunked), decoded)
    assert torch.equal(codec.decode_sequence(chunked), sequence)
    out = torch.full((sequence.numel() + 10,), 7.0, dtype=torch.float16)
    got = codec.decode_sequence(chunked, out.view(-1)[: sequence.numel()].view(sequence.shape))
    assert torch.equal(got, sequence) and got.data_ptr() == out.data_ptr()
    assert torch.equal(out[sequence.numel() :], torch.full((10,), 7.0, dtype=torch.float16))
