"""Transport settings of ``kvcache-engine serve``: limits, auth and where they come from
(command-line arguments, the token file or environment: the contract's ``resolve_token``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvcache_engine.contract.tokens import resolve_token

__all__ = ["ServerSettings", "settings_from_args"]


@dataclass
class ServerSettings:
    """Transport limits and auth. ``token`` None disables auth (a warning is logged)."""

    host: str = "0.0.0.0"
    port: int = 8080
    token: str | None = None
    token_file: str | None = None
    open_probes: bool = True
    max_body_bytes: int = 1024 * 1024 * 1024
    max_blocks_per_request: int = 4096
    body_timeout_s: float = 60.0
    drain_timeout_s: float = 60.0
    staging_bytes: int = 256 * 1024 * 1024


def settings_from_args(args: Any, environ: dict[str, str] | None = None) -> ServerSettings:
    token, token_file = resolve_token(args.token_file, environ)
    return ServerSettings(
        host=args.host,
        port=args.port,
        token=token,
        token_file=token_file,
        open_probes=not args.auth_probes,
        max_body_bytes=args.max_body_mb * 1024 * 1024,
        max_blocks_per_request=args.max_blocks,
        body_timeout_s=args.body_timeout_s,
        staging_bytes=args.staging_mb * 1024 * 1024,
    )
