"""The cache spec: one pydantic model that is the engine's config and the CRD's ``spec.cache``.

Part of the contract (torch-free): the operator renders it into the engine ConfigMap, the engine
parses the same model (``load_config``), the CRD's schema is generated from it.

Python keeps the seed's snake_case names (``max_tokens``); Kubernetes manifests use camelCase
aliases (``maxTokens``). Both are accepted on input; ``to_manifest()`` writes camelCase.
Assignments are validated (the seed mutates configs in place: ``config.max_tokens = 16384``).
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "CODEC_BYTES_PER_FP16_BYTE",
    "CODEC_GROUP_SIZE",
    "DTYPE_BYTES",
    "SLOT_OVERHEAD_BYTES",
    "CacheStrategy",
    "Codec",
    "ConfigError",
    "KVCacheConfig",
    "PayloadField",
    "PayloadLayout",
    "format_validation_error",
    "load_config",
    "payload_layout",
]


class CacheStrategy(enum.StrEnum):
    """Eviction strategy. ``ADAPTIVE`` is ARC-style: it shifts between recency and frequency
    according to hits on its own ghost lists."""

    LRU = "LRU"
    LFU = "LFU"
    ADAPTIVE = "ADAPTIVE"

    @classmethod
    def _missing_(cls, value: object) -> CacheStrategy | None:
        # Accept "lru", "CacheStrategy.LRU" and friends; anything else falls through to an error
        # that lists the supported values.
        if isinstance(value, str):
            name = value.rsplit(".", 1)[-1].upper()
            if name in cls.__members__:
                return cls[name]
        return None


Codec = Literal["none", "fp8", "int8", "int4"]
DType = Literal["float16", "bfloat16", "float32"]

DTYPE_BYTES: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}

# Nominal stored bytes per fp16 byte for each codec, scales included, for a block whose token
# and channel counts are multiples of the group size. int8: 1 byte + an fp16 scale and an fp16
# zero point per group of 128 -> (128 + 4) / 256. int4: half a byte + the same per group of 32
# -> (16 + 4) / 64. fp8: 1 byte + one fp32 scale per (K/V, layer). The exact figure for a
# geometry comes from payload_layout() (keys are grouped along the block's tokens, so a 16-token
# block has groups of 16): block_bytes_stored() and the pool use that, and the engine reports
# the ratio it achieves in get_stats()["compression_ratio"].
CODEC_BYTES_PER_FP16_BYTE: dict[str, float] = {
    "none": 1.0,
    "fp8": 0.5,
    "int8": 132 / 256,
    "int4": 20 / 64,
}

# Quantisation group size per codec (elements sharing one scale and zero point). Keys are grouped
# per channel along tokens, values per token along channels (KIVI); a group never straddles a
# block, so the effective key group is gcd(block_tokens, size) and the value group
# gcd(head_dim, size).
CODEC_GROUP_SIZE: dict[str, int] = {"int8": 128, "int4": 32}

# Every payload field starts at a multiple of this many bytes inside a pool slot, and slots are a
# multiple of it, so typed views of the pool's uint8 storage are always aligned.
SLOT_ALIGN_BYTES = 16

_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "uint8": 1}


@dataclass(frozen=True)
class PayloadField:
    """One tensor of a stored block: its dtype name, shape and byte offset inside a pool slot."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class PayloadLayout:
    """The exact bytes of one stored block for a codec and geometry (torch-free).

    Fields are ordered by decreasing item size and aligned to SLOT_ALIGN_BYTES; ``slot_bytes``
    is what one pool slot occupies, so pool bytes = slots * slot_bytes, exactly.
    """

    codec: str
    fields: tuple[PayloadField, ...]
    slot_bytes: int


def _align(n: int) -> int:
    return -(-n // SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES


def _codec_fields(
    codec: str, *, layers: int, tokens: int, heads: int, dim: int, dtype: str
) -> list[tuple[str, str, tuple[int, ...]]]:
    if codec == "none":
        return [("kv", dtype, (2, layers, tokens, heads, dim))]
    if codec == "fp8":
        return [("scale", "float32", (2, layers)), ("data", "float8_e4m3fn", (2, layers, tokens, heads, dim))]
    if codec not in CODEC_GROUP_SIZE:
        raise ConfigError(f"unknown codec {codec!r}; supported: none, fp8, int8, int4")
    size = CODEC_GROUP_SIZE[codec]
    key_group, value_group = math.gcd(tokens, size), math.gcd(dim, size)
    elements = layers * tokens * heads * dim
    # int4 packs two codes per byte over the flattened tensor.
    k_shape: tuple[int, ...] = (layers, heads, dim, tokens) if codec == "int8" else ((elements + 1) // 2,)
    v_shape: tuple[int, ...] = (layers, tokens, heads, dim) if codec == "int8" else ((elements + 1) // 2,)
    k_meta = (layers, heads, dim, tokens // key_group)
    v_meta = (layers, tokens, heads, dim // value_group)
    return [
        ("k_scale", "float16", k_meta),
        ("k_zero", "float16", k_meta),
        ("v_scale", "float16", v_meta),
        ("v_zero", "float16", v_meta),
        ("k_q", "uint8", k_shape),
        ("v_q", "uint8", v_shape),
    ]


def payload_layout(
    codec: str,
    *,
    num_layers: int,
    block_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str = "float16",
) -> PayloadLayout:
    """The stored fields of one block (see PayloadLayout). The engine's codecs and pool use this
    layout, so the memory the operator computes is the memory the engine allocates."""
    raw = _codec_fields(
        codec, layers=num_layers, tokens=block_tokens, heads=num_kv_heads, dim=head_dim, dtype=dtype
    )
    raw.sort(key=lambda f: -_ITEMSIZE[f[1]])  # stable: larger items first keeps every offset aligned
    fields, offset = [], 0
    for name, dt, shape in raw:
        nbytes = math.prod(shape) * _ITEMSIZE[dt]
        fields.append(PayloadField(name, dt, shape, offset, nbytes))
        offset = _align(offset + nbytes)
    return PayloadLayout(codec, tuple(fields), max(offset, SLOT_ALIGN_BYTES))


# The bookkeeping overhead per pool slot (index entry, checksums, eviction node), in bytes,
# used for the pod memory request. Measured in bench/ and kept deliberately generous.
SLOT_OVERHEAD_BYTES = 512


class ConfigError(ValueError):
    """A configuration problem, with the field named. Subclass of ValueError."""


def _camel(name: str) -> str:
    return to_camel(name)


class KVCacheConfig(BaseModel):
    """Configuration of one KV cache engine (also the CRD's ``spec.cache``)."""

    model_config = ConfigDict(
        alias_generator=_camel,
        populate_by_name=True,
        validate_assignment=True,
        extra="forbid",
        use_enum_values=False,
        json_schema_extra={"description": "KV cache engine configuration (the engine's KVCacheConfig)."},
    )

    # --- capacity and geometry -------------------------------------------------------------
    max_tokens: int = Field(
        8192, ge=16, le=2**31, description="Cache capacity in tokens (the fp16-equivalent budget)."
    )
    block_tokens: int = Field(16, ge=1, le=4096, description="Tokens per KV block (the unit of caching).")
    num_layers: int = Field(
        32, ge=1, le=1024, description="Transformer layers of the model whose KV is cached."
    )
    num_kv_heads: int = Field(8, ge=1, le=1024, description="Key/value heads per layer.")
    head_dim: int = Field(128, ge=1, le=4096, description="Dimension of each attention head.")
    dtype: DType = Field("float16", description="Dtype of the KV tensors clients put and get.")
    namespace: str = Field(
        "default",
        min_length=1,
        max_length=253,
        description="Model/namespace key mixed into every block hash, so two models never share entries.",
    )
    route_depth: int = Field(
        2,
        ge=1,
        le=4096,
        description=(
            "Replica placement key: a chain lives on the replica chosen by its block at this depth "
            "(its last block when shorter), so shared leading blocks (a system prompt) are stored "
            "on every replica while chains spread; 1 places by the first block."
        ),
    )

    # --- eviction ------------------------------------------------------------------------------
    cache_strategy: CacheStrategy = Field(
        CacheStrategy.ADAPTIVE, description="Eviction strategy: LRU, LFU or ADAPTIVE."
    )
    enable_gc: bool = Field(True, description="Evict in the background once occupancy passes gc_threshold.")
    gc_threshold: float = Field(
        0.9, gt=0.0, le=1.0, description="Occupancy (0..1] at which background eviction starts."
    )

    # --- compression ---------------------------------------------------------------------------
    use_compression: bool = Field(False, description="Store blocks compressed.")
    compression_ratio: float = Field(
        0.5,
        ge=0.1,
        le=1.0,
        description=(
            "Target stored bytes / fp16 bytes when use_compression is on: >= 0.5 selects int8, "
            "< 0.5 selects int4 (unless compression_codec names one)."
        ),
    )
    compression_codec: Literal["auto", "none", "fp8", "int8", "int4"] = Field(
        "auto", description="Codec; 'auto' derives it from use_compression and compression_ratio."
    )

    # --- prefetch and tiers ------------------------------------------------------------------------
    enable_prefetch: bool = Field(False, description="On a hit, promote the next blocks of the chain.")
    prefetch_size: int = Field(16, ge=1, le=4096, description="Blocks promoted per prefetch.")
    cpu_tier_tokens: int = Field(
        0,
        ge=0,
        le=2**31,
        description="Capacity in tokens of the pinned CPU tier behind a CUDA tier (0: no CPU tier).",
    )

    # --- memory and device -----------------------------------------------------------------------
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="'auto' (CUDA when available, else CPU with a warning), 'cpu', 'cuda' or 'cuda:N'.",
    )
    pin_memory: bool = Field(True, description="Pin host memory (CPU tier, transfers) when CUDA is present.")
    non_blocking: bool = Field(True, description="Use non_blocking host<->device copies.")
    enable_memory_pool: bool = Field(
        True,
        description=(
            "Preallocate the block pool. Always true: the pool is what keeps the allocator from "
            "fragmenting; false is refused."
        ),
        json_schema_extra={"enum": [True]},
    )
    memory_pool_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Pool size in bytes; when set it sizes the pool and max_tokens reports the pool's "
            "capacity in tokens (engine API only: the operator sizes pools from maxTokens)."
        ),
    )

    # --- service ---------------------------------------------------------------------------
    num_workers: int = Field(
        4, ge=1, le=256, description="Worker threads for tensor work (compression, copies)."
    )
    persistence_path: str | None = Field(
        None, description="Directory where the cache persists (a PVC mount)."
    )
    persist_interval_s: float = Field(
        60.0,
        ge=0.0,
        le=86400.0,
        description="Seconds between incremental persists (0: only on demand/SIGTERM).",
    )
    enable_distributed: bool = Field(
        False,
        description=(
            "Multi-process mode. Always false: one engine is one process; spread a cache over "
            "processes or GPUs with replicas (clients shard chains over them); true is refused."
        ),
        json_schema_extra={"enum": [False]},
    )
    enable_profiling: bool = Field(False, description="Allow POST /admin/profile (torch.profiler traces).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Engine log level.")
    model_path: str | None = Field(
        None, description="Local Hugging Face directory or GGUF file used by process_request."
    )

    # --- normalisation ------------------------------------------------------------------------------

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: Any) -> Any:
        # Accept torch.float16 (the seed assigns torch dtypes) without importing torch here.
        if value is None:
            return value
        text = str(value)
        text = text.removeprefix("torch.")
        return {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32"}.get(text, text)

    @field_validator("cache_strategy", mode="before")
    @classmethod
    def _strategy(cls, value: Any) -> Any:
        if isinstance(value, CacheStrategy):
            return value
        try:
            return CacheStrategy(value)
        except ValueError:
            allowed = ", ".join(s.value for s in CacheStrategy)
            raise ValueError(f"unknown cache_strategy {value!r}; supported: {allowed}") from None

    @field_validator("enable_memory_pool")
    @classmethod
    def _pool_always(cls, value: bool) -> bool:
        if not value:
            raise ValueError(
                "false is not supported: the engine always preallocates its block pool (that is what "
                "prevents fragmentation); remove the field or set it to true"
            )
        return value

    @field_validator("enable_distributed")
    @classmethod
    def _one_process(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "true is not supported: one engine is one process; to spread a cache over processes "
                "or GPUs run several replicas (KVCacheClient shards chains over them)"
            )
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> KVCacheConfig:
        if self.memory_pool_size is not None:
            # The pool size wins; max_tokens reports what that pool holds (fp16-equivalent tokens),
            # so the config, get_stats() and the metrics never disagree with the allocation.
            derived = max(
                self.block_tokens, self.memory_pool_size // self.block_bytes_fp16() * self.block_tokens
            )
            if derived != self.max_tokens:
                object.__setattr__(self, "max_tokens", derived)
        if self.max_tokens < self.block_tokens:
            raise ValueError(
                f"max_tokens ({self.max_tokens}) must be at least block_tokens ({self.block_tokens})"
            )
        if self.memory_pool_size is not None and self.memory_pool_size < self.block_bytes_stored():
            raise ValueError(
                f"memory_pool_size ({self.memory_pool_size} bytes) is smaller than one block "
                f"({self.block_bytes_stored()} bytes)"
            )
        return self

    # --- derived values ----------------------------------------------------------------------------

    @property
    def codec(self) -> Codec:
        """The codec the engine stores blocks with."""
        if self.compression_codec != "auto":
            return self.compression_codec
        if not self.use_compression:
            return "none"
        return "int8" if self.compression_ratio >= 0.5 else "int4"

    def block_bytes_fp16(self) -> int:
        """Bytes of one block's K and V in fp16 (the budget unit)."""
        return 2 * self.num_layers * self.block_tokens * self.num_kv_heads * self.head_dim * 2

    def payload_layout(self) -> PayloadLayout:
        """The exact layout of one stored block with the configured codec and geometry."""
        return payload_layout(
            self.codec,
            num_layers=self.num_layers,
            block_tokens=self.block_tokens,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
        )

    def block_bytes_stored(self) -> int:
        """Bytes one block occupies in the pool with the configured codec (one pool slot)."""
        return self.payload_layout().slot_bytes

    def num_blocks(self) -> int:
        """Pool slots: memory_pool_size when set, else the max_tokens budget in fp16 bytes."""
        from kvcache_engine.contract.sizing import pool_blocks  # sizing builds on this model

        return pool_blocks(self)

    def to_manifest(self) -> dict[str, Any]:
        """camelCase dict for ConfigMaps and CRs (defaults omitted, enums as strings)."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)

    def to_file_dict(self) -> dict[str, Any]:
        """Full camelCase dict (every field) for the engine's config file."""
        return self.model_dump(mode="json", by_alias=True)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``KVCACHE_<FIELD>`` variables (snake_case field names, upper-cased) as raw values."""
    out: dict[str, Any] = {}
    for name in KVCacheConfig.model_fields:
        key = f"KVCACHE_{name.upper()}"
        if key in environ:
            raw = environ[key]
            try:
                out[name] = json.loads(raw)
            except json.JSONDecodeError:
                out[name] = raw
    return out


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line per problem: ``<source>.<field>: <message> (got <value>)``."""
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(root)"
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}.{loc}: {item['msg']}{shown}")
    return "\n".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> KVCacheConfig:
    """Read a YAML or JSON config file (snake_case or camelCase keys), apply ``KVCACHE_*`` env
    overrides, then keyword overrides. Raises ConfigError naming the field on bad input."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
        data = _parse_config_text(text, str(p))
    env = _env_overrides(os.environ if environ is None else environ)
    data = _merge_names(data, env)
    data = _merge_names(data, overrides)
    try:
        return KVCacheConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path) if path else "config")) from exc


def _parse_config_text(text: str, source: str) -> dict[str, Any]:
    import yaml  # YAML is a superset of JSON; one parser for both formats

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML/JSON: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: expected a mapping of config fields, got {type(loaded).__name__}")
    return loaded


def _merge_names(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` (snake_case) into ``base`` (either case) without leaving both spellings."""
    merged = dict(base)
    for name, value in extra.items():
        merged.pop(_camel(name), None)
        merged[name] = value
    return merged
