"""Block codecs: none, fp8, int8, int4 (KIVI-style group quantisation).

A codec turns one block's KV, ``[2, L, T, H, D]`` (keys then values), into a payload: a dict of
tensors whose names, dtypes and shapes are exactly ``config.payload_layout(...)``, so the bytes a
block occupies in the pool are the bytes the operator budgets for. ``encode_batch``/``decode_batch``
take a leading block dimension so a whole request (or a benchmark batch) is one set of kernels.

int8/int4 are asymmetric (fp16 scale and zero point per group). Keys are quantised per channel
(a group runs along the block's tokens), values per token (a group runs along the channels): key
outliers live in fixed channels, value outliers in tokens (KIVI, Liu et al. 2024). int4 packs two
codes per byte. fp8 is e4m3 with one fp32 scale per (K/V, layer).
"""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from kvcache_engine.contract.cache import CODEC_GROUP_SIZE, PayloadLayout, payload_layout

__all__ = ["CODECS", "Codec", "make_codec", "relative_error", "torch_dtype"]

Payload = dict[str, torch.Tensor]

log = logging.getLogger("kvcache_engine.compression")

COMPILE_ON_CUDA = os.environ.get("KVCACHE_COMPILE", "1") != "0"
"""On CUDA, codecs run through torch.compile: the eager graph makes ~10 passes over memory, the
fused kernels one read and one write (the difference between ~100 and several hundred GB/s on an
H100). Any compile failure falls back to eager with one warning. KVCACHE_COMPILE=0 disables it."""


_CPU_CHUNK_BYTES = 8 * 1024 * 1024
"""Eager CPU codecs work through this much fp16 KV at a time: the ~10 elementwise passes of a
quantise or dequantise then run in the L3 cache instead of DRAM (about 2x on encode and 3-4x on
decode for a 64-block batch: ``bench.engine_throughput --chain 64``, docs/benchmarks.md)."""


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name`` (``float16``, ``uint8``, ``float8_e4m3fn``, ...)."""
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype: unknown torch dtype {name!r}")
    return dt


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative Frobenius error ||a - r|| / ||r|| (0.0 when both are zero)."""
    ref = reference.double()
    denom = float(torch.linalg.vector_norm(ref))
    diff = float(torch.linalg.vector_norm(approx.double() - ref))
    return diff / denom if denom else diff


class Codec(ABC):
    """Encodes/decodes blocks of one geometry. Payload tensors are on the input's device."""

    name: str = ""

    def __init__(
        self, num_layers: int, block_tokens: int, num_kv_heads: int, head_dim: int, dtype: str
    ) -> None:
        self.geometry = (num_layers, block_tokens, num_kv_heads, head_dim)
        self.dtype = torch_dtype(dtype)
        self.layout: PayloadLayout = payload_layout(
            self.name,
            num_layers=num_layers,
            block_tokens=block_tokens,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=dtype,
        )

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        layers, tokens, heads, dim = self.geometry
        return (2, layers, tokens, heads, dim)

    def stored_bytes(self) -> int:
        """Bytes one encoded block occupies (one pool slot)."""
        return self.layout.slot_bytes

    def ratio(self) -> float:
        """Stored bytes / fp16 bytes of a block."""
        return self.stored_bytes() / (math.prod(self.block_shape) * 2)

    def encode(self, kv: torch.Tensor) -> Payload:
        """One block ``[2, L, T, H, D]`` -> payload (contiguous tensors)."""
        return {k: v[0] for k, v in self.encode_batch(kv.unsqueeze(0)).items()}

    def decode(self, payload: Payload) -> torch.Tensor:
        """Payload -> one block ``[2, L, T, H, D]`` in the codec's dtype."""
        return self.decode_batch({k: v.unsqueeze(0) for k, v in payload.items()})[0]

    def encode_batch(self, kv: torch.Tensor) -> Payload:
        """``[N, 2, L, T, H, D]`` -> payload with a leading N on every field."""
        if not kv.is_cuda and self.name != "none":
            chunked: Payload = self._chunked(self._encode, kv)
            return chunked
        result: Payload = self._run("encode", self._encode, kv, kv.is_cuda)
        return result

    def encode_for_store(self, kv: torch.Tensor) -> Payload:
        """Like encode_batch, but fields may be non-contiguous views of ``kv``: for a caller that
        copies them straight into pool slots (saves the "none" codec a whole intermediate copy)."""
        return self.encode_batch(kv)

    def decode_batch(self, payload: Payload) -> torch.Tensor:
        """Payload with a leading N -> ``[N, 2, L, T, H, D]``."""
        first = next(iter(payload.values()))
        if not first.is_cuda and self.name != "none":
            chunked: torch.Tensor = self._chunked(self._decode, payload)
            return chunked
        result: torch.Tensor = self._run("decode", self._decode, payload, first.is_cuda)
        return result

    def decode_sequence(self, payload: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        """Payload of N consecutive blocks of a chain -> their KV as one sequence,
        ``[2, L, N * T, H, D]`` contiguous (the engine's get layout), written in one pass: no
        ``[N, 2, ...]`` intermediate to permute and copy. ``out`` (that shape, contiguous, same
        device) receives the result: written directly on the eager path, copied into after a
        compiled CUDA kernel."""
        first = next(iter(payload.values()))
        if not first.is_cuda and self.name != "none" and first.shape[0] > self._chunk_blocks():
            return self._chunked_sequence(payload, out)
        if out is not None and not (first.is_cuda and COMPILE_ON_CUDA and self.name != "none"):
            return self._decode_sequence(payload, out)
        result: torch.Tensor = self._run("decode_sequence", self._decode_sequence, payload, first.is_cuda)
        return result if out is None else out.copy_(result)

    _compiled: dict[str, Callable[[Any], Any]]

    def _chunk_blocks(self) -> int:
        """Blocks per step of an eager CPU encode/decode (see _CPU_CHUNK_BYTES)."""
        return max(1, _CPU_CHUNK_BYTES // (math.prod(self.block_shape) * 2))

    def _chunked_sequence(self, payload: Payload, out: torch.Tensor | None) -> torch.Tensor:
        """decode_sequence on the CPU a cache-sized run of blocks at a time."""
        layers, tokens, heads, dim = self.geometry
        n = next(iter(payload.values())).shape[0]
        if out is None:
            out = torch.empty((2, layers, n * tokens, heads, dim), dtype=self.dtype)
        k = self._chunk_blocks()
        for i in range(0, n, k):
            part = self._decode_sequence({name: t[i : i + k] for name, t in payload.items()})
            out[:, :, i * tokens : i * tokens + part.shape[2]].copy_(part)
        return out

    def _chunked(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """``fn`` (an encode or decode with a leading block dim) over cache-sized runs of blocks,
        the results written into one output (see _CPU_CHUNK_BYTES)."""
        first = arg if isinstance(arg, torch.Tensor) else next(iter(arg.values()))
        n, k = first.shape[0], self._chunk_blocks()
        if n <= k:
            return fn(arg)
        result: Any = None
        for i in range(0, n, k):
            part = fn(
                arg[i : i + k] if isinstance(arg, torch.Tensor) else {m: t[i : i + k] for m, t in arg.items()}
            )
            if isinstance(part, torch.Tensor):
                if result is None:
                    result = torch.empty((n, *part.shape[1:]), dtype=part.dtype)
                result[i : i + part.shape[0]].copy_(part)
                continue
            if result is None:
                result = {m: torch.empty((n, *t.shape[1:]), dtype=t.dtype) for m, t in part.items()}
            for m, t in part.items():
                result[m][i : i + t.shape[0]].copy_(t)
        return result

    def _run(self, op: str, fn: Callable[[Any], Any], arg: Any, on_cuda: bool) -> Any:
        if not (on_cuda and COMPILE_ON_CUDA and self.name != "none"):
            return fn(arg)
        if not hasattr(self, "_compiled"):
            self._compiled = {}
        compiled = self._compiled.get(op)
        if compiled is None:
            # Static shapes except the batch dim (marked below): the block geometry is fixed per
            # codec, so index math compiles to constants and transposes get tiled kernels
            # (dynamic=True made every dim symbolic: ~4x slower decode kernels on an H100).
            compiled = self._compiled[op] = torch.compile(fn)
        for t in arg.values() if isinstance(arg, dict) else (arg,):
            torch._dynamo.maybe_mark_dynamic(t, 0)  # one graph for every batch size > 1
        try:
            return compiled(arg)
        except Exception as exc:  # a missing compiler or an unsupported op: eager is correct, only slower
            log.warning("codec %s: torch.compile failed for %s (%s); running eagerly", self.name, op, exc)
            self._compiled[op] = fn
            return fn(arg)

    @abstractmethod
    def _encode(self, kv: torch.Tensor) -> Payload: ...

    @abstractmethod
    def _decode(self, payload: Payload) -> torch.Tensor: ...

    def _decode_sequence(self, payload: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        blocks = self._decode(payload)  # [N, 2, L, T, H, D]
        layers, _, heads, dim = self.geometry
        seq = blocks.permute(1, 2, 0, 3, 4, 5)
        if out is None:  # always a fresh tensor: the "none" codec's blocks are views of the pool
            out = torch.empty(
                (2, layers, seq.shape[2] * seq.shape[3], heads, dim), dtype=seq.dtype, device=seq.device
            )
        out.view(seq.shape).copy_(seq)
        return out

    def check_payload(self, payload: Payload) -> None:
        """Raise ValueError naming ``payload`` unless it has exactly this layout's fields."""
        names = {f.name for f in self.layout.fields}
        if set(payload) != names:
            raise ValueError(
                f"payload: expected fields {sorted(names)} for codec {self.name}, got {sorted(payload)}"
            )
        for f in self.layout.fields:
            t = payload[f.name]
            if tuple(t.shape) != f.shape or t.dtype != torch_dtype(f.dtype):
                raise ValueError(
                    f"payload: field {f.name} must be {f.dtype}{list(f.shape)}, got {t.dtype}{list(t.shape)}"
                )


class NoneCodec(Codec):
    """Stores the block as given (bit-exact)."""

    name = "none"

    def _encode(self, kv: torch.Tensor) -> Payload:
        return {"kv": kv.to(self.dtype).contiguous()}

    def encode_for_store(self, kv: torch.Tensor) -> Payload:
        return {"kv": kv.to(self.dtype)}

    def _decode(self, payload: Payload) -> torch.Tensor:
        return payload["kv"]


class Fp8Codec(Codec):
    """float8 e4m3 with one fp32 scale per (K/V, layer), mapping the amax to 448."""

    name = "fp8"
    _FP8_MAX = 448.0

    def _encode(self, kv: torch.Tensor) -> Payload:
        x = kv.float()
        amax = x.abs().amax(dim=(3, 4, 5))
        scale = torch.where(amax > 0, amax / self._FP8_MAX, torch.ones_like(amax))
        data = (x / scale[..., None, None, None]).to(torch.float8_e4m3fn)
        return {"scale": scale.contiguous(), "data": data.contiguous()}

    def _decode(self, payload: Payload) -> torch.Tensor:
        scale = payload["scale"]
        return (payload["data"].float() * scale[..., None, None, None]).to(self.dtype)


class _GroupQuantCodec(Codec):
    """Asymmetric group quantisation to ``bits``; keys per channel, values per token."""

    bits = 8

    def __init__(
        self, num_layers: int, block_tokens: int, num_kv_heads: int, head_dim: int, dtype: str
    ) -> None:
        super().__init__(num_layers, block_tokens, num_kv_heads, head_dim, dtype)
        size = CODEC_GROUP_SIZE[self.name]
        self.key_group = math.gcd(block_tokens, size)
        self.value_group = math.gcd(head_dim, size)
        self.qmax = float(2**self.bits - 1)

    def _quantize(self, x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x[..., C]`` grouped along the last dim -> (codes uint8 [..., C], scale, zero [..., C/g])."""
        g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
        lo, hi = torch.aminmax(g, dim=-1)
        # Quantise with the fp16-rounded metadata that is stored, so decode sees the same grid.
        zero = lo.half()
        scale = ((hi.float() - lo.float()) / self.qmax).half()
        inv = torch.where(scale > 0, 1.0 / scale.float(), torch.zeros_like(lo, dtype=torch.float32))
        # In place after the first op: one float32 buffer instead of one per step.
        codes = torch.sub(g, zero.float()[..., None]).mul_(inv[..., None]).round_().clamp_(0, self.qmax)
        return codes.to(torch.uint8).reshape(x.shape), scale, zero

    def _dequantize(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
    ) -> torch.Tensor:
        """zero + code * scale in float32, rounded once to the codec dtype (one pointwise
        expression: under torch.compile it fuses into the kernel that writes the output)."""
        g = codes.reshape(*scale.shape, group)
        deq = torch.addcmul(zero.float()[..., None], g, scale.float()[..., None])  # one eager CPU op
        return deq.to(self.dtype).reshape(codes.shape)

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes

    def _unpack(self, packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return packed.reshape(shape)

    def _encode(self, kv: torch.Tensor) -> Payload:
        keys = kv[:, 0].permute(0, 1, 3, 4, 2)  # [N, L, H, D, T]: groups run along tokens
        values = kv[:, 1]  # [N, L, T, H, D]: groups run along channels
        k_codes, k_scale, k_zero = self._quantize(keys, self.key_group)
        v_codes, v_scale, v_zero = self._quantize(values, self.value_group)
        return {
            "k_scale": k_scale.contiguous(),
            "k_zero": k_zero.contiguous(),
            "v_scale": v_scale.contiguous(),
            "v_zero": v_zero.contiguous(),
            "k_q": self._pack(k_codes),
            "v_q": self._pack(v_codes),
        }

    def _halves(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded keys and values, each ``[N, L, T, H, D]`` (keys as a permuted view)."""
        n = payload["k_q"].shape[0]
        layers, tokens, heads, dim = self.geometry
        k_codes = self._unpack(payload["k_q"], (n, layers, heads, dim, tokens))
        v_codes = self._unpack(payload["v_q"], (n, layers, tokens, heads, dim))
        keys = self._dequantize(k_codes, payload["k_scale"], payload["k_zero"], self.key_group)
        values = self._dequantize(v_codes, payload["v_scale"], payload["v_zero"], self.value_group)
        return keys.permute(0, 1, 4, 2, 3), values

    def _decode(self, payload: Payload) -> torch.Tensor:
        keys, values = self._halves(payload)
        return torch.stack((keys, values), dim=1)

    def _decode_sequence(self, payload: Payload, out: torch.Tensor | None = None) -> torch.Tensor:
        keys, values = self._halves(payload)
        layers, _, heads, dim = self.geometry
        halves = (keys.transpose(0, 1), values.transpose(0, 1))  # each [L, N, T, H, D]
        if out is not None:  # eager only (see decode_sequence): stack straight into the buffer
            torch.stack(halves, dim=0, out=out.view(2, *halves[0].shape))
            return out
        return torch.stack(halves, dim=0).reshape(2, layers, -1, heads, dim)


class Int8Codec(_GroupQuantCodec):
    name = "int8"
    bits = 8

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.contiguous()


class Int4Codec(_GroupQuantCodec):
    """Two 4-bit codes per byte over the flattened field (low nibble first)."""

    name = "int4"
    bits = 4

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        n, last = codes.shape[0], codes.shape[-1]
        if last % 2 == 0:
            # Pair neighbours along the last dim: the same bytes as pairing over the flattened
            # field (the last dim is even), but the kernel keeps the field's shape, so the
            # compiler can tile the keys' token/channel transpose instead of striding through it.
            return (codes[..., 0::2] | (codes[..., 1::2] << 4)).reshape(n, -1)
        flat = codes.reshape(n, -1)
        if flat.shape[1] % 2:
            flat = torch.nn.functional.pad(flat, (0, 1))
        return (flat[:, 0::2] | (flat[:, 1::2] << 4)).contiguous()

    def _unpack(self, packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        # Low nibble first; with an even last dim it runs in the field's own shape (see _pack),
        # which torch.compile folds into the dequantising kernel.
        # (A stack of two plain ops, not a broadcast against [0, 4]: eager CPU runs that at half
        # the speed, its inner loop being 2 long.)
        if shape[-1] % 2 == 0:
            pairs = packed.reshape(*shape[:-1], shape[-1] // 2)
            return torch.stack((pairs & 0x0F, pairs >> 4), dim=-1).reshape(shape)
        flat = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
        count = math.prod(shape[1:])
        if flat.shape[1] != count:  # an odd element count: drop the pad nibble
            flat = flat[:, :count]
        return flat.reshape(shape)


CODECS: dict[str, type[Codec]] = {"none": NoneCodec, "fp8": Fp8Codec, "int8": Int8Codec, "int4": Int4Codec}


def make_codec(
    name: str, *, num_layers: int, block_tokens: int, num_kv_heads: int, head_dim: int, dtype: str = "float16"
) -> Codec:
    """The codec called ``name`` for this geometry. Raises ValueError naming ``codec`` with the
    supported values (fp8 only where torch has float8_e4m3fn)."""
    cls = CODECS.get(name)
    if cls is None:
        raise ValueError(f"codec: unknown codec {name!r}; supported: {', '.join(CODECS)}")
    if cls is Fp8Codec and not hasattr(torch, "float8_e4m3fn"):
        raise ValueError("codec: fp8 needs torch.float8_e4m3fn, which this torch build lacks")
    return cls(num_layers, block_tokens, num_kv_heads, head_dim, dtype)
