"""The live config: the cache fields an engine applies without a restart (``POST /admin/config``).

``LiveConfig`` is typed and partial: a field left ``None`` is "not given". It is the one place
that knows which fields are live, converts between the wire's camelCase and Python's snake_case,
diffs (what differs from what an engine runs) and applies (a validated ``KVCacheConfig``).
Every other field of ``KVCacheConfig`` needs a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from kvcache_engine.contract.cache import CacheStrategy, ConfigError, KVCacheConfig, format_validation_error

__all__ = ["LIVE_FIELDS", "TUNED_FIELDS", "LiveConfig"]


class LiveConfig(BaseModel):
    """Live fields of ``KVCacheConfig`` (snake_case attributes, camelCase on the wire); ``None`` means
    "not given". Values are range-checked when applied to a ``KVCacheConfig``."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    max_tokens: int | None = None
    cache_strategy: CacheStrategy | None = None
    use_compression: bool | None = None
    compression_ratio: float | None = None
    compression_codec: Literal["auto", "none", "fp8", "int8", "int4"] | None = None
    enable_prefetch: bool | None = None
    prefetch_size: int | None = None
    enable_gc: bool | None = None
    gc_threshold: float | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = None
    persist_interval_s: float | None = None
    enable_profiling: bool | None = None

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def of(cls, config: KVCacheConfig) -> LiveConfig:
        """Every live field of ``config``."""
        return cls.model_validate({name: getattr(config, name) for name in LIVE_FIELDS})

    @classmethod
    def parse(cls, doc: Mapping[str, Any], source: str = "config") -> LiveConfig:
        """From a camelCase or snake_case mapping (a request body, an annotation). Raises ConfigError
        naming the field: unknown, not live (needs a restart), or of the wrong type."""
        aliases = {field.alias or name: name for name, field in KVCacheConfig.model_fields.items()}
        values: dict[str, Any] = {}
        for key, value in doc.items():
            name = key if key in KVCacheConfig.model_fields else aliases.get(str(key))
            if name is None:
                raise ConfigError(f"{source}: unknown config field {key!r}")
            if name not in LIVE_FIELDS:
                live = ", ".join(sorted(cls.wire_name(n) for n in LIVE_FIELDS))
                raise ConfigError(
                    f"{source}.{key}: cannot change live (needs a restart); live fields: {live}"
                )
            values[name] = value
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from exc

    @classmethod
    def is_live(cls, key: str) -> bool:
        """Whether ``key`` (camelCase or snake_case) names a live field."""
        return key in cls.model_fields or any(f.alias == key for f in cls.model_fields.values())

    @staticmethod
    def wire_name(name: str) -> str:
        """The camelCase spelling of a snake_case field name."""
        return to_camel(name)

    # --- reading ------------------------------------------------------------------------------------

    def given(self) -> dict[str, Any]:
        """The fields that are set, snake_case (Python values: enums stay enums)."""
        return {name: value for name, value in self if value is not None}

    def to_wire(self) -> dict[str, Any]:
        """The fields that are set, camelCase, JSON values (a request body, an annotation)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def __bool__(self) -> bool:
        return bool(self.given())

    # --- algebra ----------------------------------------------------------------------------------------

    def diff(self, running: LiveConfig) -> LiveConfig:
        """The fields set here whose value differs from ``running``'s (what to send an engine)."""
        theirs = running.given()
        return LiveConfig.model_validate({k: v for k, v in self.given().items() if theirs.get(k) != v})

    def over(self, base: LiveConfig) -> LiveConfig:
        """``base`` with the fields set here written over it."""
        return LiveConfig.model_validate({**base.given(), **self.given()})

    def apply(self, config: KVCacheConfig, source: str = "config") -> KVCacheConfig:
        """``config`` with these fields, validated (ConfigError naming the field when out of range)."""
        try:
            return KVCacheConfig.model_validate({**config.model_dump(), **self.given()})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from exc


LIVE_FIELDS: frozenset[str] = frozenset(LiveConfig.model_fields)
"""Fields the engine applies live (no restart); defined by ``LiveConfig``'s fields."""

TUNED_FIELDS: tuple[str, ...] = ("max_tokens", "use_compression", "compression_ratio")
"""The live fields the operator's tuner changes."""
