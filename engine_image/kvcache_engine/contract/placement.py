"""Placement: which replica holds a chain (route key + rendezvous hashing).

The client, the server's drain and the operator must agree on it byte for byte, so it is defined
once, here. A chain is placed by its block at depth ``route_depth`` (``route_key``); replicas are
ranked for that key by rendezvous hashing (``rendezvous_order``). ``ShardMap``: the replica set
clients place chains over, with an epoch, as the operator publishes it in ``<name>-connection``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ShardMap", "node_id", "rendezvous_order", "rendezvous_owner", "route_key"]


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


@dataclass(frozen=True)
class ShardMap:
    """The replicas clients place chains over (``members``: node ids, sorted) and its ``epoch``
    (raised by the operator at every change). A member is published only once it holds its share
    (the warm join), so a client that switches to a newer map finds the chains where it looks;
    one still on the older map finds them too, because a join copies and never moves.

    In ``<name>-connection``: ``connection.json`` holds ``shardMapEpoch`` (int) and ``members``
    (a list); the per-key files hold ``shardMapEpoch`` and ``members`` comma-separated."""

    epoch: int
    members: tuple[str, ...]

    EPOCH_KEY = "shardMapEpoch"
    MEMBERS_KEY = "members"

    @classmethod
    def of(cls, epoch: int, endpoints: Sequence[str]) -> ShardMap:
        return cls(int(epoch), tuple(sorted({node_id(e) for e in endpoints})))

    @classmethod
    def from_connection(cls, info: Mapping[str, Any], source: str = "connection") -> ShardMap | None:
        """The map in a connection contract (None when it has none: a contract published before
        shard maps, or before any replica was warm). ValueError naming the key when malformed."""
        if cls.EPOCH_KEY not in info and cls.MEMBERS_KEY not in info:
            return None
        raw_epoch, raw_members = info.get(cls.EPOCH_KEY), info.get(cls.MEMBERS_KEY)
        try:
            epoch = int(str(raw_epoch).strip())
        except ValueError:
            raise ValueError(f"{source}: {cls.EPOCH_KEY} must be an integer, got {raw_epoch!r}") from None
        if isinstance(raw_members, str):
            items = [m for m in (part.strip() for part in raw_members.split(",")) if m]
        elif isinstance(raw_members, list) and all(isinstance(m, str) for m in raw_members):
            items = list(raw_members)
        else:
            raise ValueError(
                f"{source}: {cls.MEMBERS_KEY} must be a list of 'host:port' (or a comma-separated string), "
                f"got {raw_members!r}"
            )
        if epoch < 0:
            raise ValueError(f"{source}: {cls.EPOCH_KEY} must be >= 0, got {epoch}")
        try:
            return cls.of(epoch, items)
        except ValueError as exc:
            raise ValueError(f"{source}: {cls.MEMBERS_KEY}: {exc}") from None

    def to_connection(self) -> dict[str, Any]:
        """The keys of ``connection.json`` (the per-key files join ``members`` with commas)."""
        return {self.EPOCH_KEY: self.epoch, self.MEMBERS_KEY: list(self.members)}

    def urls(self) -> list[str]:
        return [f"http://{m}" for m in self.members]
