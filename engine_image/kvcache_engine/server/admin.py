"""Admin routes of the server: live config, persist, validate, compact, clear, snapshot (a KVS1
stream out), restore (a KVS1 stream in) and drain (every block pushed to the replica that owns
its chain).

Invariants: only live fields change through ``/admin/config`` (400 naming any other); a
snapshot holds copies taken under the engine lock, segment by segment; a restore of another
geometry is refused (409) before any block is imported; a drain keeps the parent rule on every
target (a block arrives after its ancestors).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvcache_engine.contract import (
    AdminError,
    ConfigError,
    LiveConfig,
    P,
    SyncAdminClient,
    node_id,
    rendezvous_owner,
    route_key,
)
from kvcache_engine.persistence import (
    SEGMENT_BYTES,
    GeometryMismatchError,
    check_geometry,
    decode_segment,
    geometry_of,
    iter_segments,
)
from kvcache_engine.server.body import read_exact
from kvcache_engine.server.http import REQUEST_ID, BadRequestError, dumps
from kvcache_engine.wire import (
    PREFIX_BYTES,
    SEGMENT_LEN,
    STREAM_CONTENT_TYPE,
    STREAM_MAGIC,
    TRAILER_LEN,
    WIRE_FORMAT_VERSION,
    decode_frame_header,
    decode_frame_prefix,
    encode_stream_header,
    encode_stream_segment,
    encode_stream_trailer,
)

if TYPE_CHECKING:
    from kvcache_engine.core.block_pool import StoredBlock
    from kvcache_engine.server.app import EngineServer

__all__ = ["SNAPSHOT_SEGMENT_BYTES", "AdminRoutes", "Throttle", "check_peer", "live_changes"]

log = logging.getLogger("kvcache_engine.server")

SNAPSHOT_SEGMENT_BYTES = 64 * 1024 * 1024
"""Segment size inside snapshot/drain streams (bounds the server's memory per stream)."""


class AdminRoutes:
    """``/admin/*`` of one server (bearer token: the middleware)."""

    def __init__(self, server: EngineServer) -> None:
        self.server = server
        self.engine = server.engine
        self.settings = server.settings
        self.persister = server.persister

    async def config(self, request: web.Request) -> web.Response:
        doc = await self.server.read_json(request)
        changes = live_changes(doc)
        await self.server.run(lambda: self.engine.reconfigure(**changes))
        if "log_level" in changes:
            logging.getLogger("kvcache_engine").setLevel(str(self.engine.config.log_level))
        log.info("config reloaded: %s", sorted(changes))
        return web.json_response({"config": self.engine.config.to_file_dict(), "applied": sorted(changes)})

    async def persist(self, request: web.Request) -> web.Response:
        ok = await self.server.run(self.persister.persist)
        st = self.persister.stats()
        return web.json_response({"ok": ok, "error": st["last_persist_error"], "stats": st})

    async def validate(self, request: web.Request) -> web.Response:
        report = dict(await self.server.run(self.engine.validate_cache_integrity))
        extra = [e for e in self.persister.integrity_errors() if e not in report.get("errors", [])]
        if extra:
            report["persistence_errors"] = extra
        return web.json_response(report, dumps=dumps)

    async def compact(self, request: web.Request) -> web.Response:
        return web.json_response({"compacted": await self.server.run(self.engine.compact_cache)}, dumps=dumps)

    async def clear(self, request: web.Request) -> web.Response:
        await self.server.run(self.engine.clear_cache)
        return web.json_response({"ok": True})

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        """Stream every block as a KVS1 stream (segments of copies taken under the engine lock);
        a block evicted meanwhile is left out, and the trailer carries the counts."""
        hashes = await self.server.run(self.engine.cached_hashes)
        segments = iter_segments(self.engine.export_blocks(hashes), SNAPSHOT_SEGMENT_BYTES)
        resp = web.StreamResponse(
            headers={"Content-Type": STREAM_CONTENT_TYPE, "X-Request-Id": request[REQUEST_ID]}
        )
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(encode_stream_header(self._stream_header()))
        blocks = count = 0
        while True:
            item = await self.server.run(next, segments, None)
            if item is None:
                break
            data, metas = item
            await resp.write(encode_stream_segment(data))
            await resp.write(data)
            blocks += len(metas)
            count += 1
        await resp.write(encode_stream_trailer({"blocks": blocks, "segments": count}))
        await resp.write_eof()
        return resp

    def _stream_header(self) -> dict[str, Any]:
        cfg = self.engine.config
        return {
            "format_version": WIRE_FORMAT_VERSION,
            "geometry": geometry_of(cfg),
            "codec": cfg.codec,
            "created_unix": time.time(),
        }

    async def restore(self, request: web.Request) -> web.Response:
        """Import a KVS1 stream (a snapshot, a backup being restored, or a drain push)."""
        reader = request.content
        async with asyncio.timeout(self.settings.body_timeout_s):
            hlen = decode_frame_prefix(await read_exact(reader, PREFIX_BYTES), STREAM_MAGIC)
            header = decode_frame_header(await read_exact(reader, hlen))
        try:
            check_geometry(header.get("geometry") or {}, self.engine.config, "restore stream")
        except GeometryMismatchError as exc:
            raise BadRequestError(str(exc), 409) from None
        imported = segments = offered = 0
        while True:
            async with asyncio.timeout(self.settings.body_timeout_s):
                (length,) = SEGMENT_LEN.unpack(await read_exact(reader, SEGMENT_LEN.size))
                if length == 0:
                    (tlen,) = TRAILER_LEN.unpack(await read_exact(reader, TRAILER_LEN.size))
                    trailer = decode_frame_header(await read_exact(reader, min(tlen, 1 << 20)))
                    break
                if length > 2 * SEGMENT_BYTES:
                    raise BadRequestError(
                        f"segment of {length} bytes exceeds the limit of {2 * SEGMENT_BYTES}", 413
                    )
                data = await read_exact(reader, length)
            blocks = await self.server.run(decode_segment, data, None, f"segment {segments}")
            offered += len(blocks)
            imported += await self.server.run(self.engine.import_blocks, blocks)
            segments += 1
        if trailer.get("blocks") not in (None, offered):
            raise BadRequestError(
                f"stream trailer says {trailer.get('blocks')} blocks, {offered} received (truncated?)"
            )
        return web.json_response(
            {"imported_blocks": imported, "offered_blocks": offered, "segments": segments}
        )

    async def drain(self, request: web.Request) -> web.Response:
        """``{"targets": [...]}``: push every block to the target owning its chain (a scale-in).
        ``{"targets": [...], "only": [...]}``: copy only the chains that the ``only`` targets own
        among ``targets`` and keep everything (a warm join: the joining replica's share)."""
        doc = await self.server.read_json(request)
        targets = doc.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise BadRequestError("targets: expected a non-empty list of 'http://host:port' strings")
        only = doc.get("only")
        if only is not None and (
            not isinstance(only, list) or not only or not all(isinstance(t, str) for t in only)
        ):
            raise BadRequestError(
                "only: expected a non-empty list of 'http://host:port' strings among targets"
            )
        for t in targets:
            check_peer(t, self.settings.drain_peers)  # 400/403 naming a malformed or foreign target
        nodes = {node_id(t) for t in targets}
        if only is not None and not {node_id(t) for t in only} <= nodes:
            raise BadRequestError(f"only: {only!r} must be among targets")
        report = await self.server.run(self.drain_to, targets, only)
        if only is None and report["ok"]:
            self.server.handed_off = True  # SIGTERM then has nothing left to hand off
        return web.json_response(report)

    async def placement(self, request: web.Request) -> web.Response:
        """The replica set clients place chains over now (the operator says so when it changes):
        the curve forgets the chains another replica owns."""
        doc = await self.server.read_json(request)
        endpoints, this = doc.get("endpoints"), doc.get("self")
        if not isinstance(endpoints, list) or not endpoints or not all(isinstance(e, str) for e in endpoints):
            raise BadRequestError("endpoints: expected a non-empty list of 'http://host:port' strings")
        if not isinstance(this, str):
            raise BadRequestError("self: expected this engine's 'http://host:port' among the endpoints")
        try:
            dropped = await self.server.run(self.engine.rebalance, endpoints, this)
        except ValueError as exc:
            raise BadRequestError(str(exc)) from None
        self.server.placement = (tuple(endpoints), this)  # the peers a shutdown hands off to
        return web.json_response({"ok": True, "forgotten_entries": dropped})

    def drain_to(
        self,
        targets: list[str],
        only: list[str] | None = None,
        *,
        deadline: float | None = None,
        room: Mapping[str, int] | None = None,
    ) -> dict[str, Any]:
        """Push every block to the replica owning its chain (:func:`route_key` at the engine's
        ``route_depth``, the client's function). A block at depth d >= route_depth goes to the
        owner of its ancestor at depth route_depth, preceded by the shallow ancestors (depth <
        route_depth) that target has not been sent yet, so every push keeps the parent rule: a
        shared system-prompt block goes to each target owning a chain through it, and nowhere
        else. A shallow block without children ended a short chain and goes to its own key's
        owner (after its ancestors). Export order is parents first, so one pass plus the
        short-chain tail suffices; only the shallow blocks are held in memory.

        ``only``: push only the chains these targets own (a warm join's share); nothing else is
        sent and nothing is removed here either way. ``deadline`` (monotonic): stop queueing
        blocks once it passes (a shutdown's bounded hand-off); ``complete`` says whether it did.
        ``room``: at most this many blocks to a target (a shutdown hand-off sends a peer only what
        its free slots hold, so the peer's own chains are never evicted for a visitor's);
        ``left_for_room`` counts the blocks that stayed home for that."""
        if only is not None:
            wanted = {node_id(t) for t in only}
            targets_sent = [t for t in targets if node_id(t) in wanted]
        else:
            targets_sent = list(targets)
        depth = self.engine.config.route_depth
        shallow: dict[int, tuple[int, ...]] = {}  # block -> its chain's first min(d, depth) hashes
        shallow_blocks: dict[int, StoredBlock] = {}  # blocks at depth < route_depth (ancestors to carry)
        has_child: set[int] = set()
        sent: dict[str, set[int]] = {t: set() for t in targets}
        pending: dict[str, list[StoredBlock]] = {t: [] for t in targets}
        sizes = dict.fromkeys(targets, 0)
        result: dict[str, dict[str, Any]] = {
            t: {"blocks": 0, "verified": 0, "ok": True, "error": None} for t in targets
        }
        held = 0
        complete = True
        keep = set(targets_sent)
        throttle = Throttle(self.settings.handoff_mib_s * 1024 * 1024)

        left: set[int] = set()  # blocks a full target did not get

        def add(owner: str, block: StoredBlock) -> None:
            if owner not in keep:
                return  # another target's chain (a join copies only the joiner's share)
            if room is not None and len(sent[owner]) >= room.get(owner, 0):
                left.add(int(block.hash))  # the target is full: nothing more to it (no orphan children)
                return
            sent[owner].add(int(block.hash))
            pending[owner].append(block)
            sizes[owner] += sum(t.numel() * t.element_size() for t in block.payload.values())
            if sizes[owner] >= SNAPSHOT_SEGMENT_BYTES:
                self._push(owner, pending[owner], result[owner], throttle)
                pending[owner], sizes[owner] = [], 0

        for block in self.engine.export_blocks(None):
            if deadline is not None and time.monotonic() > deadline:
                complete = False
                break
            held += 1
            h = int(block.hash)
            above = shallow.get(int(block.parent), ()) if block.parent is not None else ()
            path = (*above, h) if len(above) < depth else above
            shallow[h] = path
            if block.parent is not None:
                has_child.add(int(block.parent))
            if len(path) < depth:
                shallow_blocks[h] = block
                continue
            self._drain_with_ancestors(
                block, path, shallow_blocks=shallow_blocks, sent=sent, targets=targets, add=add
            )
        for h, block in shallow_blocks.items():
            if h not in has_child and complete:
                self._drain_with_ancestors(
                    block, shallow[h], shallow_blocks=shallow_blocks, sent=sent, targets=targets, add=add
                )
        for owner, blocks in pending.items():
            if blocks:
                self._push(owner, blocks, result[owner], throttle)
        reported = {t: result[t] for t in targets_sent}
        ok = all(r["ok"] for r in reported.values())
        drained = sum(int(r["blocks"]) for r in reported.values())
        # the proof: distinct blocks each target decoded and checksum-verified (its restore answer)
        delivered = set().union(*(sent[t] for t in targets_sent if result[t]["ok"]))
        verified = sum(int(r["verified"]) for r in reported.values())
        return {
            "ok": ok,
            "complete": complete,
            "targets": reported,
            "drained_blocks": drained,
            "held_blocks": held,
            "handed_off_blocks": len(delivered) if ok else 0,
            "verified_blocks": verified,
            "left_for_room": len(left - set().union(*sent.values())),
        }

    @staticmethod
    def _drain_with_ancestors(
        block: StoredBlock,
        path: tuple[int, ...],
        *,
        shallow_blocks: dict[int, StoredBlock],
        sent: dict[str, set[int]],
        targets: list[str],
        add: Callable[[str, StoredBlock], None],
    ) -> None:
        """Queue ``block`` for the owner of its chain's key, after the shallow ancestors it lacks."""
        owner = rendezvous_owner(route_key(path, len(path)), targets)
        for ancestor in path:
            if ancestor in shallow_blocks and ancestor != int(block.hash) and ancestor not in sent[owner]:
                add(owner, shallow_blocks[ancestor])
        add(owner, block)

    def _push(
        self, target: str, blocks: list[StoredBlock], result: dict[str, Any], throttle: Throttle
    ) -> None:
        if not result["ok"]:
            return  # the target failed earlier; do not hammer it
        data, metas = next(iter_segments(blocks, max_bytes=1 << 62))
        body = b"".join(
            [encode_stream_header(self._stream_header()), encode_stream_segment(data), data,
             encode_stream_trailer({"blocks": len(metas), "segments": 1})]
        )  # fmt: skip
        peer = SyncAdminClient(
            f"http://{node_id(target)}", self.server.admin_token(), timeout_s=self.settings.drain_timeout_s
        )
        try:
            answer = peer.call_raw("POST", P.ADMIN_RESTORE, body, content_type=STREAM_CONTENT_TYPE)
            result["blocks"] += len(metas)
            result["verified"] += int(answer.get("offered_blocks") or 0)
        except AdminError as exc:
            result["ok"] = False
            result["error"] = f"{type(exc).__name__}: {exc}"
            log.error("drain to %s failed: %s", target, exc)
        throttle.spend(len(body))
        throttle.wait()  # on average at most handoff_mib_s per drain: a hand-off never starves serving


class Throttle:
    """Bytes per second over one drain: ``wait()`` sleeps until what was spent fits the rate
    (0: unbounded). Each push (a segment of up to SNAPSHOT_SEGMENT_BYTES) goes out at once and is
    paid for after, so the rate holds on average, in bursts of at most one segment."""

    def __init__(self, bytes_per_s: float) -> None:
        self.rate = bytes_per_s
        self.started = time.monotonic()
        self.spent = 0

    def spend(self, nbytes: int) -> None:
        self.spent += nbytes

    def wait(self) -> float:
        """Sleep as needed; returns the seconds slept."""
        if self.rate <= 0:
            return 0.0
        ahead = self.spent / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)
            return ahead
        return 0.0


def check_peer(target: str, allowed: tuple[str, ...] = ()) -> str:
    """``host:port`` of a drain target, refused unless it is an IP literal inside ``allowed``
    (CIDRs or IPs; empty: private and loopback addresses). A drain carries every block and the
    admin token: never to a name DNS may turn into anything, a link-local address (cloud
    metadata) or a public one. BadRequestError 400 (malformed) or 403 (not a peer)."""
    try:
        node = node_id(target)
    except ValueError as exc:
        raise BadRequestError(f"targets: {exc}") from None
    host = node.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadRequestError(
            f"targets: {target!r} is not an IP address (drain peers are pod IPs)", 403
        ) from None
    if allowed:
        ok = any(ip in ipaddress.ip_network(net, strict=False) for net in allowed)
    else:
        ok = (ip.is_private or ip.is_loopback) and not ip.is_link_local and not ip.is_unspecified
    if not ok:
        where = ", ".join(allowed) if allowed else "private or loopback addresses"
        raise BadRequestError(f"targets: {target!r} is not a drain peer (allowed: {where})", 403)
    return node


def live_changes(doc: dict[str, Any]) -> dict[str, Any]:
    """snake_case live-field changes from a camelCase/snake_case body (the contract's LiveConfig);
    400 naming a bad field."""
    try:
        changes = LiveConfig.parse(doc, "body").given()
    except ConfigError as exc:
        raise BadRequestError(str(exc)) from None
    if not changes:
        raise BadRequestError("no config fields given")
    return changes
