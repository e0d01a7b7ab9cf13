"""The connection contract (the operator's ``<name>-connection`` ConfigMap, mounted into the
inference pod) and the geometry a client needs (from that contract, a config or ``/v1/config``).

Invariant: a contract of an unknown ``formatVersion`` or missing a required key is refused
with a ValueError naming the file and the keys, never half-read.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcache_engine.contract import DTYPE_BYTES, KVCacheConfig

__all__ = [
    "DEFAULT_PORT",
    "SUPPORTED_CONNECTION_VERSIONS",
    "ClientGeometry",
    "connection_config",
    "connection_kwargs",
    "connection_token_file",
    "read_connection",
]

log = logging.getLogger("kvcache_engine.client")

DEFAULT_PORT = 8080


@dataclass(frozen=True)
class ClientGeometry:
    """What the client must know to hash chains and shape tensors (from config or /v1/config)."""

    namespace: str
    block_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    route_depth: int = 2

    @classmethod
    def from_config(cls, cfg: KVCacheConfig) -> ClientGeometry:
        return cls(
            cfg.namespace, cfg.block_tokens, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype,
            cfg.route_depth,
        )  # fmt: skip

    def block_bytes(self) -> int:
        return (
            2
            * self.num_layers
            * self.block_tokens
            * self.num_kv_heads
            * self.head_dim
            * DTYPE_BYTES[self.dtype]
        )


# --- the connection contract (the operator's ``<name>-connection`` ConfigMap) --------------------

SUPPORTED_CONNECTION_VERSIONS = frozenset({1})
_CONNECTION_REQUIRED = (
    "formatVersion", "headlessService", "port", "tokenSecretKey", "numLayers", "numKvHeads", "headDim",
    "blockTokens", "dtype", "cacheNamespace",
)  # fmt: skip
_CONNECTION_INTS = frozenset({"formatVersion", "port", "numLayers", "numKvHeads", "headDim", "blockTokens",
                              "routeDepth"})  # fmt: skip


def read_connection(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The connection contract from a mounted ConfigMap: a directory holding ``connection.json``
    or one file per key (kubelet's ``..data`` symlink layout is read through), or the JSON file.

    Raises ValueError naming the file and the missing keys, or an unsupported ``formatVersion``.
    """
    where = Path(path)
    if where.is_dir() and not (where / "connection.json").is_file():
        info = _read_key_files(where)
        source = f"{where}/*"
    else:
        file = where / "connection.json" if where.is_dir() else where
        source = str(file)
        try:
            info = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"connection: cannot read {file}: {exc}") from None
        if not isinstance(info, dict):
            raise ValueError(f"connection: {file} must hold a JSON object")
    version = info.get("formatVersion")
    if version not in SUPPORTED_CONNECTION_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_CONNECTION_VERSIONS))
        raise ValueError(
            f"connection: formatVersion {version!r} in {source} is not supported by this client "
            f"(supported: {supported}); upgrade kvcache-engine on the inference side"
        )
    missing = [k for k in _CONNECTION_REQUIRED if k not in info]
    if missing:
        raise ValueError(f"connection: {source} lacks the keys {missing}")
    return info


def _read_key_files(directory: Path) -> dict[str, Any]:
    """One key per file; kubelet's bookkeeping entries (``..data``, ``..2026_...``) start with '..'."""
    info: dict[str, Any] = {}
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("..") or not entry.is_file():
            continue
        text = entry.read_text(encoding="utf-8").strip()
        if entry.name in _CONNECTION_INTS:
            try:
                info[entry.name] = int(text)
            except ValueError:
                raise ValueError(f"connection: {entry}: expected an integer, got {text!r}") from None
        else:
            info[entry.name] = text
    if not info:
        raise ValueError(f"connection: {directory} holds neither connection.json nor any key file")
    return info


def connection_config(info: dict[str, Any]) -> KVCacheConfig:
    """The client-side config (geometry, block size, namespace, placement) of a connection."""
    fields: dict[str, Any] = {
        "num_layers": info["numLayers"],
        "num_kv_heads": info["numKvHeads"],
        "head_dim": info["headDim"],
        "block_tokens": info["blockTokens"],
        "dtype": info["dtype"],
        "namespace": info["cacheNamespace"],
    }
    if "routeDepth" in info:  # absent from contracts published before placement by depth
        fields["route_depth"] = info["routeDepth"]
    try:
        # Capacity is the engine's business; it only has to admit one block to validate.
        return KVCacheConfig(max_tokens=max(8192, int(info["blockTokens"])), **fields)
    except ValueError as exc:
        raise ValueError(f"connection: invalid geometry: {exc}") from None


def connection_token_file(
    path: str | os.PathLike[str], info: dict[str, Any], environ: dict[str, str] | None = None
) -> str | None:
    """Where the token Secret is mounted: ``$KVCACHE_TOKEN_FILE``, else ``<path>-token/<tokenSecretKey>``
    (the layout of ``crds/samples/inference-deployment.yaml``) when that file exists, else None."""
    env = os.environ if environ is None else environ
    if env.get("KVCACHE_TOKEN_FILE"):
        return env["KVCACHE_TOKEN_FILE"]
    base = Path(path)
    directory = base if base.is_dir() else base.parent
    candidate = directory.with_name(directory.name + "-token") / str(info["tokenSecretKey"])
    return str(candidate) if candidate.is_file() else None


def connection_kwargs(path: str | os.PathLike[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments for a client built from a mounted connection; ``overrides`` win."""
    info = read_connection(path)
    kwargs: dict[str, Any] = {"config": connection_config(info)}
    if "endpoints" not in overrides:
        kwargs["service"] = f"{info['headlessService']}:{int(info['port'])}"
    if "token" not in overrides and "token_file" not in overrides:
        kwargs["token_file"] = connection_token_file(path, info)
        if kwargs["token_file"] is None:
            log.warning("kvcache client: no token file for %s (set KVCACHE_TOKEN_FILE)", path)
    kwargs.update(overrides)
    return kwargs
