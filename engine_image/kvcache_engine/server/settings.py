"""Transport settings of ``kvcache-engine serve``: limits, auth and where they come from
(command-line arguments, the token file or environment: the contract's ``resolve_token``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvcache_engine.contract.lifecycle import HANDOFF_MIB_S, SHUTDOWN_HANDOFF_S
from kvcache_engine.contract.tokens import ADMIN, resolve_token

__all__ = ["ServerSettings", "settings_from_args"]


@dataclass
class ServerSettings:
    """Transport limits and auth (docs/security.md). ``token`` (data role) and ``admin_token``
    both None disables auth (a warning is logged); ``admin_token`` None leaves the data token
    every right (the one-token setup of older deployments, warned about at startup)."""

    host: str = "0.0.0.0"
    port: int = 8080
    token: str | None = None
    token_file: str | None = None
    admin_token: str | None = None
    admin_token_file: str | None = None
    open_probes: bool = True
    auth_metrics: bool = False
    max_json_bytes: int = 64 * 1024 * 1024
    max_json_depth: int = 32
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 75.0
    max_connections: int = 1024
    drain_peers: tuple[str, ...] = ()
    max_body_bytes: int = 1024 * 1024 * 1024
    max_blocks_per_request: int = 4096
    body_timeout_s: float = 60.0
    drain_timeout_s: float = 60.0
    handoff_mib_s: float = (
        HANDOFF_MIB_S  # drains, joins, shutdown hand-offs: at most this rate (0: unbounded)
    )
    shutdown_handoff_s: float = (
        SHUTDOWN_HANDOFF_S  # SIGTERM: at most this long copying chains to peers (0: off)
    )
    staging_bytes: int = 256 * 1024 * 1024


def settings_from_args(args: Any, environ: dict[str, str] | None = None) -> ServerSettings:
    token, token_file = resolve_token(args.token_file, environ)
    admin_token, admin_token_file = resolve_token(
        getattr(args, "admin_token_file", None), environ, role=ADMIN
    )
    return ServerSettings(
        host=args.host,
        port=args.port,
        token=token,
        token_file=token_file,
        admin_token=admin_token,
        admin_token_file=admin_token_file,
        open_probes=not args.auth_probes,
        auth_metrics=bool(getattr(args, "auth_metrics", False)),
        header_timeout_s=getattr(args, "header_timeout_s", 10.0),
        idle_timeout_s=getattr(args, "idle_timeout_s", 75.0),
        max_connections=getattr(args, "max_connections", 1024),
        max_json_depth=getattr(args, "max_json_depth", 32),
        drain_peers=tuple(getattr(args, "drain_peer", None) or ()),
        max_body_bytes=args.max_body_mb * 1024 * 1024,
        max_blocks_per_request=args.max_blocks,
        body_timeout_s=args.body_timeout_s,
        shutdown_handoff_s=getattr(args, "shutdown_handoff_s", SHUTDOWN_HANDOFF_S),
        handoff_mib_s=getattr(args, "handoff_mib_s", HANDOFF_MIB_S),
        staging_bytes=args.staging_mb * 1024 * 1024,
    )
