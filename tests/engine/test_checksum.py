"""payload_checksum: the word-sum digest against a pure-Python reference, its detection
guarantees, and the batched/slot variants agreeing with it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_engine.contract import payload_layout
from kvcache_engine.core import block_pool
from kvcache_engine.core.block_pool import BlockPool, payload_checksum, payload_checksums
from kvcache_engine.core.compression import make_codec

_MASK = (1 << 64) - 1


def reference_checksum(fields: dict[str, bytes]) -> str:
    """The documented definition, in plain Python: sorted fields, each zero-padded to 4 bytes,
    little-endian int32 words, s1 = sum x, s2 = sum x * (i + 1), modulo 2**64."""
    stream = b"".join(data + b"\0" * (-len(data) % 4) for _, data in sorted(fields.items()))
    words = [int.from_bytes(stream[i : i + 4], "little", signed=True) for i in range(0, len(stream), 4)]
    s1 = sum(words) & _MASK
    s2 = sum(x * (i + 1) for i, x in enumerate(words)) & _MASK
    return f"{s1:016x}{s2:016x}"


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


payload_bytes = st.dictionaries(
    st.sampled_from(["a", "k_q", "scale", "v"]), st.binary(max_size=67), min_size=1
)


def _native_or_skip() -> None:
    if block_pool.NATIVE_SUMS is None:
        if shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("a C compiler is here but the checksum kernel was not built: pip install -e .")
        pytest.skip("no C compiler here: the checksum kernel (_wordsums.c) was not built")


@pytest.fixture(params=["native", "torch"])
def sums_form(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the C kernel, then with the torch forms (NATIVE_SUMS unset)."""
    saved = block_pool.NATIVE_SUMS
    if request.param == "native":
        _native_or_skip()
    else:
        block_pool.NATIVE_SUMS = None
    try:
        yield request.param
    finally:
        block_pool.NATIVE_SUMS = saved


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=payload_bytes)
def test_matches_the_pure_python_reference(sums_form: str, fields: dict[str, bytes]) -> None:
    payload = {name: as_tensor(data) for name, data in fields.items()}
    assert payload_checksum(payload) == reference_checksum(fields)


def test_typed_fields_hash_their_bytes_and_chunking_does_not_matter(
    sums_form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(1)
    payload = {
        "kv": torch.randn(2, 3, 5, 7, generator=gen).half(),
        "scale": torch.randn(3, generator=gen),
        "codes": torch.randint(0, 256, (1001,), dtype=torch.uint8, generator=gen),
    }
    expected = reference_checksum({k: v.numpy().tobytes() for k, v in payload.items()})
    assert payload_checksum(payload) == expected
    monkeypatch.setattr(block_pool, "_CHUNK_ELEMENTS", 7)  # many chunks of odd width: same digest
    assert payload_checksum(payload) == expected
    strided = {**payload, "kv": payload["kv"].transpose(0, 1).contiguous().transpose(0, 1)}
    assert payload_checksum(strided) == expected  # a non-contiguous view hashes its logical bytes


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=96), st.data())
def test_any_flipped_byte_changes_the_checksum(data: bytes, draw: st.DataObject) -> None:
    index = draw.draw(st.integers(0, len(data) - 1))
    flip = draw.draw(st.integers(1, 255))
    tampered = bytearray(data)
    tampered[index] ^= flip
    assert payload_checksum({"x": as_tensor(bytes(tampered))}) != payload_checksum({"x": as_tensor(data)})


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=2, max_size=40, unique=True), st.data())
def test_swapped_words_change_the_checksum(words: list[int], draw: st.DataObject) -> None:
    i = draw.draw(st.integers(0, len(words) - 2))
    j = draw.draw(st.integers(i + 1, len(words) - 1))
    swapped = list(words)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    original = torch.tensor(words, dtype=torch.int32)
    assert payload_checksum({"x": torch.tensor(swapped, dtype=torch.int32)}) != payload_checksum(
        {"x": original}
    )


def test_batched_checksums_equal_one_at_a_time() -> None:
    gen = torch.Generator().manual_seed(2)
    batch = {
        "a": torch.randn(5, 3, 9, generator=gen).half(),
        "b": torch.randint(0, 256, (5, 7), dtype=torch.uint8),
    }
    singles = [payload_checksum({k: v[i] for k, v in batch.items()}) for i in range(5)]
    assert payload_checksums(batch) == singles
    assert len(set(singles)) == 5


@pytest.mark.parametrize("codec_name", ["none", "int8", "int4"])
def test_slot_checksums_ignore_padding_and_match_the_payload(sums_form: str, codec_name: str) -> None:
    geometry = {"num_layers": 1, "block_tokens": 3, "num_kv_heads": 1, "head_dim": 5}  # odd sizes: padding
    codec = make_codec(codec_name, **geometry)
    pool = BlockPool(payload_layout(codec_name, **geometry), 4, torch.device("cpu"))
    kv = torch.randn(3, *codec.block_shape).half()
    payloads = codec.encode_batch(kv)
    rows = pool.rows_of(payloads)
    pool.write_rows([3, 1, 2], rows)  # not consecutive: the indexed path
    expected = payload_checksums(payloads)
    assert pool.checksums([3, 1, 2]) == expected == pool.row_checksums(rows)
    assert [pool.checksum(s) for s in (3, 1, 2)] == expected
    assert all(torch.equal(pool.read(3)[k], v[0]) for k, v in payloads.items())
    last = pool.layout.fields[-1]
    padding = last.offset + last.nbytes
    if padding < pool.layout.slot_bytes:
        pool.storage[3, padding:] = 0xAB  # bytes outside every field do not count
        assert pool.checksum(3) == expected[0]
    pool.storage[3, pool.layout.fields[0].offset] ^= 0x10
    assert pool.checksum(3) != expected[0]


@pytest.mark.parametrize(
    "step", [64, 128 * 3, 64 * 64 * 8], ids=["row-in-steps", "block-runs", "rows-per-step"]
)
def test_blocked_cpu_sums_equal_the_chunked_sums(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The float64 block/column-sum form (CPU) against the int64 multiply-add form, on extreme
    words (all +-2**31 edges) and rows whose width leaves a tail outside the blocks."""
    monkeypatch.setattr(block_pool, "_BLOCK_WORDS", 64)
    monkeypatch.setattr(block_pool, "_F64_STEP", step)
    gen = torch.Generator().manual_seed(4)
    words = torch.randint(-(2**31), 2**31, (5, 64 * 9 + 13), dtype=torch.int32, generator=gen)
    words[0] = 2**31 - 1
    words[1] = -(2**31)
    got = block_pool._field_sums_blocked(words)
    want = block_pool._field_sums_chunked(words)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    raw = {"x": words.view(torch.uint8).reshape(5, -1)[2]}
    assert payload_checksum(raw) == reference_checksum({"x": raw["x"].numpy().tobytes()})


def test_the_c_kernel_is_built_and_used_for_cpu_words() -> None:
    """make setup builds _wordsums.c (setup.py); a compiler-less install falls back to torch."""
    _native_or_skip()
    words = torch.arange(-8, 4096, dtype=torch.int32).reshape(4, -1)
    calls: list[int] = []
    kernel = block_pool.NATIVE_SUMS
    assert kernel is not None

    def spy(*args: object) -> None:
        calls.append(1)
        kernel(*args)

    saved = block_pool.NATIVE_SUMS
    block_pool.NATIVE_SUMS = spy
    try:
        got = block_pool._field_sums(words)
    finally:
        block_pool.NATIVE_SUMS = saved
    want = block_pool._field_sums_chunked(words)
    assert calls and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 5),
    width=st.integers(1, 300),
    pad=st.integers(0, 9),
    edge=st.sampled_from([None, 2**31 - 1, -(2**31)]),
    seed=st.integers(0, 2**16),
    threads=st.integers(1, 3),
)
def test_c_kernel_equals_the_torch_sums(
    rows: int, width: int, pad: int, edge: int | None, seed: int, threads: int
) -> None:
    """The C kernel's lanes against the int64 multiply-adds: any width (lane tails), rows that
    are views of wider rows (a row stride other than the width), the int32 extremes, rows split
    unevenly across threads."""
    _native_or_skip()
    kernel = block_pool.NATIVE_SUMS
    assert kernel is not None
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randint(-(2**31), 2**31, (rows, width + pad), dtype=torch.int32, generator=gen)
    if edge is not None:
        wide[0] = edge
    words = wide[:, pad:]  # starts pad words in: an offset data pointer and a longer row stride
    saved = block_pool._SUM_THREADS, block_pool._SUM_PART_BYTES
    block_pool._SUM_THREADS, block_pool._SUM_PART_BYTES = threads, 4  # split whenever rows allow
    try:
        got = block_pool._field_sums_native(words, kernel)
    finally:
        block_pool._SUM_THREADS, block_pool._SUM_PART_BYTES = saved
    want = block_pool._field_sums_chunked(words)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
