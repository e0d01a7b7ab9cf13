"""Placement: which replica holds a chain (route key + rendezvous hashing).

The client, the server's drain and the operator must agree on it byte for byte, so it is defined
once, here. A chain is placed by its block at depth ``route_depth`` (``route_key``); replicas are
ranked for that key by rendezvous hashing (``rendezvous_order``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from urllib.parse import urlsplit

__all__ = ["node_id", "rendezvous_order", "rendezvous_owner", "route_key"]


def node_id(endpoint: str) -> str:
    """Canonical identity of a replica for placement: ``host:port`` of its URL (lower-cased).

    ``http://10.0.0.5:8080/`` and ``10.0.0.5:8080`` are the same node; the client's endpoints and
    the drain's targets must use the same host spelling (both use what the operator publishes).
    """
    text = endpoint.strip()
    if "//" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if not parts.hostname:
        raise ValueError(f"endpoint {endpoint!r}: expected http://host:port")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def route_key(hashes: Sequence[int], route_depth: int) -> int:
    """The hash a chain is placed by: its block at depth ``route_depth`` (1-based), or its last
    block when the chain is shorter.

    Why not the first block: every prompt sharing a system prompt shares block 1, so placing by
    it puts all of them on one replica. Placing by a deeper block spreads chains while the shared
    shallow blocks (depth < ``route_depth``) are stored on every replica that owns a chain
    through them (each put carries its whole chain; that first miss-then-put per replica is the
    price). Consistency: every chain that shares its first ``route_depth`` blocks has one key,
    so lookup, get and put of a prompt and of its longer continuations meet on one replica. A
    prompt shorter than ``route_depth`` blocks is keyed by its last block and may therefore sit
    on another replica than the longer chains through it: its lookup then misses unless it was
    itself put before (a short prompt is the cheapest to recompute).
    """
    if route_depth < 1:
        raise ValueError(f"route_depth must be >= 1, got {route_depth}")
    if not hashes:
        raise ValueError("route_key: empty chain")
    return int(hashes[min(route_depth, len(hashes)) - 1])


def _score(node: str, root: int) -> int:
    digest = hashlib.blake2b(f"{node}|{root:016x}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def rendezvous_order(root: int, endpoints: Sequence[str]) -> list[str]:
    """Endpoints by descending rendezvous score for a chain's :func:`route_key` (``root``).

    Invariant: adding a replica moves only the chains whose new top scorer is that replica
    (about 1/N of them); removing one moves only its own chains. Ties (never in practice) break
    by node id so every process computes the same order.
    """
    return sorted(endpoints, key=lambda e: (_score(node_id(e), root), node_id(e)), reverse=True)


def rendezvous_owner(root: int, endpoints: Sequence[str]) -> str:
    """The replica that owns the chain whose :func:`route_key` is ``root``."""
    if not endpoints:
        raise ValueError("rendezvous_owner: no endpoints")
    return rendezvous_order(root, endpoints)[0]
